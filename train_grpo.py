"""Stage 4, reasoning RL with verifiable rewards (GRPO): reinforce the answers a checker marks right.

    python train_grpo.py                    # TinyWorld's problems on a CPU, from out/ppo (else dpo, else sft)
    python train_grpo.py --loss_type=dr_grpo
    python train_grpo.py --preset=gpu       # GSM8K on one GPU (python -m data.prepare_gsm8k first)
    torchrun --standalone --nproc_per_node=8 train_grpo.py --preset=gpu

Each step takes a few problems, asks each through the chat template and samples a group of G answers
at --temperature with the KV cache (the policy trained is the model's softmax at that temperature).
A verifier scores them: 1 when the number after the last "####" is the reference's, else 0
(--format_reward and --step_reward add partial credit). There is no critic: an answer's advantage is
its reward against its own group's, (r - mean) / (std + eps) (`group_advantages`), so a group whose
answers are all right or all wrong says nothing and is left out. The loss is PPO's clipped surrogate
on every answer token plus a k3 KL penalty to the starting model (`grpo_loss`), averaged per answer
(grpo), over a fixed length (dr_grpo) or per token (dapo), which weigh long and short answers
differently; --replay_data adds a batch of pre-training text's next-token loss to each update (as SFT
does; `make forgetting` measures what it keeps). Before and after, the held-out problems are answered greedily (pass@1) and --pass_k
times at temperature 1 (pass@k), per level too, with the share of their steps stated right.

Why the defaults: SFT's set answers some problems step by step and as many with the number alone;
rewarded for the final number only, GRPO finds that the worked answers are the ones that pay. Rollouts
are sampled at temperature 0.7, where this small model's samples keep the steps its greedy answer gets
right. Partial credit is off: on the seeds tried it did not lift pass@1 consistently. Flags: configs.GRPO.
Writes out/grpo/ckpt.pt, log.jsonl and metrics.json.
"""
from pathlib import Path

import torch

import cli
import common
import configs
import gpt_kernels
import loaders
import measures
import stage_evals
from common import print0
from data.batches import pack_responses
from data.tinymath import check_answer, check_steps, extract_answer, shows_work
from run import Run


# ----------------------------------------------------------------------------- the loss

def k3(logp, ref_logp):
    """KL(pi || ref) per token, estimated on samples of pi: (q - 1) - log q with q = ref / pi.
    Never negative (log q <= q - 1), zero exactly where the two agree, and unbiased."""
    log_q = ref_logp - logp
    return torch.expm1(log_q) - log_q  # expm1, not exp - 1: exact near q = 1, so never below zero


def grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_type="grpo",
              max_len=None, denom=None):
    """The clipped policy-gradient loss of GRPO and its variants; returns (loss, {"clipfrac", "kl"}).

    Per token: l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t, with
    rho_t = exp(logp_t - old_logp_t) and A the answer's advantage. logp, old_logp, ref_logp, mask:
    (B, T), mask 1 on answer tokens; adv: (B,); ref_logp may be None when beta = 0. Aggregated as
      grpo:    mean over answers of (sum_t mask l_t / sum_t mask): each answer weighs the same, so a
               long wrong answer is penalised less per token than a short one;
      dr_grpo: sum of mask l_t / (B * max_len), max_len a constant (the generation limit);
      dapo:    sum of mask l_t / sum of mask: every token weighs the same.
    When a batch is split into micro-batches, denom is the whole batch's divisor (answers, answers *
    max_len, or tokens), so that the micro-batch losses add up to the batch's.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / (denom or logp.size(0))
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (denom or logp.size(0) * (max_len or logp.size(1)))
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (denom or mask.sum().clamp(min=1))
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo or dapo, got {loss_type!r}")
    with torch.no_grad():  # the share of tokens whose gradient the clip removed
        clipped = ((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 1 - eps_low) & (a < 0))
        n = mask.sum().clamp(min=1)
        stats = {"clipfrac": (clipped * mask).sum() / n, "kl": (kl * mask).sum() / n}
    return loss, stats


# ----------------------------------------------------------------------------- training

def main(cfg):
    run = Run("grpo", cfg, per_rank=("prompts_per_step", "replay_batch"))

    # the policy: from an SFT or preference-tuned checkpoint (by default the latest stage that has run), or resumed
    latest = next((p for p in ("out/ppo/ckpt.pt", "out/dpo/ckpt.pt") if Path(p).is_file()), "out/sft/ckpt.pt")
    ckpt, init, tok = run.load(["sft", "ppo", "dpo", "grpo"], init=cfg.init or latest)
    print0(f"grpo: starting from {run.init} (a {init['stage']} checkpoint)")
    model = common.gpt_from_checkpoint(ckpt, tok, dropout=0.0)  # ratios of 1 must mean "the same policy"
    problems, test, rater, replay = loaders.grpo(cfg, tok, model.config.block_size)
    before = ckpt.get("eval_before") if cfg.resume else None
    run.start(model, ckpt, seed=cfg.seed + run.rank, unit="perf/tokens_per_s",  # each rank its own answers
              keep=lambda: dict(eval_before=before), reference=init if cfg.beta > 0 else None)
    ref = run.reference  # the KL penalty's anchor, the starting model (none at beta = 0)
    if run.step == 0 and test and common.is_master():
        before = stage_evals.grpo_eval(run, tok, test, cfg, rater, "before")

    for step in run.steps():
        # 1-2. this rank's share of the step's problems, G answers to each, and their rewards
        picks = torch.randint(len(problems), (cfg.prompts_per_step,), generator=run.data_gen)[run.rank::run.world].tolist()
        prompts, answers, rewards, correct, worked = rollouts(run.raw, tok, problems, picks, cfg, rater)
        run.count(sum(map(len, answers)))  # the speed logged: answer tokens sampled per second

        # 3. advantages within each group; all-equal groups carry no signal
        adv, all_equal = group_advantages(rewards, cfg.group_size, cfg.scale)
        keep = [i for i in range(len(answers)) if not (cfg.skip_all_equal and all_equal[i // cfg.group_size])]
        rows = keep or [0]  # with nothing to learn here, one answer, masked out: DDP needs every rank's backward
        x, y, mask = pack_responses([prompts[i] for i in rows], [answers[i] for i in rows])
        mask, adv = (mask, adv[keep]) if keep else (torch.zeros_like(mask), torch.zeros(1))

        # 4. the update; its divisor counts the kept answers (or their tokens) of every rank
        n_seqs = common.all_mean(len(keep)) * run.world
        denom = {"grpo": n_seqs, "dr_grpo": n_seqs * cfg.max_new_tokens,
                 "dapo": common.all_mean(mask.sum().item()) * run.world}[cfg.loss_type] / run.world
        loss, clipfrac, kl, replay_loss = 0.0, 0.0, 0.0, None
        if n_seqs > 0:
            batch = tuple(t.to(run.device) for t in (x, y, mask, adv))
            loss, clipfrac, kl, replay_loss = update(run, ref, batch, denom, cfg, replay)
        run.step += 1

        metrics = {"loss/policy": loss, "lr": run.lr, "rollout/reward": rewards.mean().item(),
                   "rollout/accuracy": sum(correct) / len(correct), "rollout/worked": sum(worked) / len(worked),
                   "rollout/all_equal": all_equal.float().mean().item(), "rollout/length": sum(map(len, answers)) / len(answers),
                   "policy/clipfrac": clipfrac, **({"policy/kl": kl} if ref is not None else {}),
                   **({"loss/replay": replay_loss} if replay_loss is not None else {})}
        metrics = {k: common.all_mean(v) for k, v in metrics.items()}
        run.log(metrics, save=run.due())

    summary = {"init": run.init, "loss_type": cfg.loss_type, "format_reward": cfg.format_reward, "step_reward": cfg.step_reward}
    if test and common.is_master():
        summary.update(before=before, after=stage_evals.grpo_eval(run, tok, test, cfg, rater, "after"))
    run.finish(summary)


# ----------------------------------------------------------------------------- the reward and the advantages

def reward(completion, answer, ended, format_reward=0.0, step_reward=0.0, world=None):
    """1 if the completion's number after its last "####" equals the answer's, else 0; plus
    format_reward when the completion ended its turn (<|end|>) with such a number, right or wrong;
    plus step_reward times the share of the reference's steps the completion states right (given
    the TinyWorld world that `check_steps` marks them against)."""
    well_formed = ended and extract_answer(completion) is not None
    r = float(check_answer(completion, answer)) + format_reward * well_formed
    if step_reward and world is not None:
        _, right, total = check_steps(completion, answer, world)
        r += step_reward * right / max(total, 1)
    return r


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each group of group_size consecutive rewards;
    with scale="none", A_i = r_i - mean_g r (Dr. GRPO: no std, so low-variance groups are not blown up).

    A group whose rewards are all equal gets exactly zero advantage: it says nothing about which
    answer is better. Returns (advantages (N,), all_equal (N // group_size,) booleans).
    """
    r = rewards.view(-1, group_size).float()
    all_equal = (r == r[:, :1]).all(1)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (torch.where(all_equal, 1.0, r.std(1))[:, None] + eps)
    return torch.where(all_equal[:, None], 0.0, adv).view(-1), all_equal


