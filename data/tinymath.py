"""TinyWorld's reasoning problems: the characters' facts plus the world's prices and pay, worked one
checkable step per line and ending in "#### n", as GSM8K's solutions do.

A problem's level is the number of characters it asks about (1 to 3):

    How many coins do Lucy and Sam earn a day together?
        Lucy works as a baker.
        A baker earns 4 coins a day.
        Sam works as a nurse.
        A nurse earns 6 coins a day.
        They earn 4 + 6 = 10 coins a day.
        #### 10

with three characters, two numbers at a time: "4 + 6 = 10, and they earn 10 + 3 = 13 coins a day."

Each step is something pre-training taught: a character's fact in its completion form, a rate of
the world (`RATES`: what each job earns, each pet eats, each food and paint colour costs, the same in
every world), or a sum of two small numbers. Nothing has to be copied from the question but its
names. Problems whose numbers stood in the question ("Each baker gets 4 apples and each nurse 2; how many does Lucy
get?") were tried first and left: the small model never learned to find the rule that matches a fact
in its context (it picked the right one of two about half the time, at SFT and after GRPO alike, and
text twice as long was no easier on its second reading), so RL had nothing but a guess to sharpen.

`make_math` draws distinct problems for each split; `check_steps` marks each written step right or
wrong against the world; `extract_answer` and `check_answer` are the verifier that GRPO and the
evals use, on TinyWorld's problems and on GSM8K's alike (data/prepare_gsm8k.py).
"""
import functools
import random
import re
from decimal import Decimal, InvalidOperation

from cli import UserError
from data.tinyworld_facts import VALUES, fact_sentence

LEVELS = (1, 2, 3)
# per kind of fact: the rate a value carries, the question for one character and for several, the sum
RATE_TEXT = {
    "job": ("A {v} earns {n} coins a day.", "How many coins does {names} earn a day?",
            "How many coins do {names} earn a day together?", "They earn {sum} coins a day."),
    "pet": ("A {v} eats {n} treats a day.", "How many treats does {names}'s pet eat a day?",
            "How many treats do the pets of {names} eat a day together?", "Their pets eat {sum} treats a day."),
    "food": ("A plate of {v} costs {n} coins.", "How many coins does a plate of {names}'s favourite food cost?",
             "How many coins do plates of the favourite foods of {names} cost together?", "They cost {sum} coins."),
    "colour": ("A tin of {v} paint costs {n} coins.",
               "How many coins does a tin of paint in {names}'s favourite colour cost?",
               "How many coins do tins of paint in the favourite colours of {names} cost together?",
               "They cost {sum} coins."),
}
KINDS = tuple(RATE_TEXT)
_draw = random.Random("tinyworld rates")
RATES = {kind: {v: _draw.randint(2, 9) for v in VALUES[kind]} for kind in KINDS}  # the same in every world


def rate_sentence(kind, value):
    return RATE_TEXT[kind][0].format(v=value, n=RATES[kind][value])


