"""Stage 3c, direct preference optimisation (DPO): learn from preference pairs without a reward model.

    python train_dpo.py                 # TinyWorld on a CPU, from out/sft/ckpt.pt
    python train_dpo.py --loss_type=robust --label_smoothing=0.1    # a variant (see dpo_loss)
    python train_dpo.py --preset=gpu    # HH-RLHF on one GPU (python -m data.prepare_hh_rlhf first), starting
                                        # from a GPU fine-tuning run (train_sft.py --preset=gpu)
    torchrun --standalone --nproc_per_node=8 train_dpo.py --preset=gpu

A preference pair is a prompt with a chosen and a rejected reply. The policy and a frozen reference
both start from the SFT checkpoint; a reply's log pi(y | x) is summed over its tokens (<|end|>
included), the reference's without gradients. beta * (log pi(y) - log pi_ref(y)) is the reply's
implicit reward, the one for which the KL-regularised RLHF objective has this policy as its optimum;
the loss (`dpo_loss`) pushes the chosen reply's above the rejected one's, so the pairs train the
policy as a reward model and PPO would, in one supervised loop with no sampling. Each step: 1. a batch
of pairs; 2. the policy's log-probabilities of both replies, the reference's, the loss, backward; 3. the
update.

At the end: on held-out pairs (clean labels, prompts no training pair asks), the implicit reward's
accuracy; on their prompts, the gold rater's win rate of the policy's greedy replies against SFT's and
the KL to SFT on sampled replies; held-out QA accuracy (preferences should change the manner of the
answers, not their facts). Writes out/dpo/ckpt.pt, log.jsonl and metrics.json.

Which loss: TinyWorld's rater flips a share of the training labels, which is what conservative
(label smoothing) and robust DPO are for. In the CPU budget, a fraction of an epoch, the margins
stay small, where the three sigmoid losses differ only in the size of their gradient ((1 - 2 eps)
and 1 / (1 - 2 eps) times the plain one at h = 0): in effect a change of learning rate, not yet a
defence against noise. Compare them with --loss_type on the same seed.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cli
import common
import evals
from cli import UserError
from common import print0
from data import formats, numbered_records
from data.batches import by_length, pack_responses
from data.tinyworld_facts import load_world
from data.tokenizer import load_tokenizer
from run import Run


# ----------------------------------------------------------------------------- the loss

LOSS_TYPES = ("sigmoid", "ipo", "robust")


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, kind="sigmoid", label_smoothing=0.0):
    """The mean over pairs of a loss of h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected), where
    each argument (N,) is a reply's log-probability summed over its tokens. eps = label_smoothing is the
    assumed probability that a label is flipped.

      sigmoid  -log sigmoid(beta h) (Rafailov et al., 2023); with eps > 0, "conservative" DPO:
               (1 - eps) (-log sigmoid(beta h)) + eps (-log sigmoid(-beta h)), the plain loss averaged
               over the noise, whose optimum is a finite margin instead of an ever larger one;
      ipo      (h - 1 / (2 beta))^2 (Azar et al., 2023): aims at a fixed margin, so pairs already
               ranked right stop pulling;
      robust   ((1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))) / (1 - 2 eps)
               (Chowdhury et al., 2024): averaged over the noise it is the plain loss on the true label
               (unbiased); the sigmoid loss at eps = 0.

    Returns (loss, metrics): means over pairs of the implicit rewards beta (pi - ref) of the chosen and
    rejected replies, their margin, and the fraction of pairs ranked right (strictly, so 0 at pi = ref).
    """
    chosen = pi_chosen - ref_chosen
    rejected = pi_rejected - ref_rejected
    h = chosen - rejected
    eps = label_smoothing
    if kind == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: one of {LOSS_TYPES}")
    r_chosen, r_rejected = beta * chosen.detach(), beta * rejected.detach()
    metrics = {"rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
               "rewards/margin": (r_chosen - r_rejected).mean(),
               "rewards/accuracy": (r_chosen > r_rejected).float().mean()}
    return losses.mean(), metrics


# ----------------------------------------------------------------------------- the data

def get_batch(pairs, batch_size, gen, rank, world):
    """A random batch of pairs. Every rank draws the same indices from the same generator and keeps its
    own slice, so the global batch does not depend on the world size."""
    picks = torch.randint(len(pairs), (batch_size,), generator=gen)[rank::world]
    return [pairs[i] for i in picks.tolist()]


def pair_logprobs(model, batch, device):
    """log pi(chosen | prompt) and log pi(rejected | prompt), each (N,), summed over the reply tokens.
    Both replies of every pair go through the model in groups of similar length before one backward
    (under DDP, the one that synchronises gradients)."""
    prompts = [p for p, _, _, _ in batch] * 2
    replies = [c for _, c, _, _ in batch] + [r for _, _, r, _ in batch]

    def logprobs(rows):
        x, y, mask = (t.to(device) for t in pack_responses([prompts[i] for i in rows], [replies[i] for i in rows]))
        with common.autocast(device):
            return (mask * -model(x, y, reduction="none").float()).sum(1)

    return by_length([len(p) + len(r) for p, r in zip(prompts, replies)], logprobs).chunk(2)


# ----------------------------------------------------------------------------- training

def main(cfg):
    check_config(cfg)
    run = Run("dpo", cfg)

    # the policy and the frozen reference: both the SFT model (under --resume, the policy goes on from ours)
    ckpt = run.resumed()
    init = ckpt["init"] if ckpt else cfg.init
    ref_ckpt = common.load_checkpoint(init, ["sft"], made_by="python train_sft.py")
    ckpt = ckpt or ref_ckpt
    tokenizer = cfg.tokenizer or ckpt["tokenizer"]
    tok = load_tokenizer(tokenizer)
    model = common.gpt_from_checkpoint(ckpt, tok)
    ref = common.gpt_from_checkpoint(ref_ckpt, tok).to(run.device).eval().requires_grad_(False)
    pairs, dropped, test_pairs, questions, rater = load_data(cfg, tok, model.config.block_size)
    model = run.start(model, ckpt, tok, tokenizer, seed=cfg.seed, unit="perf/pairs_per_s", keep=lambda: dict(init=init))
    if run.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(run.device)

    metrics = {}
    for step in run.steps():
        sums = {}
        for micro in range(cfg.grad_accum):  # 1-2.
            batch = get_batch(pairs, cfg.batch_size, run.data_gen, run.rank, run.world)
            run.sync(micro == cfg.grad_accum - 1)
            pi_chosen, pi_rejected = pair_logprobs(model, batch, run.device)
            with torch.no_grad():
                ref_logprobs = pair_logprobs(ref, batch, run.device)
            loss, stats = dpo_loss(pi_chosen, pi_rejected, *ref_logprobs, cfg.beta, cfg.loss_type, cfg.label_smoothing)
            (loss / cfg.grad_accum).backward()  # every micro-batch has the same number of pairs
            for k, v in {"loss/train": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
            run.count(len(batch))
        metrics = {k: common.all_mean(v) for k, v in sums.items()}
        run.update(metrics["loss/train"])  # 3.
        metrics["lr"] = run.lr
        if run.due():  # the weights after a step can be broken while its loss (from before it) was fine
            with torch.no_grad():
                run.raw.eval()
                after, _ = dpo_loss(*pair_logprobs(run.raw, batch, run.device), *ref_logprobs, cfg.beta,
                                    cfg.loss_type, cfg.label_smoothing)
                run.raw.train()
            run.check(after.item(), "loss after the update")
        run.log(metrics, save=run.due())

    result = {"pairs": len(pairs), "dropped": len(dropped), "final": {k: v for k, v in metrics.items() if k != "perf/pairs_per_s"}}
    if common.is_master():
        result.update(final_evaluation(run.raw, ref, tok, pairs, test_pairs, questions, rater, cfg, run.device))
        if run.device.startswith("cuda"):
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.finish(result)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_pairs(model, ref, pairs, cfg, device):
    """The DPO loss and the implicit reward's accuracy and margin on held-out pairs."""
    model.eval()
    totals = {}
    for start in range(0, len(pairs), cfg.batch_size):
        batch = pairs[start:start + cfg.batch_size]
        loss, metrics = dpo_loss(*pair_logprobs(model, batch, device), *pair_logprobs(ref, batch, device),
                                 cfg.beta, cfg.loss_type, cfg.label_smoothing)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(batch)
    model.train()
    return {k: v / len(pairs) for k, v in totals.items()}


