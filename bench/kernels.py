"""Speed and memory of our kernels against PyTorch's own ops; prints a table and writes bench/RESULTS.md.

    .venv/bin/python bench/kernels.py        (or: make bench)

On a GPU: the Triton attention against F.scaled_dot_product_attention's flash backend (causal, bf16,
forward and forward+backward, TFLOP/s), and the fused cross-entropy and the chunked linear
cross-entropy against F.cross_entropy on materialised logits (time and peak extra memory).
On a CPU the dispatch runs PyTorch's own ops, so we check that going through `kernels` costs nothing
against calling those ops directly. Every number in RESULTS.md comes from the run that wrote it.
"""
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["KERNELS"] = "auto"  # measure the dispatch's own choice: Triton on CUDA tensors, PyTorch elsewhere
import kernels  # noqa: E402
from sampling import bench_sampling  # noqa: E402  (bench/ is on sys.path as the script's folder)
from train_step import bench_train_step  # noqa: E402

try:
    import triton
    TRITON_VERSION = triton.__version__
except ImportError:
    TRITON_VERSION = "not installed"


# ----------------------------------------------------------------------------- measuring

def time_ms(fns, device, warmup=3, reps=10):
    """Median milliseconds of each function, run interleaved so that drifts of the machine hit all alike."""
    for fn in fns:
        for _ in range(warmup):  # the first calls compile the Triton kernels
            fn()
    samples = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, samples):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(s) for s in samples]


