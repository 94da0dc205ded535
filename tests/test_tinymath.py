"""TinyWorld's reasoning problems (data/tinymath.py): worked answers that the verifier and the step
checker accept on their own world, steps that pre-training states, disjoint splits with every level
in each, and the step checker on the cases a model's answers bring."""
import itertools
import random
import re
from collections import Counter

import pytest

from data.tinymath import (KINDS, LEVELS, RATE_TEXT, RATES, and_list, check_steps, extract_answer, make_math, problem,
                           rate_sentence, shows_work)
from data.tinyworld import Config, generate, make_world


@pytest.fixture(scope="module")
def data():
    return generate(Config())


def splits_of(data):
    """The math of each split; SFT's has worked answers and bare ones ("#### n")."""
    sft = [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
           for r in data["sft_train.jsonl"] if "####" in r["messages"][1]["content"]]
    return {"sft": sft, "grpo": data["math_train.jsonl"], "test": data["math_test.jsonl"]}


def worked_answer(world, question):
    """The worked answer of a problem, rebuilt from its question alone."""
    for kind, (_, ask_one, ask_many, _) in RATE_TEXT.items():
        for n in LEVELS:
            for people in itertools.permutations(world.seen, n):
                if (ask_one if n == 1 else ask_many).format(names=and_list([c.name for c in people])) == question:
                    return problem(list(people), kind)["answer"]
    raise AssertionError(f"no problem asks {question!r}")


def test_every_worked_answer_passes_the_verifier_and_the_step_checker(data):
    world = data["world"]
    for name, split in splits_of(data).items():
        for p in (p for p in split if shows_work(p["answer"])):
            marks, right, total = check_steps(p["answer"], p["answer"], world)
            steps = p["answer"].split("####")[0].strip().splitlines()
            assert all(verdict for _, verdict in marks) and len(marks) == len(steps) and right == total > 0, (name, p)
            assert p["answer"].count("####") == 1 and extract_answer(p["answer"]) == re.findall(r"\d+", steps[-1])[-1]
            if "+" in steps[-1]:  # sums of two, each right, adding up the numbers of the lines before
                sums = [tuple(map(int, m)) for m in re.findall(r"(\d+) \+ (\d+) = (\d+)", steps[-1])]
                assert all(a + b == c for a, b, c in sums) and all(x[2] == y[0] for x, y in zip(sums, sums[1:]))
                assert [sums[0][0]] + [b for _, b, _ in sums] == [int(n) for s in steps[:-1] for n in re.findall(r"\d+", s)]
                assert steps[-1].count("+") == len(sums) == len(steps[:-1]) // 2 - 1


def test_levels_count_the_characters_and_every_split_has_every_level(data):
    world = data["world"]
    for name, split in splits_of(data).items():
        if name != "sft":
            assert Counter(p["level"] for p in split).keys() == set(LEVELS), name
        for p in split:
            named = [c for c in world.characters if re.search(rf"\b{c.name}\b", p["question"])]
            assert len(named) == p.get("level", len(named)) and all(c.seen for c in named), p
    sft = splits_of(data)["sft"]
    assert len(sft) == Config().math_sft + Config().math_sft_bare
    assert sum(map(shows_work, (p["answer"] for p in sft))) == Config().math_sft


def test_sft_bare_answers_are_the_number_alone_and_right(data):
    world, bare = data["world"], [p for p in splits_of(data)["sft"] if not shows_work(p["answer"])]
    assert bare
    for p in bare[:40]:  # the number a worked answer reaches, and nothing before it
        assert p["answer"] == "#### " + extract_answer(worked_answer(world, p["question"])), p


def test_splits_are_disjoint_and_absent_from_the_corpus(data):
    splits = list(splits_of(data).values())
    ids = [{p["question"] for p in s} for s in splits]
    assert [len(i) for i in ids] == [len(s) for s in splits]  # no repeats within a split either
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    corpus = [d for d in data["corpus_train.txt"] + data["corpus_val.txt"] if d.startswith("Question: ")]
    assert len(corpus) > 100  # worked problems are in the corpus, but none of these
    in_corpus = {d.split("\n")[0].removeprefix("Question: ") for d in corpus}
    for split in splits:
        assert not [p for p in split if p["question"] in in_corpus]


