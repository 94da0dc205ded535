"""Stage 3a, the reward model: learn to score answers the way a rater ranks them.

    python train_rm.py                  # TinyWorld's preference pairs on a CPU, from out/sft/ckpt.pt
    python train_rm.py --preset=gpu     # Anthropic HH-RLHF on one GPU (python -m data.prepare_hh_rlhf first),
                                        # from a GPU SFT run (train_sft.py --preset=gpu)
    torchrun --standalone --nproc_per_node=8 train_rm.py --preset=gpu

A preference pair is a prompt and two replies, one chosen by a rater over the other. The reward model
(model.RewardModel) is the SFT model with two small heads. Its score is a scalar head read at the last
token of prompt+reply (the reply's manner), plus, for every reply token, a learned non-negative gate
times how much more that token surprises the trunk than the trunk expected (its facts: "Lucy lives
in Ashford." costs a lot when the trunk is sure she lives in Millbrook). Bradley-Terry says the rater
prefers a to b with probability sigmoid(r(a) - r(b)), so the loss is -log of that for the pair as
labelled (`reward_loss`), plus a language-modelling loss on the chosen replies that keeps those
log-probabilities meaningful. Only differences of scores matter to it; so after training the scores
are shifted to make the SFT policy's own replies score 0 on average, which is where PPO starts (the
shift is folded into the head's bias and recorded in the checkpoint as "score_shift").

Why the gate: a head on the last token alone learns the rater's taste but not its facts (on
TinyWorld it orders pairs with a wrong reply no better than a coin toss, however long it trains),
although the SFT model knows them: to tell a right reply from a wrong one it must recall the fact and
compare it with the one stated, which that head does not learn from the pairs. The trunk's own
probability of the stated value already is that comparison; the gate only learns where to read it.

TinyWorld's training labels are flipped with probability 0.1 (a noisy rater); the held-out pairs are
clean, and a quarter of the characters appear in no training pair: the accuracy on right-against-wrong
pairs about them shows whether the model checks what pre-training taught or recalls the pairs.
Besides their accuracy, the model is checked on fresh pairs: two replies sampled from the SFT policy
for each held-out prompt, ranked by TinyWorld's gold rater, which is what PPO will ask of it.
Each step: 1. a batch of pairs; 2. both replies of each scored (in groups of similar length), the
loss, backward; 3. the update. Writes out/rm/ckpt.pt, log.jsonl and metrics.json.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import common
import evals
from cli import UserError
from common import print0
from data import formats, read_jsonl, tinyworld
from data.batches import score_replies
from data.tokenizer import load_tokenizer
from run import Run


# ----------------------------------------------------------------------------- the loss

def reward_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0, lm_nll=None, lm_coef=0.0):
    """mean(-log sigmoid(r_chosen - r_rejected - margin)) + center_coef * mean((r_chosen + r_rejected)^2)
    + lm_coef * lm_nll.

    The first term is the negative log-likelihood of the labels under Bradley-Terry: the chosen reply
    wins with probability sigmoid(r_c - r_r). It is log 2 when the scores tie and falls as the
    chosen one pulls ahead; a margin (a float, or one per pair) asks for a lead of at least that much.
    It cannot see a shift of all scores, so the second term, small, keeps them centred on zero. The
    third keeps the trunk a language model of good replies (lm_nll: the chosen replies' mean -log p
    per token), since the score reads how likely the trunk finds each reply token.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    if lm_coef:
        loss = loss + lm_coef * lm_nll
    return loss


# ----------------------------------------------------------------------------- the data

def pair_scores(model, batch, every_rank=False):
    """(r_chosen, r_rejected, the chosen replies' mean -log p per token) for a list of pairs, both
    sides scored together. every_rank (in training, where every rank calls it at once): the mean
    divides by the chosen replies' tokens on every rank (each rank by their mean), so that under DDP
    the averaged gradient is the whole batch's."""
    prompts, n = [p for p, _, _ in batch], len(batch)
    r, logp, lengths = score_replies(model, prompts + prompts, [c for _, c, _ in batch] + [x for _, _, x in batch])
    tokens = common.all_mean(lengths[:n].sum().item()) if every_rank else lengths[:n].sum()
    return r[:n], r[n:], -logp[:n].sum() / tokens


