"""Every Triton kernel, at every configuration the dispatch can pick, compiled for Ampere (sm_80) and
Hopper (sm_90) on a machine without a GPU, and what the compiler says of each.

    python bench/compile_kernels.py        # the table (half a minute on 2 cores); exit 1 if anything is wrong

The kernel tests run through Triton's interpreter, which accepts programs the compiler rejects or
builds badly. Triton compiles without a GPU when it is given the target (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`), down to PTX and, through the ptxas that ships with it, a cubin. So
on any machine we can check what only the compiler knows:
  - registers per thread and spills: what ptxas says as it builds the cubin (its -v lines, which
    Triton prints when TRITON_DUMP_PTXAS_LOG is set; every launch is compiled afresh, past Triton's
    cache, so that ptxas runs);
  - shared memory per block: Triton's own count (the kernel's metadata), against the card's limit
    (sm_80: 163 KB, sm_90: 227 KB);
  - tensor cores: the matrix products of the attention kernels should be `mma` on sm_80 and `wgmma`,
    only, on sm_90 (fp32 inputs too: tl.dot takes them as tf32, Triton's default).
Speed, and agreement with the reference at size, need the GPU itself (`make gpu`).

The configurations come from the dispatch (`attention._config`, `cross_entropy._launch_config`), the
launches' arguments from the kernels' own signatures: the attention kernels are compiled causal
(the model's only use) at each head-dim bucket (16, 32, 64, 128, with HEAD_DIM at the bucket's top),
cross-entropy at three vocabulary sizes, one per path (V <= 1024, up to 2048, above: 4096-wide blocks),
for fp16, bf16 and fp32; what the dispatch leaves to PyTorch (`attention.spills`) is not compiled.
Pointers are marked 16-byte aligned, as PyTorch's allocations are. A launch also specialises each
integer argument divisible by 16, which changes the code (vectorised loads, fewer masks): each
configuration is compiled twice, with the strides and sequence lengths so marked (as in a GPT's
training; the head count, vocabulary size and ignore_index left general) and with none (ints "any").
"""
import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# while compiling here: ptxas's own count of registers and spills, printed as it runs; and past Triton's
# cache, where a kernel would be found without running ptxas
COMPILE_ENV = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from measure import markdown_table  # noqa: E402  (bench/ is on sys.path)

# by module path: the package's names `attention` and `cross_entropy` are its dispatching functions
att = importlib.import_module("gpt_kernels.attention")
ce = importlib.import_module("gpt_kernels.cross_entropy")

KERNELS = {"attention forward": att._fwd_kernel, "attention backward delta": att._bwd_delta_kernel,
           "attention backward dK dV": att._bwd_dkdv_kernel, "attention backward dQ": att._bwd_dq_kernel,
           "cross-entropy forward": ce._ce_forward_kernel, "cross-entropy backward": ce._ce_backward_kernel}
TARGETS = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # bytes per block an SM can give (opt-in maximum)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HEAD_DIMS = (16, 32, 64, 128)
VOCABS = (1000, 2000, 50257)  # one per path of _launch_config
FLOATS = ("qk_scale", "sm_scale")  # the kernels' float arguments; every other non-pointer is an int
COUNTS = ("H", "V", "ignore_index")  # ints that are rarely multiples of 16 (12 heads, 50257 tokens, -100)


@dataclasses.dataclass
class Launch:
    """One kernel at one configuration: what triton.compile needs, and the labels of the table."""
    kernel: str
    dtype: str
    shape: str  # "D=64" or "V=50257"
    pointers: dict  # argument name -> Triton pointer type ("*bf16"); every other argument not in constexprs is an int
    constexprs: dict
    num_warps: int
    num_stages: int
    matmul: bool  # does it multiply matrices (tensor cores expected)?
    ints_aligned: bool = True  # the strides and sequence lengths marked divisible by 16

    def source(self):
        fn = KERNELS[self.kernel]
        signature = {}
        for name in fn.arg_names:
            signature[name] = ("constexpr" if name in self.constexprs else self.pointers.get(name)
                               or ("fp32" if name in FLOATS else "i32"))
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in self.pointers
                   or (self.ints_aligned and signature[name] == "i32" and name not in COUNTS)}
        return ASTSource(fn, signature, constexprs=self.constexprs, attrs=aligned)