def peak_extra_mb(fn, device):
    """Peak memory allocated while fn runs, above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def fwd_bwd(fn, inputs, grad_out=None):
    """fn(*inputs) and its backward; the gradients are dropped after, so that each run starts clean."""
    def run():
        out = fn(*inputs)
        out.backward(grad_out)
        for t in inputs:
            t.grad = None
    return run


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- GPU: attention

def gpu_attention(device):
    rows = []
    for H in (12, 16):
        for T in (2048, 4096):
            for D in (64, 128):
                rows += attention_rows(device, 4, H, T, D)
    header = ["B", "H", "T", "D", "pass", "ours ms", "SDPA flash ms", "ours TFLOP/s", "SDPA TFLOP/s", "speed vs SDPA"]
    return "Attention, causal, bf16: Triton (ours) vs F.scaled_dot_product_attention (flash backend)", header, rows


def attention_rows(device, B, H, T, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours(q, k, v):
        out = kernels.attention(q, k, v, causal=True)
        assert kernels.last_backend["attention"] == "triton"
        return out

    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    fwd_flops = 4 * B * H * T * T * D / 2  # two matmuls, half of the causal scores skipped
    with torch.no_grad():
        fwd = time_ms([lambda: ours(q, k, v), lambda: sdpa_flash(q, k, v)], device)
    both = time_ms([fwd_bwd(ours, (q, k, v), do), fwd_bwd(sdpa_flash, (q, k, v), do)], device)
    rows = []
    # the backward does five matmuls to the forward's two: 3.5 times the forward's flops in all
    for name, (t_ours, t_sdpa), flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", both, 3.5 * fwd_flops)):
        rows.append([B, H, T, D, name, fmt(t_ours, 3), fmt(t_sdpa, 3), fmt(flops / t_ours / 1e9, 0),
                     fmt(flops / t_sdpa / 1e9, 0), fmt(t_sdpa / t_ours)])
    return rows


# ----------------------------------------------------------------------------- GPU: cross-entropy

def gpu_cross_entropy(device):
    N, V, C = 16384, 50257, 768
    logits = torch.randn(N, V, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    hidden = torch.randn(N, C, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.02 * torch.randn(V, C, device=device, dtype=torch.bfloat16)).requires_grad_()

    def ours(x):
        loss = kernels.cross_entropy(x, targets)
        assert kernels.last_backend["cross_entropy"] == "triton"
        return loss

    cases = [  # name, fn, inputs
        ("F.cross_entropy (bf16 logits given)", lambda x: F.cross_entropy(x, targets), (logits,)),
        ("kernels.cross_entropy (ours)", ours, (logits,)),
        ("F.cross_entropy(hidden @ weight.T)", lambda h, w: F.cross_entropy(h @ w.T, targets), (hidden, weight)),
        ("kernels.linear_cross_entropy (ours, chunks of 4096)",
         lambda h, w: kernels.linear_cross_entropy(h, w, targets), (hidden, weight)),
    ]
    runs = [fwd_bwd(fn, inputs) for _, fn, inputs in cases]
    times = time_ms(runs, device)
    mems = [peak_extra_mb(run, device) for run in runs]
    rows = [[name, fmt(t, 3), fmt(m, 0)] for (name, _, _), t, m in zip(cases, times, mems)]
    title = f"Cross-entropy forward+backward, N={N} tokens, V={V}, bf16 (linear: C={C})"
    return title, ["op", "ms", "peak extra MiB"], rows


# ----------------------------------------------------------------------------- CPU: the dispatch costs nothing

def cpu_dispatch(device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4, 256, 64, generator=gen, requires_grad=True) for _ in range(3))
    logits = torch.randn(2048, 4096, generator=gen, requires_grad=True)
    targets = torch.randint(0, 4096, (2048,), generator=gen)
    hidden = torch.randn(2048, 256, generator=gen, requires_grad=True)
    weight = (0.02 * torch.randn(4096, 256, generator=gen)).requires_grad_()

    def via_kernels_attention(q, k, v):
        out = kernels.attention(q, k, v, causal=True)
        assert kernels.last_backend["attention"] == "torch"
        return out.sum()

    def via_kernels_ce(x):
        loss = kernels.cross_entropy(x, targets)
        assert kernels.last_backend["cross_entropy"] == "torch"
        return loss

    pairs = [  # what, through kernels, directly, inputs
        ("attention (4, 4, 256, 64) fwd+bwd", via_kernels_attention,
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), (q, k, v)),
        ("cross_entropy (2048, 4096) fwd+bwd", via_kernels_ce,
         lambda x: F.cross_entropy(x.float(), targets), (logits,)),
        ("linear_cross_entropy (2048x256 @ 256x4096) fwd+bwd, chunked vs whole logits",
         lambda h, w: kernels.linear_cross_entropy(h, w, targets, chunk_size=512),
         lambda h, w: F.cross_entropy(h @ w.T, targets), (hidden, weight)),
    ]
    rows = []
    for what, through, direct, inputs in pairs:
        t_kernels, t_direct = time_ms([fwd_bwd(through, inputs), fwd_bwd(direct, inputs)], device, warmup=3, reps=15)
        rows.append([what, fmt(t_kernels), fmt(t_direct), fmt(t_kernels / t_direct), "n/a"])
    header = ["op", "via kernels ms", "torch op directly ms", "ratio", "peak memory"]
    return "CPU: the dispatch (PyTorch path) vs the PyTorch op called directly", header, rows


# ----------------------------------------------------------------------------- report

def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # each section returns (title, header, rows); the model's training-step comparison joins these lists
    sections = [gpu_attention, gpu_cross_entropy] if device.type == "cuda" else [cpu_dispatch]
    sections += [bench_train_step, bench_sampling]
    started = time.time()
    parts = [
        "# Kernel benchmarks",
        "",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, triton {TRITON_VERSION}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "- command: `.venv/bin/python bench/kernels.py`; times are medians (CUDA events on a GPU, wall clock on a CPU)",
    ]
    if device.type != "cuda":
        parts.append("- no GPU in this run: the Triton kernels' speed and memory are not measured here")
    for section in sections:
        title, header, rows = section(device)
        table = markdown_table(header, rows)
        print(f"\n## {title}\n\n{table}")
        parts += ["", f"## {title}", "", table]
    parts += ["", f"Benchmark wall time: {time.time() - started:.0f} s", ""]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(parts))
    print(f"\nwrote {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
