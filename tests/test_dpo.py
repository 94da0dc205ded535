"""Stage 3c: the DPO losses' properties, a tiny run end to end with an exact resume, bad input."""
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import common
from conftest import error_line, run_script
import train_dpo
from train_dpo import dpo_loss

# ----------------------------------------------------------------------------- the losses

betas = st.floats(0.01, 5.0)
smoothing = st.floats(0.0, 0.45)


@st.composite
def logprobs(draw, n=None):
    """Four (N,) tensors of sequence log-probabilities: policy chosen, policy rejected, reference
    chosen, reference rejected."""
    n = n or draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return [-torch.rand(n, generator=gen, dtype=torch.float64) * 60 for _ in range(4)]


def loss_of_h(h, beta, kind="sigmoid", eps=0.0):
    """The loss as a function of h alone: the policy's chosen log-prob is h, the rest 0."""
    zero = torch.zeros_like(h)
    return dpo_loss(h, zero, zero, zero, beta, kind, eps)[0]


@given(logprobs(), betas, smoothing, st.sampled_from(["sigmoid", "robust"]))
def test_the_loss_is_log_2_when_the_policy_is_the_reference(lp, beta, eps, kind):
    _, _, ref_chosen, ref_rejected = lp
    loss, metrics = dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta, kind, eps)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-9)
    assert metrics["rewards/margin"].item() == 0 and metrics["rewards/accuracy"].item() == 0


@given(st.floats(-40, 40), betas)
def test_the_sigmoid_loss_of_h_minus_that_of_minus_h_is_minus_beta_h(h, beta):
    h = torch.tensor([h], dtype=torch.float64)
    assert (loss_of_h(h, beta) - loss_of_h(-h, beta)).item() == pytest.approx(-beta * h.item(), rel=1e-9, abs=1e-9)


@given(st.floats(-30, 30), betas)
def test_the_gradient_with_respect_to_h_lies_between_minus_beta_and_0(beta_h, beta):
    # beta h within +-30, so that sigmoid(-beta h) is neither 0 nor 1 in float64
    h = torch.tensor([beta_h / beta], dtype=torch.float64, requires_grad=True)
    loss_of_h(h, beta).backward()
    assert -beta < h.grad.item() < 0


