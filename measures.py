"""Measures of what a checkpoint knows, shared by the stages that report them and by report.py,
so that every figure of a stage is computed by the same function wherever it appears."""
import torch

from configs import QA_TOKENS
from data import tinymath, tinyworld
from data.batches import pack_responses, score_replies


@torch.no_grad()
def generate_batched(model, prompts, max_new_tokens, stop_tokens=(), batch_size=256, temperature=0.0, generator=None):
    """model.generate over a long list of prompts, batch_size at a time (greedy by default)."""
    if max_new_tokens <= 0:  # the prompts fill the context: nothing to say
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(prompts), batch_size):
        outs += model.generate(prompts[i:i + batch_size], max_new_tokens, temperature=temperature,
                               stop_tokens=stop_tokens, generator=generator)
    model.train(was_training)
    return outs


def fact_accuracy(model, tok, world=None, max_new_tokens=4, every=1):
    """Fraction of the world's facts the model completes greedily: "<Name>'s favourite colour is" ->
    " blue". Every character counts, those seen in SFT and those not; every=k takes every k-th fact
    only (a fixed sample, for a curve). Returns (accuracy, examples)."""
    world = world or tinyworld.default_world()
    pairs = tinyworld.fact_prompts(world)[::every]
    prompts = [[tok.eot_id] + tok.encode(p) for p, _ in pairs]
    outs = generate_batched(model, prompts, max_new_tokens, stop_tokens=[tok.eot_id])
    texts = [tok.decode(o) for o in outs]
    hits = [tinyworld.completes_fact(t, a) for t, (_, a) in zip(texts, pairs)]
    examples = [(p, a, t) for (p, a), t in zip(pairs, texts)]
    return sum(hits) / len(hits), examples


def qa_accuracy(model, tok, records, max_new_tokens=QA_TOKENS, n_examples=2):
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


def chat_replies(model, tok, questions, max_new_tokens=64, temperature=0.0, generator=None, batch_size=256):
    """Replies to single-turn user questions through the chat template, greedy unless a temperature
    is given. Returns (prompt ids, reply ids as generated, reply texts without the special tokens)."""
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in questions]
    limit = min(max_new_tokens, model.config.block_size - max(map(len, prompts)))
    outs = generate_batched(model, prompts, limit, stop_tokens=[tok.end_id, tok.eot_id],
                            temperature=temperature, generator=generator, batch_size=batch_size)
    texts = [tok.decode(t for t in o if t not in (tok.end_id, tok.eot_id)) for o in outs]
    return prompts, outs, texts


def gold_scores(model, tok, questions, max_new_tokens=64, world=None):
    """TinyWorld's gold rater on the model's greedy replies. Returns (scores, replies)."""
    world = world or tinyworld.default_world()
    texts = chat_replies(model, tok, questions, max_new_tokens)[2]
    return [tinyworld.gold_score(q, t, world) for q, t in zip(questions, texts)], texts