# ----------------------------------------------------------------------------- training

def main(cfg):
    cli.require_positive(cfg, "batch_size", "max_steps", "eval_every", "log_every", "max_new_tokens", "lr")
    if not 0 <= cfg.lm_coef < math.inf:
        raise UserError(f"--lm_coef must be 0 (off) or a positive number, got {cfg.lm_coef}")
    if cfg.best_of > 0:
        cli.require_positive(cfg, "best_of_prompts")
    run = Run("rm", cfg)

    # the reward model: the SFT trunk with a fresh scalar head, or resumed exactly
    ckpt = run.resumed()
    init = common.load_checkpoint(ckpt["init"] if ckpt else cfg.init, ["sft"], made_by="python train_sft.py")
    ckpt = ckpt or init
    tokenizer = cfg.tokenizer or ckpt["tokenizer"]
    tok = load_tokenizer(tokenizer)
    torch.manual_seed(cfg.seed)  # the fresh head's initial weights
    model = common.gpt_from_checkpoint(ckpt, tok, reward=True, dropout=0.0)
    pairs, dropped, test_pairs = load_data(cfg, tok, model.config.block_size)
    shift = 0.0
    model = run.start(model, ckpt, tok, tokenizer, seed=cfg.seed, keep=lambda: dict(
        init=cfg.init if not cfg.resume else ckpt["init"], score_shift=shift))
    run.logger.phase("evaluation")
    test_acc = None
    if run.step == 0 and test_pairs:
        test_acc = accuracy(model, test_pairs, cfg, run)
        print0(f"rm: held-out accuracy before training {test_acc:.1%} (an untrained head; the gate at its small start)")
        run.logger.log(0, printed=False, **{"eval/accuracy": test_acc})

    train_loss = None
    for step in run.steps():
        # 1. this rank's share of the step's pairs
        picks = torch.randint(len(pairs), (cfg.batch_size,), generator=run.data_gen)[run.rank::run.world]
        batch = [pairs[i] for i in picks.tolist()]
        r_c, r_r, lm_nll = pair_scores(model, batch, every_rank=True)  # 2.
        loss = reward_loss(r_c, r_r, cfg.margin, cfg.center_coef, lm_nll, cfg.lm_coef)
        loss.backward()
        train_loss = common.all_mean(loss.item())
        run.update(train_loss)  # 3.
        metrics = {"loss/train": train_loss, "train/accuracy": common.all_mean((r_c > r_r).float().mean().item()),
                   "train/margin": common.all_mean((r_c - r_r).mean().item()), "lr": run.lr}
        if test_pairs and (run.due() or run.step == run.end):
            test_acc = metrics["eval/accuracy"] = accuracy(model, test_pairs, cfg, run)
        if run.due():  # the weights after the update can be broken while the loss before it was fine
            with torch.no_grad():
                r_c, r_r, lm_nll = pair_scores(run.raw, batch, every_rank=True)
                run.check(reward_loss(r_c, r_r, cfg.margin, cfg.center_coef, lm_nll, cfg.lm_coef).item(),
                          "loss after the update")
        run.log(metrics, printed="eval/accuracy" in metrics, save=run.due())

    metrics = {"loss": train_loss, "test_accuracy": test_acc, "pairs": len(pairs), "dropped": dropped}
    if common.is_master():
        shift = final_evaluation(run.raw, init, tok, cfg, run.device, metrics)
    run.save()  # with the score shift
    run.finish(metrics)
    if test_acc is not None:
        print0(f"rm: held-out pairwise accuracy {test_acc:.1%} ({len(test_pairs)} pairs)")
        if metrics.get("test_accuracy_facts") is not None:
            unseen = metrics.get("test_accuracy_facts_unseen")
            print0(f"rm: {metrics['test_accuracy_style']:.1%} where both replies are right and differ in manner, "
                   f"{metrics['test_accuracy_facts']:.1%} where one is wrong about a character the training pairs "
                   "mention" + (f", {unseen:.1%} about characters no training pair mentions" if unseen is not None else ""))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def accuracy(model, pairs, cfg, run):
    """Fraction of pairs whose chosen reply scores higher, over every pair."""
    model.eval()
    right = 0
    for start in range(run.rank * cfg.batch_size, len(pairs), run.world * cfg.batch_size):
        r_c, r_r, _ = pair_scores(model, pairs[start:start + cfg.batch_size])
        right += (r_c > r_r).sum().item()
    model.train()
    return common.all_mean(right) * run.world / max(len(pairs), 1)


