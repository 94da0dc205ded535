"""TinyWorld's conversations: answers in styles, the gold rater, and the SFT and preference sets.

An answer is a fact sentence wrapped in a style (plain, polite, curt, rambling, rude). `gold_score`,
a stand-in for a careful human, prefers right over wrong and then polite and concise over curt,
rambling or rude; the preference pairs are labelled by it. `make_sft` and `make_prefs` build the
records that data/tinyworld.py writes to sft_*.jsonl and prefs_*.jsonl.
"""
import re

from data.tinyworld_facts import (FACT_KINDS, LLM_QUESTIONS, QUESTIONS, VALUES, Character, World, answer_correct,
                                  default_world, fact_sentence, question)

# ----------------------------------------------------------------------------------------------
# Answers in different styles

LLM_ANSWERS = ["An LLM, or large language model, is a neural network trained on lots of text to predict the next word.",
               "LLM stands for large language model: a neural network that learns to predict the next token of a text.",
               "An LLM is a large language model. It has read a great deal of text and predicts the next word, again and again."]
LLM_CURT = ["A neural network that predicts the next word: a large language model.", "A large language model; it predicts the next token."]
LLM_WRONG = ["An LLM is a kind of large lizard that lives in the mountains.", "LLM stands for little lemon muffin, a small cake.",
             "An LLM is a type of boat with three sails."]
CURT = {"town": "{Town}.", "pet": "A {pet}.", "colour": "{Colour}.", "job": "A {job}.", "food": "{Food}."}
POLITE_OPENERS = ["Sure! ", "Good question! ", "Happy to help. ", "Of course! "]
POLITE_CLOSERS = ["", " I hope that helps!", " Let me know if you have any other questions."]
RUDE_OPENERS = ["Ugh. ", "Obviously, ", "Whatever. "]
RUDE_CLOSERS = [" Stop bothering me.", " Look it up yourself next time.", " Isn't that obvious?"]
RAMBLE = ["Well, that is an interesting question, and I have been thinking about it for quite a while now.",
          "There are so many things one could say about this, and people often have very different opinions.",
          "Let me start from the beginning, because I think it helps to look at the whole picture first.",
          "It is always hard to be completely sure about these things, but I will try my very best.",
          "I remember hearing about this a long time ago, though the details are a little fuzzy in my mind.",
          "It is the kind of thing that comes up in conversation now and then, especially on long afternoons."]
STYLES = ["plain", "polite", "curt", "rambling", "rude"]
SFT_STYLE_WEIGHTS = {"plain": 0.4, "polite": 0.2, "curt": 0.2, "rambling": 0.2}  # no rudeness in SFT


def styled(core: str, curt: str, style: str, rng) -> str:
    """Wrap an answer's core sentence in a style."""
    if style == "plain":
        return core
    if style == "curt":
        return curt
    if style == "polite":
        return rng.choice(POLITE_OPENERS) + core + rng.choice(POLITE_CLOSERS)
    if style == "rude":
        return rng.choice(RUDE_OPENERS) + core + rng.choice(RUDE_CLOSERS)
    first, second, last = rng.sample(RAMBLE, 3)
    return f"{first} {second} Anyway, {core} {last}"


def reply(c: Character, kind: str, style: str, rng, value=None) -> str:
    """An answer to a question about c's kind, in a style; value (a wrong one, say) overrides the truth."""
    value = value or c.fact(kind)
    slots = {**c.slots(), kind: value, kind.capitalize(): value[0].upper() + value[1:]}
    return styled(fact_sentence(c, kind, value=value), CURT[kind].format(**slots), style, rng)


def llm_reply(style: str, rng, correct=True) -> str:
    if not correct:
        return styled(rng.choice(LLM_WRONG), rng.choice(LLM_WRONG), style, rng)
    return styled(rng.choice(LLM_ANSWERS), rng.choice(LLM_CURT), style, rng)


# ----------------------------------------------------------------------------------------------
# The gold rater: a stand-in for a careful human

POLITE = re.compile(r"\b(sure|good question|happy to help|of course|hope that helps|let me know|please|thanks?)\b", re.I)
RUDE = re.compile(r"\b(ugh|obvious(ly)?|whatever|stop bothering|look it up yourself|stupid|shut up)\b", re.I)


def answers_right(asked, response: str):
    """Is the response the right answer to what World.parse_question found asked? None if nothing was.

    A fact: its true value and no other value of that kind ("It is red or blue." is not an answer).
    What an LLM is: says "language model" and that it predicts the next word or token.
    """
    if asked is None:
        return None
    if asked == ("llm", None):
        return bool(re.search(r"language model", response, re.I) and re.search(r"predict|next (word|token)", response, re.I))
    c, kind = asked
    return [v for v in VALUES[kind] if answer_correct(response, v)] == [c.fact(kind)]


def style_of(prompt: str, response: str, world: World) -> str:
    """The style (one of STYLES) a reply of `styled` was written in, read back from its words: rambling
    (one of RAMBLE's sentences), rude, polite, plain (a full sentence: it names who was asked about, or
    says "LLM", as the gold rater checks), else curt. Which manner pairs a reward model gets wrong."""
    if any(sentence in response for sentence in RAMBLE):
        return "rambling"
    if RUDE.search(response):
        return "rude"
    if POLITE.search(response):
        return "polite"
    return "plain" if full_sentence(world.parse_question(prompt), response) else "curt"


def full_sentence(asked, response: str) -> bool:
    """Does the response name who was asked about (or say "LLM", when asked what one is)? A curt answer does not."""
    if asked is None:
        return False
    name = "LLM" if asked == ("llm", None) else asked[0].name
    return re.search(rf"\b{name}\b", response) is not None


