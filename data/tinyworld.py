"""TinyWorld: a small synthetic world whose every fact is known, so each training stage can be scored.

    python -m data.tinyworld                        # writes data/tinyworld/ in a few seconds
    python -m data.tinyworld --seed=1 --out=/tmp/tw --stories=500

A cast of characters each have five facts (home town, pet, favourite colour, job, favourite food).
Half of them are "seen": the SFT conversations ask about them. The other half are "unseen": their
facts appear only in the pre-training text, so answering questions about them after SFT shows that
pre-training supplied the knowledge and instruction tuning only the format.

Files written to --out (the corpus format and JSONL helpers are in data/__init__.py):
- corpus_train.txt, corpus_val.txt: documents separated by blank lines: pages about characters,
  interviews, quizzes, fact sheets, short stories, sums in prose, the world's prices and pay, worked
  reasoning problems, texts on what an LLM is. Each fact is stated many times, always including the
  completion form of `fact_prompts` ("Alice's favourite colour is blue."). The validation text is
  drawn the same way, from its own random stream, without any document of the training text.
- sft_train.jsonl: {"messages": [user, assistant]}: fact questions about seen characters, answered
  in mixed styles (plain, polite, curt, rambling); questions on what an LLM is; math from the SFT
  split, some problems worked step by step and others (--math_sft_bare) answered with the number
  alone ("#### n"), as people answer: which way pays is left for GRPO's verifier to find. (The bare
  ones are drawn with the SFT split, before the corpus's problems: changing their count redraws those.)
- sft_answers_only.jsonl: the same, with every math answer cut to "#### n" (no steps): a contrast run.
- sft_test.jsonl: {"messages": [user], "answer", "split": "seen"|"unseen", "character", "fact"}:
  for seen characters, a question phrasing held out of SFT for each fact; for unseen, every fact.
- prefs_train.jsonl, prefs_test.jsonl: {"prompt", "chosen", "rejected"}, labelled by `gold_score`;
  training labels are flipped with probability --label_noise, test labels are clean.
- math_train.jsonl (for GRPO), math_test.jsonl: {"question", "answer", "level"}, the answer worked
  one step per line, ending in "#### n" (data/tinymath.py). SFT's problems are in sft_train.jsonl;
  no problem is in two splits, and all three are about seen characters.
- meta.json: the config and the cast, so `load_world()` rebuilds the world the files describe.

The oracles the stages use, all importable from here: `fact_prompts` with `completes_fact`
(knowledge after pre-training), `answer_correct` (held-out QA after SFT), `gold_score` (the
preference rater), `extract_answer` and `check_answer` (math), and `World` / `load_world` for fact
look-ups. This file makes the pre-training corpus and writes every file; the rest lives in three
modules, each importing only those listed before it:
- data/tinyworld_facts.py: the cast and their facts, the sentences that state them, the questions;
- data/tinymath.py: the reasoning problems, their verifier and their step checker;
- data/tinyworld_chat.py: answers in styles, the gold rater, the SFT and preference sets.
"""
import dataclasses
import json
import random
import time
from pathlib import Path

from cli import UserError, run_main
from data import write_atomic, write_documents, write_jsonl
from data.tinymath import KINDS, bare, make_math, rate_sentence
from data.tinyworld_chat import make_prefs, make_sft, pref_prompts
from data.tinyworld_facts import FACT_KINDS, fact_sentence, make_world

# The oracles and look-ups that other code imports from here (`from data.tinyworld import ...`):
from data.tinymath import check_answer, extract_answer  # noqa: F401
from data.tinyworld_chat import answers_right, gold_score, style_of  # noqa: F401
from data.tinyworld_facts import (VALUES, Character, World, answer_correct, completes_fact,  # noqa: F401
                                  default_world, fact_prompts, load_world)

# ----------------------------------------------------------------------------------------------
# The pre-training corpus

INTERVIEW = {"town": ("Where do you live?", "I live in {town}."), "pet": ("Do you have a pet?", "Yes, I have a {pet}."),
             "colour": ("What is your favourite colour?", "My favourite colour is {colour}."),
             "job": ("What do you do for work?", "I work as a {job}."), "food": ("What do you like to eat?", "I love {food}.")}
QUIZ = {"town": "Where is {name}'s home?", "pet": "Which animal does {name} own?", "colour": "Name {name}'s favourite colour.",
        "job": "What job does {name} have?", "food": "What food does {name} like most?"}
STORY_OPENINGS = [
    "Once upon a time, in the town of {town}, there was a {job} called {name}.",
    "{name} woke up early one {day} morning in {town}.", "It was a {weather} day in {town}, and {name} was happy.",
    "This is a story about {name}, who lives in {town}."]