@torch.no_grad()
def sampled_scores(rm, policy, tok, questions, cfg, device, gen):
    """Replies sampled from the policy at temperature 1, and the reward model's scores of them."""
    prompts, outs, texts = evals.chat_replies(policy, tok, questions, cfg.max_new_tokens, temperature=1.0, generator=gen)
    rm.eval()
    r = torch.cat([score_replies(rm, prompts[i:i + 64], outs[i:i + 64])[0] for i in range(0, len(prompts), 64)])
    return texts, r


def gold_agreement(rm, policy, tok, questions, rater, cfg, device, gen):
    """On two replies sampled from the SFT policy per question, how often the reward model orders them
    as the gold rater does (pairs the gold rater scores equal are left out)."""
    texts, r = sampled_scores(rm, policy, tok, questions + questions, cfg, device, gen)
    n = len(questions)
    gold = [tinyworld.gold_score(q, t, rater) for q, t in zip(questions + questions, texts)]
    agree = [(gold[i] > gold[n + i]) == (r[i] > r[n + i]).item() for i in range(n) if gold[i] != gold[n + i]]
    return sum(agree) / max(len(agree), 1), len(agree)


def final_evaluation(model, init, tok, cfg, device, metrics):
    """After training, into metrics: the shift that makes the SFT policy's typical reply score zero
    (folded into the head's bias; returned), held-out accuracy by kind of pair, agreement with the gold
    rater on fresh SFT replies, and best of n."""
    policy = common.gpt_from_checkpoint(init, tok).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    questions = sorted({r["prompt"] for r in read_jsonl(cfg.data)})
    shift = 0.0
    if cfg.zero_prompts > 0:
        picks = torch.randperm(len(questions), generator=torch.Generator().manual_seed(cfg.seed))
        _, r = sampled_scores(model, policy, tok, [questions[i] for i in picks[:cfg.zero_prompts]], cfg, device, gen)
        shift = r.mean().item()
        with torch.no_grad():
            model.head.bias -= shift
        metrics.update(score_shift=shift, sft_score_std=r.std().item())
        print0(f"rm: scores shifted by {-shift:+.3f} so that the SFT policy's replies score 0 on average "
               f"(their spread: std {r.std().item():.3f})")
    rater = tinyworld.load_world(cfg.world) if cfg.world else None  # the world the gold rater knows
    if rater is None or not cfg.test_data or rater.parse_question(questions[0]) is None:
        return shift
    test_records = read_jsonl(cfg.test_data)
    kinds = evals.reward_accuracy(model, tok, test_records, rater)
    metrics.update(test_accuracy_style=kinds.get("style"), test_accuracy_facts=kinds.get("facts"),
                   test_accuracy_facts_unseen=kinds.get("facts_unseen"))
    held_out = sorted({r["prompt"] for r in test_records})
    agree, n = gold_agreement(model, policy, tok, held_out, rater, cfg, device, gen)
    metrics.update(gold_agreement=agree, gold_pairs=n)
    print0(f"rm: agrees with the gold rater on {agree:.1%} of {n} fresh pairs of SFT replies")
    if cfg.best_of > 0:
        ns = [2 ** i for i in range(cfg.best_of.bit_length()) if 2 ** i <= cfg.best_of]
        picks = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(cfg.seed))
        asked = [held_out[i] for i in picks[:cfg.best_of_prompts]]
        best = evals.best_of_n(policy, model, tok, asked, ns, cfg.max_new_tokens, gen, rater)
        metrics["best_of_n"] = best
        evals.plot_best_of_n(best, Path(cfg.out) / "best_of_n.png")
        print0("rm: best of n SFT replies (n, reward model's score, gold rater's score): "
               + ", ".join(f"{n}: {r:.2f}, {g:.2f}" for n, r, g in zip(best["n"], best["rm"], best["gold"]))
               + f" (plot: {Path(cfg.out) / 'best_of_n.png'})")
    return shift