def win_rate(scores, baseline_scores):
    """The fraction of head-to-head comparisons won, a tie counting half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))
    return wins / len(scores)


def gold_win_rate(model, baseline, tok, questions, max_new_tokens=64, world=None, n_examples=3):
    """Head-to-head by TinyWorld's gold rater: the fraction of questions on which model's greedy reply
    scores higher than baseline's, a tie counting half. Returns {"win_rate", "score" and
    "baseline_score" (mean gold scores), "examples": (question, model's reply, baseline's reply)}."""
    a, mine = gold_scores(model, tok, questions, max_new_tokens, world)
    b, theirs = gold_scores(baseline, tok, questions, max_new_tokens, world)
    return {"win_rate": win_rate(a, b), "score": sum(a) / len(a), "baseline_score": sum(b) / len(b),
            "examples": list(zip(questions, mine, theirs))[:n_examples]}


def math_eval(model, tok, records, max_new_tokens=48, k=8, seed=1337, world=None, n_examples=2):
    """Held-out problems ({"question", "answer" ending in "#### n", optional "level"}): greedy accuracy
    (pass@1); the share solved by at least one of k answers sampled at temperature 1 (pass@k, when
    k > 0); given a TinyWorld world, the share of the reference's steps the greedy answers state
    correctly (`tinymath.check_steps`); the share of greedy answers that write steps before their
    "####" rather than the number alone ("worked"); the greedy answers' mean length in tokens.
    Overall, and for each level in "levels"; and "solved", each problem's greedy verdict. The same
    samples for the same seed."""
    questions = [r["question"] for r in records]
    _, outs, greedy = chat_replies(model, tok, questions, max_new_tokens)
    right = [tinyworld.check_answer(t, r["answer"]) for t, r in zip(greedy, records)]
    steps = [tinymath.check_steps(t, r["answer"], world)[1:] if world is not None else None
             for t, r in zip(greedy, records)]
    solved = right
    if k > 0:
        gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        sampled = chat_replies(model, tok, [q for q in questions for _ in range(k)], max_new_tokens,
                               temperature=1.0, generator=gen, batch_size=256)[2]
        solved = [any(tinyworld.check_answer(t, r["answer"]) for t in sampled[i * k:(i + 1) * k])
                  for i, r in enumerate(records)]

    def measures(rows):
        m = {"pass@1": sum(right[i] for i in rows) / len(rows), "n": len(rows)}
        if k > 0:
            m[f"pass@{k}"] = sum(solved[i] for i in rows) / len(rows)
        if world is not None:
            m["steps"] = sum(steps[i][0] for i in rows) / max(1, sum(steps[i][1] for i in rows))
        m["worked"] = sum(tinymath.shows_work(greedy[i]) for i in rows) / len(rows)
        m["length"] = sum(len(outs[i]) for i in rows) / len(rows)
        return m

    levels = sorted({r["level"] for r in records if "level" in r})
    result = measures(range(len(records)))
    result["levels"] = {lv: measures([i for i, r in enumerate(records) if r.get("level") == lv]) for lv in levels}
    result["examples"] = list(zip(questions, greedy))[:n_examples]
    result["solved"] = right  # each problem's greedy verdict, in order
    return result


@torch.no_grad()
def reward_accuracy(rm, tok, records, world=None, batch_size=32):
    """How often the reward model (a model.RewardModel) scores a pair's chosen reply above its rejected
    one, over the {"prompt", "chosen", "rejected"} records that fit in the context: {"all": fraction},
    and given a TinyWorld world, apart for its kinds of pair: "style" (both replies right, differing in
    manner: polite, plain, curt, rambling or rude), "facts" (one right, the other wrong, about a
    character that training pairs mention) and "facts_unseen" (the same about a character that no
    training pair mentions: records marked "split": "unseen"), and "style_pairs": for the style pairs,
    {"<chosen's style> > <rejected's style>": [ordered right, pairs]}, where its manner errs."""
    was_training = rm.training
    rm.eval()
    pairs = []
    for r in records:
        prompt = tok.render_prompt([{"role": "user", "content": r["prompt"]}])
        replies = [tok.encode(r[k]) + [tok.end_id] for k in ("chosen", "rejected")]
        if len(prompt) + max(map(len, replies)) <= rm.config.block_size:
            kind = None
            if world is not None:
                asked = world.parse_question(r["prompt"])
                right = {tinyworld.answers_right(asked, r[k]) for k in ("chosen", "rejected")}
                kind = ("facts_unseen" if r.get("split") == "unseen" else "facts") if right == {True, False} \
                    else "style" if right == {True} else None
            styles = " > ".join(tinyworld.style_of(r["prompt"], r[k], world) for k in ("chosen", "rejected")) \
                if kind == "style" else None
            pairs.append((prompt, replies, kind, styles))
    hits = {"all": [], "style": [], "facts": [], "facts_unseen": []}
    by_styles = {}
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        prompts, replies = [p for p, *_ in batch for _ in range(2)], [x for _, xs, *_ in batch for x in xs]
        r = score_replies(rm, prompts, replies)[0]
        for (_, _, kind, styles), won in zip(batch, (r[0::2] > r[1::2]).tolist()):
            hits["all"].append(won)
            if kind is not None:
                hits[kind].append(won)
            if styles is not None:
                by_styles.setdefault(styles, []).append(won)
    rm.train(was_training)
    result = {k: sum(v) / len(v) for k, v in hits.items() if v}
    if by_styles:
        result["style_pairs"] = {k: [sum(v), len(v)] for k, v in sorted(by_styles.items())}
    return result


@torch.no_grad()
def best_of_n(policy, rm, tok, questions, ns=(1, 2, 4, 8, 16), max_new_tokens=64, generator=None, world=None):
    """Best of n, the cheap use of a reward model: sample max(ns) replies per question at temperature 1,
    and for each n keep, of the first n, the one the reward model scores highest. Returns {"n": ns,
    "rm": mean reward-model score of the kept replies, and given a TinyWorld world "gold": their mean
    gold score}, one value per n. n = 1 is the plain sampled reply; where "gold" stops rising with
    "rm", picking harder for the reward model is picking its mistakes."""
    k = max(ns)
    prompts, outs, texts = chat_replies(policy, tok, [q for q in questions for _ in range(k)], max_new_tokens,
                                        temperature=1.0, generator=generator)
    was_training = rm.training
    rm.eval()
    scores = torch.cat([score_replies(rm, prompts[i:i + 64], outs[i:i + 64])[0].cpu()
                        for i in range(0, len(prompts), 64)]).view(len(questions), k)
    rm.train(was_training)
    result = {"n": list(ns), "rm": [], "gold": []}
    for n in ns:
        pick = scores[:, :n].argmax(1)
        result["rm"].append(scores[torch.arange(len(questions)), pick].mean().item())
        if world is not None:
            kept = [texts[i * k + j] for i, j in enumerate(pick.tolist())]
            gold = [tinyworld.gold_score(q, t, world) for q, t in zip(questions, kept)]
            result["gold"].append(sum(gold) / len(gold))
    if world is None:
        del result["gold"]
    return result


def plot_best_of_n(result, png):
    """The reward model's and the gold rater's mean score of the kept reply against n (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(result["n"], result["rm"], marker="o", label="reward model score")
    if "gold" in result:
        ax.plot(result["n"], result["gold"], marker="o", label="gold rater score")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["n"], [str(n) for n in result["n"]])
    ax.set_xlabel("n (replies sampled, the highest-scored kept)")
    ax.set_ylabel("mean score of the kept reply")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def describe_qa(result, label):
    """qa_accuracy's result as the line a stage prints: accuracy, on seen and unseen characters, and the
    replies that end their turn."""
    splits = "".join(f", {s} {result[s]:.1%}" for s in ("seen", "unseen") if s in result)
    return (f"{label}: held-out QA {result['accuracy']:.1%}{splits}; replies ending with <|end|> "
            f"{result['format']:.1%} (of {result['n']} questions)")


