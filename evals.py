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



def qa_accuracy(model, tok, records, max_new_tokens=96, n_examples=2):
    """Greedy answers to held-out questions asked through the chat template (sft_test.jsonl's records:
    {"messages": [user], "answer", "split"}). A reply is correct when it contains the answer as a word
    (`tinyworld.answer_correct`); it is well formed when it ends with <|end|> within max_new_tokens
    (or the room the context leaves). Returns {"accuracy", "format", "n", then for each split (seen,
    unseen) its accuracy and "n_<split>", and "examples": n_examples (question, answer, reply) per split}."""
    prompts = [tok.render_prompt(r["messages"]) for r in records]
    limit = min(max_new_tokens, model.config.block_size - max(map(len, prompts)))
    outs = generate_batched(model, prompts, limit, stop_tokens=[tok.end_id, tok.eot_id])
    ended = [o[-1:] == [tok.end_id] for o in outs]
    replies = [tok.decode(t for t in o if t not in (tok.end_id, tok.eot_id)) for o in outs]
    correct = [tinyworld.answer_correct(text, r["answer"]) for text, r in zip(replies, records)]
    result = {"accuracy": sum(correct) / len(records), "format": sum(ended) / len(records), "n": len(records)}
    examples = []
    for split in sorted({r.get("split", "all") for r in records}):
        rows = [i for i, r in enumerate(records) if r.get("split", "all") == split]
        result[split] = sum(correct[i] for i in rows) / len(rows)
        result[f"n_{split}"] = len(rows)
        examples += [(records[i]["messages"][-1]["content"], records[i]["answer"], replies[i])
                     for i in rows[:n_examples]]
    result["examples"] = examples
    return result