# ----------------------------------------------------------------------------- rollouts and the update

def rollouts(model, tok, problems, picks, cfg, world):
    """G answers to each picked problem, sampled together with the KV cache, and their rewards: (prompts,
    answers, rewards, correct, worked: steps before its "####"), one entry per answer, grouped by problem."""
    prompts = [problems[i]["prompt"] for i in picks for _ in range(cfg.group_size)]
    refs = [problems[i]["answer"] for i in picks for _ in range(cfg.group_size)]
    answers = measures.generate_batched(model, prompts, cfg.max_new_tokens, stop_tokens=[tok.end_id, tok.eot_id],
                                     batch_size=len(prompts), temperature=cfg.temperature)
    texts = [tok.decode(t for t in a if t not in (tok.end_id, tok.eot_id)) for a in answers]
    rewards = torch.tensor([reward(t, r, a[-1:] == [tok.end_id], cfg.format_reward, cfg.step_reward, world)
                            for t, r, a in zip(texts, refs, answers)])
    return prompts, answers, rewards, [check_answer(t, r) for t, r in zip(texts, refs)], list(map(shows_work, texts))


def answer_logprobs(model, x, y, temperature):
    """log p(y_t | x up to t) under the policy that sampled the answers: the model's logits divided by
    the rollout temperature. Greedy decoding is the same at every temperature; what is learned is the
    sampling policy, so the ratio and the KL compare exactly what was sampled."""
    if temperature == 1.0:
        return -model(x, y, reduction="none")
    logits = model(x).float() / temperature  # in fp32: under bf16 autocast the division would round
    return -gpt_kernels.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)


def update(run, ref, batch, denom, cfg, replay=None):
    """cfg.passes optimizer steps on one batch of rollouts, in micro-batches whose losses add up to the
    batch's, plus (with --replay_data) one batch of pre-training text's next-token loss per optimizer step
    (a step with no group to learn from makes no update, and replays nothing either). Returns
    the loss, the clipped fraction and the KL to the reference (token means, last pass) and the replayed
    text's loss (None without it); stops the run, before a step, when the loss is not finite, and after
    one that broke the weights."""
    x, y, mask, adv = batch
    starts = list(range(0, len(x), cfg.micro_batch))
    olds, refs = [], []
    replay_loss = None
    for p in range(cfg.passes):
        loss_sum, clipped, kl = 0.0, 0.0, 0.0
        for c, s in enumerate(starts):
            sl = slice(s, s + cfg.micro_batch)
            run.sync(c == len(starts) - 1)  # all-reduce once per update
            with common.autocast(run.device):
                logp = answer_logprobs(run.model, x[sl], y[sl], cfg.temperature)
                if p == 0:  # the answers were sampled from exactly this model: rho = 1 on the first pass
                    olds.append(logp.detach())
                    refs.append(answer_logprobs(ref, x[sl], y[sl], cfg.temperature) if ref is not None else None)
                loss, stats = grpo_loss(logp, olds[c], refs[c], adv[sl], mask[sl], cfg.eps_low, cfg.eps_high,
                                        cfg.beta, cfg.loss_type, cfg.max_new_tokens, denom)
                extra = 0.0
                if replay is not None and c == len(starts) - 1:  # against forgetting: pre-training text, once per step
                    replay_loss = run.replay_loss(replay)
                    extra = cfg.replay_coef * replay_loss
            (loss + extra).backward()
            n = mask[sl].sum().item()
            loss_sum += loss.item()
            clipped, kl = clipped + stats["clipfrac"].item() * n, kl + stats["kl"].item() * n
        loss_sum = common.all_mean(loss_sum)
        run.check(loss_sum, "loss", run.step + 1)  # no step on a broken gradient
        run.apply_gradients()
        # finite weights can still give logits that overflow, which the next rollout could not sample from
        run.check_after_update(lambda net: net.token_logprobs(x[:1], y[:1]).sum(), "log-probability after the update",
                               run.step + 1)
    n = max(mask.sum().item(), 1)
    return loss_sum, clipped / n, kl / n, None if replay_loss is None else replay_loss.item()


if __name__ == "__main__":
    cli.run_main(main, configs.GRPO, configs.PRESETS["grpo"])