def launches():
    """(launch, target) for every launch the dispatch can make on Ampere and on Hopper, each with its
    integers marked divisible by 16 and not."""
    cuda = torch.device("cuda")  # a device object only: nothing here needs a GPU
    out = []
    for target, arch in TARGETS.items():
        capability = (arch // 10, arch % 10)
        for dtype, t in DTYPES.items():
            p = "*" + t
            for D in HEAD_DIMS:
                if att.spills(dtype, D, capability):  # the dispatch does not launch these (PyTorch's attention runs)
                    continue
                block_d = max(16, triton.next_power_of_2(D))
                cfg = att._config(block_d, dtype, cuda, capability)
                shared = dict(CAUSAL=True, HEAD_DIM=D, BLOCK_D=block_d)
                qkv = dict(Q=p, K=p, V=p, LSE="*fp32")

                def blocked(name, kernel, pointers):
                    block_m, block_n, warps, stages = cfg[name]
                    return Launch(kernel, t, f"D={D}", pointers, {**shared, "BLOCK_M": block_m, "BLOCK_N": block_n},
                                  warps, stages, matmul=True)
                delta_m, delta_warps = cfg["delta"]
                out += [(launch, target) for launch in [
                    blocked("fwd", "attention forward", {**qkv, "O": p}),
                    Launch("attention backward delta", t, f"D={D}", dict(O=p, DO=p, DELTA="*fp32"),
                           dict(HEAD_DIM=D, BLOCK_M=delta_m, BLOCK_D=block_d), delta_warps, 3, matmul=False),
                    blocked("dkdv", "attention backward dK dV", {**qkv, "DO": p, "DK": p, "DV": p, "DELTA": "*fp32"}),
                    blocked("dq", "attention backward dQ", {**qkv, "DO": p, "DQ": p, "DELTA": "*fp32"})]]
            for V in VOCABS:
                cfg = ce._launch_config(V, "cuda")
                rows = dict(LOGITS=p, TARGETS="*i64", LSE="*fp32")
                out += [(Launch("cross-entropy forward", t, f"V={V}", {**rows, "LOSS": "*fp32"},
                                dict(BLOCK_V=cfg["BLOCK_V"]), cfg["num_warps"], 3, matmul=False), target),
                        (Launch("cross-entropy backward", t, f"V={V}", {**rows, "DLOGITS": p, "GRAD": "*fp32"},
                                dict(BLOCK_V=cfg["BLOCK_V"]), cfg["num_warps"], 3, matmul=False), target)]
    return [(dataclasses.replace(launch, ints_aligned=aligned), target) for launch, target in out
            for aligned in (True, False)]


def compile_launch(launch, target):
    """Compile one launch for one target ("sm_80", "sm_90"). Returns the table's row: registers per
    thread, bytes of spill stores and loads per thread, shared memory, the tensor-core instruction the
    PTX uses, seconds."""
    start = time.perf_counter()
    log = io.StringIO()
    before = {k: os.environ.get(k) for k in COMPILE_ENV}
    os.environ.update(COMPILE_ENV)
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(launch.source(), target=GPUTarget("cuda", TARGETS[target], 32),
                                    options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    finally:  # the process may go on to run kernels (bench/gpu.py), which should use the cache
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - start
    log = log.getvalue()
    if "spill stores" not in log:  # a Triton that does not print ptxas's lines: run ptxas on the PTX ourselves
        log = ptxas_log(kernel.asm["ptx"], TARGETS[target])
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()))
    ptx = kernel.asm["ptx"]
    tensor_core = "+".join(name for name, op in (("wgmma", "wgmma."), ("mma", "mma.sync")) if op in ptx) or "-"
    return dict(kernel=launch.kernel, dtype=launch.dtype, shape=launch.shape, target=target,
                ints="÷16" if launch.ints_aligned else "any",
                blocks=" x ".join(f"{k}={v}" for k, v in launch.constexprs.items() if k.startswith("BLOCK")),
                warps=launch.num_warps, stages=launch.num_stages, registers=registers, spill_bytes=spills,
                shared=kernel.metadata.shared, tensor_core=tensor_core, matmul=launch.matmul, seconds=seconds)


