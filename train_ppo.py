"""Stage 3b, RLHF with PPO: make the SFT policy write what the reward model scores high, without drifting.

    python train_ppo.py                 # TinyWorld on a CPU, from out/sft and out/rm
    python train_ppo.py --kl_coef=0 --out=out/ppo/no_kl   # no KL penalty: is the reward hacked? (make hacking: shown)
    python train_ppo.py --preset=gpu    # HH-RLHF prompts on one GPU, from GPU runs of train_sft.py and train_rm.py
    torchrun --standalone --nproc_per_node=8 train_ppo.py --preset=gpu

Four networks: the policy (trained, from SFT), the reference (frozen SFT), the critic (trained, from
the reward model: a separate network that predicts how much reward is still to come) and the reward
model (frozen; or several, --reward_model=A,B,C, whose scores `conservative_score` combines). Each step:
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
and the second does not, the policy is exploiting the reward model. Flags: configs.PPO.
Writes out/ppo/ckpt.pt, log.jsonl and metrics.json.
"""
import numpy as np
import torch
import torch.nn.functional as F

import cli
import common
import configs
import loaders
import measures
import stage_evals
from cli import UserError
from data import tinyworld
from data.batches import pack_responses, score_replies
from gpt_lora import add_lora
from run import Run


# ----------------------------------------------------------------------------- the loss

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


# ----------------------------------------------------------------------------- training