# ----------------------------------------------------------------------------- loading

def load_data(cfg, tok, block_size):
    """The training pairs (and how many were dropped as too long) and the held-out ones, checked now."""
    pairs, dropped = formats.pairs(cfg.data, tok, block_size)  # prompt and reply within the context
    formats.require_some(pairs, dropped, cfg.data, "preference pairs", block_size)
    test_pairs = formats.pairs(cfg.test_data, tok, block_size)[0] if cfg.test_data else []
    print0(f"rm: {len(pairs):,} pairs from {cfg.data} ({len(dropped)} dropped as longer than the context), "
           f"{len(test_pairs):,} held out")
    return [p[:3] for p in pairs], len(dropped), [p[:3] for p in test_pairs]


# ----------------------------------------------------------------------------- the settings

@dataclass
class Config:
    data: str = "data/tinyworld/prefs_train.jsonl"  # preference pairs: {"prompt", "chosen", "rejected"}
    test_data: str = "data/tinyworld/prefs_test.jsonl"  # held-out pairs for the accuracy (empty: none)
    tokenizer: str = ""                # default: the one the --init checkpoint was trained with
    init: str = "out/sft/ckpt.pt"      # the SFT checkpoint whose trunk the reward model starts from
    out: str = "out/rm"                # where ckpt.pt, log.jsonl and metrics.json go
    resume: bool = False               # continue exactly from out/ckpt.pt (optimizer, step, RNG)
    batch_size: int = 32               # pairs per step, over all processes
    max_steps: int = 160               # optimizer steps (160 x 32: TinyWorld's 3,000 pairs, about 1.7 times)
    stop_at: int = 0                   # stop early at this step with a checkpoint (0: run to max_steps)
    lr: float = 5e-4                   # peak learning rate
    min_lr: float = 5e-5               # learning rate at the end of the cosine
    warmup_steps: int = 10             # linear warm-up steps
    weight_decay: float = 0.0          # AdamW decay on matrices
    margin: float = 0.0                # required gap between chosen and rejected scores
    center_coef: float = 0.01          # weight of mean((r_chosen + r_rejected)^2): keeps scores near 0
    lm_coef: float = 1.0               # weight of the language-modelling loss on the chosen replies (0: off)
    grad_clip: float = 1.0             # clip the gradient norm to this (0: off)
    eval_every: int = 60               # steps between held-out accuracies and checkpoints
    log_every: int = 10                # steps between printed lines
    zero_prompts: int = 256            # SFT replies sampled to set the score's zero (0: no shift)
    best_of: int = 16                  # best of n for n = 1, 2, 4, ... up to this, on held-out questions (0: skip)
    best_of_prompts: int = 64          # the held-out questions best of n is measured on
    world: str = "data/tinyworld"      # the TinyWorld whose gold rater ranks fresh pairs of SFT replies (empty: skip)
    max_new_tokens: int = 64           # length limit of the sampled replies
    device: str = "auto"               # auto (cuda, mps, cpu), or a torch device name
    compile: bool = False              # torch.compile the model
    seed: int = 1337                   # seeds data order and sampling


PRESETS = {
    # HH-RLHF helpful-base (python -m data.prepare_hh_rlhf), from a GPU SFT run of the 12x768 model
    "gpu": dict(data="data/real/hh_train.jsonl", test_data="data/real/hh_test.jsonl", batch_size=64,
                max_steps=1500, lr=1e-5, min_lr=1e-6, warmup_steps=50, eval_every=250, log_every=25,
                world="", compile=True),
    # the whole journey's plumbing in about a minute on a CPU, nothing learned (make demo PRESET=smoke)
    "smoke": dict(batch_size=4, max_steps=2, warmup_steps=1, eval_every=2, log_every=1, zero_prompts=4, best_of=2,
                  best_of_prompts=2, max_new_tokens=8),
}


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
