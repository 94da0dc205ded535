"""Speed and memory of our kernels against PyTorch's own ops; prints a table and writes bench/RESULTS.md.

    .venv/bin/python bench/speed.py        (or: make bench)

On a GPU: make gpu's attention and cross-entropy tables (bench/gpu.py, which runs much more: the
tests compiled, GPT-2 small's MFU, the journey at GPU size). On a CPU the dispatch runs PyTorch's own ops, so we check that going through `gpt_kernels` costs nothing
against calling those ops directly. Every number in RESULTS.md comes from the run that wrote it.
"""
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["KERNELS"] = "auto"  # measure the dispatch's own choice: Triton on CUDA tensors, PyTorch elsewhere
import gpt_kernels  # noqa: E402
from measure import device_name, fmt, fwd_bwd, markdown_table, time_ms, triton_version  # noqa: E402  (bench/ is on sys.path)
from demo_times import bench_demo_times  # noqa: E402
from sampling import bench_sampling  # noqa: E402
from train_step import bench_train_step  # noqa: E402

# ----------------------------------------------------------------------------- CPU: the dispatch costs nothing

def cpu_dispatch(device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4, 256, 64, generator=gen, requires_grad=True) for _ in range(3))
    logits = torch.randn(2048, 4096, generator=gen, requires_grad=True)
    targets = torch.randint(0, 4096, (2048,), generator=gen)
    hidden = torch.randn(2048, 256, generator=gen, requires_grad=True)
    weight = (0.02 * torch.randn(4096, 256, generator=gen)).requires_grad_()

    def via_kernels_attention(q, k, v):
        out = gpt_kernels.attention(q, k, v, causal=True)
        assert gpt_kernels.last_backend["attention"] == "torch"
        return out.sum()

    def via_kernels_ce(x):
        loss = gpt_kernels.cross_entropy(x, targets)
        assert gpt_kernels.last_backend["cross_entropy"] == "torch"
        return loss

    pairs = [  # what, through kernels, directly, inputs
        ("attention (4, 4, 256, 64) fwd+bwd", via_kernels_attention,
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), (q, k, v)),
        ("cross_entropy (2048, 4096) fwd+bwd", via_kernels_ce,
         lambda x: F.cross_entropy(x.float(), targets), (logits,)),
        ("linear_cross_entropy (2048x256 @ 256x4096) fwd+bwd, chunked vs whole logits",
         lambda h, w: gpt_kernels.linear_cross_entropy(h, w, targets, chunk_size=512),
         lambda h, w: F.cross_entropy(h @ w.T, targets), (hidden, weight)),
    ]
    rows = []
    for what, through, direct, inputs in pairs:
        t_kernels, t_direct = time_ms([fwd_bwd(through, inputs), fwd_bwd(direct, inputs)], device, warmup=3, reps=15)
        rows.append([what, fmt(t_kernels), fmt(t_direct), fmt(t_kernels / t_direct), "n/a"])
    header = ["op", "via kernels ms", "torch op directly ms", "ratio", "peak memory"]
    return "CPU: the dispatch (PyTorch path) vs the PyTorch op called directly", header, rows


def compile_section():
    """bench/compile_kernels.py's table, where Triton's CUDA backend is installed (Linux)."""
    try:
        from compile_kernels import section
    except ImportError as e:
        print(f"no compile table: {e}", file=sys.stderr)
        return None
    return section()


# ----------------------------------------------------------------------------- report

def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # each section returns (title, header, rows[, a line for under the table]); the model's training-step
    # comparison joins these lists
    if device.type == "cuda":  # make gpu's measures of the kernels, and its own file: bench/RESULTS-gpu.md
        from gpu import attention_section, cross_entropy_section
        sections = [lambda d: attention_section(d)[:3], lambda d: cross_entropy_section(d)[:3]]
    else:
        sections = [cpu_dispatch]
    sections += [bench_train_step, bench_sampling]
    started = time.time()
    parts = [
        "# Kernel benchmarks",
        "",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, triton {triton_version()}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "- command: `.venv/bin/python bench/speed.py`; times are medians (CUDA events on a GPU, wall clock on a CPU)",
    ]
    if device.type != "cuda":
        parts.append("- no GPU in this run: the Triton kernels' speed and memory are not measured here")
    sections.append(lambda d: bench_demo_times(d, ROOT / "out"))  # None until a make demo has run
    sections.append(lambda d: compile_section())  # every kernel built for Ampere and Hopper: no GPU needed
    for section in sections:
        result = section(device)
        if result is None:
            continue
        title, header, rows, *note = result  # a section may end with a line said under its table
        table = markdown_table(header, rows)
        print(f"\n## {title}\n\n{table}" + "".join(f"\n\n{line}" for line in note))
        parts += ["", f"## {title}", "", table] + [x for line in note for x in ("", line)]
    parts += ["", f"Benchmark wall time: {time.time() - started:.0f} s", ""]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(parts))
    print(f"\nwrote {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
