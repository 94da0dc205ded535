"""Stage 4: group advantages, the clipped GRPO loss and its aggregations, the reward, a tiny run end to
end; its row of the fault table (resume, bad input: run by test_faults.py)."""
import json

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import cli
import common
import configs
import train_grpo
from conftest import run_script
from data.tinymath import shows_work
from data.tinyworld_facts import make_world
from faults import Case, Script, data_file_cases, jsonl, write, wrong_file
from model import GPT, GPTConfig
from train_grpo import answer_logprobs, group_advantages, grpo_loss, k3, reward

# ----------------------------------------------------------------------------- group advantages


@st.composite
def grouped_rewards(draw):
    """Rewards of a few groups, some of them all equal (as a 0/1 verifier gives them)."""
    G, n = draw(st.integers(2, 8)), draw(st.integers(1, 5))
    values = st.sampled_from([0.0, 0.1, 1.0, 1.1]) if draw(st.booleans()) else st.floats(-10, 10, width=32)
    groups = []
    for _ in range(n):
        groups += [draw(values)] * G if draw(st.booleans()) else [draw(values) for _ in range(G)]
    return torch.tensor(groups), G


@given(grouped_rewards(), st.sampled_from(["group", "none"]))
def test_advantages_have_zero_mean_in_every_group(rg, scale):
    rewards, G = rg
    adv, _ = group_advantages(rewards, G, scale)
    assert torch.allclose(adv.view(-1, G).mean(1), torch.zeros(len(rewards) // G), atol=1e-4)


@given(grouped_rewards(), st.sampled_from(["group", "none"]))
def test_all_equal_groups_get_zero_advantage_and_are_counted(rg, scale):
    rewards, G = rg
    adv, all_equal = group_advantages(rewards, G, scale)
    r = rewards.view(-1, G)
    assert all_equal.tolist() == [len(set(g.tolist())) == 1 for g in r]
    assert (adv.view(-1, G)[all_equal] == 0).all()


@given(grouped_rewards(), st.floats(0.1, 10), st.floats(-10, 10))
def test_std_scaled_advantages_ignore_an_affine_change_of_the_rewards(rg, a, b):
    rewards, G = rg
    rewards = rewards.double()
    assume(all(g.std() > 1e-3 or len(set(g.tolist())) == 1 for g in rewards.view(-1, G)))
    adv, _ = group_advantages(rewards, G, "group", eps=0.0)
    moved, _ = group_advantages(a * rewards + b, G, "group", eps=0.0)
    assert torch.allclose(adv, moved, atol=1e-3)


@given(grouped_rewards(), st.floats(-10, 10), st.floats(0.1, 10))
def test_unscaled_advantages_ignore_a_shift_but_follow_a_scale(rg, b, a):
    rewards, G = rg
    rewards = rewards.double()
    adv, _ = group_advantages(rewards, G, "none")
    assert torch.allclose(group_advantages(rewards + b, G, "none")[0], adv, atol=1e-3)
    assert torch.allclose(group_advantages(a * rewards, G, "none")[0], a * adv, atol=1e-2)


def test_advantages_of_a_right_and_a_wrong_answer():
    adv, all_equal = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3, "none")
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])) and all_equal.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor([1.0, 0.0]), 2, "group", eps=0.0)
    assert torch.allclose(adv, torch.tensor([1, -1]) / 2 ** 0.5)  # the unbiased std of {0, 1} is 1/sqrt(2)

# ----------------------------------------------------------------------------- the loss


@st.composite
def rollout(draw):
    """Log-probs (B, T), a response mask with at least one token per answer, and advantages."""
    B, T = draw(st.integers(1, 6)), draw(st.integers(1, 10))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 5
    old = logp + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5)
    ref = logp + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5)
    mask = (torch.rand(B, T, generator=gen) < 0.7).double()
    mask[:, 0] = 1.0
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    return logp, old, ref, adv, mask


@given(rollout())
def test_on_policy_without_kl_the_loss_is_minus_the_mean_advantage_and_its_gradient_the_policy_gradient(r):
    logp, _, _, adv, mask = r
    logp = logp.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, loss_type="grpo")
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-9)
    loss.backward()
    # d/d logp of -(1/B) sum_i A_i (1/n_i) sum_t log pi(y_it): every answer token pushed by its answer's advantage
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / len(adv)
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    assert stats["clipfrac"].item() == 0


