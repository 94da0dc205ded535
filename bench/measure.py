"""How the benchmarks measure and print: interleaved medians, peak memory, markdown tables, the device's name.

Shared by bench/speed.py (make bench) and bench/gpu.py (make gpu).
"""
import platform
import statistics
import time

import torch


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


def triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"
