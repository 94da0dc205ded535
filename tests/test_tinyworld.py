"""TinyWorld (data/tinyworld*.py, data/tinymath.py): determinism, disjoint splits, answers that agree with the
world, the oracles."""
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cli import UserError
from data import read_documents, read_jsonl
from data.tinyworld import (FACT_KINDS, VALUES, Config, answer_correct, check_answer, completes_fact, extract_answer,
                            fact_prompts, generate, gold_score, load_world, make_world)
from data.tinyworld_chat import STYLES, designed_pair, llm_reply, pref_prompts, reply, style_of
from data.tinyworld_facts import LLM_QUESTIONS, NAMES, QUESTIONS, question

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--n_characters=10", "--profile_docs=3", "--quizzes=20", "--fact_sheets=20", "--stories=60",
         "--arithmetic_docs=40", "--math_docs=40", "--llm_docs=5", "--math_sft=30", "--math_sft_bare=10", "--math_grpo=60", "--math_test=20",
         "--prefs_train=200", "--prefs_test=40", "--prefs_test_unseen=20", "--val_fraction=0.2"]


@pytest.fixture(scope="module")
def data():
    """The default-size data set, in memory (about a second)."""
    return generate(Config())


def user_texts(records):
    return [r["messages"][0]["content"] for r in records]


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "data.tinyworld", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------
# Files and determinism


def test_same_seed_gives_identical_files(tmp_path):
    # different hash seeds: a set iterated in its hash order would show up here
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(f"--out={a}", *SMALL, env={"PYTHONHASHSEED": "1"}).returncode == 0
    assert run(f"--out={b}", *SMALL, env={"PYTHONHASHSEED": "2"}).returncode == 0
    assert run(f"--out={c}", "--seed=1", *SMALL).returncode == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(["corpus_train.txt", "corpus_val.txt", "sft_train.jsonl", "sft_answers_only.jsonl",
                            "sft_test.jsonl", "prefs_train.jsonl", "prefs_test.jsonl", "math_train.jsonl",
                            "math_test.jsonl", "meta.json"])
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "corpus_train.txt").read_bytes() != (c / "corpus_train.txt").read_bytes()
    # the files are what the readers expect, and meta.json gives back the world
    world = load_world(a)
    assert len(world.characters) == 10 and world.characters == make_world(0, 10).characters
    assert len(read_jsonl(a / "math_test.jsonl")) == 20 and len(read_documents(a / "corpus_val.txt")) > 0