@given(st.floats(-3, 3), st.floats(-2, 2), st.floats(0.05, 0.5), st.floats(0.05, 0.5), st.floats(0, 0.5))
def test_raising_eps_high_loosens_only_the_upper_clip(log_ratio, a, eps_low, eps_high, more):
    one = torch.ones(1, 1, dtype=torch.float64)
    logp, adv = one * log_ratio, torch.tensor([a], dtype=torch.float64)
    tight, _ = grpo_loss(logp, 0 * one, None, adv, one, eps_low, eps_high)
    loose, _ = grpo_loss(logp, 0 * one, None, adv, one, eps_low, eps_high + more)
    rho = torch.exp(logp).item()
    assert loose.item() <= tight.item() + 1e-12  # never a smaller objective
    if a <= 0 or rho <= 1 + eps_high:  # the lower clip, and everything inside the old range: unchanged
        assert loose.item() == pytest.approx(tight.item(), abs=1e-12)
    else:  # a good answer's ratio above the old clip: now counted up to the new one
        assert loose.item() == pytest.approx(-a * min(rho, 1 + eps_high + more), abs=1e-9)


# advantages are 0 or of a size a gradient can carry: 5e-324 times a ratio of 1 underflows to a zero gradient
@given(st.floats(-3, 3), st.floats(-2, 2).filter(lambda a: a == 0 or abs(a) > 1e-100), st.floats(0.05, 0.5))
def test_a_token_past_the_clip_in_its_advantage_s_direction_has_no_gradient(log_ratio, a, eps):
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), None, torch.tensor([a], dtype=torch.float64),
                            torch.ones(1, 1), eps, eps)
    loss.backward()
    rho = torch.exp(logp).item()
    clipped = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
    assert stats["clipfrac"].item() == float(clipped)
    assert (logp.grad.item() == 0) == (clipped or a == 0)


@given(st.floats(-20, 5), st.floats(-20, 5))
def test_k3_is_never_negative_and_zero_only_where_the_models_agree(logp, ref_logp):
    kl = k3(torch.tensor(logp, dtype=torch.float64), torch.tensor(ref_logp, dtype=torch.float64)).item()
    assert kl >= 0
    assert (kl == 0) == (logp == ref_logp) or abs(logp - ref_logp) < 1e-7


@given(rollout(), st.floats(0.01, 1))
def test_the_kl_penalty_adds_beta_times_k3_on_the_answer_tokens(r, beta):
    logp, old, ref, adv, mask = r
    plain, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.0, loss_type="dapo")
    penalised, stats = grpo_loss(logp, old, ref, adv, mask, beta=beta, loss_type="dapo")
    assert penalised.item() == pytest.approx(plain.item() + beta * stats["kl"].item(), rel=1e-9, abs=1e-12)


def test_the_aggregations_weigh_long_and_short_answers_differently():
    # one short answer (1 token) and one long one (3 tokens), each token losing 1
    logp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    loss = {t: grpo_loss(logp, logp, None, adv, mask, loss_type=t, max_len=4)[0].item()
            for t in ("grpo", "dr_grpo", "dapo")}
    assert loss == pytest.approx({"grpo": (1 + 1) / 2, "dr_grpo": (1 + 3) / (2 * 4), "dapo": (1 + 3) / 4})


@given(rollout(), st.sampled_from(["grpo", "dr_grpo", "dapo"]), st.data())
def test_micro_batches_given_the_batch_divisor_add_up_to_the_batch_loss(r, loss_type, data):
    logp, old, ref, adv, mask = r
    assume(len(adv) >= 2)
    cut = data.draw(st.integers(1, len(adv) - 1))
    whole, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1, loss_type=loss_type, max_len=12)
    denom = {"grpo": len(adv), "dr_grpo": len(adv) * 12, "dapo": mask.sum().item()}[loss_type]
    parts = sum(grpo_loss(*(t[:cut] if i else t[cut:] for t in (logp, old, ref, adv, mask)), beta=0.1,
                          loss_type=loss_type, max_len=12, denom=denom)[0] for i in (0, 1))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-9, abs=1e-12)

# ----------------------------------------------------------------------------- the reward


