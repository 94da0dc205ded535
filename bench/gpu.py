"""make gpu: the single-GPU path proven by one command, in under 8 minutes on one H100 or H200.

    python3 bench/gpu.py        (or: make gpu PY=python3 where PyTorch, Triton and pytest are installed already)

1. the kernel and model tests, compiled on the GPU: bf16 and fp16, head dims 64 and 128, T up to 8192,
   V = 50257 and 128256, a cross-entropy over more than 2**31 logits; and every kernel compiled for
   Ampere and Hopper with ptxas's count of registers and spills (bench/compile_kernels.py);
2. benchmarks side by side in one run: attention against SDPA's flash backend (TFLOP/s); cross-entropy
   against F.cross_entropy, eager and compiled (time, peak memory); the chunked linear cross-entropy's
   peak memory against materialised logits; GPT-2 small's training tokens/s and MFU, ours against the
   same model on SDPA + F.cross_entropy, with and without torch.compile;
3. the TinyWorld journey at GPU size: `make demo` in a scratch copy of the repository, and its table;
4. bench/RESULTS-gpu.md with all of it, and a summary as the last lines.

Without a GPU the same run is dry: the Triton kernels through the interpreter, tiny
shapes, `torch.compile` with its eager backend, the journey at toy size (PRESET=smoke), and the file
goes to --out, never over the committed GPU results. tests/test_gpu_bench.py runs it so CI keeps it working.
--only=training,journey reruns some sections (of tests, compile, attention, cross_entropy, training, journey;
on a GPU into bench/RESULTS-gpu-partial.md), when GPU minutes are short.
The file is rewritten after every section, and the journey, last, is cut to what --budget leaves, so a
run inside a lent GPU's 600 s command ends with its results written.
"""
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

try:
    import torch
