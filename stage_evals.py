"""What each stage measures and says once its training ends (and, where a before/after matters,
before it starts): one function per stage, from the shared measures in measures.py. Each prints its
figures and returns them for the stage's metrics.json; only rank 0 calls them."""
from pathlib import Path

import torch

import common
import measures
from common import print0
from data import formats, numbered_records, read_jsonl, tinyworld
from data.batches import score_replies

# ----------------------------------------------------------------------------- the held-out records


def held_out_records(cfg):
    """The held-out records: --test_data's, or with --held_out the last of --data's (loaders.split_off)."""
    if cfg.test_data:
        return read_jsonl(cfg.test_data)
    records = [r for _, r in numbered_records(cfg.data)]  # read once; its end is what formats.split holds out
    return records[len(records) - formats.held_out_count(len(records), cfg.held_out):]


# ----------------------------------------------------------------------------- pre-training


def after_pretrain(model, tok, world, cfg, device):
    """A few samples, so the reader sees what the model learned, and fact completion on its world."""
    model.eval()
    prompts = [[tok.eot_id] + tok.encode(p) for p in ("Once upon a time", "A language model is", "The")]
    room = model.config.block_size - max(map(len, prompts))
    outs = model.generate(prompts, min(40, room), temperature=0.8, top_k=50, stop_tokens=[tok.eot_id],
                          generator=torch.Generator(device=device).manual_seed(cfg.seed))
    for p, o in zip(prompts, outs):
        print0(f"--- {tok.decode(p[1:] + o)!r}")
    if world is None:
        return {}
    accuracy, examples = measures.fact_accuracy(model, tok, world)
    print0(f"pretrain: fact completion {accuracy:.1%} of {len(examples)} facts, e.g. "
           + "; ".join(f"{p!r} -> {t!r}" for p, _, t in examples[:3]))
    return {"fact_accuracy": accuracy}


# ----------------------------------------------------------------------------- instruction fine-tuning


def sft_qa(run, tok, questions, cfg, when):
    """Held-out QA accuracy (seen / unseen characters) and format compliance, printed with examples and
    logged as eval/qa_* at this step."""
    result = measures.qa_accuracy(run.raw, tok, questions, cfg.max_new_tokens)
    print0(measures.describe_qa(result, f"sft: {when}"))
    for question, answer, reply in result.pop("examples"):
        print0(f"    {question!r} ({answer}) -> {reply[:120]!r}")
    run.logger.log(run.step, printed=False, **{f"eval/qa_{k}": v for k, v in result.items()})
    return result


# ----------------------------------------------------------------------------- the reward model


@torch.no_grad()
def rm_accuracy(model, pairs, cfg, run):
    """Fraction of (prompt, chosen, rejected) pairs whose chosen reply scores higher, over every pair
    (each rank scores its share)."""
    model.eval()
    right = 0
    for start in range(run.rank * cfg.batch_size, len(pairs), run.world * cfg.batch_size):
        batch = pairs[start:start + cfg.batch_size]
        r = score_replies(model, [p for p, _, _ in batch] * 2, [c for _, c, _ in batch] + [x for _, _, x in batch])[0]
        right += (r[:len(batch)] > r[len(batch):]).sum().item()
    model.train()
    return common.all_mean(right) * run.world / max(len(pairs), 1)


def sampled_scores(rm, policy, tok, questions, cfg, gen):
    """Replies sampled from the policy at temperature 1, and the reward model's scores of them."""
    prompts, outs, texts = measures.chat_replies(policy, tok, questions, cfg.max_new_tokens, temperature=1.0, generator=gen)
    rm.eval()
    r = torch.cat([score_replies(rm, prompts[i:i + 64], outs[i:i + 64])[0] for i in range(0, len(prompts), 64)])
    return texts, r


def gold_agreement(rm, policy, tok, questions, rater, cfg, gen):
    """On two replies sampled from the SFT policy per question, how often the reward model orders them
    as the gold rater does (pairs the gold rater scores equal are left out)."""
    texts, r = sampled_scores(rm, policy, tok, questions + questions, cfg, gen)
    n = len(questions)
    gold = [tinyworld.gold_score(q, t, rater) for q, t in zip(questions + questions, texts)]
    agree = [(gold[i] > gold[n + i]) == (r[i] > r[n + i]).item() for i in range(n) if gold[i] != gold[n + i]]
    return sum(agree) / max(len(agree), 1), len(agree)