# extract_answer's own cases are in test_tinyworld.py; these are the verifier's, as GRPO's reward sees them
@pytest.mark.parametrize("completion, answer, right", [
    ("3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 7", True),   # against a worked reference
    ("#### 12,345.50 coins", "12345.5", True),          # commas and a decimal together
    ("#### 7.0", 7, True),                              # the same number, written another way
    ("#### 4", "-4", False),                            # the sign counts
    ("#### -4", "x = -4\n#### -4", True),
    ("7", 7, False),                                    # no marker, right number: still wrong
    ("#### 7\n#### 8", 7, False),                       # several markers: the last one counts
    ("#### 8\n#### 7", 7, True),
    ("#### 7 apples, and 8 pears", 7, True),            # text after the number
    ("#### 7th", 7, True),
    ("#### about 7", 7, False),                         # text between the marker and the number
])
def test_the_verifier(completion, answer, right):
    assert reward(completion, answer, ended=False) == float(right)


def test_the_format_reward_needs_a_finished_turn_with_a_number():
    assert reward("#### 5", 7, ended=True, format_reward=0.1) == pytest.approx(0.1)
    assert reward("#### 7", 7, ended=True, format_reward=0.1) == pytest.approx(1.1)
    assert reward("#### 5", 7, ended=False, format_reward=0.1) == 0.0  # cut off at the length limit
    assert reward("the answer is 7", 7, ended=True, format_reward=0.1) == 0.0

WORLD = make_world(0, 48)
LUCY = WORLD.seen[0]
PROBLEM = f"{LUCY.name}'s pet is a {LUCY.pet}.\n{LUCY.name} gets 4 apples.\n#### 4"
OTHER_PET = next(p for p in ("cat", "dog", "pony") if p != LUCY.pet)
ANSWERS = [  # (a model's answer, how many of the reference's two steps it states right)
    ("", 0), ("#### 4", 0), (f"{LUCY.name}'s pet is a {OTHER_PET}.\n#### 4", 0),
    (f"{LUCY.name}'s pet is a {LUCY.pet}.\n#### 5", 1), (f"{LUCY.name} gets 4 apples.\n#### 4", 1),
    (f"{LUCY.name}'s pet is a {LUCY.pet}.\n{LUCY.name} gets 4 apples.\n#### 4", 2),
    (f"{LUCY.name}'s pet is a {LUCY.pet}.\n{LUCY.name} gets 4 apples.\n#### 5", 2)]


@given(st.sampled_from(ANSWERS), st.floats(0, 1), st.floats(0, 1), st.booleans())
def test_the_step_reward_is_bounded_and_grows_with_the_steps_right(answer, step_reward, format_reward, ended):
    text, steps_right = answer
    r = reward(text, PROBLEM, ended, format_reward, step_reward, WORLD)
    right = text.endswith("#### 4")
    assert 0 <= r <= 1 + format_reward + step_reward
    assert r == pytest.approx(right + format_reward * (ended and "####" in text) + step_reward * steps_right / 2)
    assert reward("", PROBLEM, ended, format_reward, step_reward, WORLD) == 0.0
    for other, other_steps in ANSWERS:  # more steps right, same final answer and format: never less reward
        if other_steps > steps_right and other.endswith("#### 4") == right and ("####" in other) == ("####" in text):
            assert reward(other, PROBLEM, ended, format_reward, step_reward, WORLD) >= r