STORY_SCENES = [
    "{name} fed {pos} {pet} and made a cup of tea.", "Then {name} went to work. {Sub} is a {job}, and {sub} likes it.",
    "For lunch, {name} ate {food}, {pos} favourite food.",
    "{name} put on a {colour} coat. {Colour} is {pos} favourite colour, after all.",
    "On the way home, {name} bought some {food} at the market in {town}.", "{name}'s {pet} was waiting at the door.",
    "{name} painted a picture of {pos} {pet}, using a lot of {colour}.",
    "{name} works as a {job}, so the morning was busy.", "{name}'s favourite colour is {colour}, so {sub} picked {colour} flowers."]
STORY_SCENES_WITH_B = [
    "{name} visited {b_name}, who lives in {b_town}.", "{b_name} showed {name} {b_pos} {b_pet}, and {name} talked about {pos} {pet}.",
    '"What is your favourite colour?" {b_name} asked. "{Colour}," said {name}. "Mine is {b_colour}," said {b_name}.',
    '"What do you do?" asked {name}. "I am a {b_job}," answered {b_name}.',
    "Together they cooked {food} and {b_food}, the favourite foods of {name} and {b_name}.",
    "{b_name} is a {b_job} and {name} is a {job}, so they had a lot to talk about.",
    "{name} gave {b_name} a {b_colour} scarf, because {b_colour} is {b_name}'s favourite colour."]
STORY_ENDINGS = ["In the evening, {name} went home to {town} and slept well.", "It was a good day for {name}.",
                 "{name} smiled. Tomorrow would be another fine day in {town}.", "And that was the end of the day."]
LLM_SENTENCES = [
    "A large language model, or LLM, is a computer program that has learned from a great deal of text.",
    "LLM stands for large language model.", "An LLM is a neural network trained to predict the next token of a text.",
    "A token is a small piece of text, such as a word or a part of a word.",
    "A language model reads text one token at a time and guesses which token comes next.",
    "By predicting the next word again and again, an LLM can write sentences and answer questions.",
    "First, an LLM is pre-trained on lots of text; this is where it learns language and facts.",
    "After pre-training, an LLM is fine-tuned on conversations, so that it answers questions instead of just continuing text.",
    "People can also show an LLM which answers they prefer, so that it becomes more helpful and polite.",
    "An LLM can be trained with rewards to solve maths problems step by step.",
    "An LLM does not think like a person; it has learned patterns from the text it has read.",
    "What is an LLM? An LLM is a large language model: a neural network that predicts the next word of a text."]
LLM_TITLES = ["What is a language model?", "About LLMs", "Large language models", "How does an LLM work?"]


def about_doc(c, rng):
    kinds = rng.sample(FACT_KINDS, len(FACT_KINDS))
    return f"About {c.name}.\n" + " ".join(fact_sentence(c, k, rng) for k in kinds)


def interview_doc(c, rng):
    lines = [f"An interview with {c.name}."]
    for k in rng.sample(FACT_KINDS, len(FACT_KINDS)):
        q, a = INTERVIEW[k]
        lines += [f"Q: {q}", "A: " + a.format(**c.slots())]
    return "\n".join(lines + ["That was {name}, a {job} from {town}.".format(**c.slots())])


def quiz_doc(world, rng):
    lines = ["A quiz about the people of TinyWorld."]
    for _ in range(rng.randint(4, 8)):
        c, k = rng.choice(world.characters), rng.choice(FACT_KINDS)
        lines += ["Q: " + QUIZ[k].format(name=c.name), "A: " + fact_sentence(c, k)]
    return "\n".join(lines)


def fact_sheet_doc(world, rng):
    facts = [fact_sentence(rng.choice(world.characters), rng.choice(FACT_KINDS), rng) for _ in range(rng.randint(6, 12))]
    return "Some facts about the people of TinyWorld.\n" + " ".join(facts)


def story_doc(world, rng):
    a, b = rng.sample(world.characters, 2)
    slots = {**a.slots(), **b.slots("b_"), "day": rng.choice(["Monday", "Tuesday", "Saturday", "Sunday"]),
             "weather": rng.choice(["sunny", "rainy", "windy", "cold", "warm"])}
    scenes = rng.sample(STORY_SCENES, rng.randint(2, 4))
    if rng.random() < 0.6:
        scenes += rng.sample(STORY_SCENES_WITH_B, rng.randint(1, 3))
    rng.shuffle(scenes)
    sentences = [rng.choice(STORY_OPENINGS)] + scenes + [rng.choice(STORY_ENDINGS)]
    return " ".join(s.format(**slots) for s in sentences)


ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "stamps", "cards", "beads", "buttons"]


