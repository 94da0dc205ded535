"""Stage 3b, RLHF with PPO: make the SFT policy write what the reward model scores high, without drifting.

    python train_ppo.py                 # TinyWorld on a CPU, from out/sft and out/rm
    python train_ppo.py --kl_coef=0 --max_steps=120 --out=out/ppo/no_kl   # no KL penalty: is the reward hacked?
    python train_ppo.py --preset=gpu    # HH-RLHF prompts on one GPU, from GPU runs of train_sft.py and train_rm.py
    torchrun --standalone --nproc_per_node=8 train_ppo.py --preset=gpu

Four networks: the policy (trained, from SFT), the reference (frozen SFT), the critic (trained, from
the reward model: a separate network that predicts how much reward is still to come) and the reward
model (frozen). Each step:
 1. rollout: the policy samples a reply to each prompt of a batch (batched, with the KV cache);
 2. scoring: the reward model scores each whole reply (a reply that never emits <|end|> gets a fixed
    penalty instead); log-probs under the policy and the reference; the critic's values;
 3. `shape_rewards`: per token, -kl_coef times the KL to the reference, plus the score at the last
    token: the policy may chase the score only as far as it stays close to what SFT would say;
 4. `gae`: advantages and returns over the reply tokens; advantages whitened (`masked_whiten`);
 5. a few epochs over minibatches of the rollouts: the clipped policy loss (`ppo_policy_loss`) for
    the policy, the clipped value loss (`ppo_value_loss`) for the critic.
Logits are divided by the sampling temperature both when sampling and when scoring log-probs, so the
ratios compare the distribution the tokens were drawn from. Dropout is off: ratios of 1 must mean
"the same policy". On TinyWorld the gold rater also scores every rollout, so the learned reward and
the true one can be watched side by side (out/<run>/reward_vs_gold.png): where the first keeps rising
and the second does not, the policy is exploiting the reward model. Writes out/ppo/ckpt.pt, log.jsonl and metrics.json.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli
import common
import evals
from cli import UserError
from common import print0
from data import formats, read_jsonl, tinyworld
from data.batches import pack_responses, score_replies
from data.tokenizer import load_tokenizer
from run import Run


# ----------------------------------------------------------------------------- the losses

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the tokens where mask is 1; 0 elsewhere. PPO's advantages go through
    this: their scale changes as the rewards do, the step size should not."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalty(logp, ref_logp, estimator="k1"):
    """Per-token estimates of KL(pi || pi_ref) from the sampled token's log-probs, with r = pi_ref / pi:
    k1 = -log r (unbiased, but any one token can be negative); k3 = (r - 1) - log r (never negative,
    zero only at r = 1; unbiased too, as E_pi[r - 1] = 0)."""
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1 or k3")


def shape_rewards(score, logp, ref_logp, mask, kl_coef, estimator="k1"):
    """The per-token rewards PPO maximises: r_t = -kl_coef * KL_t on every reply token, plus the
    reward model's score (B,) on the last one. Returns (rewards, KL_t), both 0 off the mask."""
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)  # the last reply token's index
    rewards[torch.arange(len(score), device=mask.device), last] += score
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over the reply tokens (mask 1), from the last one back:
    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, with V and A zero after
    the reply ends. Returns (advantages, returns = advantages + values), both 0 off the mask.
    lam = 1 gives the return-to-go minus V_t; lam = 0 gives delta_t alone."""
    adv = torch.zeros_like(rewards)
    next_value = next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t] * mask[:, t], adv[:, t]
    return adv, (adv + values) * mask


def ppo_policy_loss(logp, old_logp, adv, mask, clip=0.2):
    """mean over tokens of max(-A rho, -A clip(rho, 1 - clip, 1 + clip)), rho = pi / pi_old.

    The max of the two is the pessimistic one: once rho has moved past the clip in the direction
    that the advantage rewards, the loss goes flat and its gradient is zero, so one batch of
    rollouts cannot pull the policy far. Returns (loss, {"approx_kl", "clipfrac"})."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), mask)
    with torch.no_grad():
        stats = {"approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),  # k3 of pi_old against pi
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask).item()}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """1/2 mean over tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, +-clip):
    the critic, like the policy, may move only so far from its rollout-time values per batch."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ----------------------------------------------------------------------------- rollouts

def token_logprobs(model, x, y, temperature):
    """log pi(y_t) under the temperature-scaled logits, and the entropy of each position's distribution."""
    logp_all = F.log_softmax(model(x).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@torch.no_grad()
def rollout(policy, ref, critic, rm, tok, questions, cfg, device):
    """Sample a reply to each question and score it: everything the PPO update needs, as tensors."""
    prompts, outs, texts = evals.chat_replies(policy, tok, questions, cfg.max_new_tokens, temperature=cfg.temperature)
    x, y, mask = (t.to(device) for t in pack_responses(prompts, outs))
    ended = torch.tensor([o[-1] == tok.end_id for o in outs], device=device)
    score = score_replies(rm, prompts, outs)[0]
    score = torch.where(ended, score, torch.full_like(score, cfg.missing_end_penalty))
    with common.autocast(device):
        logp = token_logprobs(policy, x, y, cfg.temperature)[0]
        ref_logp = token_logprobs(ref, x, y, cfg.temperature)[0]
        values = critic(x)
    return dict(x=x, y=y, mask=mask, score=score, logp=logp.float(), ref_logp=ref_logp.float(),
                values=values.float(), ended=ended.float(), texts=texts)


# ----------------------------------------------------------------------------- training

def main(cfg):
    cli.require_positive(cfg, "batch_size", "minibatch_size", "ppo_epochs", "max_steps", "eval_every", "log_every",
                         "max_new_tokens", "lr", "critic_lr", "temperature")
    cli.require_choice(cfg, "kl_estimator", ("k1", "k3"))
    run = Run("ppo", cfg)

    # the four networks: policy and reference from SFT, critic and reward model from the reward model
    ckpt = run.resumed()
    init, reward_model = (ckpt["init"], ckpt["reward_model"]) if ckpt else (cfg.init, cfg.reward_model)
    tokenizer, tok, policy, ref, rm, critic = networks(ckpt, init, reward_model, cfg, run.device)
    questions, rater, judge = load_data(cfg, tok, policy.config.block_size)
    model = run.start(policy, ckpt, tok, tokenizer, seed=cfg.seed + run.rank, keep=lambda: dict(  # each rank its own replies
        critic=critic.state_dict(), critic_optimizer=critic_opt.state_dict(), init=init, reward_model=reward_model))
    critic_opt = critic.configure_optimizer(cfg.critic_lr, cfg.weight_decay)
    if ckpt:
        critic_opt.load_state_dict(ckpt["critic_optimizer"])
    critic_model = run.ddp(critic)

    metrics = {}
    for step in run.steps():
        # 1-2. rollouts, scored
        picks = torch.randint(len(questions), (cfg.batch_size,), generator=run.data_gen)[run.rank::run.world].tolist()
        batch = rollout(policy, ref, critic, rm, tok, [questions[i] for i in picks], cfg, run.device)
        mask = batch["mask"]
        # 3-4. rewards, advantages, returns
        rewards, kl = shape_rewards(batch["score"], batch["logp"], batch["ref_logp"], mask, cfg.kl_coef, cfg.kl_estimator)
        adv, returns = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask)

        # 5. PPO epochs over minibatches
        stats = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(picks), generator=run.data_gen)
            for mb in order.split(cfg.minibatch_size):
                m = mask[mb]
                with common.autocast(run.device):
                    logp, entropy = token_logprobs(model, batch["x"][mb], batch["y"][mb], cfg.temperature)
                    values = critic_model(batch["x"][mb])
                pg_loss, pg_stats = ppo_policy_loss(logp, batch["logp"][mb], adv[mb], m, cfg.clip)
                vf_loss = ppo_value_loss(values, batch["values"][mb], returns[mb], m, cfg.value_clip)
                run.check(pg_loss.item() + vf_loss.item(), "loss", run.step + 1)
                for loss, net, opt in ((pg_loss, model, run.optimizer), (vf_loss, critic_model, critic_opt)):
                    loss.backward()
                    run.apply_gradients(net, opt)
                stats.append({"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                              "policy/entropy": masked_mean(entropy.detach(), m).item(),
                              **{f"policy/{k}": v for k, v in pg_stats.items()}})
        run.step += 1

        gold = [tinyworld.gold_score(questions[i], t, rater) for i, t in zip(picks, batch["texts"])] if judge else None
        metrics = step_metrics(batch, kl, stats, gold, run.lr)
        # finite losses can still leave weights whose probabilities the next rollout cannot sample from
        with torch.no_grad():
            after = token_logprobs(policy, batch["x"][:1], batch["y"][:1], cfg.temperature)[0].sum().item()
        run.check(after, "policy's log-probability after the update")
        run.log(metrics, save=run.due())

    result = {"final": metrics}
    if common.is_master():
        result.update(final_evaluation(policy, ref, tok, rater if judge else None, cfg))
    run.finish(result)


