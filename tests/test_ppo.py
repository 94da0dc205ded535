"""Stage 3b: PPO's pieces against their definitions (rewards, GAE, whitening, the clipped losses, the
KL estimators), and a tiny PPO run end to end."""
import json
import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import common
from conftest import run_script, run_scripts
from faults import LONG_PAIR, Case, Script, data_file_cases, good_pair, jsonl, write
from train_ppo import (conservative_score, gae, kl_penalty, masked_whiten, ppo_policy_loss, ppo_value_loss,
                       shape_rewards)


@st.composite
def rollouts(draw, max_rows=4, max_len=10):
    """Rewards, values and a mask with one contiguous reply per row, as pack_responses makes them."""
    B, T = draw(st.integers(1, max_rows)), draw(st.integers(2, max_len))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        start = draw(st.integers(0, T - 1))
        mask[b, start:draw(st.integers(start + 1, T))] = 1
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    return rewards, values, mask


@given(rollouts())
def test_gae_with_gamma_and_lambda_one_is_return_to_go_minus_value(r):
    rewards, values, mask = r
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)  # sum of r_k for k >= t (rewards are 0 off the reply)
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-12)


@given(rollouts(), st.floats(0.5, 1.0))
def test_gae_with_lambda_zero_is_the_td_residual(r, gamma):
    rewards, values, mask = r
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], 1)
    assert torch.allclose(adv, (rewards + gamma * next_values - values) * mask, atol=1e-12)


@given(rollouts(), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_returns_minus_values_are_the_advantages(r, gamma, lam):
    rewards, values, mask = r
    adv, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(returns - values * mask, adv, atol=1e-12)
    assert (adv[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


@given(rollouts())
def test_whitened_advantages_have_masked_mean_0_and_variance_1(r):
    x, _, mask = r
    n = mask.sum()
    spread = ((x - (x * mask).sum() / n) ** 2 * mask).sum() / n
    assume(n >= 2 and spread > 1e-3)
    w = masked_whiten(x, mask)
    mean = (w * mask).sum() / n
    assert abs(mean.item()) < 1e-9
    assert ((w - mean) ** 2 * mask).sum().item() / n.item() == pytest.approx(1.0, rel=1e-5)
    assert (w[mask == 0] == 0).all()


@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(0.05, 0.5))
def test_policy_gradient_vanishes_only_beyond_the_clip_in_the_advantage_direction(log_ratio, a, clip):
    ratio = math.exp(log_ratio)
    assume(abs(a) > 1e-3 and abs(ratio - 1 - clip) > 1e-9 and abs(ratio - 1 + clip) > 1e-9)  # not on a kink
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    old, adv, mask = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[a]], dtype=torch.float64), torch.ones(1, 1)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip)
    loss.backward()
    beyond = (a > 0 and ratio > 1 + clip) or (a < 0 and ratio < 1 - clip)
    if beyond:
        assert logp.grad.item() == 0.0
    else:  # the unclipped objective -A * rho, whose gradient in log rho is -A * rho
        assert logp.grad.item() == pytest.approx(-a * ratio, rel=1e-9)


@given(rollouts(), st.floats(0.05, 0.5))
def test_value_loss_is_at_least_half_the_squared_error(r, clip):
    returns, values, mask = r
    old = values + 0.3 * torch.sin(torch.arange(values.numel(), dtype=torch.float64)).view_as(values)
    plain = 0.5 * ((values - returns) ** 2 * mask).sum() / mask.sum()
    assert ppo_value_loss(values, old, returns, mask, clip).item() >= plain.item() - 1e-12


@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=10))
def test_k3_is_never_negative_and_zero_only_at_ratio_one(pairs):
    logp = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    ref = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    assume(((logp - ref).abs() > 1e-6).all())
    assert (kl_penalty(logp, ref, "k3") > 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros_like(logp))


@given(rollouts(), st.floats(0.0, 1.0), st.sampled_from(["k1", "k3"]))
def test_shaped_rewards_add_up_to_the_score_minus_the_kl_penalty(r, beta, estimator):
    logp, ref_logp, mask = r
    score = torch.linspace(-1, 1, len(mask), dtype=torch.float64)
    rewards, kl = shape_rewards(score, logp, ref_logp, mask, beta, estimator)
    assert torch.allclose(rewards.sum(1), score - beta * kl.sum(1), atol=1e-12)
    assert (rewards[mask == 0] == 0).all()


@st.composite
def ensemble_scores(draw, max_models=5, max_rows=6):
    k, B = draw(st.integers(1, max_models)), draw(st.integers(1, max_rows))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return torch.randn(k, B, generator=gen, dtype=torch.float64) * draw(st.floats(0.01, 10))


RULES = [("min", 1.0), ("mean_std", 1.0), ("mean_std", 0.5), ("mean", 0.0)]


@given(ensemble_scores(max_models=1), st.sampled_from(RULES))
def test_one_reward_model_is_its_own_score(scores, rule):
    assert torch.equal(conservative_score(scores, *rule), scores[0])