def final_evaluation(policy, ref, tok, pairs, test_pairs, questions, rater, cfg, device):
    """The figures of metrics.json, printed: the implicit reward's accuracy on held-out pairs, KL(policy ||
    SFT) on replies sampled from the policy, the gold rater's win rate against SFT, held-out QA of both:
    of all the questions, and of those that are no training pair's prompt (on TinyWorld most are)."""
    result = {}
    # every distinct held-out prompt, those of pairs too long to train on too: the prompts PPO is judged on
    prompts = sorted({r["prompt"] for _, r in numbered_records(cfg.test_data)}) if test_pairs else []
    prompts = [p for p in prompts if len(tok.render_prompt([{"role": "user", "content": p}])) < policy.config.block_size]
    if test_pairs:
        test = result["test"] = evaluate_pairs(policy, ref, test_pairs, cfg, device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        kl = result["kl_to_sft"] = evals.kl_to_reference(policy, ref, tok, prompts, cfg.max_new_tokens, generator=gen)
        print0(f"dpo: on {len(test_pairs)} held-out pairs, the implicit reward ranks the chosen reply first in "
               f"{test['rewards/accuracy']:.1%} (margin {test['rewards/margin']:.3f}, loss {test['loss']:.4f}); "
               f"KL to SFT {kl:.2f} nats per reply")
    if rater is not None:
        versus = evals.gold_win_rate(policy, ref, tok, prompts, cfg.max_new_tokens, world=rater)
        result.update(win_rate_vs_sft=versus["win_rate"], gold_score=versus["score"],
                      sft_gold_score=versus["baseline_score"], win_rate_prompts=len(prompts))
        print0(f"dpo: on {len(prompts)} held-out prompts, wins {versus['win_rate']:.1%} against SFT by the gold rater "
               f"(mean gold score {versus['score']:.2f} vs {versus['baseline_score']:.2f})")
        for q, mine, theirs in versus["examples"]:
            print0(f"    {q!r}\n      dpo: {mine[:100]!r}\n      sft: {theirs[:100]!r}")
    if questions:  # also apart: the questions no training pair asks (TinyWorld's pairs ask most of them)
        fresh = [q for q in questions if q["messages"][-1]["content"] not in {text for *_, text in pairs}]
        for name, net in (("sft", ref), ("dpo", policy)):
            result.update(qa_eval(net, name, tok, questions, fresh, cfg))
    if device.startswith("cuda"):
        print0(f"dpo: peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return result


def qa_eval(model, name, tok, questions, fresh, cfg):
    """Held-out QA accuracy of one model, on all the questions and on those no training pair asks."""
    result = {}
    for key, records in ((f"qa_{name}", questions), (f"qa_{name}_not_trained", fresh)):
        if records:
            result[key] = evals.qa_accuracy(model, tok, records)
            result[key].pop("examples")
    line = evals.describe_qa(result[f"qa_{name}"], f"dpo: {name}")
    if fresh:
        line += f"; {result[f'qa_{name}_not_trained']['accuracy']:.1%} of the {len(fresh)} no training pair asks"
    print0(line)
    return result


# ----------------------------------------------------------------------------- checks and loading

def check_config(cfg):
    cli.require_positive(cfg, "batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "max_new_tokens",
                         "lr", "beta")
    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type={cfg.loss_type} is not one of {', '.join(LOSS_TYPES)}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing is a probability below 0.5, got {cfg.label_smoothing}")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise UserError("--loss_type=ipo takes no --label_smoothing: use sigmoid or robust for noisy labels")
    if cfg.world and not cfg.test_data:
        raise UserError("the win rate (--world) is measured on the prompts of --test_data: give one, or --world=")


def load_data(cfg, tok, block_size):
    """The training pairs (and those dropped as too long), the held-out pairs and questions, and the
    world the gold rater knows: everything the final evaluation reads, checked before training."""
    context = block_size + 1
    pairs, dropped = formats.pairs(cfg.data, tok, context)
    formats.require_some(pairs, dropped, cfg.data, "preference pairs", context)
    test_pairs = formats.pairs(cfg.test_data, tok, context)[0] if cfg.test_data else []
    if cfg.test_data and not test_pairs:
        raise UserError(f"--test_data={cfg.test_data} holds no pair that fits the context ({context} tokens): "
                        "give shorter ones, or --test_data= for none")
    questions = formats.questions(cfg.qa_data, tok, block_size) if cfg.qa_data else None
    rater = load_world(cfg.world) if cfg.world else None
    first = f", the first at line {dropped[0]}" if dropped else ""
    print0(f"dpo: {len(pairs):,} pairs from {cfg.data}, {len(dropped)} dropped as longer than the context "
           f"({context} tokens{first}); {len(test_pairs)} held out; {cfg.loss_type} loss, beta {cfg.beta}"
           + (f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""))
    return pairs, dropped, test_pairs, questions, rater


# ----------------------------------------------------------------------------- the settings

@dataclass
class Config:
    data: str = "data/tinyworld/prefs_train.jsonl"  # training pairs: {"prompt", "chosen", "rejected"} per line
    test_data: str = "data/tinyworld/prefs_test.jsonl"  # held-out pairs, same format (empty: skip the evaluation)
    qa_data: str = "data/tinyworld/sft_test.jsonl"  # held-out questions with "answer" and "split" (empty: skip)
    world: str = "data/tinyworld"      # the TinyWorld whose gold rater judges the win rate (empty: no win rate)
    tokenizer: str = ""                # default: the one the --init checkpoint was trained with
    init: str = "out/sft/ckpt.pt"      # the sft checkpoint: the policy's start and the frozen reference
    out: str = "out/dpo"               # where ckpt.pt, log.jsonl and metrics.json go
    resume: bool = False               # continue exactly from out/ckpt.pt (optimizer, step, RNG)
    loss_type: str = "sigmoid"         # sigmoid (DPO), ipo, or robust (unbiased under label noise): see dpo_loss
    beta: float = 0.3                  # strength of the pull to the reference: the implicit reward's scale
    label_smoothing: float = 0.0       # assumed rate of flipped labels, for sigmoid and robust (below 0.5)
    batch_size: int = 16               # pairs per micro-step, over all processes
    grad_accum: int = 1                # micro-steps per optimizer step
    max_steps: int = 60                # optimizer steps
    stop_at: int = 0                   # stop early at this step with a checkpoint (0: run to max_steps)
    lr: float = 1.5e-4                 # peak learning rate
    min_lr: float = 2e-5               # learning rate at the end of the cosine
    warmup_steps: int = 10             # linear warm-up steps
    weight_decay: float = 0.0          # AdamW decay on matrices
    grad_clip: float = 1.0             # clip the gradient norm to this (0: off)
    eval_every: int = 30               # steps between checkpoints
    log_every: int = 10                # steps between printed lines
    max_new_tokens: int = 128          # reply length limit when generating for the win rate and KL (QA: evals.QA_TOKENS)
    device: str = "auto"               # auto (cuda, mps, cpu), or a torch device name
    compile: bool = False              # torch.compile the policy
    seed: int = 1337                   # seeds data order and the sampled replies of the KL estimate


PRESETS = {
    # HH-RLHF (python -m data.prepare_hh_rlhf) on the 12x768 model from train_sft.py --preset=gpu; no gold rater
    "gpu": dict(data="data/real/hh_train.jsonl", test_data="data/real/hh_test.jsonl", qa_data="", world="",
                batch_size=32, grad_accum=2, max_steps=1000, lr=1e-6, min_lr=1e-7, warmup_steps=100,
                eval_every=250, log_every=25, max_new_tokens=128, compile=True),
    # the whole journey's plumbing in about a minute on a CPU, nothing learned (make demo PRESET=smoke)
    "smoke": dict(batch_size=4, max_steps=2, warmup_steps=1, eval_every=2, log_every=1, max_new_tokens=8),
}


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