def after_rm(model, init, tok, cfg, device, metrics):
    """After training, into metrics: the shift that makes the SFT policy's typical reply score zero
    (folded into the head's bias; returned), held-out accuracy by kind of pair, agreement with the gold
    rater on fresh SFT replies, and best of n; then the held-out accuracies, printed."""
    policy = common.gpt_from_checkpoint(init, tok).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    questions = sorted({r["prompt"] for r in read_jsonl(cfg.data)})
    shift = 0.0
    if cfg.zero_prompts > 0:
        picks = torch.randperm(len(questions), generator=torch.Generator().manual_seed(cfg.seed))
        _, r = sampled_scores(model, policy, tok, [questions[i] for i in picks[:cfg.zero_prompts]], cfg, gen)
        shift = r.mean().item()
        with torch.no_grad():
            model.head.bias -= shift
        metrics.update(score_shift=shift, sft_score_std=r.std().item())
        print0(f"rm: scores shifted by {-shift:+.3f} so that the SFT policy's replies score 0 on average "
               f"(their spread: std {r.std().item():.3f})")
    rater = tinyworld.load_world(cfg.world) if cfg.world else None  # the world the gold rater knows
    if rater is not None and (cfg.test_data or cfg.held_out) and rater.parse_question(questions[0]) is not None:
        gold_checks(model, policy, tok, questions, rater, cfg, device, gen, metrics)
    say_accuracy(metrics)
    return shift


def gold_checks(model, policy, tok, questions, rater, cfg, device, gen, metrics):
    """Into metrics: held-out accuracy by kind of pair, agreement with the gold rater on fresh pairs of
    SFT replies, and best of n."""
    test_records = held_out_records(cfg)
    kinds = measures.reward_accuracy(model, tok, test_records, rater)
    metrics.update(test_accuracy_style=kinds.get("style"), test_accuracy_facts=kinds.get("facts"),
                   test_accuracy_facts_unseen=kinds.get("facts_unseen"))
    held_out = sorted({r["prompt"] for r in test_records})
    agree, n = gold_agreement(model, policy, tok, held_out, rater, cfg, gen)
    metrics.update(gold_agreement=agree, gold_pairs=n)
    print0(f"rm: agrees with the gold rater on {agree:.1%} of {n} fresh pairs of SFT replies")
    if cfg.best_of > 0:
        ns = [2 ** i for i in range(cfg.best_of.bit_length()) if 2 ** i <= cfg.best_of]
        picks = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(cfg.seed))
        asked = [held_out[i] for i in picks[:cfg.best_of_prompts]]
        best = measures.best_of_n(policy, model, tok, asked, ns, cfg.max_new_tokens, gen, rater)
        metrics["best_of_n"] = best
        measures.plot_best_of_n(best, Path(cfg.out) / "best_of_n.png")
        print0("rm: best of n SFT replies (n, reward model's score, gold rater's score): "
               + ", ".join(f"{n}: {r:.2f}, {g:.2f}" for n, r, g in zip(best["n"], best["rm"], best["gold"]))
               + f" (plot: {Path(cfg.out) / 'best_of_n.png'})")


def say_accuracy(metrics):
    """The held-out pairwise accuracy, overall and by kind of pair."""
    if metrics["test_accuracy"] is None:
        return
    print0(f"rm: held-out pairwise accuracy {metrics['test_accuracy']:.1%} ({metrics['test_pairs']} pairs)")
    if metrics.get("test_accuracy_facts") is not None:
        unseen = metrics.get("test_accuracy_facts_unseen")
        print0(f"rm: {metrics['test_accuracy_style']:.1%} where both replies are right and differ in manner, "
               f"{metrics['test_accuracy_facts']:.1%} where one is wrong about a character the training pairs "
               "mention" + (f", {unseen:.1%} about characters no training pair mentions" if unseen is not None else ""))


# ----------------------------------------------------------------------------- DPO