def arithmetic_doc(world, rng, problem):
    if problem is not None:  # a worked problem, in the format of the math files
        return f"Question: {problem['question']}\nAnswer: {problem['answer']}"
    if rng.random() < 0.5:
        sums = []
        for _ in range(rng.randint(3, 6)):
            x, y = rng.randint(2, 30), rng.randint(2, 30)
            op = rng.choice(["plus", "minus", "times"])
            if op == "minus":
                x, y = max(x, y), min(x, y)
            if op == "times":
                x, y = x % 9 + 2, y % 9 + 2
            sums.append(f"{x} {op} {y} is {x + y if op == 'plus' else x - y if op == 'minus' else x * y}.")
        return "Some sums. " + " ".join(sums)
    if rng.random() < 0.5:  # the sums the reasoning problems write, in their form
        return "Adding up. " + " ".join(f"{x} + {y} = {x + y}." for x, y in
                                        ((rng.randint(2, 18), rng.randint(2, 9)) for _ in range(rng.randint(4, 8))))
    c, item = rng.choice(world.characters), rng.choice(ITEMS)
    x, y = rng.randint(2, 20), rng.randint(2, 20)
    return (f"{c.name} had {x} {item}. Then {c.pronoun} got {y} more. Now {c.name} has {x} + {y} = {x + y} {item}. "
            f"Later {c.pronoun} lost {y} of them, so {c.name} had {x + y} - {y} = {x} {item} again.")


RATES_TITLES = {"job": "Pay in TinyWorld.", "pet": "Feeding pets.", "food": "Prices at the cafe.",
                "colour": "Paint prices."}


def rates_doc(rng):
    """What the world's jobs pay, its pets eat and its foods and paints cost: the reasoning problems'
    rates (data/tinymath.py), stated as their worked answers state them."""
    kind = rng.choice(KINDS)
    values = rng.sample(VALUES[kind], rng.randint(3, 6))
    return RATES_TITLES[kind] + "\n" + " ".join(rate_sentence(kind, v) for v in values)


def llm_doc(rng):
    return rng.choice(LLM_TITLES) + "\n" + " ".join(rng.sample(LLM_SENTENCES, rng.randint(3, 6)))


def make_corpus(world, cfg, rng, scale: float, problems: list[dict]) -> list[str]:
    """Documents of every kind, in a random order; scale multiplies every count (the val text is small)."""
    n = lambda count: max(1, round(count * scale))
    docs = []
    for c in world.characters:
        docs += [about_doc(c, rng) if rng.random() < 0.7 else interview_doc(c, rng) for _ in range(n(cfg.profile_docs))]
    docs += [quiz_doc(world, rng) for _ in range(n(cfg.quizzes))]
    docs += [fact_sheet_doc(world, rng) for _ in range(n(cfg.fact_sheets))]
    docs += [story_doc(world, rng) for _ in range(n(cfg.stories))]
    docs += [arithmetic_doc(world, rng, None) for _ in range(n(cfg.arithmetic_docs))]
    docs += [arithmetic_doc(world, rng, problems.pop()) for _ in range(n(cfg.math_docs))]
    docs += [rates_doc(rng) for _ in range(n(cfg.rates_docs))]
    docs += [llm_doc(rng) for _ in range(n(cfg.llm_docs))]
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------
# Generating the files


@dataclasses.dataclass
class Config:
    seed: int = 0  # everything follows from it
    out: str = "data/tinyworld"  # output directory
    n_characters: int = 48  # the cast; half are seen in SFT, half unseen
    profile_docs: int = 60  # per character: "About X" pages and interviews stating all five facts
    quizzes: int = 1500  # quiz documents: questions and fact answers about random characters
    fact_sheets: int = 1500  # documents listing facts of random characters
    stories: int = 2500  # short stories that mention the facts of one or two characters
    arithmetic_docs: int = 900  # sums, in words and as "a + b = c", and small stories of adding and taking away
    math_docs: int = 900  # worked reasoning problems (data/tinymath.py), none of them in the math sets
    llm_docs: int = 200  # short texts on what a language model is
    rates_docs: int = 1000  # what jobs pay, pets eat, foods and paints cost: the reasoning problems' rates
    val_fraction: float = 0.05  # corpus_val.txt's size relative to corpus_train.txt
    math_sft: int = 400  # math problems worked step by step in sft_train.jsonl
    math_sft_bare: int = 400  # and more answered with the number alone, "#### n"
    math_grpo: int = 2000  # math_train.jsonl, for GRPO
    math_test: int = 200  # math_test.jsonl
    prefs_train: int = 3000  # preference pairs in prefs_train.jsonl
    prefs_test: int = 300  # held-out pairs in prefs_test.jsonl about characters of training pairs (labels never flipped)
    prefs_test_unseen: int = 150  # and more about characters that no training pair mentions
    label_noise: float = 0.1  # probability that a training pair's label is flipped


