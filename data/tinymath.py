"""TinyWorld's reasoning problems: the characters' facts plus small numbers, worked one checkable
step per line and ending in "#### n", as GSM8K's solutions do.

A problem's level is the number of characters whose facts it needs (1 to 3). Two kinds:

    rule (levels 1-3)   Each baker gets 4 apples and each nurse receives 2 apples. How many apples
                        do Lucy and Sam get together?
                            Lucy works as a baker.
                            Each baker gets 4 apples.
                            Sam works as a nurse.
                            Each nurse receives 2 apples.
                            They get 4 + 2 = 6 apples.
                            #### 6
    count (levels 2-3)  How many of Lucy, Sam and Max have a dog?
                            Lucy's pet is a dog, so 1.
                            Sam's pet is a cat, so 0.
                            Max's pet is a dog, so 1.
                            That makes 1 + 0 + 1 = 2.
                            #### 2

Every fact step is a sentence pre-training states many times (the completion form of
`fact_prompts`); the rule a fact calls for is restated before it is used, so that each number is
copied from a line that names it. Each rule of a question has its own verb (gets, receives, earns):
the word before a number then points to one rule, which a small model copies far more easily than a
number found by the two words before it. A problem asks the model to recall what it knows, look up and add
at most three small numbers: within reach of the small CPU model, sometimes.

`make_math` draws distinct problems for each split; `check_steps` marks each written step right or
wrong against the world; `extract_answer` and `check_answer` are the verifier that GRPO and the
evals use, on TinyWorld's problems and on GSM8K's alike (data/prepare_gsm8k.py).
"""
import functools
import re
from decimal import Decimal, InvalidOperation

from data import UserError
from data.tinyworld_facts import VALUES, fact_sentence

ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "stamps", "cards", "beads", "buttons"]
LEVELS = (1, 2, 3)
KINDS = ("pet", "job", "town", "colour")  # the facts problems are built on: short, unambiguous words
# how a rule names the people with a value, and how a count asks for them
RULE_GROUP = {"pet": "each {v} owner", "job": "each {v}", "town": "everyone from {v}", "colour": "everyone who loves {v}"}
VERBS = ["gets", "receives", "earns"]
COUNT_ASK = {"pet": "have a {v}", "job": "work as a {v}", "town": "live in {v}", "colour": "love {v} most"}


def and_list(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def rule(rng, cast, level, item):
    """Each of max(2, level) values of a fact gets a number; add up what `level` characters get."""
    kind = rng.choice(KINDS)
    people = rng.sample(cast, level)
    values = list(dict.fromkeys(c.fact(kind) for c in people))
    values += rng.sample([v for v in VALUES[kind] if v not in values], max(2, level) - len(values))
    rng.shuffle(values)
    number = dict(zip(values, rng.sample(range(2, 8), len(values))))
    verb = dict(zip(values, rng.sample(VERBS, len(values))))  # one verb per rule: each rule reads apart
    gets = lambda v: f"{RULE_GROUP[kind].format(v=v)} {verb[v]} {number[v]} {item}"
    rules = and_list([gets(v) for v in values])
    names = [c.name for c in people]
    ask = f"does {names[0]} get?" if level == 1 else f"do {and_list(names)} get together?"
    steps = []
    for c in people:  # the fact, then the rule it calls for, restated
        steps += [fact_sentence(c, kind), gets(c.fact(kind))[0].upper() + gets(c.fact(kind))[1:] + "."]
    got = [number[c.fact(kind)] for c in people]
    if level > 1:
        steps.append(f"They get {' + '.join(map(str, got))} = {sum(got)} {item}.")
    key = ("rule", kind, tuple(names), tuple(sorted(number.items())))
    return key, f"{rules[0].upper()}{rules[1:]}. How many {item} {ask}", steps


def count(rng, cast, level, item):
    """How many of `level` characters share a value of a fact; about half of them do, on average."""
    kind = rng.choice(KINDS)
    value = rng.choice(VALUES[kind])
    people = []
    for _ in range(level):
        want = rng.random() < 0.5
        pool = [c for c in cast if (c.fact(kind) == value) == want and c not in people]
        if not pool:
            return None  # this world has too few characters with that value: draw again
        people.append(rng.choice(pool))
    names = [c.name for c in people]
    ones = [int(c.fact(kind) == value) for c in people]
    question = f"How many of {and_list(names)} {COUNT_ASK[kind].format(v=value)}?"
    steps = [f"{fact_sentence(c, kind)[:-1]}, so {one}." for c, one in zip(people, ones)]
    steps.append(f"That makes {' + '.join(map(str, ones))} = {sum(ones)}.")
    key = ("count", kind, tuple(names), value)
    return key, question, steps


KIND_LEVELS = [(rule, 1), (rule, 2), (count, 2), (rule, 3), (count, 3)]


def make_math(world, sizes: list[int], rng, casts=None) -> list[list[dict]]:
    """Problems for each size in sizes, as {"question", "answer", "level"}: levels in equal shares
    (rule and count alike where both exist), no problem in two lists (its item aside). casts: the
    characters each list's problems are about (default: the whole cast)."""
    used, splits = set(), []
    for i, size in enumerate(sizes):
        cast = casts[i] if casts else world.characters
        split, tries = [], 0
        while len(split) < size:
            level = LEVELS[len(split) % len(LEVELS)]
            make = rng.choice([m for m, lv in KIND_LEVELS if lv == level])
            drawn = make(rng, cast, level, rng.choice(ITEMS))
            tries += 1
            if tries > 100 * size:
                raise UserError(f"cannot draw {size} more distinct math problems: ask for fewer")
            if drawn is None or drawn[0] in used:
                continue
            key, question, steps = drawn
            used.add(key)
            split.append({"question": question, "answer": "\n".join(steps) + f"\n#### {numbers(steps[-1])[-1]}",
                          "level": level})
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