except ImportError:  # make gpu takes python3 where there is no .venv: say what to do, in one line
    print(f"error: {sys.executable} has no PyTorch: run `make venv` first, or `make gpu PY=<a python with torch>`",
          file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CUDA = torch.cuda.is_available()
DRY = not CUDA  # without a GPU, the dry run: tiny shapes, Triton's interpreter, the toy journey
START_ENV = {k: os.environ[k] for k in ("KERNELS", "TRITON_INTERPRET") if k in os.environ}
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU tensors
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402
from run import peak_flops  # noqa: E402
import gpt_kernels  # noqa: E402
import model as model_module  # noqa: E402
from measure import device_name, fmt, fwd_bwd, markdown_table, peak_extra_mb, time_ms, triton_version  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train_step import PLAIN, step_time  # noqa: E402

TEST_FILES = ["tests/test_attention.py", "tests/test_cross_entropy.py", "tests/test_model.py"]


@dataclass
class Config:
    out: str = "out/gpu"               # scratch (the journey's copy, logs); a dry run's RESULTS-dry.md goes here
    only: str = ""                     # sections to run, comma-separated: tests, compile, attention, cross_entropy,
                                       # training, journey (empty: all; a partial GPU run writes RESULTS-gpu-partial.md)
    tests_timeout: int = 240           # seconds before the tests are stopped (an empty Triton cache compiles a lot)
    compile_timeout: int = 240         # seconds before bench/compile_kernels.py is stopped
    journey_timeout: int = 240         # seconds before the journey is stopped and reported as over time
    budget: int = 540                  # seconds for the whole run (a lent GPU's command gets 600): the journey,
                                       # last, gets at most what the sections before it left


# ----------------------------------------------------------------------------- 1. the tests

def run_tests(cfg):
    """pytest on the kernel and model tests; (title, header, rows, summary line)."""
    t0 = time.time()
    log = Path(cfg.out) / "tests.log"
    rc = run_logged([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES], log,
                    cfg.tests_timeout, cwd=ROOT)
    lines = log.read_text().strip().splitlines() or ["(no output)"]
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED", "ERROR"))]
    result = f"stopped after {cfg.tests_timeout} s" if rc is None else lines[-1].strip("= ")
    rows = [[" ".join(TEST_FILES), "compiled on the GPU" if not DRY else "Triton interpreter, CPU",
             result, f"{time.time() - t0:.0f}"]] + [["", "", f, ""] for f in failed]
    return ("The kernel and model tests", ["files", "kernels", "result", "seconds"], rows,
            f"tests: {result}" + ("" if rc == 0 else f" (FAILED, see {log})"))


def run_compile(cfg):
    """bench/compile_kernels.py, every kernel built for Ampere and Hopper, in a process of its own (a dry
    run's interpreter cannot compile); (title, header, rows, summary line)."""
    from compile_kernels import HEADER, table_rows
    log, rows_file = Path(cfg.out) / "compile.log", Path(cfg.out) / "compile.json"
    rows_file.unlink(missing_ok=True)
    rc = run_logged([sys.executable, "bench/compile_kernels.py", f"--json={rows_file}"], log, cfg.compile_timeout,
                    cwd=ROOT, env={k: v for k, v in clean_env().items() if k != "TRITON_INTERPRET"})
    lines = log.read_text().strip().splitlines() or ["(no output)"]
    rows = table_rows(json.loads(rows_file.read_text())) if rows_file.is_file() else []
    line = f"stopped after {cfg.compile_timeout} s" if rc is None else lines[-1]
    return ("Every Triton kernel compiled for Ampere and Hopper (bench/compile_kernels.py)", HEADER, rows,
            f"compile: {line}" + ("" if rc == 0 else f" (FAILED, see {log})"))


def run_logged(cmd, log, timeout, cwd=None, env=None):
    """cmd's exit code, its output in log; None if it ran past timeout, and then it and every process it
    started (its own process group) are stopped, so none keeps the GPU busy after us."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env or clean_env(),
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


# ----------------------------------------------------------------------------- 2. benchmarks

def attention_section(device):
    """Causal attention, ours (Triton) against SDPA's flash backend, forward and forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, dtype = (1, 1, torch.float32) if DRY else (4, 16, torch.bfloat16)
    shapes = [(16, 16), (32, 32)] if DRY else [(T, D) for T in (1024, 2048, 4096, 8192) for D in (64, 128)]
    reps = 1 if DRY else 10

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours(q, k, v):
        out = gpt_kernels.attention(q, k, v, causal=True)
        assert gpt_kernels.last_backend["attention"] == "triton"
        return out

    rows, speedups = [], []
    for T, D in shapes:
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        fwd_flops = 4 * B * H * T * T * D / 2  # two matmuls, half of the causal scores skipped
        with torch.no_grad():
            fwd = time_ms([lambda: ours(q, k, v), lambda: sdpa_flash(q, k, v)], device, warmup=reps, reps=reps)
        both = time_ms([fwd_bwd(ours, (q, k, v), do), fwd_bwd(sdpa_flash, (q, k, v), do)], device, warmup=reps,
                       reps=reps)
        # the backward does five matmuls to the forward's two: 3.5 times the forward's flops in all
        for name, (t_ours, t_sdpa), flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", both, 3.5 * fwd_flops)):
            rows.append([B, H, T, D, name, fmt(t_ours, 3), fmt(t_sdpa, 3), fmt(flops / t_ours / 1e9, 1),
                         fmt(flops / t_sdpa / 1e9, 1), fmt(t_sdpa / t_ours)])
            if name == "fwd+bwd":
                speedups.append(t_sdpa / t_ours)
    header = ["B", "H", "T", "D", "pass", "ours ms", "SDPA flash ms", "ours TFLOP/s", "SDPA TFLOP/s", "speed vs SDPA"]
    title = f"Attention, causal, {str(dtype).replace('torch.', '')}: ours (Triton) vs SDPA's flash backend"
    return title, header, rows, f"attention fwd+bwd: {min(speedups):.2f}x to {max(speedups):.2f}x SDPA flash"


def compiled(fn):
    # a dry run checks the plumbing: the eager backend traces the same graph without inductor's minutes of codegen
    return torch.compile(fn, backend="eager" if DRY else "inductor", dynamic=False)


def cross_entropy_section(device):
    """Cross-entropy forward+backward on given logits, and the linear one against materialised logits."""
    N, C, dtype = (4, 16, torch.float32) if DRY else (16384, 768, torch.bfloat16)
    rows, ratios, reps = [], [], 1 if DRY else 10
    for V in ((100, 300) if DRY else (50257, 128256)):
        logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, V, (N,), device=device)
        hidden = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        weight = (0.02 * torch.randn(V, C, device=device, dtype=dtype)).requires_grad_()

        def ours(x):
            loss = gpt_kernels.cross_entropy(x, targets)
            assert gpt_kernels.last_backend["cross_entropy"] == "triton"
            return loss

        eager = lambda x: F.cross_entropy(x, targets)  # noqa: E731
        cases = [  # name, fn, inputs
            ("F.cross_entropy, eager", eager, (logits,)),
            ("F.cross_entropy, torch.compile", compiled(eager), (logits,)),
            ("gpt_kernels.cross_entropy (ours)", ours, (logits,)),
            ("F.cross_entropy(hidden @ weight.T)", lambda h, w: F.cross_entropy(h @ w.T, targets), (hidden, weight)),
            (f"gpt_kernels.linear_cross_entropy (ours, chunks of {N // 4})",
             lambda h, w: gpt_kernels.linear_cross_entropy(h, w, targets, chunk_size=N // 4), (hidden, weight)),
        ]
        runs = [fwd_bwd(fn, inputs) for _, fn, inputs in cases]
        times = time_ms(runs, device, warmup=reps, reps=reps)
        mems = [peak_extra_mb(run, device) for run in runs]
        rows += [[V, name, fmt(t, 3), fmt(m, 0)] for (name, _, _), t, m in zip(cases, times, mems)]
        ratios.append((times[0] / times[2], mems[2] / mems[0] if mems[0] else None,
                       mems[4] / mems[3] if mems[3] else None))
    title = f"Cross-entropy forward+backward, N={N} tokens, {str(dtype).replace('torch.', '')} (linear: C={C})"
    speed, mem, lin = ratios[-1]
    summary = (f"cross-entropy (V={V}): {speed:.2f}x F.cross_entropy eager, peak memory "
               f"{'n/a' if mem is None else f'{mem:.2f}x'}; linear cross-entropy peak memory "
               f"{'n/a' if lin is None else f'{lin:.2f}x'} materialised logits")
    return title, ["V", "op", "ms", "peak extra MiB"], rows, summary


def training_section(device):
    """GPT-2 small (124M, T=1024, bf16) training steps: ours against SDPA + F.cross_entropy, eager and compiled."""
    if DRY:
        cfg, batch, steps = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=16), 1, 1
    else:
        cfg, batch, steps = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 16, 10
    torch.manual_seed(0)
    gpt = GPT(cfg).to(device)
    opt = gpt.configure_optimizer(1e-4, 0.1)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device) for _ in range(2))
    n_params = gpt.num_params()
    flops_per_token = gpt.flops_per_token(cfg.block_size)  # 6 per parameter per token, plus attention's
    peak = peak_flops(device.type)  # a GPU's bf16 data sheet; a CPU's own large fp32 matmul, measured now
    seconds, backend, failed, mode = {}, {}, {}, os.environ["KERNELS"]
    for is_compiled in (False, True):
        for name in ("ours", "plain"):
            model_module.gpt_kernels = gpt_kernels if name == "ours" else PLAIN
            # dry, torch.compile would trace Triton's interpreter itself: the compiled rows take the torch path
            os.environ["KERNELS"] = "torch" if DRY and is_compiled else mode
            try:
                seconds[name, is_compiled] = step_time(compiled(gpt) if is_compiled else gpt, opt, x, y, device.type,
                                                       steps, warmup=min(steps, 2))
            except Exception as e:  # a compile that fails is a finding; the other rows still get measured
                failed[name, is_compiled] = f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            finally:
                model_module.gpt_kernels = gpt_kernels
            backend[name, is_compiled] = (f"{gpt_kernels.last_backend.get('attention', '?')}/"
                                          f"{gpt_kernels.last_backend.get('cross_entropy', '?')}")
    os.environ["KERNELS"] = mode
    tok_s = {key: batch * cfg.block_size / s for key, s in seconds.items()}
    mfu = {key: t * flops_per_token / peak if peak else None for key, t in tok_s.items()}
    ratio = {(name, c): seconds[("plain", c)] / seconds[(name, c)] if ("plain", c) in seconds else None
             for name, c in seconds}
    rows = []
    for name, is_compiled in backend:
        key = (name, is_compiled)
        cells = [fmt(seconds[key] * 1e3, 1), f"{tok_s[key]:,.0f}", "n/a" if mfu[key] is None else f"{mfu[key]:.1%}",
                 "n/a" if ratio[key] is None else f"{ratio[key]:.3f}x"] if key in seconds else [failed[key], "", "", ""]
        rows.append([f"ours (kernels: {backend[key]})" if name == "ours" else "plain (SDPA + F.cross_entropy)",
                     "torch.compile" if is_compiled else "eager", *cells])
    title = (f"Training: GPT {cfg.n_layer} layers x {cfg.n_embd} wide ({n_params / 1e6:.1f}M), vocab {cfg.vocab_size}, "
             f"T={cfg.block_size}, batch {batch}, {'fp32' if device.type == 'cpu' else 'bf16 autocast'}, AdamW")
    speeds = [f"{ratio['ours', c]:.2f}x the SDPA baseline {'compiled' if c else 'eager'}"
              for c in (False, True) if ratio.get(("ours", c))]
    summary = ("training: ours " + ", ".join(speeds) if speeds else "training: no comparison measured") + \
        (f"; best MFU {max(v for v in mfu.values() if v is not None):.1%}" if peak and mfu else "") + \
        (f"; FAILED: {len(failed)} of 4 runs" if failed else "")
    return title, ["model", "mode", "ms/step", "tokens/s", "MFU", "speed vs plain"], rows, summary


