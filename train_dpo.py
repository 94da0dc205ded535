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
of pairs; 2. the policy's log-probabilities of both replies, the reference's, the loss (plus, with
--replay_data, windows of pre-training text's next-token loss, as SFT replays them), backward; 3. the
update.

At the end: on held-out pairs (clean labels, prompts no training pair asks), the implicit reward's
accuracy; on their prompts, the gold rater's win rate of the policy's greedy replies against SFT's and
the KL to SFT on sampled replies; held-out QA accuracy (preferences should change the manner of the
answers, not their facts). Flags: configs.DPO. Writes out/dpo/ckpt.pt, log.jsonl and metrics.json.

Which loss: TinyWorld's rater flips a share of the training labels, which is what conservative
(label smoothing) and robust DPO are for. In the CPU budget, a fraction of an epoch, the margins
stay small, where the three sigmoid losses differ only in the size of their gradient ((1 - 2 eps)
and 1 / (1 - 2 eps) times the plain one at h = 0): in effect a change of learning rate, not yet a
defence against noise. Compare them with --loss_type on the same seed.
"""
import torch
import torch.nn.functional as F

import cli
import common
import configs
import loaders
import stage_evals
from data.batches import by_length, pack_responses
from run import Run


# ----------------------------------------------------------------------------- the loss

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
        raise ValueError(f"unknown DPO loss {kind!r}: one of {configs.DPO_LOSSES}")
    r_chosen, r_rejected = beta * chosen.detach(), beta * rejected.detach()
    metrics = {"rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
               "rewards/margin": (r_chosen - r_rejected).mean(),
               "rewards/accuracy": (r_chosen > r_rejected).float().mean()}
    return losses.mean(), metrics


# ----------------------------------------------------------------------------- training

def main(cfg):
    run = Run("dpo", cfg, per_rank=("batch_size", "replay_batch"))

    # the policy and the frozen reference: both the SFT model (under --resume, the policy goes on from ours)
    ckpt, init, tok = run.load(["sft"])
    model = common.gpt_from_checkpoint(ckpt, tok)
    pairs, dropped, test_pairs, questions, rater, replay = loaders.dpo(cfg, tok, model.config.block_size)
    model = run.start(model, ckpt, seed=cfg.seed, unit="perf/pairs_per_s", reference=init)
    ref = run.reference
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
            total = loss
            if replay is not None:  # plus windows of pre-training text and their next-token loss (against forgetting)
                stats["loss/replay"] = run.replay_loss(replay)
                total = loss + cfg.replay_coef * stats["loss/replay"]
            (total / cfg.grad_accum).backward()  # every micro-batch has the same number of pairs
            for k, v in {"loss/train": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
            run.count(len(batch))
        metrics = {k: common.all_mean(v) for k, v in sums.items()}
        run.check(metrics["loss/train"], "loss", run.step + 1)  # 3. the update, never from a broken loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        metrics["lr"] = run.lr
        if run.due():  # the weights after a step can be broken while its loss (from before it) was fine
            run.check_after_update(lambda net: dpo_loss(*pair_logprobs(net, batch, run.device), *ref_logprobs,
                                                        cfg.beta, cfg.loss_type, cfg.label_smoothing)[0])
        run.log(metrics, save=run.due())

    result = {"pairs": len(pairs), "dropped": len(dropped), "final": {k: v for k, v in metrics.items() if k != "perf/pairs_per_s"}}
    if common.is_master():
        ref = run.reference_to_evaluate()  # the evaluation also generates from it
        test = evaluate_pairs(run.raw, ref, test_pairs, cfg, run.device) if test_pairs else None
        result.update(stage_evals.after_dpo(run.raw, ref, tok, pairs, test, questions, rater, cfg, run.device))
        if run.device.startswith("cuda"):
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.finish(result)


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


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_pairs(model, ref, pairs, cfg, device):
    """The DPO loss and the implicit reward's accuracy and margin on held-out pairs (and their number)."""
    model.eval()
    totals = {}
    for start in range(0, len(pairs), cfg.batch_size):
        batch = pairs[start:start + cfg.batch_size]
        loss, metrics = dpo_loss(*pair_logprobs(model, batch, device), *pair_logprobs(ref, batch, device),
                                 cfg.beta, cfg.loss_type, cfg.label_smoothing)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(batch)
    model.train()
    return {**{k: v / len(pairs) for k, v in totals.items()}, "pairs": len(pairs)}


if __name__ == "__main__":
    cli.run_main(main, configs.DPO, configs.PRESETS["dpo"])
