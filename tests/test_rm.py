"""Stage 3a: the reward loss's properties and a tiny reward model end to end (bad input: tests/test_faults.py)."""
import json
import math
import types

import pytest
import torch
from hypothesis import given, strategies as st

import common
import configs
import measures
from studies import report_writing
from conftest import run_script
from cli import UserError
from data.batches import score_replies
from data.tinyworld_chat import gold_score
from data.tinyworld_facts import VALUES, fact_sentence, load_world, question
from data.tokenizer import load_tokenizer
from faults import LONG_PAIR, Case, Script, data_file_cases, good_pair, jsonl, write, wrong_file
from model import GPTConfig, RewardModel
from train_rm import reward_loss

finite = st.floats(-20, 20, allow_nan=False)
rewards = st.lists(st.tuples(finite, finite), min_size=1, max_size=8)


def tensors(pairs):
    return (torch.tensor([c for c, _ in pairs], dtype=torch.float64),
            torch.tensor([r for _, r in pairs], dtype=torch.float64))


@given(st.lists(finite, min_size=1, max_size=8))
def test_equal_rewards_give_log_2(r):
    t = torch.tensor(r, dtype=torch.float64)
    assert reward_loss(t, t).item() == pytest.approx(math.log(2), rel=1e-12)


@given(rewards, st.floats(0.01, 5))
def test_the_loss_falls_as_the_chosen_reply_pulls_ahead(pairs, lead):
    r_c, r_r = tensors(pairs)
    assert reward_loss(r_c + lead, r_r).item() < reward_loss(r_c, r_r).item()


@given(rewards, st.floats(-5, 5))
def test_a_margin_is_the_same_as_a_smaller_gap(pairs, m):
    r_c, r_r = tensors(pairs)
    assert reward_loss(r_c, r_r, margin=m).item() == pytest.approx(reward_loss(r_c - m, r_r).item(), rel=1e-9, abs=1e-12)


@given(rewards, st.floats(0.0, 1.0))
def test_centering_adds_its_term_and_nothing_else(pairs, c):
    r_c, r_r = tensors(pairs)
    extra = c * ((r_c + r_r) ** 2).mean().item()
    assert reward_loss(r_c, r_r, center_coef=c).item() == pytest.approx(reward_loss(r_c, r_r).item() + extra, rel=1e-9)


@given(rewards, st.floats(0.0, 10.0), st.floats(0.0, 2.0))
def test_the_language_modelling_term_adds_its_weight_times_the_nll_and_nothing_else(pairs, nll, coef):
    r_c, r_r = tensors(pairs)
    plain = reward_loss(r_c, r_r, 0.1, 0.01).item()
    with_lm = reward_loss(r_c, r_r, 0.1, 0.01, lm_nll=torch.tensor(nll, dtype=torch.float64), lm_coef=coef).item()
    assert with_lm == pytest.approx(plain + coef * nll, rel=1e-9, abs=1e-12)
    assert reward_loss(r_c, r_r, 0.1, 0.01, lm_nll=None, lm_coef=0.0).item() == plain  # off: Bradley-Terry alone


@given(rewards)
def test_the_loss_sees_only_differences_without_centering(pairs):
    r_c, r_r = tensors(pairs)
    assert reward_loss(r_c + 3.0, r_r + 3.0).item() == pytest.approx(reward_loss(r_c, r_r).item(), rel=1e-9)


# ----------------------------------------------------------------------------- end to end


def rm_flags(tiny_world, init, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", f"--test_data={d / 'prefs_test.jsonl'}", f"--init={init}",
            f"--out={out}", f"--world={d}", "--batch_size=4", "--warmup_steps=1", "--log_every=2", "--zero_prompts=8",
            "--max_new_tokens=8", *extra]


def test_tiny_reward_model_trains_scores_and_saves(tiny_world, tiny_sft, tmp_path):
    out = tmp_path / "rm"
    r = run_script("train_rm.py", *rm_flags(tiny_world, tiny_sft, out, "--max_steps=4", "--eval_every=2"))
    assert r.returncode == 0, r.stderr
    assert "rm 4/4" in r.stdout and "held-out pairwise accuracy" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["steps"] == 4
    assert 0.0 <= metrics["gold_agreement"] <= 1.0 and "agrees with the gold rater" in r.stdout
    # the held-out accuracy apart for pairs that differ in manner and pairs with a wrong reply
    assert 0.0 <= metrics["test_accuracy_style"] <= 1.0 and 0.0 <= metrics["test_accuracy_facts"] <= 1.0
    assert 0.0 <= metrics["test_accuracy_facts_unseen"] <= 1.0
    assert "where one is wrong about a character the training pairs mention" in r.stdout
    assert "no training pair mentions" in r.stdout
    ckpt = common.load_checkpoint(out / "ckpt.pt", ["rm"])
    assert ckpt["score_shift"] == pytest.approx(metrics["score_shift"])
    model = common.gpt_from_checkpoint(ckpt, reward=True)  # the heads come back with the trunk
    assert torch.equal(model.head.bias, ckpt["model"]["head.bias"])
    assert torch.equal(model.gate.weight, ckpt["model"]["gate.weight"])
    assert ckpt["first_slack"] == model.first_slack == configs.RM.first_slack > 0  # scored as it was trained
    with pytest.raises(UserError, match="--first_slack"):
        configs.RM(first_slack=-1.0).check()


class LongerWins(torch.nn.Module):
    """A stand-in reward model that scores a row by where it ends: the longer reply of a pair wins."""

    def __init__(self, block_size):
        super().__init__()
        self.head, self.config = torch.nn.Linear(1, 1), types.SimpleNamespace(block_size=block_size)

    def forward(self, idx, start, end):
        return end.float(), torch.zeros(idx.shape[0], idx.shape[1] - 1)