def test_user_errors_exit_2_with_one_line(tmp_path):
    for args in (["--stories=many"], ["--colour=blue"], ["--n_characters=500"], ["--math_sft_bare=-1"]):
        r = run(f"--out={tmp_path}", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(UserError, match="python -m data.tinyworld"):
        load_world(tmp_path / "missing")


def test_oracles_import_from_tinyworld_whose_parts_never_import_it():
    from data import tinyworld
    for name in ("World", "load_world", "default_world", "make_world", "fact_prompts", "completes_fact", "answer_correct",
                 "gold_score", "answers_right", "extract_answer", "check_answer"):
        assert hasattr(tinyworld, name), name
    # the imports point one way: data.tinyworld imports its parts, never the reverse
    code = "import sys, data.tinyworld_facts, data.tinyworld_chat, data.tinymath; print('data.tinyworld' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


# ----------------------------------------------------------------------------------------------
# The world


def test_cast_names_and_values_cannot_be_confused():
    names = [n for ns in NAMES.values() for n in ns]
    values = [v.lower() for vs in VALUES.values() for v in vs]
    assert len(set(names)) == len(names) and len(set(values)) == len(values)
    assert not [(a, b) for a in names for b in names if a != b and b.startswith(a)]
    assert not {n.lower() for n in names} & set(values)
    world = make_world(0, 48)
    assert len(world.seen) == len(world.unseen) == 24
    for kind in FACT_KINDS:  # balanced: no value is used much more than another
        counts = Counter(c.fact(kind) for c in world.characters)
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == len(VALUES[kind])


def test_fact_prompts_are_always_completed_by_the_fact(data):
    world = data["world"]
    prompts = fact_prompts(world)
    assert len(prompts) == 5 * len(world.characters)
    assert {(p.split()[0].split("'")[0], a) for p, a in prompts} == {(c.name, c.fact(k)) for c in world.characters for k in FACT_KINDS}
    text = "\n\n".join(data["corpus_train.txt"])
    for prompt, answer in prompts:
        nexts = Counter(re.findall(re.escape(prompt) + r" (\w+)", text))
        assert list(nexts) == [answer], (prompt, nexts)
        assert nexts[answer] >= 20  # the completion form alone; the other phrasings add more
        assert text.count(prompt) == nexts[answer]  # the prompt never appears any other way


def test_corpus_has_every_kind_of_text_and_val_is_new(data):
    train, val = data["corpus_train.txt"], data["corpus_val.txt"]
    assert 2_000_000 < sum(len(d) for d in train) < 6_000_000
    assert len(val) > 100 and not set(val) & set(train)
    for docs in (train, val):
        text = "\n".join(docs)
        for marker in ("What is an LLM?", "Q: ", "An interview with", "Once upon a time", "####", " times "):
            assert marker in text
        assert all("\n\n" not in d and d == d.strip() for d in docs)


# ----------------------------------------------------------------------------------------------
# SFT


def test_sft_answers_agree_with_the_world_and_cover_seen_characters_only(data):
    world, train = data["world"], data["sft_train.jsonl"]
    asked = set()
    for r in train:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        parsed = world.parse_question(q)
        if "####" in a:
            assert check_answer(a, a)  # a worked problem (tests/test_tinymath.py checks them)
        elif parsed == ("llm", None):
            assert "language model" in a
        else:
            c, kind = parsed
            assert c.seen
            assert [v for v in VALUES[kind] if answer_correct(a, v)] == [c.fact(kind)], (q, a)
            asked.add((c.name, kind))
    assert asked == {(c.name, k) for c in world.seen for k in FACT_KINDS}
    styles = Counter("Anyway" in r["messages"][1]["content"] for r in train)
    assert styles[True] > 50  # rambling answers are there for preference tuning to remove


def test_sft_test_is_held_out(data):
    world, train, test = data["world"], data["sft_train.jsonl"], data["sft_test.jsonl"]
    assert not set(user_texts(train)) & set(user_texts(test))
    for r in test:
        c, kind = world.parse_question(r["messages"][0]["content"])
        assert len(r["messages"]) == 1 and r["character"] == c.name and r["fact"] == kind
        assert r["answer"] == c.fact(kind) and r["split"] == ("seen" if c.seen else "unseen")
    unseen = {(r["character"], r["fact"]) for r in test if r["split"] == "unseen"}
    assert unseen == {(c.name, k) for c in world.unseen for k in FACT_KINDS}
    assert Counter(r["split"] for r in test)["seen"] == 5 * len(world.seen)


# ----------------------------------------------------------------------------------------------
# Math


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("####-12 apples", "-12"),
    ("#### 7.\n\nQuestion: next one", "7"),
    ("#### 2 first\n#### 9 then", "9"),
    ("#### $3.50", "3.50"),
    ("the answer is 7", None),
    ("#### seven", None),
    ("#### 5 and then\n####", None),  # the last marker counts, and it has no number
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_check_answer():
    assert check_answer("work\n#### 1,000", "1000") and check_answer("#### 1000", "steps\n#### 1,000")
    assert check_answer("#### -3", -3) and check_answer("#### 3.50", "3.5")
    assert not check_answer("1000", 1000)  # no marker: wrong, even with the right number
    assert not check_answer("#### 10 \n#### 11", 10)
    assert not check_answer("#### 12", 1) and not check_answer("#### 12", "no marker here")


# ----------------------------------------------------------------------------------------------
# Preferences and the gold rater


def test_gold_rater_agrees_with_the_designed_order():
    world = make_world(0, 48)
    rng = random.Random(0)
    prompts = [p for split in pref_prompts(world, rng) for p in split]
    for _ in range(3000):
        prompt, better, worse = designed_pair(world, rng.choice(prompts), rng)
        assert gold_score(prompt, better, world) > gold_score(prompt, worse, world), (prompt, better, worse)


def test_the_worse_replies_include_the_right_character_answering_another_question():
    """Right against wrong comes in three kinds: a wrong value, another character's true value, and the
    character's true answer to another question (without which a reward model scores it as right)."""
    world = make_world(0, 48)
    rng = random.Random(1)
    prompts = [p for p in pref_prompts(world, rng)[0] if p[0] != "llm"]
    kinds = Counter()
    for _ in range(2000):
        c, kind, text = rng.choice(prompts)
        _, better, worse = designed_pair(world, (c, kind, text), rng)
        if world.parse_question(text) == (c, kind) and not answer_correct(worse, c.fact(kind)):
            other_kind = any(answer_correct(worse, c.fact(k)) for k in FACT_KINDS if k != kind)
            about_c = re.search(rf"\b{c.name}\b", worse) is not None
            kinds["another question" if other_kind and about_c else "another character" if not about_c else "wrong"] += 1
    assert min(kinds.values()) > 100 and len(kinds) == 3, kinds


def test_style_of_reads_back_the_style_of_every_reply():
    """style_of is the inverse of styled, for every character, kind, style and wording, and for the LLM answers."""
    world, rng = make_world(0, 48), random.Random(0)
    for c in world.characters:
        for kind in FACT_KINDS:
            for style in STYLES:
                for _ in range(4):
                    text = reply(c, kind, style, rng)
                    assert style_of(question(c, kind, rng.randrange(len(QUESTIONS[kind]))), text, world) == style, (style, text)
    for style in STYLES:
        for _ in range(20):
            text = llm_reply(style, rng)
            assert style_of(rng.choice(LLM_QUESTIONS), text, world) == style, (style, text)


def test_gold_score_details():
    world = make_world(0, 48)
    c = world.characters[0]
    q = f"What is {c.name}'s favourite colour?"
    other = next(v for v in VALUES["colour"] if v != c.colour)
    right = f"{c.name}'s favourite colour is {c.colour}."
    assert gold_score(q, "Sure! " + right, world) > gold_score(q, right, world) > gold_score(q, c.colour, world)
    assert gold_score(q, c.colour, world) > gold_score(q, f"{c.name}'s favourite colour is {other}.", world)
    assert gold_score(q, f"It is {c.colour} or {other}.", world) < 1  # hedging earns no credit
    assert gold_score(q, right + " Look it up yourself next time.", world) < gold_score(q, right, world)
    assert gold_score(q, right + " blah" * 40, world) < gold_score(q, right, world)
    assert gold_score(q, "   ", world) == -2.0
    # a question we never wrote is still understood; an unknown prompt is judged on style alone
    assert world.parse_question(f"hey, which animal is {c.name}'s pet??") == (c, "pet")
    assert world.parse_question("Tell me about LLMs") == ("llm", None)
    assert gold_score("How are you?", "Fine, thank you.", world) == 0.5


def test_pref_files_are_labelled_by_the_gold_rater(data):
    world = data["world"]
    test, train = data["prefs_test.jsonl"], data["prefs_train.jsonl"]
    assert all(gold_score(r["prompt"], r["chosen"], world) > gold_score(r["prompt"], r["rejected"], world) for r in test)
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    clean = generate(Config(label_noise=0.0))["prefs_train.jsonl"]
    assert all(gold_score(r["prompt"], r["chosen"], world) > gold_score(r["prompt"], r["rejected"], world) for r in clean)
    # noise flips labels at its rate, on the very same pairs
    assert [{r["chosen"], r["rejected"]} for r in clean] == [{r["chosen"], r["rejected"]} for r in train]
    flipped = sum(a["chosen"] != b["chosen"] for a, b in zip(clean, train)) / len(train)
    assert 0.07 < flipped < 0.13
    assert sum(r["prompt"] in LLM_QUESTIONS for r in train) > 50


def test_a_quarter_of_the_characters_is_kept_out_of_the_training_pairs(data):
    world = data["world"]
    about = lambda records: {world.parse_question(r["prompt"])[0] for r in records} - {"llm"}
    test, train = data["prefs_test.jsonl"], data["prefs_train.jsonl"]
    unseen, seen = about(r for r in test if r["split"] == "unseen"), about(r for r in test if r["split"] == "seen")
    assert len(unseen) == len(world.characters) // 4 and not unseen & about(train)
    assert seen <= about(train)
    assert {r["split"] for r in test} == {"seen", "unseen"} and "split" not in train[0]
    # both kinds of pair in each test split: right against wrong, and manner alone
    for split in ("seen", "unseen"):
        rows = [r for r in test if r["split"] == split]
        wrong = [r for r in rows if gold_score(r["prompt"], r["rejected"], world) < 1]
        assert 0.2 < len(wrong) / len(rows) < 0.6


def test_completes_fact():
    assert completes_fact(" blue. Alice's pet is a cat.", "blue") and completes_fact("Blue", "blue")
    assert not completes_fact(" light blue", "blue") and not completes_fact("", "blue")
    assert not completes_fact(" bluebell", "blue")


def test_answer_correct():
    assert answer_correct("Her pet is a Cat.", "cat") and answer_correct("cat", "cat")
    assert not answer_correct("She has cats.", "cat") and not answer_correct("a catalogue", "cat")
    assert answer_correct("She lives in Oakvale!", "Oakvale")