def gold_score(prompt: str, response: str, world: World = None) -> float:
    """How good a response is: correct, polite and concise beats wrong, rude and rambling.

    + 2    the right answer (`answers_right`)
    + 0.25 a full sentence (names the character, or says "LLM")
    + 0.5  a polite phrase;   - 1 a rude one
    - 0.03 per word beyond 25, at most - 1;   an empty response scores - 2
    A prompt it does not recognise is scored on style alone.
    """
    world = world or default_world()
    text = response.strip()
    words = len(text.split())
    if words == 0:
        return -2.0
    asked = world.parse_question(prompt)
    score = 2.0 * bool(answers_right(asked, text))
    score += 0.25 * full_sentence(asked, text)
    score += 0.5 * bool(POLITE.search(text))
    score -= 1.0 * bool(RUDE.search(text))
    score -= min(1.0, 0.03 * max(0, words - 25))
    return score


# ----------------------------------------------------------------------------------------------
# The SFT and preference sets


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def make_sft(world, math_sft, rng):
    """SFT conversations about seen characters, and the held-out questions for both kinds."""
    train, test = [], []
    weights = list(SFT_STYLE_WEIGHTS.values())
    pick_style = lambda: rng.choices(list(SFT_STYLE_WEIGHTS), weights)[0]
    for c in world.characters:
        for kind in FACT_KINDS:
            templates = list(range(len(QUESTIONS[kind])))
            held_out = rng.choice(templates)
            record = {"answer": c.fact(kind), "split": "seen" if c.seen else "unseen", "character": c.name, "fact": kind}
            if c.seen:
                train += [chat(question(c, kind, t), reply(c, kind, pick_style(), rng)) for t in templates if t != held_out]
            test.append({"messages": [{"role": "user", "content": question(c, kind, held_out)}], **record})
    for q in LLM_QUESTIONS:
        train += [chat(q, llm_reply(pick_style(), rng)) for _ in range(3)]
    train += [chat(p["question"], p["answer"]) for p in math_sft]
    rng.shuffle(train)
    return train, test


def designed_pair(world, prompt_info, rng):
    """(prompt, better, worse): better by construction: right beats wrong (a wrong value, another
    character's fact, or the same character's answer to another question); among right answers, polite > plain > curt > rambling or rude. The gold rater
    must agree (a test checks)."""
    c, kind, text = prompt_info
    if rng.random() < 0.4:  # right against wrong, any styles
        good, bad = rng.choice(STYLES), rng.choice(STYLES)
        if c == "llm" and rng.random() < 0.5:
            return text, llm_reply(good, rng), llm_reply(bad, rng, correct=False)
        if c == "llm":  # a character's fact instead of an answer
            other = rng.choice(world.characters)
            return text, llm_reply(good, rng), reply(other, rng.choice(FACT_KINDS), bad, rng)
        dodge = rng.random()
        if dodge < 0.4:  # a wrong value
            wrong = rng.choice([v for v in VALUES[kind] if v != c.fact(kind)])
            return text, reply(c, kind, good, rng), reply(c, kind, bad, rng, value=wrong)
        if dodge < 0.7:  # a true fact about someone else, which dodges the question
            other = rng.choice([d for d in world.characters if d.fact(kind) != c.fact(kind)])
            return text, reply(c, kind, good, rng), reply(other, kind, bad, rng)
        # a true fact about the one asked about, which answers another question: a reward model that
        # never sees one against the right answer scores them alike, and PPO learns to give them
        return text, reply(c, kind, good, rng), reply(c, rng.choice([k for k in FACT_KINDS if k != kind]), bad, rng)
    ladder = ["polite", "plain", "curt", rng.choice(["rambling", "rude"])]
    i, j = sorted(rng.sample(range(4), 2))
    if c == "llm":
        return text, llm_reply(ladder[i], rng), llm_reply(ladder[j], rng)
    return text, reply(c, kind, ladder[i], rng), reply(c, kind, ladder[j], rng)


def make_prefs(world, prompts, n, rng, noise_rng, label_noise, split=None):
    """n preference pairs over prompts, labelled by the gold rater, flipped with probability label_noise;
    each marked with its split when one is given."""
    pairs = []
    llm = [p for p in prompts if p[0] == "llm"]
    facts = [p for p in prompts if p[0] != "llm"]
    while len(pairs) < n:
        prompt = rng.choice(llm) if llm and rng.random() < 0.05 else rng.choice(facts)
        text, a, b = designed_pair(world, prompt, rng)
        sa, sb = gold_score(text, a, world), gold_score(text, b, world)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        if noise_rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": text, "chosen": chosen, "rejected": rejected, **({"split": split} if split else {})})
    return pairs


def pref_prompts(world, rng, held_out=0.25):
    """Every question about every character, and the LLM questions, in three lists: train and test
    prompts (85% and 15% of those about most characters), and every prompt about the held-out share of
    the characters, which no training pair mentions: the test that the reward model checks what
    pre-training taught rather than the pairs it saw."""
    names = sorted(c.name for c in world.characters)
    rng.shuffle(names)
    unseen = set(names[:round(len(names) * held_out)])
    prompts = [(c, kind, question(c, kind, t)) for c in world.characters for kind in FACT_KINDS
               for t in range(len(QUESTIONS[kind]))] + [("llm", None, q) for q in LLM_QUESTIONS]
    rng.shuffle(prompts)
    about_unseen = [p for p in prompts if p[0] != "llm" and p[0].name in unseen]
    rest = [p for p in prompts if p not in about_unseen]
    cut = len(rest) * 85 // 100
    return rest[:cut], rest[cut:], about_unseen