@given(ensemble_scores(), st.sampled_from(RULES), st.randoms(use_true_random=False))
def test_the_combination_is_never_above_the_mean_nor_depends_on_the_models_order(scores, rule, rnd):
    combined = conservative_score(scores, *rule)
    assert (combined <= scores.mean(0) + 1e-12).all()
    order = list(range(scores.size(0)))
    rnd.shuffle(order)
    assert torch.allclose(conservative_score(scores[order], *rule), combined, rtol=0, atol=1e-12)


@given(ensemble_scores(), st.floats(0, 3))
def test_mean_std_is_the_mean_less_a_multiple_of_the_spread(scores, coef):
    k = scores.size(0)
    mean = [sum(scores[:, b].tolist()) / k for b in range(scores.size(1))]
    std = [math.sqrt(sum((x - m) ** 2 for x in scores[:, b].tolist()) / k) for b, m in enumerate(mean)]
    expected = torch.tensor([m - coef * s for m, s in zip(mean, std)], dtype=torch.float64)
    assert torch.allclose(conservative_score(scores, "mean_std", coef), expected, atol=1e-9)
    assert torch.equal(conservative_score(scores, "min"), torch.tensor([min(scores[:, b].tolist()) for b in range(scores.size(1))], dtype=torch.float64))


# ----------------------------------------------------------------------------- end to end


def ppo_flags(tiny_world, sft, rm, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", f"--test_data={d / 'prefs_test.jsonl'}",
            f"--qa_data={d / 'sft_test.jsonl'}", f"--world={d}", f"--init={sft}", f"--reward_model={rm}", f"--out={out}",
            "--batch_size=4", "--minibatch_size=2", "--ppo_epochs=2", "--max_new_tokens=8", "--warmup_steps=1",
            "--log_every=1", *extra]


def test_tiny_ppo_run_trains_logs_and_saves(tiny_world, tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "ppo"
    r = run_script("train_ppo.py", *ppo_flags(tiny_world, tiny_sft, tiny_rm, out, "--max_steps=3", "--eval_every=3"))
    assert r.returncode == 0, r.stderr
    assert "ppo 3/3" in r.stdout and "against SFT by the gold rater" in r.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for name in ("rollout/score", "rollout/kl", "loss/policy", "loss/value", "policy/approx_kl", "policy/clipfrac",
                 "policy/entropy", "rollout/length"):
        assert all(name in row for row in rows), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["win_rate_vs_sft"] <= 1.0 and "qa_ppo" in metrics
    ckpt = common.load_checkpoint(out / "ckpt.pt", ["ppo"])
    assert ckpt["step"] == 3 and "critic" in ckpt


def test_an_ensemble_of_one_model_twice_is_that_model_and_an_ensemble_resumes_exactly(tiny_world, tiny_sft, tiny_rm,
                                                                                        tmp_path):
    d, rm2 = tiny_world["data"], tmp_path / "rm2"
    ppo = lambda rms, out, *extra: ["train_ppo.py", *ppo_flags(tiny_world, tiny_sft, rms, tmp_path / out, "--max_steps=4",
                                                               "--eval_every=2", "--test_data=", "--qa_data=", *extra)]
    pair = f"{tiny_rm},{rm2 / 'ckpt.pt'}"
    runs = run_scripts([
        ["train_rm.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", f"--init={tiny_sft}", f"--out={rm2}", "--world=",
         "--batch_size=4", "--max_steps=2", "--warmup_steps=1", "--zero_prompts=4", "--max_new_tokens=8", "--seed=7"],
        ppo(str(tiny_rm), "one"), ppo(f"{tiny_rm},{tiny_rm}", "twice", "--ensemble=mean_std"), ppo(pair, "pair"),
        ppo(pair, "resumed", "--stop_at=2"), ppo(pair, "resumed", "--resume")], tmp_path)
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    learned = lambda out: [{k: v for k, v in row.items() if k.startswith(("step", "rollout/", "loss/", "policy/"))}
                           for row in map(json.loads, (tmp_path / out / "log.jsonl").read_text().splitlines())]
    assert learned("twice") == learned("one") and all(row["rollout/spread"] == 0 for row in learned("one"))
    assert learned("resumed") == learned("pair") and any(row["rollout/spread"] > 0 for row in learned("pair"))
    a, b = (common.load_checkpoint(tmp_path / out / "ckpt.pt")["model"] for out in ("pair", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- its row of the fault table (test_faults.py)

def fault_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=", f"--init={fx.tiny_sft}",
            f"--reward_model={fx.tiny_rm}", f"--out={out}", "--batch_size=4", "--minibatch_size=2", "--ppo_epochs=1",
            "--max_new_tokens=8"]


PPO_CASES = {
    **data_file_cases(good_pair, "prompts"),
    "a record with no prompt": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_pair(fx), {'question': 'Hi?'}))}"],
        f"{tmp / 'bad.jsonl'}:2", "not a prompt"),
    "a prompt longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"], None, "do not fit in the context"),
    "an SFT checkpoint as the reward model": lambda fx, tmp: Case(
        [f"--reward_model={fx.tiny_sft}"], str(fx.tiny_sft), "'sft' checkpoint"),
}


FAULTS = Script("train_ppo.py", fault_flags, init="tiny_sft", wrong_stage="rm", cases=PPO_CASES, curve="rollout/score")