def after_dpo(policy, ref, tok, pairs, test, questions, rater, cfg, device):
    """The figures of metrics.json, printed: the implicit reward's accuracy on held-out pairs (test: the
    loss and rewards on them, or None without held-out pairs), KL(policy || SFT) on replies sampled
    from the policy, the gold rater's win rate against SFT, held-out QA of both: of all the questions,
    and of those that are no training pair's prompt (on TinyWorld most are)."""
    result = {}
    # every distinct held-out prompt, those of pairs too long to train on too: the prompts PPO is judged on
    prompts = sorted({r["prompt"] for r in held_out_records(cfg)}) if test else []
    prompts = [p for p in prompts if len(tok.render_prompt([{"role": "user", "content": p}])) < policy.config.block_size]
    if test:
        result["test"] = test
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        kl = result["kl_to_sft"] = measures.kl_to_reference(policy, ref, tok, prompts, cfg.max_new_tokens, generator=gen)
        print0(f"dpo: on {test['pairs']} held-out pairs, the implicit reward ranks the chosen reply first in "
               f"{test['rewards/accuracy']:.1%} (margin {test['rewards/margin']:.3f}, loss {test['loss']:.4f}); "
               f"KL to SFT {kl:.2f} nats per reply")
    if rater is not None:
        versus = measures.gold_win_rate(policy, ref, tok, prompts, cfg.max_new_tokens, world=rater)
        result.update(win_rate_vs_sft=versus["win_rate"], gold_score=versus["score"],
                      sft_gold_score=versus["baseline_score"], win_rate_prompts=len(prompts))
        print0(f"dpo: on {len(prompts)} held-out prompts, wins {versus['win_rate']:.1%} against SFT by the gold rater "
               f"(mean gold score {versus['score']:.2f} vs {versus['baseline_score']:.2f})")
        for q, mine, theirs in versus["examples"]:
            print0(f"    {q!r}\n      dpo: {mine[:100]!r}\n      sft: {theirs[:100]!r}")
    if questions:  # also apart: the questions no training pair asks (TinyWorld's pairs ask most of them)
        fresh = [q for q in questions if q["messages"][-1]["content"] not in {text for *_, text in pairs}]
        for name, net in (("sft", ref), ("dpo", policy)):
            result.update(dpo_qa(net, name, tok, questions, fresh))
    if device.startswith("cuda"):
        print0(f"dpo: peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return result


def dpo_qa(model, name, tok, questions, fresh):
    """Held-out QA accuracy of one model, on all the questions and on those no training pair asks."""
    result = {}
    for key, records in ((f"qa_{name}", questions), (f"qa_{name}_not_trained", fresh)):
        if records:
            result[key] = measures.qa_accuracy(model, tok, records)
            result[key].pop("examples")
    line = measures.describe_qa(result[f"qa_{name}"], f"dpo: {name}")
    if fresh:
        line += f"; {result[f'qa_{name}_not_trained']['accuracy']:.1%} of the {len(fresh)} no training pair asks"
    print0(line)
    return result


# ----------------------------------------------------------------------------- PPO


def after_ppo(policy, ref, tok, rater, cfg):
    """The reward model's score against the gold rater's over training (a plot), and on held-out prompts
    PPO's greedy replies against SFT's: the gold rater's verdict, KL to SFT, held-out QA of both."""
    result = {}
    if rater is not None:
        measures.plot_reward_vs_gold(Path(cfg.out) / "log.jsonl", Path(cfg.out) / "reward_vs_gold.png")
    if cfg.test_data and rater is not None:
        held_out = formats.prompts(cfg.test_data)
        versus = measures.gold_win_rate(policy, ref, tok, held_out, cfg.max_new_tokens, rater)
        kl_ref = measures.kl_to_reference(policy, ref, tok, held_out, cfg.max_new_tokens)
        result.update(win_rate_vs_sft=versus["win_rate"], gold_score=versus["score"],
                      sft_gold_score=versus["baseline_score"], kl_to_sft=kl_ref)
        print0(f"ppo: on {len(held_out)} held-out prompts, wins {versus['win_rate']:.1%} against SFT by the "
               f"gold rater (mean gold score {versus['score']:.2f} vs {versus['baseline_score']:.2f}); "
               f"KL to SFT {kl_ref:.2f} nats per reply")
        for q, mine, theirs in versus["examples"]:
            print0(f"    {q!r}\n      ppo: {mine[:100]!r}\n      sft: {theirs[:100]!r}")
    if cfg.qa_data:
        records = read_jsonl(cfg.qa_data)
        for name, net in (("sft", ref), ("ppo", policy)):
            result[f"qa_{name}"] = qa = measures.qa_accuracy(net, tok, records)
            qa.pop("examples")
            print0(measures.describe_qa(qa, f"ppo: {name}"))
    return result


# ----------------------------------------------------------------------------- GRPO


def grpo_eval(run, tok, problems, cfg, world, when):
    """pass@1, pass@k and steps right on the held-out problems, overall and per level (measures.math_eval):
    printed, logged as eval/* and returned."""
    result = measures.math_eval(run.raw, tok, problems, cfg.max_new_tokens, cfg.pass_k, cfg.seed, world)
    result.pop("solved")  # per problem: the figures above are what the log and metrics.json keep
    print0(measures.describe_math(result, f"grpo: {when}", cfg.pass_k))
    run.logger.log(run.step, printed=False, **{f"eval/{k}": v for k, v in result.items()})
    return result