def step_metrics(batch, kl, stats, gold, lr):
    """The step's row: what the rollouts got, the update's statistics averaged over its minibatches, and
    the gold rater's score of the same replies where a world can judge them; averaged over the ranks."""
    mask = batch["mask"]
    metrics = {"rollout/score": batch["score"].mean().item(), "rollout/kl": kl.sum(1).mean().item()}
    if gold is not None:
        metrics["rollout/gold"] = float(np.mean(gold))
    metrics.update({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
    metrics.update({"rollout/length": mask.sum(1).mean().item(), "rollout/ended": batch["ended"].mean().item(), "lr": lr})
    return {k: common.all_mean(v) for k, v in metrics.items()}


def final_evaluation(policy, ref, tok, rater, cfg):
    """The reward model's score against the gold rater's over training (a plot), and on held-out prompts
    PPO's greedy replies against SFT's: the gold rater's verdict, KL to SFT, held-out QA of both."""
    result = {}
    if rater is not None:
        evals.plot_reward_vs_gold(Path(cfg.out) / "log.jsonl", Path(cfg.out) / "reward_vs_gold.png")
    if cfg.test_data and rater is not None:
        held_out = formats.prompts(cfg.test_data)
        versus = evals.gold_win_rate(policy, ref, tok, held_out, cfg.max_new_tokens, rater)
        kl_ref = evals.kl_to_reference(policy, ref, tok, held_out, cfg.max_new_tokens)
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
            result[f"qa_{name}"] = qa = evals.qa_accuracy(net, tok, records)
            qa.pop("examples")
            print0(evals.describe_qa(qa, f"ppo: {name}"))
    return result


def networks(ckpt, init, reward_model, cfg, device):
    """The tokenizer and the four networks: policy (ours under --resume) and frozen reference from SFT,
    frozen reward model and critic (its trunk and head, trained from here) from the reward model."""
    sft = common.load_checkpoint(init, ["sft"], made_by="python train_sft.py")
    rm_ckpt = common.load_checkpoint(reward_model, ["rm"], made_by="python train_rm.py")
    if rm_ckpt["model_args"]["vocab_size"] != sft["model_args"]["vocab_size"]:
        raise UserError(f"the reward model {reward_model} and the policy {init} use different vocabularies: "
                        "train the reward model from this SFT checkpoint")
    tokenizer = cfg.tokenizer or sft["tokenizer"]
    tok = load_tokenizer(tokenizer)
    policy = common.gpt_from_checkpoint(ckpt or sft, tok, dropout=0.0).to(device)
    ref = common.gpt_from_checkpoint(sft, tok).to(device).eval().requires_grad_(False)
    rm = common.gpt_from_checkpoint(rm_ckpt, tok, reward=True).to(device).eval().requires_grad_(False)
    critic = common.gpt_from_checkpoint(rm_ckpt, tok, value_head=True, dropout=0.0).to(device)
    if ckpt:
        critic.load_state_dict(ckpt["critic"])
    return tokenizer, tok, policy, ref, rm, critic


def load_data(cfg, tok, block_size):
    """The prompts, checked against the context; the world the gold rater knows, and whether it can judge them."""
    questions = formats.prompts(cfg.data)
    if not questions:
        raise UserError(f"{cfg.data} holds no prompts: give a JSONL file of preference pairs or conversations")
    longest = max(len(tok.render_prompt([{"role": "user", "content": q}])) for q in questions)
    if longest + cfg.max_new_tokens > block_size:
        raise UserError(f"a prompt of {longest} tokens and --max_new_tokens={cfg.max_new_tokens} do not fit in the "
                        f"context ({block_size}): lower --max_new_tokens or shorten the prompts")
    rater = tinyworld.load_world(cfg.world) if cfg.world else None  # the world the gold rater knows
    judge = rater is not None and rater.parse_question(questions[0]) is not None
    print0(f"ppo: {len(questions):,} prompts from {cfg.data}; policy and reference from {cfg.init}, "
           f"critic and reward model from {cfg.reward_model}")
    return questions, rater, judge


# ----------------------------------------------------------------------------- the settings

@dataclass
class Config:
    data: str = "data/tinyworld/prefs_train.jsonl"  # prompts to train on: JSONL records with "prompt" or "messages"
    test_data: str = "data/tinyworld/prefs_test.jsonl"  # held-out prompts for the final head-to-head (empty: none)
    qa_data: str = "data/tinyworld/sft_test.jsonl"  # held-out questions for answer accuracy (empty: skip)
    tokenizer: str = ""                # default: the one the --init checkpoint was trained with
    init: str = "out/sft/ckpt.pt"      # the SFT checkpoint: the policy's start and the frozen reference
    reward_model: str = "out/rm/ckpt.pt"  # the reward model: scores replies, and the critic's start
    out: str = "out/ppo"               # where ckpt.pt, log.jsonl, metrics.json and the plot go
    resume: bool = False               # continue exactly from out/ckpt.pt
    batch_size: int = 32               # prompts per rollout, over all processes
    minibatch_size: int = 16           # rollouts per gradient step, per process
    ppo_epochs: int = 4                # passes over each batch of rollouts
    max_steps: int = 70                # rollout-and-update steps
    stop_at: int = 0                   # stop early at this step with a checkpoint (0: run to max_steps)
    lr: float = 1e-4                   # the policy's peak learning rate
    critic_lr: float = 1e-3            # the critic's learning rate
    min_lr: float = 3e-5               # the policy's learning rate at the end of the cosine
    warmup_steps: int = 5              # linear warm-up steps
    weight_decay: float = 0.0          # AdamW decay on matrices
    kl_coef: float = 0.05              # beta: weight of the per-token KL penalty to the reference
    kl_estimator: str = "k1"           # k1 (log pi/pi_ref, unbiased) or k3 ((r-1) - log r, never negative)
    gamma: float = 1.0                 # discount: 1, the reward arrives once at the end
    lam: float = 0.95                  # GAE's lambda: bias (0) against variance (1) of the advantages
    clip: float = 0.2                  # PPO's ratio clip epsilon
    value_clip: float = 0.2            # how far a value may move from its rollout value per update
    temperature: float = 1.0           # sampling temperature (logits are divided by it in training too)
    max_new_tokens: int = 48           # reply length limit
    missing_end_penalty: float = -1.0  # the score of a reply that never emits <|end|>
    grad_clip: float = 1.0             # clip each network's gradient norm to this (0: off)
    eval_every: int = 25               # steps between checkpoints
    log_every: int = 5                 # steps between printed lines
    world: str = "data/tinyworld"      # the TinyWorld whose gold rater scores rollouts and the win rate (empty: none)
    device: str = "auto"               # auto (cuda, mps, cpu), or a torch device name
    compile: bool = False              # torch.compile the policy
    seed: int = 1337                   # seeds prompt order and sampling


PRESETS = {
    # HH-RLHF prompts (python -m data.prepare_hh_rlhf), from GPU runs of train_sft.py and train_rm.py
    "gpu": dict(data="data/real/hh_train.jsonl", test_data="", qa_data="", batch_size=64, minibatch_size=16,
                max_steps=300, lr=1e-5, critic_lr=1e-5, min_lr=1e-6, warmup_steps=10, max_new_tokens=128,
                eval_every=50, log_every=5, world=""),
    # the whole journey's plumbing in about a minute on a CPU, nothing learned (make demo PRESET=smoke)
    "smoke": dict(batch_size=4, minibatch_size=2, ppo_epochs=1, max_steps=2, warmup_steps=1, max_new_tokens=8,
                  eval_every=2, log_every=1),
}


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