# ----------------------------------------------------------------------------- 3. the journey

SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "out", "tinyworld", "real", "__pycache__", ".pytest_cache",
                                   ".hypothesis", "tests", "bench")


def run_journey(cfg):
    """`make demo` (PRESET=smoke when dry) in a fresh copy of the repository under --out; the report's table."""
    work = Path(cfg.out) / "journey"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT, work, ignore=SKIP_COPY)
    cmd = ["make", "-C", str(work), "demo", f"PY={sys.executable}"] + (["PRESET=smoke"] if DRY else [])
    log = Path(cfg.out) / "journey.log"
    print(f"journey: {' '.join(cmd)} (log: {log})", flush=True)
    t0 = time.time()
    rc = run_logged(cmd, log, cfg.journey_timeout)
    seconds = time.time() - t0
    report = work / "out" / "report.md"
    if rc != 0 or not report.is_file():
        tail = log.read_text().strip().splitlines()[-5:]
        what = f"stopped after {cfg.journey_timeout} s" if rc is None else f"failed (exit {rc})"
        return "The TinyWorld journey", [what], [[line] for line in tail], f"journey: {what}, see {log}"
    lines = report.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))  # the report's first table
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    grpo = next((r for r in rows if r[0].startswith("4 GRPO")), None)
    math = f", GRPO's math {grpo[header.index('math')]}" if grpo and "math" in header else ""
    title = f"The TinyWorld journey, {'toy size (PRESET=smoke)' if DRY else 'GPU size'}: make demo in {seconds:.0f} s"
    return title, header, rows, f"journey: {seconds:.0f} s{math}"