def ptxas_log(ptx, arch):
    """ptxas -v's report on PTX for sm_<arch> (the ptxas that ships with Triton)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:  # the ptxas Triton itself uses for this architecture
            from triton.backends.nvidia.compiler import get_ptxas
            ptxas = get_ptxas(arch).path
        except (ImportError, AttributeError, TypeError):
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        return subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True,
                              check=True).stderr


def problems(row):
    """What is wrong with a compiled launch, as sentences (none: it is fine)."""
    found = []
    if row["spill_bytes"]:
        found.append(f"{row['spill_bytes']} bytes of spill stores and loads per thread")
    if row["shared"] > SHARED_LIMIT[row["target"]]:
        found.append(f"{row['shared']} bytes of shared memory, over {row['target']}'s {SHARED_LIMIT[row['target']]}")
    if row["matmul"]:
        want = "wgmma" if row["target"] == "sm_90" else "mma"  # and only it: no product left on the older path
        if row["tensor_core"] != want:
            found.append(f"its matrix products use {row['tensor_core']}, not {want}")
    return found


HEADER = ["kernel", "dtype", "shape", "ints", "target", "blocks", "warps", "stages", "registers", "spills (bytes)",
          "shared (KB)", "tensor cores", "compile s"]


def compile_all(workers=None):
    """Every launch on both targets, compiled `workers` at once (default: one per core): the rows. The
    workers are started afresh (spawn), not forked: a caller may have CUDA running (bench/speed.py)."""
    jobs = launches()
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_launch(*job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_job, jobs))


def _compile_job(job):
    return compile_launch(*job)


def table_rows(rows):
    return [[r["kernel"], r["dtype"], r["shape"], r["ints"], r["target"], r["blocks"], r["warps"], r["stages"],
             r["registers"], r["spill_bytes"], f"{r['shared'] / 1024:.0f}",
             r["tensor_core"] if r["matmul"] else "(no matmul)", f"{r['seconds']:.1f}"] for r in rows]


def summary(rows, seconds):
    """One line: how many compiled, and every problem found (or that there is none)."""
    bad = [f"{r['kernel']} {r['dtype']} {r['shape']} ints {r['ints']} {r['target']}: {p}"
           for r in rows for p in problems(r)]
    head = (f"{len(rows)} kernel launches compiled for {' and '.join(TARGETS)} in {seconds:.0f} s "
            f"(Triton {triton.__version__})")
    if not bad:
        return head + (": no spills, shared memory within each target's limit, tensor cores wherever a kernel "
                       "multiplies matrices")
    return head + f": {len(bad)} problems: " + "; ".join(bad)


def section():
    """For bench/speed.py: (title, header, rows, summary line)."""
    start = time.perf_counter()
    rows = compile_all()
    return ("Every Triton kernel compiled for Ampere and Hopper, without a GPU (bench/compile_kernels.py)",
            HEADER, table_rows(rows), summary(rows, time.perf_counter() - start))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=0, help="compiles at once (default: one per core)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"compiling {len(launches())} kernel launches for {' and '.join(TARGETS)} ...", file=sys.stderr, flush=True)
    rows = compile_all(args.workers)
    print(markdown_table(HEADER, table_rows(rows)))
    print("\n" + summary(rows, time.perf_counter() - start))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
