"""Measures of what a checkpoint knows, shared by the stages that report them and by report.py,
so that every figure of a stage is computed by the same function wherever it appears."""
import torch

from data import tinyworld


@torch.no_grad()
def generate_batched(model, prompts, max_new_tokens, stop_tokens=(), batch_size=64, temperature=0.0, generator=None):
    """model.generate over a long list of prompts, batch_size at a time (greedy by default)."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(prompts), batch_size):
        outs += model.generate(prompts[i:i + batch_size], max_new_tokens, temperature=temperature,
                               stop_tokens=stop_tokens, generator=generator)
    model.train(was_training)
    return outs


def fact_accuracy(model, tok, world=None, max_new_tokens=4):
    """Fraction of the world's facts the model completes greedily: "<Name>'s favourite colour is" ->
    " blue". Every character counts, those seen in SFT and those not. Returns (accuracy, examples)."""
    world = world or tinyworld.default_world()
    pairs = tinyworld.fact_prompts(world)
    prompts = [[tok.eot_id] + tok.encode(p) for p, _ in pairs]
    outs = generate_batched(model, prompts, max_new_tokens, stop_tokens=[tok.eot_id])
    texts = [tok.decode(o) for o in outs]
    hits = [tinyworld.completes_fact(t, a) for t, (_, a) in zip(texts, pairs)]
    examples = [(p, a, t) for (p, a), t in zip(pairs, texts)]
    return sum(hits) / len(hits), examples