# ----------------------------------------------------------------------------- 4. the report

def main(cfg):
    device = torch.device("cuda" if CUDA else "cpu")
    # on a GPU the dispatch's own choice (Triton on CUDA tensors); dry, the Triton code itself through the interpreter
    os.environ["KERNELS"] = "triton" if DRY else "auto"
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    names = {"tests": partial(run_tests, cfg), "compile": partial(run_compile, cfg),
             "attention": partial(attention_section, device),
             "cross_entropy": partial(cross_entropy_section, device), "training": partial(training_section, device),
             "journey": partial(run_journey, cfg)}
    chosen = [n.strip() for n in cfg.only.split(",") if n.strip()] or list(names)
    if set(chosen) - set(names):
        raise cli.UserError(f"--only={cfg.only}: sections are {', '.join(names)}")
    partial_run = len(chosen) < len(names)
    results = (Path(cfg.out) / "RESULTS-dry.md" if DRY else
               ROOT / "bench" / ("RESULTS-gpu-partial.md" if partial_run else "RESULTS-gpu.md"))
    started = time.time()
    parts = [
        "# make gpu: the single-GPU path" + (" (dry run, CPU: plumbing only, no figure here is a GPU's)" if DRY else ""),
        "",
        f"- device: {device_name(device)}" + (", dry run, CPU" if DRY else ""),
        f"- driver: {driver_version()}; torch {torch.__version__}, triton {triton_version()}, "
        f"Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "- command: `make gpu` (`python3 bench/gpu.py`); times are medians (CUDA events on a GPU, wall clock on a CPU)",
    ]
    sections = [names[n] for n in names if n in chosen]
    summary = []
    for section in sections:
        t0 = time.time()
        if section.func is run_journey:  # stopped at the budget, it is reported as over time, not killed unwritten
            cfg.journey_timeout = min(cfg.journey_timeout, max(1, int(started + cfg.budget - t0)))
        try:
            title, header, rows, line = section()
        except Exception as e:  # one broken section must not cost the GPU minutes the others measure
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            traceback.print_exc()
            title, header, rows, line = f"{section.func.__name__} failed", ["error"], [[error]], f"FAILED: {error}"
        table = markdown_table(header, rows)
        print(f"\n## {title}\n\n{table}\n({time.time() - t0:.0f} s)", flush=True)
        parts += ["", f"## {title}", "", table]
        summary.append(line)
        results.write_text("\n".join(parts + [""]))  # after every section: a run stopped later keeps these
    parts += ["", f"Wall time: {time.time() - started:.0f} s", ""]
    results.write_text("\n".join(parts))
    print(f"\nmake gpu{' (dry run, CPU)' if DRY else ''} on {device_name(device)} in {time.time() - started:.0f} s:")
    for line in summary:
        print("  " + line)
    print(f"wrote {results}")
    if any("FAILED" in line or "failed" in line or "stopped" in line for line in summary):
        sys.exit(1)


def clean_env():
    """The environment this script started with: the tests and the journey choose their own kernels."""
    return {k: v for k, v in os.environ.items() if k not in ("KERNELS", "TRITON_INTERPRET")} | START_ENV


def driver_version():
    if not CUDA:
        return "none"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    cli.run_main(main, Config)
