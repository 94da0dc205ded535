"""TinyWorld's math: word problems of two or three steps, worked, ending in "#### n" (as in GSM8K).

`make_math` draws distinct problems for each split (SFT, GRPO, test, the corpus); `extract_answer`
and `check_answer` are the correctness checker that GRPO and the evals use, on TinyWorld's problems
and on GSM8K's alike (data/prepare_gsm8k.py).
"""
import re
from decimal import Decimal, InvalidOperation

from data import UserError

ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "stamps", "cards", "beads", "buttons"]


# Each template takes (rng, three characters, an item) and returns (numbers, question, steps); the
# last step's result is the answer. The numbers, with the template's name, identify a problem.

def bags(r, n, m, o, it):
    a, b, c = r.randint(2, 30), r.randint(2, 9), r.randint(2, 9)
    q = f"{n.name} has {a} {it}. {n.pronoun.capitalize()} buys {b} bags with {c} {it} in each bag. How many {it} does {n.name} have now?"
    return (a, b, c), q, [f"The bags hold {b} * {c} = {b * c} {it}.", f"{n.name} now has {a} + {b * c} = {a + b * c} {it}."]


def give_and_find(r, n, m, o, it):
    a = r.randint(10, 40)
    b, c = r.randint(2, a - 1), r.randint(2, 20)
    q = f"{n.name} had {a} {it}. {n.pronoun.capitalize()} gave {b} of them to {m.name} and then found {c} more. How many {it} does {n.name} have now?"
    return (a, b, c), q, [f"After giving {b} away, {n.name} has {a} - {b} = {a - b} {it}.",
                          f"After finding {c} more, {n.name} has {a - b} + {c} = {a - b + c} {it}."]


def share(r, n, m, o, it):
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = r.choice([d for d in range(2, 10) if a * b % d == 0])
    q = f"{n.name} buys {a} packs of {it} with {b} {it} in each pack and shares them equally among {c} friends. How many {it} does each friend get?"
    return (a, b, c), q, [f"{n.name} buys {a} * {b} = {a * b} {it}.", f"Each friend gets {a * b} / {c} = {a * b // c} {it}."]


def boxes(r, n, m, o, it):
    a, b = r.randint(3, 12), r.randint(2, 9)
    c = r.randint(1, a - 1)
    q = f"A box holds {a} {it}. {n.name} fills {b} boxes and has {c} {it} left over. How many {it} does {n.name} have in total?"
    return (a, b, c), q, [f"The boxes hold {b} * {a} = {a * b} {it}.", f"With {c} left over, {n.name} has {a * b} + {c} = {a * b + c} {it}."]


def more_and_times(r, n, m, o, it):
    a, b, c = r.randint(2, 30), r.randint(2, 20), r.randint(2, 3)
    q = (f"{n.name} has {a} {it}. {m.name} has {b} more {it} than {n.name}. {o.name} has {['twice', 'three times'][c - 2]} "
         f"as many {it} as {m.name}. How many {it} does {o.name} have?")
    return (a, b, c), q, [f"{m.name} has {a} + {b} = {a + b} {it}.", f"{o.name} has {c} * {a + b} = {c * (a + b)} {it}."]


def earn_and_spend(r, n, m, o, it):
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = r.randint(1, a * b - 1)
    q = f"{n.name} earns {a} coins each day for {b} days, then spends {c} coins on a present. How many coins does {n.name} have left?"
    return (a, b, c), q, [f"{n.name} earns {a} * {b} = {a * b} coins.", f"After spending {c}, {n.name} has {a * b} - {c} = {a * b - c} coins left."]


def pick_and_give(r, n, m, o, it):
    a, b, c = r.randint(5, 30), r.randint(5, 30), r.randint(2, 5)
    c = min(c, (a + b - 1) // 2)  # two friends' share must leave something: 5 + 5 picked, 5 each, would not
    d = r.randint(2, min(5, (a + b - 1) // c))  # something is left
    q = (f"{n.name} picks {a} {it} in the morning and {b} in the afternoon. Then {n.pronoun} gives {c} {it} to each "
         f"of {d} friends. How many {it} does {n.name} have left?")
    return (a, b, c, d), q, [f"{n.name} picks {a} + {b} = {a + b} {it}.", f"{n.pronoun.capitalize()} gives away {c} * {d} = {c * d} {it}.",
                             f"{n.name} has {a + b} - {c * d} = {a + b - c * d} {it} left."]


def jars(r, n, m, o, it):
    c, each = r.randint(2, 6), r.randint(2, 12)
    a = r.randint(1, c * each - 1)
    b = c * each - a
    q = (f"{n.name} has {a} {it}. {n.pronoun.capitalize()} gets {b} more and puts all of them into {c} jars, the same "
         f"number in each jar. How many {it} are in each jar?")
    return (a, b, c), q, [f"{n.name} has {a} + {b} = {a + b} {it}.", f"Each jar holds {a + b} / {c} = {each} {it}."]


def shopping(r, n, m, o, it):
    a, b, c, d = r.randint(2, 9), r.randint(2, 9), r.randint(2, 9), r.randint(2, 9)
    it2 = r.choice([x for x in ITEMS if x != it])
    q = f"{n.name} buys {a} {it} for {b} coins each and {c} {it2} for {d} coins each. How many coins does {n.name} spend?"
    return (a, b, c, d), q, [f"The {it} cost {a} * {b} = {a * b} coins.", f"The {it2} cost {c} * {d} = {c * d} coins.",
                             f"{n.name} spends {a * b} + {c * d} = {a * b + c * d} coins."]


PROBLEMS = [bags, give_and_find, share, boxes, more_and_times, earn_and_spend, pick_and_give, jars, shopping]


def make_math(world, sizes: list[int], rng) -> list[list[dict]]:
    """Problems for each size in sizes: {"question", "answer"}; no problem (template and numbers) in two lists."""
    used, splits = set(), []
    for size in sizes:
        split, tries = [], 0
        while len(split) < size:
            template = rng.choice(PROBLEMS)
            numbers, q, steps = template(rng, *rng.sample(world.characters, 3), rng.choice(ITEMS))
            tries += 1
            if tries > 100 * size:
                raise UserError(f"cannot draw {size} more distinct math problems: ask for fewer")
            if (template.__name__, numbers) not in used:
                used.add((template.__name__, numbers))
                answer = steps[-1].split(" = ")[-1].split()[0]
                split.append({"question": q, "answer": "\n".join(steps) + f"\n#### {answer}"})
        splits.append(split)
    return splits


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