def and_list(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def problem(people, kind):
    """The question about these characters and its worked answer, one step per line."""
    _, ask_one, ask_many, total = RATE_TEXT[kind]
    names = and_list([c.name for c in people])
    question = (ask_one if len(people) == 1 else ask_many).format(names=names)
    steps = [s for c in people for s in (fact_sentence(c, kind), rate_sentence(kind, c.fact(kind)))]
    got = [RATES[kind][c.fact(kind)] for c in people]
    if len(people) > 1:  # two numbers at a time: a sum of three in one go was where the model slipped
        sums = [f"{sum(got[:i])} + {got[i]} = {sum(got[:i + 1])}" for i in range(1, len(got))]
        line = total.format(sum=sums[-1])
        steps.append(line if len(sums) == 1 else f"{sums[0]}, and {line[0].lower()}{line[1:]}")
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {sum(got)}", "level": len(people)}


def make_math(world, sizes: list[int], rng, casts=None) -> list[list[dict]]:
    """Problems for each size in sizes, as {"question", "answer", "level"}, no problem in two lists.
    casts: the characters each list's problems are about (default: the whole cast). Levels 2 and 3
    come in equal shares; level 1 has few distinct problems (a kind and a character), so each list
    gets a fair share of those left, at most a third of it."""
    used, splits = set(), []
    for i, size in enumerate(sizes):
        cast = casts[i] if casts else world.characters
        ones = [(kind, (c.name,)) for kind in KINDS for c in cast if (kind, (c.name,)) not in used]
        n_ones = min(size // 3, len(ones) // (len(sizes) - i))
        picks = rng.sample(ones, n_ones)
        used.update(picks)
        split = [problem([world.by_name[name] for name in names], kind) for kind, names in picks]
        tries = 0
        while len(split) < size:
            level = 2 + len(split) % 2
            people, kind = rng.sample(cast, level), rng.choice(KINDS)
            tries += 1
            if tries > 100 * size:
                raise UserError(f"cannot draw {size} more distinct math problems: ask for fewer")
            key = (kind, tuple(c.name for c in people))
            if key not in used:
                used.add(key)
                split.append(problem(people, kind))
        rng.shuffle(split)
        splits.append(split)
    return splits


# ----------------------------------------------------------------------------------------------
# Checking: the final answer (the verifier) and each step (the step checker)

def numbers(line):
    return [int(n) for n in re.findall(r"\d+", line)]


# compiled once: the step checker reads every line of every answer an evaluation writes. A kind's
# values are first looked for all at once, and one by one only in a line that has one of them.
def word_pattern(words, flags=0):
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", flags)


VALUE_PATTERNS = {kind: (word_pattern(values, re.I), [(v, word_pattern([v], re.I)) for v in values])
                  for kind, values in VALUES.items()}


@functools.lru_cache(maxsize=16)
def name_pattern(names):
    return word_pattern(names)


def fact_claims(line, world):
    """(character, kind, values) for each fact the line states: the character it names and the values
    of a kind it mentions. A line naming no character, or no value, claims nothing."""
    names = set(name_pattern(tuple(c.name for c in world.characters)).findall(line))
    claims = []
    for kind, (any_value, patterns) in VALUE_PATTERNS.items():
        said = [v for v, pattern in patterns if pattern.search(line)] if any_value.search(line) else []
        if said and len(names) == 1:
            claims.append((next(iter(names)), kind, said))
    return claims


def step_keys(line, world):
    """What a line states, as keys to compare: ("fact", name, kind) for each fact of a line that states
    facts and nothing else; ("line", its words) for any other line with a number; none for chatter."""
    claims = fact_claims(line, world)
    if claims and not numbers(line):
        return [("fact", name, kind) for name, kind, _ in claims]
    return [("line", " ".join(line.split()))] if numbers(line) else []


def check_steps(completion: str, reference: str, world):
    """Mark the steps of a written solution against the world, and say how many of the reference's
    steps it got right. Returns (marks, right, total):
      marks: one (line, verdict) per written line before "####": True when the line is a step and it
        is right, False when it is a step and wrong, None for a line that is not a step;
      right: how many of the reference's steps (its lines before "####") the solution states
        correctly, each counted once; total: how many there are.
    A fact ("Lucy's pet is a dog.", in any words) is right when the world says so: the character's
    true value, and no other value of that kind. A line with numbers ("Each baker gets 3 apples.",
    "They get 3 + 5 = 8 apples.", "Lucy's pet is a dog, so 1.") is right when it is one of the
    reference's own steps, word for word, and its facts are true.
    """
    ref = {k for s in reference.split("####")[0].splitlines() for k in step_keys(s, world)}
    marks, found = [], set()
    for line in completion.split("####")[0].splitlines():
        keys = step_keys(line, world)
        if not keys:  # chatter, or a blank line
            marks.append((line, None))
            continue
        right = all(vals == [world.fact(name, kind)] for name, kind, vals in fact_claims(line, world))
        right = right and all(k[0] == "fact" or k in ref for k in keys)
        found |= set(keys) & ref if right else set()
        marks.append((line, right))
    return [m for m in marks if m[0].strip()], len(found), len(ref)


def extract_answer(text: str):
    """The number after the last "####" (commas dropped), or None when there is none (GSM8K-style).

    "#### 1,234 apples" -> "1234";  "####-5." -> "-5";  "#### $3.50" -> "3.50";  "17" -> None.
    """
    if "####" not in text:
        return None
    m = re.match(r"\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", text.rsplit("####", 1)[1])
    return m.group(1).replace(",", "") if m else None


def bare(answer: str) -> str:
    """A worked answer cut to its last line, "#### n": the number alone, no steps."""
    return "#### " + extract_answer(answer)


def shows_work(completion: str) -> bool:
    """Does the answer write something before its final "####" (its steps), unlike a bare "#### n"?
    An answer with no "####" at all (chatter, or cut off at the length limit) does not count."""
    return "####" in completion and bool(completion.rsplit("####", 1)[0].strip())


def check_answer(completion: str, answer) -> bool:
    """Is the completion's final answer right? answer: a number, or a worked solution ending in "#### n"."""
    got = extract_answer(completion)
    want = extract_answer(answer) if isinstance(answer, str) and "####" in answer else str(answer).replace(",", "")
    if got is None or want is None:
        return False
    try:
        return Decimal(got) == Decimal(want)
    except InvalidOperation:
        return False