def main(cfg):
    run = Run("ppo", cfg)

    # the four networks: policy and reference from SFT, critic and reward model from the reward model
    ckpt, sft, tok = run.load(["sft"])
    reward_model = ckpt["reward_model"] if cfg.resume else cfg.reward_model
    policy, rms, critic = networks(ckpt, sft, reward_model, tok, run)
    questions, rater, judge = loaders.ppo(cfg, tok, policy.config.block_size)
    model = run.start(policy, ckpt, seed=cfg.seed + run.rank, reference=sft,  # each rank its own replies
                      keep=lambda: dict(critic=critic.state_dict(), critic_optimizer=critic_opt.state_dict(),
                                        reward_model=reward_model))
    ref = run.reference
    if cfg.lora_rank:  # the critic, too, trains adapters and its head only: drawn after the seed, as the policy's
        add_lora(critic, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    critic_opt = critic.configure_optimizer(cfg.critic_lr, cfg.weight_decay)
    if cfg.resume:
        critic.load_state_dict(ckpt["critic"])
        critic_opt.load_state_dict(ckpt["critic_optimizer"])
    critic_model = run.ddp(critic)

    metrics = {}
    for step in run.steps():
        # 1-2. rollouts, scored
        picks = torch.randint(len(questions), (cfg.batch_size,), generator=run.data_gen)[run.rank::run.world].tolist()
        batch = rollout(policy, ref, critic, rms, tok, [questions[i] for i in picks], cfg, run.device)
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
        first = batch["x"][:1], batch["y"][:1]
        run.check_after_update(lambda net: token_logprobs(net, *first, cfg.temperature)[0].sum(),
                               "policy's log-probability after the update")
        run.log(metrics, save=run.due())

    result = {"final": metrics}
    if common.is_master():
        ref = run.reference_to_evaluate()  # the evaluation also generates from it
        result.update(stage_evals.after_ppo(policy, ref, tok, rater if judge else None, cfg))
    run.finish(result)


# ----------------------------------------------------------------------------- the rewards and the advantages

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


def conservative_score(scores, how="min", coef=1.0):
    """One reward from k reward models' scores of the same replies, scores (k, B), cautious where they disagree:

        how="min":       min over the k models
        how="mean_std":  mean - coef * std over the k models (the population std: 0 for k = 1)
        how="mean":      the plain mean (not cautious: the ensemble's average taste)

    A reply that one model overrates and the others do not gains little, so the policy is paid for
    what the models agree on, and a flaw of one model is worth less to exploit (Coste et al. 2023,
    "Reward model ensembles help mitigate overoptimization"). Each equals the single score for k = 1,
    is never above the mean, and does not depend on the order of the models."""
    if how == "min":
        return scores.min(0).values
    if how == "mean_std":
        return scores.mean(0) - coef * scores.std(0, correction=0)
    if how == "mean":
        return scores.mean(0)
    raise ValueError(f"unknown ensemble rule {how!r}: use min, mean_std or mean")


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


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the tokens where mask is 1; 0 elsewhere. PPO's advantages go through
    this: their scale changes as the rewards do, the step size should not."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# ----------------------------------------------------------------------------- rollouts

def token_logprobs(model, x, y, temperature):
    """log pi(y_t) under the temperature-scaled logits, and the entropy of each position's distribution."""
    logp_all = F.log_softmax(model(x).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@torch.no_grad()
def rollout(policy, ref, critic, rms, tok, questions, cfg, device):
    """Sample a reply to each question and score it (by the reward models' conservative score when
    there are several): everything the PPO update needs, as tensors."""
    prompts, outs, texts = measures.chat_replies(policy, tok, questions, cfg.max_new_tokens, temperature=cfg.temperature)
    x, y, mask = (t.to(device) for t in pack_responses(prompts, outs))
    ended = torch.tensor([o[-1] == tok.end_id for o in outs], device=device)
    scores = torch.stack([score_replies(m, prompts, outs)[0] for m in rms])  # (k, B): each reward model's
    score = conservative_score(scores, cfg.ensemble, cfg.ensemble_coef)
    score = torch.where(ended, score, torch.full_like(score, cfg.missing_end_penalty))
    with common.autocast(device):
        logp = token_logprobs(policy, x, y, cfg.temperature)[0]
        ref_logp = token_logprobs(ref, x, y, cfg.temperature)[0]
        values = critic(x)
    return dict(x=x, y=y, mask=mask, score=score, logp=logp.float(), ref_logp=ref_logp.float(),
                values=values.float(), ended=ended.float(), texts=texts, spread=scores.std(0, correction=0))


# ----------------------------------------------------------------------------- the step's row and the networks

def step_metrics(batch, kl, stats, gold, lr):
    """The step's row: what the rollouts got, the update's statistics averaged over its minibatches, and
    the gold rater's score of the same replies where a world can judge them; averaged over the ranks."""
    mask = batch["mask"]
    metrics = {"rollout/score": batch["score"].mean().item(), "rollout/kl": kl.sum(1).mean().item(),
               "rollout/spread": batch["spread"].mean().item()}
    if gold is not None:
        metrics["rollout/gold"] = float(np.mean(gold))
    metrics.update({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
    metrics.update({"rollout/length": mask.sum(1).mean().item(), "rollout/ended": batch["ended"].mean().item(), "lr": lr})
    return {k: common.all_mean(v) for k, v in metrics.items()}


def networks(ckpt, sft, reward_model, tok, run):
    """Three of the four networks (run.start adds the reference): the policy (ours under --resume) from SFT,
    the frozen reward models (one, or an ensemble: reward_model is a comma-separated list) and the critic (its
    trunk and head, trained from here; main adds its adapters and state) from the first of them."""
    rm_ckpts = []
    for path in reward_model.split(","):
        rm_ckpts.append(common.load_checkpoint(path, ["rm"], made_by="python train_rm.py"))
        if rm_ckpts[-1]["model_args"]["vocab_size"] != sft["model_args"]["vocab_size"]:
            raise UserError(f"the reward model {path} and the policy {run.init} use different vocabularies: "
                            "train the reward model from this SFT checkpoint")
    policy = common.gpt_from_checkpoint(ckpt, tok, dropout=0.0).to(run.device)
    rms = [run.frozen(c, reward=True) for c in rm_ckpts]
    critic = common.gpt_from_checkpoint(rm_ckpts[0], tok, value_head=True, dropout=0.0).to(run.device)
    return policy, rms, critic


if __name__ == "__main__":
    cli.run_main(main, configs.PPO, configs.PRESETS["ppo"])