def describe_math(result, label, k):
    """math_eval's result as the lines a stage prints: pass@1 and pass@k overall and by level, steps
    right, the greedy answers' length and how many work the steps, and a few examples (taken out)."""
    levels = result["levels"]
    by_level = "; ".join(f"level {lv}: {m['pass@1']:.0%} / {m[f'pass@{k}']:.0%}" for lv, m in levels.items())
    steps = f", steps right {result['steps']:.1%}" if "steps" in result else ""
    lines = [f"{label}: held-out pass@1 {result['pass@1']:.1%}, pass@{k} {result[f'pass@{k}']:.1%}{steps}, "
             f"greedy answers {result['length']:.1f} tokens long, {result['worked']:.0%} of them worked step by step "
             f"(of {result['n']} problems)" + (f"\n    pass@1 / pass@{k} by {by_level}" if levels else "")]
    lines += [f"    {question!r}\n      -> {answer!r}" for question, answer in result.pop("examples")]
    return "\n".join(lines)


def facts_arrival(log):
    """The steps at which pre-training's facts curve (eval/facts in its log) first reaches 10%, 50% and 90%
    ({level: step, or None where it never did}), and its last value: where the plateau ends and how
    sharp the jump is."""
    points = [(r["step"], r["eval/facts"]) for r in log if isinstance(r.get("eval/facts"), (int, float))]
    first = {level: next((step for step, v in points if v >= level), None) for level in (0.1, 0.5, 0.9)}
    return first, (points[-1][1] if points else None)


def describe_facts_arrival(log):
    """A sentence on the facts curve for the report, from facts_arrival."""
    first, last = facts_arrival(log)
    if last is None:
        return "pre-training's log has no facts curve (eval/facts; --facts_every=0 turns it off)."
    reached = [f"{level:.0%} at step {step}" for level, step in first.items() if step is not None]
    never = [f"{level:.0%}" for level, step in first.items() if step is None]
    said = ("fact completion on a fixed half of the world's facts during pre-training first reaches "
            + ", ".join(reached) if reached else "fact completion during pre-training never reaches 10%")
    return said + (f" (never {' or '.join(never)})" if reached and never else "") + f", and ends at {last:.0%}."


def plot_reward_vs_gold(log_path, png):
    """PPO's learned reward (the reward model's score) and the true one (the gold rater's) per step:
    where they part, the policy is exploiting the reward model."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in map(json.loads, open(log_path)) if "rollout/gold" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["rollout/score"] for r in rows], label="reward model score")
    ax.plot([r["step"] for r in rows], [r["rollout/gold"] for r in rows], label="gold rater score")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("mean over the step's rollouts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


@torch.no_grad()
def text_loss(model, ids, n_windows=64, batch_size=16):
    """Mean next-token loss on the first n_windows non-overlapping windows of a token tensor: the
    same windows for every model, so the losses compare."""
    T = model.config.block_size
    n = min(n_windows, (len(ids) - 1) // T)
    if n == 0:
        raise ValueError(f"a text of {len(ids)} tokens has no full window of {T + 1}")
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        starts = range(i * T, min(i + batch_size, n) * T, T)
        x = torch.stack([ids[s:s + T] for s in starts]).to(model.lm_head.weight.device)
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts]).to(x.device)
        total += model(x, y).item() * len(starts)
    model.train(was_training)
    return total / n


@torch.no_grad()
def kl_to_reference(model, ref, tok, questions, max_new_tokens=64, generator=None):
    """KL(model || ref) per reply, estimated on replies sampled from model at temperature 1: the mean
    over replies of the sum over reply tokens of log model(y_t) - log ref(y_t). Zero when they agree."""
    prompts, outs, _ = chat_replies(model, tok, questions, max_new_tokens, temperature=1.0, generator=generator)
    was_training = model.training, ref.training
    model.eval(), ref.eval()
    total = 0.0
    for i in range(0, len(prompts), 64):
        x, y, mask = pack_responses(prompts[i:i + 64], outs[i:i + 64])
        x, y, mask = x.to(model.lm_head.weight.device), y.to(model.lm_head.weight.device), mask.to(model.lm_head.weight.device)
        total += (mask * (ref(x, y, reduction="none") - model(x, y, reduction="none"))).sum().item()
    model.train(was_training[0]), ref.train(was_training[1])
    return total / len(prompts)