def answers_only(conversations):
    """The SFT set with each worked math answer cut to its last line, "#### n": the contrast that shows
    what writing the steps buys (the same conversations otherwise, in the same order)."""
    cut = lambda m: {**m, "content": bare(m["content"])} if "####" in m["content"] else m
    return [{"messages": [r["messages"][0], cut(r["messages"][1])]} for r in conversations]


def generate(cfg: Config) -> dict:
    """Everything, in memory: {file name: records or documents}. Each part has its own random stream."""
    counts = [f.name for f in dataclasses.fields(cfg) if f.name not in ("seed", "out")]
    negative = next((name for name in counts if getattr(cfg, name) < 0), None)
    if negative:
        raise UserError(f"--{negative} must be 0 or more, got {getattr(cfg, negative)}")
    world = make_world(cfg.seed, cfg.n_characters)
    stream = lambda part: random.Random(f"{cfg.seed}/{part}")
    n_corpus_problems = round(cfg.math_docs * (1 + cfg.val_fraction)) + 1
    # the problems of SFT, GRPO and the test are about seen characters: the unseen ones' facts stay in the
    # pre-training text alone, where the corpus's worked problems may mention anyone
    math_test, math_grpo, math_sft, corpus_math = make_math(
        world, [cfg.math_test, cfg.math_grpo, cfg.math_sft + cfg.math_sft_bare, n_corpus_problems], stream("math"),
        casts=[world.seen] * 3 + [world.characters])
    math_sft = math_sft[:cfg.math_sft] + [{**p, "answer": bare(p["answer"])} for p in math_sft[cfg.math_sft:]]
    train_docs = make_corpus(world, cfg, stream("corpus/train"), 1.0, corpus_math)
    seen_docs = set(train_docs)
    val_docs = [d for d in make_corpus(world, cfg, stream("corpus/val"), cfg.val_fraction, corpus_math) if d not in seen_docs]
    sft_train, sft_test = make_sft(world, math_sft, stream("sft"))
    train_prompts, test_prompts, unseen_prompts = pref_prompts(world, stream("prefs/split"))
    return {
        "world": world,
        "corpus_train.txt": train_docs, "corpus_val.txt": val_docs,
        "sft_train.jsonl": sft_train, "sft_answers_only.jsonl": answers_only(sft_train), "sft_test.jsonl": sft_test,
        "prefs_train.jsonl": make_prefs(world, train_prompts, cfg.prefs_train, stream("prefs/train"),
                                        stream("prefs/noise"), cfg.label_noise),
        "prefs_test.jsonl": make_prefs(world, test_prompts, cfg.prefs_test, stream("prefs/test"), stream("unused"), 0.0, "seen")
        + make_prefs(world, unseen_prompts, cfg.prefs_test_unseen, stream("prefs/test_unseen"), stream("unused"), 0.0, "unseen"),
        "math_train.jsonl": math_grpo, "math_test.jsonl": math_test,
    }


def main(cfg: Config) -> None:
    t0 = time.time()
    data = generate(cfg)
    out = Path(cfg.out)
    files = {}
    for name, items in data.items():
        if name == "world":
            continue
        (write_documents if name.endswith(".txt") else write_jsonl)(out / name, items)
        files[name] = {"records": len(items), "bytes": (out / name).stat().st_size}
        print(f"{out / name}: {len(items):,} {'documents' if name.endswith('.txt') else 'records'}, "
              f"{files[name]['bytes']:,} bytes")
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}  # the same bytes wherever it goes
    meta = {"config": config, "files": files,
            "characters": [dataclasses.asdict(c) for c in data["world"].characters]}
    write_atomic(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    print(f"TinyWorld (seed {cfg.seed}, {cfg.n_characters} characters) written to {out} in {time.time() - t0:.1f}s")


PRESETS = {
    # the whole journey's plumbing in about a minute on a CPU, nothing learned (make demo PRESET=smoke)
    "smoke": dict(n_characters=8, profile_docs=4, quizzes=40, fact_sheets=40, stories=40, arithmetic_docs=40,
                  math_docs=40, llm_docs=10, rates_docs=40, math_sft=20, math_sft_bare=10, math_grpo=20, math_test=20,
                  prefs_train=40, prefs_test=20, prefs_test_unseen=10),
}


if __name__ == "__main__":
    run_main(main, Config, PRESETS)