def test_every_step_is_stated_in_the_pre_training_text(data):
    """The problems need nothing pre-training does not teach: each rate is stated in the corpus, as
    the worked answers state it, many times over."""
    text = "\n".join(data["corpus_train.txt"])
    for kind in KINDS:
        for value in RATES[kind]:
            assert text.count(rate_sentence(kind, value)) >= 50, (kind, value)


def test_other_seeds_and_small_casts_draw_problems_too():
    for seed in range(5):
        world = make_world(seed, 10)
        for split in make_math(world, [30, 30], random.Random(seed), casts=[world.seen, world.characters]):
            assert Counter(p["level"] for p in split) == {1: 10, 2: 10, 3: 10}


# ----------------------------------------------------------------------------------------------
# The step checker on a model's kinds of answer

WORLD = make_world(0, 48)
A, B = WORLD.seen[:2]
RATE = rate_sentence("job", A.job)
N = RATES["job"][A.job]
REF = f"{A.name} works as a {A.job}.\n{RATE}\n#### {N}"
WRONG_JOB = next(j for j in ("baker", "pilot", "tailor") if j != A.job)


def test_a_right_answer_has_every_step_right():
    marks, right, total = check_steps(REF, REF, WORLD)
    assert (right, total) == (2, 2) and [v for _, v in marks] == [True, True]


def test_a_fact_in_other_words_is_the_same_step():
    marks, right, _ = check_steps(f"{A.name} is a {A.job}.\n{RATE}\n#### {N}", REF, WORLD)
    assert [v for _, v in marks] == [True, True] and right == 2


def test_a_right_final_number_after_a_wrong_step():
    text = f"{A.name} works as a {WRONG_JOB}.\n{RATE}\n#### {N}"
    marks, right, total = check_steps(text, REF, WORLD)
    assert [v for _, v in marks] == [False, True] and (right, total) == (1, 2)


def test_a_missing_step_counts_as_not_right():
    marks, right, total = check_steps(f"{RATE}\n#### {N}", REF, WORLD)
    assert [v for _, v in marks] == [True] and (right, total) == (1, 2)
    assert check_steps(f"#### {N}", REF, WORLD) == ([], 0, 2)
    assert check_steps("", REF, WORLD) == ([], 0, 2)


def test_extra_text_is_not_a_step_and_repeats_count_once():
    text = f"Let me think.\n{A.name} works as a {A.job}.\n{A.name} works as a {A.job}.\nSo:\n{RATE}\n#### {N}"
    marks, right, total = check_steps(text, REF, WORLD)
    assert [v for _, v in marks] == [None, True, True, None, True] and (right, total) == (2, 2)


def test_a_fact_hedged_between_two_values_is_wrong():
    marks, _, _ = check_steps(f"{A.name} works as a {A.job} or a {WRONG_JOB}.", REF, WORLD)
    assert marks[0][1] is False


def test_a_line_with_numbers_must_be_the_reference_s_own_step():
    a, b = RATES["pet"][A.pet], RATES["pet"][B.pet]
    ref = (f"{A.name}'s pet is a {A.pet}.\n{rate_sentence('pet', A.pet)}\n{B.name}'s pet is a {B.pet}.\n"
           f"{rate_sentence('pet', B.pet)}\nTheir pets eat {a} + {b} = {a + b} treats a day.\n#### {a + b}")
    other = next(p for p in RATES["pet"] if RATES["pet"][p] != a)
    for line, verdict in [(f"Their pets eat {a} + {b} = {a + b} treats a day.", True),
                          (f"Their pets eat {a} + {b} = {a + b + 1} treats a day.", False),
                          (f"Their pets eat {a + 1} + {b} = {a + b + 1} treats a day.", False),
                          (rate_sentence("pet", A.pet), True), (f"A {A.pet} eats {RATES['pet'][other]} treats a day.", False),
                          (RATE, False)]:  # a right rate, but not one this problem calls for
        assert check_steps(line, ref, WORLD)[0] == [(line, verdict)]


def test_the_answers_only_set_is_the_sft_set_without_the_steps(data):
    full, short = data["sft_train.jsonl"], data["sft_answers_only.jsonl"]
    assert len(full) == len(short)
    for a, b in zip(full, short):
        (qa, aa), (qb, ab) = ([m["content"] for m in r["messages"]] for r in (a, b))
        assert qa == qb and (ab == f"#### {extract_answer(aa)}" if "####" in aa else ab == aa)