def test_reward_accuracy_counts_each_kind_of_pair_apart(tiny_world):
    world, tok = load_world(tiny_world["data"]), load_tokenizer(tiny_world["tokenizer"])
    c = world.characters[0]
    q, right = question(c, "pet", 0), fact_sentence(c, "pet")
    wrong = fact_sentence(c, "pet", value=next(v for v in VALUES["pet"] if v != c.pet))
    pair = lambda prompt, chosen, rejected: {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    records = [pair(q, "Sure! " + right, wrong),                                 # facts, won
               pair(q, right, "Sure! " + wrong + " I hope that helps!"),         # facts, lost
               pair(q, "Sure! " + right, right),                                 # style, won
               pair(q, right, right + " It is a long story, and I like it."),    # style, lost
               pair("How are you?", "Fine, thank you.", "Ugh."),                 # neither kind, won
               pair(q, right + " word" * 200, right),                            # longer than the context: left out
               {**pair(q, "Sure! " + right, wrong), "split": "unseen"}]          # facts, about an unseen character: won
    acc = measures.reward_accuracy(LongerWins(128), tok, records, world)
    assert acc == {"all": 4 / 6, "facts": 0.5, "style": 0.5, "facts_unseen": 1.0,
                   "style_pairs": {"plain > plain": [0, 1], "polite > plain": [1, 1]}}
    assert report_writing.manner_mistakes(acc["style_pairs"]) == \
        " Where it orders manner wrong, by the pair's styles (the better first): plain > plain 1 of 1."
    assert report_writing.manner_mistakes({"polite > plain": [1, 1]}) == ""  # none wrong: nothing said
    assert measures.reward_accuracy(LongerWins(128), tok, records) == {"all": 4 / 6}  # no world: no kinds


tokens = st.lists(st.integers(0, 63), min_size=1, max_size=20)


@given(st.lists(st.tuples(tokens, tokens), min_size=1, max_size=12))
def test_replies_scored_in_length_groups_score_as_one_by_one(pairs):
    """Padding a length group at a time changes nothing a row computes: each score and log-prob sum is
    the row's own, scored alone without any padding."""
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=64, block_size=48, n_layer=1, n_head=2, n_embd=16, rope=True)).eval()
    torch.nn.init.normal_(rm.gate.weight, std=1.0)  # the log-prob part weighs in too
    prompts, replies = [p for p, _ in pairs], [r for _, r in pairs]
    with torch.no_grad():
        scores, logp, lengths = score_replies(rm, prompts, replies)
        alone = [score_replies(rm, [p], [r]) for p, r in pairs]
    assert torch.allclose(scores, torch.cat([a[0] for a in alone]), atol=1e-5)
    assert torch.allclose(logp, torch.cat([a[1] for a in alone]), atol=1e-4)
    assert lengths.tolist() == [len(r) for r in replies]


def test_best_of_n_keeps_the_highest_scored_of_the_first_n_replies(tiny_world, tiny_sft):
    tok, world = load_tokenizer(tiny_world["tokenizer"]), load_world(tiny_world["data"])
    ckpt = common.load_checkpoint(tiny_sft)
    policy = common.gpt_from_checkpoint(ckpt, tok).eval()
    torch.manual_seed(0)
    rm = common.gpt_from_checkpoint(ckpt, tok, reward=True).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # scores that differ from reply to reply
    questions = [question(c, "pet", 0) for c in world.characters[:3]]
    best = measures.best_of_n(policy, rm, tok, questions, (1, 2, 4), 8, torch.Generator().manual_seed(5), world)
    # the same samples again, scored one by one
    prompts, outs, texts = measures.chat_replies(policy, tok, [q for q in questions for _ in range(4)], 8,
                                              temperature=1.0, generator=torch.Generator().manual_seed(5))
    scores = torch.stack([score_replies(rm, [p], [o])[0][0] for p, o in zip(prompts, outs)]).view(3, 4)
    for i, n in enumerate((1, 2, 4)):
        assert best["rm"][i] == pytest.approx(scores[:, :n].max(1).values.mean().item(), abs=1e-5)
    # n = 1 is the plain sampled reply, scored by the gold rater
    plain = [gold_score(q, texts[4 * i], world) for i, q in enumerate(questions)]
    assert best["gold"][0] == pytest.approx(sum(plain) / 3)
    assert best["rm"] == sorted(best["rm"])  # more replies to pick from never lowers the kept score


@pytest.mark.parametrize("flag, says", [("--lm_coef=-1", "--lm_coef must be 0"), ("--best_of_prompts=0", "--best_of_prompts")])
def test_a_bad_new_flag_is_one_line_and_exit_2(flag, says, tmp_path):
    r = run_script("train_rm.py", flag, f"--out={tmp_path / 'rm'}")
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------- its row of the fault table (test_faults.py)

def fault_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--world=", f"--init={fx.tiny_sft}", f"--out={out}",
            "--batch_size=4", "--zero_prompts=4", "--max_new_tokens=8"]


RM_CASES = {
    **data_file_cases(good_pair, "preference pairs"),
    "a pair without its rejected reply": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_pair(fx), '', {'prompt': 'Hi?', 'chosen': 'Hello.'}))}"],
        f"{tmp / 'bad.jsonl'}:3", "not a preference pair"),
    "pairs longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"], str(tmp / "long.jsonl"), "too long for the context"),
    "conversations given to the reward model": wrong_file("data", "sft_train.jsonl", "a conversation (SFT's data)"),
}


FAULTS = Script("train_rm.py", fault_flags, init="tiny_sft", wrong_stage="pretrain", cases=RM_CASES)
