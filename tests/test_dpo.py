"""Stage 3c: the DPO losses' properties, a tiny run end to end; its row of the fault table (resume, bad
input: run by test_faults.py)."""
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import cli
import common
import configs
from conftest import run_script
from faults import LONG_PAIR, Case, Script, data_file_cases, good_pair, jsonl, write, wrong_file
from gpt_lora import AdaptersOff
from model import GPT, GPTConfig
from run import Run
from train_dpo import dpo_loss, pair_logprobs

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


def started(tiny_world, tiny_sft, out, lora_rank, reference):
    """A DPO run started (seed 7) with SFT's model as its reference or none, and the first numbers drawn after."""
    cfg = cli.parse_config(configs.DPO, dpo_flags(tiny_world, tiny_sft, out, f"--lora_rank={lora_rank}", "--device=cpu"),
                           configs.PRESETS["dpo"])
    run = Run("dpo", cfg)
    ckpt, init, tok = run.load(["sft"])
    run.start(common.gpt_from_checkpoint(ckpt, tok), ckpt, seed=7, reference=init if reference else None)
    return run, torch.rand(4)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_the_reference_is_sft_frozen_or_with_lora_the_policy_with_its_adapters_off(lora_rank, tiny_world, tiny_sft,
                                                                                    tmp_path):
    run, drawn = started(tiny_world, tiny_sft, tmp_path / "ref", lora_rank, reference=True)
    assert torch.equal(drawn, started(tiny_world, tiny_sft, tmp_path / "none", lora_rank, reference=False)[1])
    sft = common.gpt_from_checkpoint(common.load_checkpoint(tiny_sft), run.tok).eval()
    evaluated = run.reference_to_evaluate()
    assert type(evaluated) is GPT and evaluated is not run.raw and not evaluated.training
    assert not any(p.requires_grad for p in evaluated.parameters())
    if lora_rank:  # one copy of the weights for training against; a model of its own for the evaluation
        assert isinstance(run.reference, AdaptersOff) and run.reference.model is run.raw
        with torch.no_grad():  # the adapters move away from zero, as training moves them
            for name, p in run.raw.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1)
    else:
        assert evaluated is run.reference
    x = torch.randint(sft.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(run.reference(x), sft(x)) and torch.equal(evaluated(x), sft(x))
        assert lora_rank == 0 or not torch.allclose(run.raw.eval()(x), sft(x))


# ----------------------------------------------------------------------------- its row of the fault table (test_faults.py)

def fault_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=", f"--init={fx.tiny_sft}",
            f"--out={out}", "--batch_size=4", f"--replay_data={d / 'corpus_train.txt'}", "--replay_batch=2"]


# DPO reads preference pairs as the reward model does, but with a loader and errors of its own
DPO_CASES = {
    **data_file_cases(good_pair, "preference pairs"),
    "a pair without its rejected reply": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_pair(fx), '', {'prompt': 'Hi?', 'chosen': 'Hello.'}))}"],
        f"{tmp / 'bad.jsonl'}:3", '"rejected" is missing'),
    "pairs longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"],
        str(tmp / "long.jsonl"), "too long for the context"),
    "conversations given to DPO": wrong_file("data", "sft_train.jsonl",
        "a conversation (SFT's data), not a preference pair"),
    "math problems given to DPO": wrong_file("data", "math_train.jsonl",
        "a math problem (GRPO's data), not a preference pair"),
    "held-out pairs that do not fit the context": lambda fx, tmp: Case(
        [f"--test_data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"],
        f"--test_data={tmp / 'long.jsonl'}", "holds no pair that fits the context"),
    "conversations given as held-out questions": wrong_file("qa_data", "sft_train.jsonl", 'needs "messages"'),
    "a win rate without held-out prompts": lambda fx, tmp: Case(
        [f"--world={fx.tiny_world['data']}"], None, "--world"),
    "a --world that is not a TinyWorld": lambda fx, tmp: Case(
        [f"--test_data={fx.tiny_world['data'] / 'prefs_test.jsonl'}", f"--world={tmp}"],
        f"no TinyWorld in {tmp}", "python -m data.tinyworld"),
    "an unknown loss": lambda fx, tmp: Case(["--loss_type=kto"], None, "--loss_type=kto"),
    "label smoothing of one half": lambda fx, tmp: Case(
        ["--label_smoothing=0.5"], None, "--label_smoothing is a probability below 0.5"),
    "label smoothing given to IPO": lambda fx, tmp: Case(
        ["--loss_type=ipo", "--label_smoothing=0.1"], None, "--loss_type=ipo takes no --label_smoothing"),
}


FAULTS = Script("train_dpo.py", fault_flags, init="tiny_sft", wrong_stage="pretrain", cases=DPO_CASES)


# ----------------------------------------------------------------------------- batches padded by length group

tokens = st.lists(st.integers(0, 63), min_size=1, max_size=20)


@given(st.lists(st.tuples(tokens, tokens, tokens), min_size=1, max_size=10))
def test_pair_logprobs_in_length_groups_equal_each_pair_alone(pairs):
    """Both replies of every pair are scored in groups of similar length: each log-prob is the reply's
    own sum over its tokens, as if it were scored alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=1, n_head=2, n_embd=16, rope=True)).eval()
    batch = [(p, c, r, None) for p, c, r in pairs]
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, batch, "cpu")
        alone = [pair_logprobs(model, [pair], "cpu") for pair in batch]
    assert torch.allclose(chosen, torch.cat([c for c, _ in alone]), atol=1e-4)
    assert torch.allclose(rejected, torch.cat([r for _, r in alone]), atol=1e-4)