@settings(max_examples=20)
@given(st.floats(0.2, 3.0), st.integers(0, 2**16))
def test_answer_logprobs_are_those_of_the_tempered_policy_that_sampled(temperature, seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=8)).eval()
    x, y = torch.randint(11, (2, 6)), torch.randint(11, (2, 6))
    y[0, :2] = -100  # prompt tokens predict nothing
    want = torch.log_softmax(model(x).double() / temperature, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    got = answer_logprobs(model, x, y, temperature)
    assert torch.allclose(got.double(), torch.where(y == -100, 0.0, want), atol=1e-5)


@pytest.mark.parametrize("answer, worked", [("#### 7", False), ("  \n#### 7", False), ("Lucy is a baker.\n#### 4", True),
                                            ("Lucy is a baker.", False), ("", False), ("4 + 3 = 7 #### 7", True)])
def test_shows_work_tells_steps_from_a_bare_number(answer, worked):
    assert shows_work(answer) == worked


def test_the_step_reward_needs_a_world():
    assert reward(PROBLEM, PROBLEM, True, step_reward=0.5) == 1.0
    assert reward(PROBLEM, PROBLEM, True, step_reward=0.5, world=WORLD) == 1.5

# ----------------------------------------------------------------------------- end to end


def grpo_flags(tiny_world, init, out, *extra):
    d = tiny_world["data"]
    return [f"--init={init}", f"--out={out}", f"--data={d / 'math_train.jsonl'}",
            f"--test_data={d / 'math_test.jsonl'}", f"--world={d}", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=16",
            "--pass_k=2", "--test_limit=4", "--log_every=1", *extra]


def test_tiny_run_samples_rewards_evaluates_and_saves(tiny_world, tiny_sft, tmp_path, capsys):
    out = tmp_path / "grpo"
    r = run_script("train_grpo.py", *grpo_flags(tiny_world, tiny_sft, out, "--max_steps=3", "--beta=0.1",
                                                "--skip_all_equal=false", "--passes=2", "--loss_type=dr_grpo"))
    assert r.returncode == 0, r.stderr
    assert f"starting from {tiny_sft} (a sft checkpoint)" in r.stdout and "grpo 3/3" in r.stdout
    assert "before: held-out pass@1" in r.stdout and "after: held-out pass@1" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(metrics[when]) >= {"pass@1", "pass@2", "length", "worked", "n"} and metrics[when]["n"] == 4
        assert 0 <= metrics[when]["worked"] <= 1
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss/policy" in row]
    assert len(steps) == 3
    assert all(set(row) >= {f"rollout/{k}" for k in ("reward", "accuracy", "worked", "all_equal", "length")}
               | {"policy/kl", "policy/clipfrac"} for row in steps)
    assert all(0 <= row["rollout/worked"] <= 1 for row in steps)
    ckpt = common.load_checkpoint(out / "ckpt.pt", ["grpo"])
    assert ckpt["step"] == 3 and ckpt["init"] == str(tiny_sft)
    # a grpo checkpoint is a valid start for more, through the GPU preset's flags on TinyWorld's files
    cfg = cli.parse_config(configs.GRPO, ["--preset=gpu", *grpo_flags(tiny_world, out / "ckpt.pt", tmp_path / "more"),
                                       "--test_data=", "--max_steps=1", "--compile=false"], configs.PRESETS["grpo"])
    train_grpo.main(cfg)
    assert "a grpo checkpoint" in capsys.readouterr().out and cfg.lr == configs.PRESETS["grpo"]["gpu"]["lr"]


# ----------------------------------------------------------------------------- its row of the fault table (test_faults.py)

def fault_flags(fx, out):
    return [f"--data={fx.tiny_solver.parent / 'problems.jsonl'}", "--test_data=", f"--init={fx.tiny_solver}",
            f"--out={out}", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=8",
            f"--replay_data={fx.tiny_world['data'] / 'corpus_train.txt'}", "--replay_batch=2"]


def good_problem(fx):
    return (fx.tiny_world["data"] / "math_train.jsonl").read_text().splitlines()[0]


LONG_PROBLEM = {"question": "tell me " * 200, "answer": "#### 1"}
WORDS = {"question": "What is 2 + 2?", "answer": "four"}  # no "#### <number>" for the verifier to read

GRPO_CASES = {
    **data_file_cases(good_problem, "problems"),
    "a problem without its answer": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_problem(fx), '', {'question': 'What is 2 + 2?'}))}"],
        f"{tmp / 'bad.jsonl'}:3", "not a math problem"),
    "an answer without its number": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_problem(fx), WORDS))}"],
        f"{tmp / 'bad.jsonl'}:2", "not a math problem"),
    "conversations given to GRPO": wrong_file("data", "sft_train.jsonl",
        "a conversation (SFT's data), not a math problem"),
    "preference pairs given to GRPO": wrong_file("data", "prefs_train.jsonl", "a preference pair"),
    "problems longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PROBLEM))}"],
        str(tmp / "long.jsonl"), "too long for the context"),
    "answers as long as the context": lambda fx, tmp: Case(
        ["--max_new_tokens=128"], None, "--max_new_tokens=128 leaves no room for a prompt"),
    "a missing held-out problem file": lambda fx, tmp: Case(
        [f"--test_data={tmp / 'none.jsonl'}"], str(tmp / "none.jsonl"), "run `python -m data.tinyworld`"),
    "a group of one answer": lambda fx, tmp: Case(
        ["--group_size=1"], None, "--group_size must be 2 or more"),
    "an unknown loss": lambda fx, tmp: Case(["--loss_type=ppo"], None, "--loss_type must be grpo or dr_grpo or dapo"),
}


FAULTS = Script("train_grpo.py", fault_flags, init="tiny_solver", wrong_stage="rm", cases=GRPO_CASES,
                batch="prompts_per_step", curve="loss/policy")