@given(betas, st.floats(-10, 10).filter(lambda d: abs(d) > 1e-3))
def test_ipo_is_minimised_at_h_equal_to_one_over_2_beta(beta, delta):
    best = torch.tensor([1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
    at_best = loss_of_h(best, beta, "ipo")
    at_best.backward()
    assert at_best.item() == pytest.approx(0, abs=1e-12) and best.grad.item() == pytest.approx(0, abs=1e-9)
    assert loss_of_h(best.detach() + delta, beta, "ipo").item() > at_best.item()


@given(logprobs(), betas)
def test_the_robust_loss_is_the_sigmoid_loss_at_zero_smoothing(lp, beta):
    sigmoid, robust = dpo_loss(*lp, beta, "sigmoid")[0], dpo_loss(*lp, beta, "robust", 0.0)[0]
    assert robust.item() == pytest.approx(sigmoid.item(), rel=1e-12)


@given(st.floats(-40, 40), betas, smoothing)
def test_smoothing_matches_its_noise_model(h, beta, eps):
    # a label flipped with probability eps sees the loss of -h instead of h
    h = torch.tensor([h], dtype=torch.float64)
    expected = lambda kind: (1 - eps) * loss_of_h(h, beta, kind, eps) + eps * loss_of_h(-h, beta, kind, eps)
    # conservative DPO is the plain loss averaged over that noise...
    conservative = (1 - eps) * loss_of_h(h, beta) + eps * loss_of_h(-h, beta)
    assert loss_of_h(h, beta, "sigmoid", eps).item() == pytest.approx(conservative.item(), rel=1e-9, abs=1e-9)
    # ...and the robust loss, averaged over it, is the plain loss on the true label: unbiased
    assert expected("robust").item() == pytest.approx(loss_of_h(h, beta).item(), rel=1e-7, abs=1e-7)


@given(logprobs(), betas)
def test_the_reward_metrics_are_beta_times_the_log_ratios(lp, beta):
    pi_chosen, pi_rejected, ref_chosen, ref_rejected = lp
    _, m = dpo_loss(*lp, beta)
    r_chosen, r_rejected = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    assert m["rewards/chosen"].item() == pytest.approx(r_chosen.mean().item(), rel=1e-9)
    assert m["rewards/margin"].item() == pytest.approx((r_chosen - r_rejected).mean().item(), rel=1e-9, abs=1e-12)
    assert m["rewards/accuracy"].item() == pytest.approx((r_chosen > r_rejected).double().mean().item())


# ----------------------------------------------------------------------------- end to end


def dpo_flags(tiny_world, init, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", f"--test_data={d / 'prefs_test.jsonl'}",
            f"--qa_data={d / 'sft_test.jsonl'}", f"--world={d}", f"--init={init}", f"--out={out}",
            "--batch_size=4", "--max_steps=4", "--warmup_steps=1", "--eval_every=2", "--log_every=2",
            "--max_new_tokens=8", *extra]


@pytest.fixture(scope="module")
def tiny_dpo(tiny_world, tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    r = run_script("train_dpo.py", *dpo_flags(tiny_world, tiny_sft, out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_tiny_run_trains_evaluates_and_saves(tiny_dpo, tiny_world):
    out, stdout = tiny_dpo
    assert "dpo 4/4" in stdout and "against SFT by the gold rater" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and set(metrics["final"]) >= {"loss/train", "rewards/margin", "rewards/accuracy"}
    assert 0 <= metrics["test"]["rewards/accuracy"] <= 1 and 0 <= metrics["win_rate_vs_sft"] <= 1
    held_out = (tiny_world["data"] / "prefs_test.jsonl").read_text().splitlines()
    assert metrics["win_rate_prompts"] == len({json.loads(line)["prompt"] for line in held_out})  # each prompt once
    for name in ("qa_sft", "qa_dpo", "qa_sft_not_trained", "qa_dpo_not_trained"):
        assert set(metrics[name]) >= {"accuracy", "seen", "unseen", "format"}
    assert math.isfinite(metrics["kl_to_sft"]) and metrics["seconds"]["evaluation"] > 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    ckpt = common.load_checkpoint(out / "ckpt.pt", ["dpo"])
    assert ckpt["step"] == 4 and "optimizer" in ckpt and ckpt["init"].endswith("ckpt.pt")


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_world, tiny_sft, tmp_path):
    # in this process, to spare two interpreter starts; training only, no evaluation
    d = tiny_world["data"]
    run = lambda out, **kw: train_dpo.main(train_dpo.Config(
        data=str(d / "prefs_train.jsonl"), test_data="", qa_data="", world="", init=str(tiny_sft), out=str(out),
        batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, log_every=2, **kw))
    run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_at=2)
    run(tmp_path / "resumed", resume=True)
    straight, resumed = (common.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 4
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])


def test_a_pair_missing_a_field_names_the_file_and_line(tiny_world, tiny_sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (tiny_world["data"] / "prefs_train.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n\n" + json.dumps({"prompt": "Where does Ada live?", "chosen": "In Oakvale."}) + "\n")
    line = error_line(run_script("train_dpo.py", *dpo_flags(tiny_world, tiny_sft, tmp_path / "o", f"--data={bad}")))
    assert f"{bad}:3" in line and '"rejected" is missing' in line


def test_init_from_a_checkpoint_that_is_not_sft(tiny_world, tiny_pretrained, tmp_path):
    line = error_line(run_script("train_dpo.py", *dpo_flags(tiny_world, tiny_pretrained, tmp_path / "o")))
    assert "'pretrain' checkpoint" in line and "sft" in line
