"""Our GPT's training step against the same GPT calling PyTorch's ops directly (SDPA + F.cross_entropy).

The two differ only in what `model.gpt_kernels` points at, so the gap is exactly the cost (or gain) of
our dispatch and kernels. Runs are interleaved (ours, plain, plain, ours, ...) so that the machine's
drift hits both alike and neither always runs first; the table gives the median of each.

    python bench/train_step.py      # this table alone; bench/speed.py puts it in bench/RESULTS.md
"""
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt_kernels  # noqa: E402
import model as model_module  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PLAIN = types.SimpleNamespace(
    attention=lambda q, k, v, causal=True: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    cross_entropy=lambda logits, targets, ignore_index=-100, reduction="mean": F.cross_entropy(
        logits.float(), targets, ignore_index=ignore_index, reduction=reduction),
)


def step_time(gpt, opt, x, y, device, steps, warmup=1):
    """Seconds per optimizer step (forward, backward, AdamW), after warm-up steps (where a compile happens)."""
    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = gpt(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_train_step(device, rounds=5, steps=3):
    device = device.type
    if device == "cuda":  # GPT-2 small at T=1024
        cfg, batch = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8
    else:  # the pre-training script's CPU default
        cfg, batch = GPTConfig(vocab_size=1458, block_size=128, n_layer=4, n_head=4, n_embd=128), 16
    torch.manual_seed(0)
    gpt = GPT(cfg).to(device)
    opt = gpt.configure_optimizer(1e-4, 0.1)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    times = {"ours": [], "plain": []}
    for r in range(rounds):
        for name in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):  # neither always runs first
            model_module.gpt_kernels = gpt_kernels if name == "ours" else PLAIN
            try:
                times[name].append(step_time(gpt, opt, x, y, device, steps))
            finally:
                model_module.gpt_kernels = gpt_kernels
    tokens = batch * cfg.block_size
    ours, plain = statistics.median(times["ours"]), statistics.median(times["plain"])
    backend = gpt_kernels.last_backend.get("attention", "?") + "/" + gpt_kernels.last_backend.get("cross_entropy", "?")
    title = (f"Training step: GPT {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
             f"T={cfg.block_size}, batch {batch} (median of {rounds} interleaved rounds of {steps} steps)")
    header = ["model", "ms/step", "tokens/s", "speed vs plain"]
    rows = [[f"ours (kernels: {backend})", f"{ours * 1e3:.1f}", f"{tokens / ours:,.0f}", f"{plain / ours:.3f}x"],
            ["plain (SDPA + F.cross_entropy)", f"{plain * 1e3:.1f}", f"{tokens / plain:,.0f}", "1.000x"]]
    return title, header, rows


if __name__ == "__main__":
    title, header, rows = bench_train_step(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(title)
    for row in [header] + rows:
        print(" | ".join(row))
