"""Generation speed: tokens per second of GPT.generate at the demo's model shape, and our sampler
against torch.multinomial on the same probabilities.

Rollouts (PPO, GRPO) and every evaluation run on generate, so its speed is a large share of the
demo's time. The rows: 64 prompts of 20-40 tokens continued by 64 tokens, greedy and sampled; and a
rollout's shape, where each row stops at its own length (40 of the vocabulary's tokens count as stop
tokens for the random model, so rows end after about 30 tokens) and stopped rows leave the batch.

    python bench/sampling.py      # this table alone; bench/speed.py puts it in bench/RESULTS.md
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig, sample_next  # noqa: E402


def tokens_per_second(model, prompts, n, rounds, **kw):
    rates = []
    for i in range(rounds + 1):  # the first round warms up
        t0 = time.perf_counter()
        outs = model.generate(prompts, n, generator=torch.Generator(model.lm_head.weight.device).manual_seed(i), **kw)
        if i:
            rates.append(sum(map(len, outs)) / (time.perf_counter() - t0))
    return statistics.median(rates)


def seconds(fn, rounds=50):
    fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


@torch.no_grad()
def bench_sampling(device, rounds=3):
    cfg = GPTConfig(rope=True)  # the pre-training script's CPU default
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (int(torch.randint(20, 41, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]
    stops = torch.randperm(cfg.vocab_size, generator=g)[:40].tolist()
    rows = []
    for label, kw in [("64 prompts x 64 new tokens, greedy", dict(temperature=0.0)),
                      ("64 prompts x 64 new tokens, sampled", dict(temperature=1.0)),
                      ("a rollout: 64 prompts, each stops on its own (sampled)",
                       dict(temperature=1.0, stop_tokens=stops))]:
        rows.append([label, f"{tokens_per_second(model, prompts, 64, rounds, **kw):,.0f} new tokens/s"])
    probs = torch.randn(64, cfg.vocab_size, generator=g).mul(3).softmax(-1).to(device)
    gen = torch.Generator(device).manual_seed(0)
    ours = seconds(lambda: sample_next(probs.log(), 1.0, generator=gen))
    multinomial = seconds(lambda: torch.multinomial(probs, 1, generator=gen))
    rows.append([f"one draw for 64 rows of {cfg.vocab_size} tokens: ours (inverse CDF) vs torch.multinomial",
                 f"{ours * 1e3:.3f} ms vs {multinomial * 1e3:.3f} ms ({multinomial / ours:.1f}x)"])
    title = (f"Generation: GPT {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, random weights, "
             f"KV cache (median of {rounds} runs)")
    return title, ["workload", "speed"], rows


if __name__ == "__main__":
    title, header, rows = bench_sampling(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(title)
    for row in [header] + rows:
        print(" | ".join(row))
