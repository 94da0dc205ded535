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
loss, backward; 3. the update. Flags: configs.RM. Writes out/rm/ckpt.pt, log.jsonl and metrics.json.
"""
import torch
import torch.nn.functional as F

import cli
import common
import configs
import loaders
import stage_evals
from data.batches import score_replies
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


# ----------------------------------------------------------------------------- training

def main(cfg):
    run = Run("rm", cfg)
    ckpt, init, tok = run.load(["sft"])  # the SFT model, or under --resume our own
    torch.manual_seed(cfg.seed)  # the fresh head's initial weights
    model = common.gpt_from_checkpoint(ckpt, tok, reward=True, dropout=0.0)
    model.head_only, model.first_slack = cfg.head_only, cfg.first_slack
    model.gate.requires_grad_(not cfg.head_only)  # unused then: no gradient, and nothing for DDP to wait for
    pairs, dropped, test_pairs = loaders.rm(cfg, tok, model.config.block_size)
    shift = 0.0
    model = run.start(model, ckpt, seed=cfg.seed, keep=lambda: dict(score_shift=shift, head_only=cfg.head_only,
                                                                    first_slack=cfg.first_slack))
    test_acc = None
    if run.step == 0 and test_pairs:
        test_acc = stage_evals.rm_accuracy(model, test_pairs, cfg, run)
        common.print0(f"rm: held-out accuracy before training {test_acc:.1%} (an untrained head; the gate at its "
                      "small start)")
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
        run.check(train_loss, "loss", run.step + 1)  # 3. the update, never from a broken loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        metrics = {"loss/train": train_loss, "train/accuracy": common.all_mean((r_c > r_r).float().mean().item()),
                   "train/margin": common.all_mean((r_c - r_r).mean().item()), "lr": run.lr}
        if test_pairs and (run.due() or run.step == run.end):
            test_acc = metrics["eval/accuracy"] = stage_evals.rm_accuracy(model, test_pairs, cfg, run)
        if run.due():  # the weights after the update can be broken while the loss before it was fine
            run.check_after_update(lambda net: sum(t.sum() for t in pair_scores(net, batch, every_rank=True)),
                                   "scores after the update")
        run.log(metrics, printed="eval/accuracy" in metrics, save=run.due())

    metrics = {"loss": train_loss, "test_accuracy": test_acc, "test_pairs": len(test_pairs), "pairs": len(pairs),
               "dropped": dropped}
    if common.is_master():
        shift = stage_evals.after_rm(run.raw, init, tok, cfg, run.device, metrics)
    run.save()  # with the score shift
    run.finish(metrics)


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


if __name__ == "__main__":
    cli.run_main(main, configs.RM, configs.PRESETS["rm"])
