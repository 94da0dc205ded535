"""TinyWorld: a small synthetic world whose every fact is known, so each training stage can be scored.

    python -m data.tinyworld                        # writes data/tinyworld/ in a few seconds
    python -m data.tinyworld --seed=1 --out=/tmp/tw --stories=500

A cast of characters each have five facts (home town, pet, favourite colour, job, favourite food).
Half of them are "seen": the SFT conversations ask about them. The other half are "unseen": their
facts appear only in the pre-training text, so answering questions about them after SFT shows that
pre-training supplied the knowledge and instruction tuning only the format.

Files written to --out (the corpus format and JSONL helpers are in data/__init__.py):
- corpus_train.txt, corpus_val.txt: documents separated by blank lines: pages about characters,
  interviews, quizzes, fact sheets, short stories, worked arithmetic, texts on what an LLM is. Each
  fact is stated many times, always including the completion form of `fact_prompts`
  ("Alice's favourite colour is blue."). The validation text is drawn the same way, from its own
  random stream, without any document of the training text.
- sft_train.jsonl: {"messages": [user, assistant]}: fact questions about seen characters, answered
  in mixed styles (plain, polite, curt, rambling); questions on what an LLM is; math from the SFT split.
- sft_test.jsonl: {"messages": [user], "answer", "split": "seen"|"unseen", "character", "fact"}:
  for seen characters, a question phrasing held out of SFT for each fact; for unseen, every fact.
- prefs_train.jsonl, prefs_test.jsonl: {"prompt", "chosen", "rejected"}, labelled by `gold_score`;
  training labels are flipped with probability --label_noise, test labels are clean.
- math_train.jsonl (for GRPO), math_test.jsonl: {"question", "answer"}, the answer worked in
  steps ending in "#### n". SFT's math problems are in sft_train.jsonl; no problem is in two splits.
- meta.json: the config and the cast, so `load_world()` rebuilds the world the files describe.

The oracles the stages use: `fact_prompts` with `completes_fact` (knowledge after pre-training),
`answer_correct` (held-out QA after SFT), `gold_score` (the preference rater), `extract_answer` and
`check_answer` (math), and `World` / `load_world` for fact look-ups.
"""
import dataclasses
import json
import random
import re
import time
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

from data import UserError, run_main, write_atomic, write_documents, write_jsonl

# ----------------------------------------------------------------------------------------------
# The world: characters and their facts

VALUES = {  # each fact kind's closed set of values; no word is in two sets
    "town": ["Millbrook", "Oakvale", "Riverton", "Stonebridge", "Ashford", "Pinecrest", "Lakeside", "Fernhill"],
    "pet": ["cat", "dog", "rabbit", "parrot", "hamster", "turtle", "goldfish", "pony", "ferret", "mouse"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "grey"],
    "job": ["baker", "teacher", "farmer", "doctor", "painter", "sailor", "potter", "tailor", "nurse", "pilot",
            "carpenter", "gardener"],
    "food": ["soup", "pizza", "pasta", "curry", "noodles", "pancakes", "salad", "dumplings", "tacos", "porridge"],
}
FACT_KINDS = tuple(VALUES)
NAMES = {  # no name is a prefix of another, a value, or an everyday word
    "she": "Alice Bella Clara Daisy Emma Fiona Greta Hazel Ivy Julia Kate Lena Maya Nora Petra Rosa Sara Tessa "
           "Uma Vera Wendy Xena Yara Zoe Agnes Bianca Celia Dora Edith Freya Gwen Helga Irene Joan Kira Lucy "
           "Mabel Nadia Pia Ruth Sophie Thea Willa Zelda Astrid Beatrix Cora Delia Elsie Flora Gemma Hilda "
           "Ingrid Lola Mina Nell Orla Polly".split(),
    "he": "Adam Ben Carl David Eric Felix George Hugo Ivan Jack Leo Max Nick Oscar Paul Rex Sam Tom Victor "
          "Walter Xavier Yusuf Zack Arthur Boris Cyril Dexter Elliot Gus Harry Igor Jonah Kevin Luke Milo Ned "
          "Otto Ralph Simon Theo Vince Wes Yuri Zane Abel Bruno Colin Dean Edgar Finn Gordon Henry Isaac Jasper "
          "Lars Marco Nils Omar Rufus Stan".split(),
}


@dataclasses.dataclass(frozen=True)
class Character:
    name: str
    pronoun: str  # "she" or "he"
    town: str
    pet: str
    colour: str
    job: str
    food: str
    seen: bool  # asked about in SFT

    def fact(self, kind: str) -> str:
        return getattr(self, kind)

    def slots(self, prefix="") -> dict:
        """The words templates fill in: {name}, {sub}, {pos}, {town}, {Colour}, ..."""
        she = self.pronoun == "she"
        s = {"name": self.name, "sub": self.pronoun, "Sub": self.pronoun.capitalize(), "obj": "her" if she else "him",
             "pos": "her" if she else "his", "Pos": "Her" if she else "His"}
        for kind in FACT_KINDS:
            s[kind] = self.fact(kind)
            s[kind.capitalize()] = self.fact(kind)[0].upper() + self.fact(kind)[1:]
        return {prefix + k: v for k, v in s.items()}


class World:
    """The cast, with look-ups by name and the question parser the gold rater relies on."""

    def __init__(self, characters: list[Character]):
        self.characters = list(characters)
        self.by_name = {c.name: c for c in self.characters}
        self.seen = [c for c in self.characters if c.seen]
        self.unseen = [c for c in self.characters if not c.seen]
        self._questions = None

    def fact(self, name: str, kind: str) -> str:
        return self.by_name[name].fact(kind)

    def parse_question(self, text: str):
        """(character, kind) the question asks about; ("llm", None) for what-is-an-LLM; else None.

        Our own question texts are looked up exactly; any other text falls back to keywords.
        """
        if self._questions is None:
            self._questions = {question(c, kind, t): (c, kind) for c in self.characters
                               for kind in FACT_KINDS for t in range(len(QUESTIONS[kind]))}
        key = " ".join(text.split())
        if key in self._questions:
            return self._questions[key]
        if key in LLM_QUESTIONS or re.search(r"\bLLMs?\b|language model", key, re.I):
            return ("llm", None)
        names = [c for c in self.characters if re.search(rf"\b{c.name}\b", key)]
        for kind, words in QUESTION_KEYWORDS:
            if len(names) == 1 and re.search(words, key, re.I):
                return (names[0], kind)
        return None


def make_world(seed: int = 0, n_characters: int = 48) -> World:
    """The cast: unique names, each fact value used about equally often, half of them seen."""
    pool = [(n, p) for p in NAMES for n in NAMES[p]]
    if not 4 <= n_characters <= len(pool):
        raise UserError(f"--n_characters={n_characters}: must be between 4 and {len(pool)} (the name pool)")
    rng = random.Random(f"{seed}/world")
    cast = rng.sample(pool, n_characters)
    facts = {}
    for kind, values in VALUES.items():  # balanced: guessing the commonest value gets little credit
        column = (values * (n_characters // len(values) + 1))[:n_characters]
        rng.shuffle(column)
        facts[kind] = column
    seen = set(rng.sample(range(n_characters), n_characters // 2))
    return World([Character(name, pronoun, *(facts[k][i] for k in FACT_KINDS), seen=i in seen)
                  for i, (name, pronoun) in enumerate(cast)])


def load_world(data_dir="data/tinyworld") -> World:
    """The world that data_dir's files were generated from (read from its meta.json)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"no TinyWorld in {data_dir}: run `python -m data.tinyworld --out={data_dir}`")
    return World([Character(**c) for c in json.loads(path.read_text())["characters"]])


@lru_cache(maxsize=1)
def default_world() -> World:
    """data/tinyworld's world if it was generated, else the default seed's."""
    try:
        return load_world()
    except UserError:
        return make_world()


# ----------------------------------------------------------------------------------------------
# Facts in words. The first phrasing of each kind is the completion form: fact_prompts' prompt,
# a space, the value, a full stop. Nowhere else does a prompt's text appear.

FACT_PROMPTS = {"town": "{name} lives in", "pet": "{name}'s pet is a", "colour": "{name}'s favourite colour is",
                "job": "{name} works as a", "food": "{name}'s favourite food is"}
PHRASINGS = {
    "town": ["{name} lives in {town}.", "{name}'s home town is {town}.", "{name} comes from {town}.",
             "{town} is the town where {name} lives.", "{name} has a little house in {town}.",
             "Ask anyone in {town} and they will tell you that {name} lives there."],
    "pet": ["{name}'s pet is a {pet}.", "{name} has a pet {pet}.", "{name} keeps a {pet} as a pet.",
            "A {pet} lives with {name}; it is {pos} pet.", "{name} takes good care of {pos} {pet}.",
            "Every evening, {name} plays with {pos} pet {pet}."],
    "colour": ["{name}'s favourite colour is {colour}.", "{name} likes {colour} more than any other colour.",
               "The colour {name} loves most is {colour}.", "{Colour} is {name}'s favourite colour.",
               "If you ask {name} about colours, {sub} will say {colour}.", "{name} loves the colour {colour}."],
    "job": ["{name} works as a {job}.", "{name} is a {job}.", "By trade, {name} is a {job}.",
            "{name} has been a {job} for many years.", "Being a {job} is {name}'s job.",
            "In {town}, everyone knows {name} the {job}."],
    "food": ["{name}'s favourite food is {food}.", "{name} loves to eat {food}.", "Of all foods, {name} likes {food} best.",
             "{Food} is {name}'s favourite food.", "{name} could eat {food} every day.",
             "When {name} is hungry, {sub} cooks {food}."],
}


def fact_sentence(c: Character, kind: str, rng=None, value=None) -> str:
    """The completion form of a fact (or a random phrasing of it, given rng); value overrides the truth."""
    template = PHRASINGS[kind][0] if rng is None or rng.random() < 0.5 else rng.choice(PHRASINGS[kind][1:])
    slots = c.slots()
    if value is not None:
        slots[kind], slots[kind.capitalize()] = value, value[0].upper() + value[1:]
    return template.format(**slots)


def fact_prompts(world: World) -> list[tuple[str, str]]:
    """(prompt, answer) for every fact of every character: ("Alice's favourite colour is", "blue")."""
    return [(FACT_PROMPTS[kind].format(name=c.name), c.fact(kind)) for c in world.characters for kind in FACT_KINDS]


def completes_fact(completion: str, answer: str) -> bool:
    """Is the completion's first word the answer? ("blue. Alice's pet is ..." completes "... colour is")"""
    words = re.findall(r"\w+", completion)
    return bool(words) and words[0].lower() == answer.lower()


def answer_correct(response: str, expected: str) -> bool:
    """Does the response contain the expected answer as a whole word (any case)?"""
    return re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", response, re.IGNORECASE) is not None


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
    c, item = rng.choice(world.characters), rng.choice(ITEMS)
    x, y = rng.randint(2, 20), rng.randint(2, 20)
    return (f"{c.name} had {x} {item}. Then {c.pronoun} got {y} more. Now {c.name} has {x} + {y} = {x + y} {item}. "
            f"Later {c.pronoun} lost {y} of them, so {c.name} had {x + y} - {y} = {x} {item} again.")


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
    docs += [arithmetic_doc(world, rng, problems.pop() if problems and rng.random() < 0.6 else None)
             for _ in range(n(cfg.arithmetic_docs))]
    docs += [llm_doc(rng) for _ in range(n(cfg.llm_docs))]
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------
# Questions, and answers in different styles

QUESTIONS = {
    "town": ["Where does {name} live?", "Which town does {name} live in?", "What is {name}'s home town?",
             "Can you tell me where {name} lives?", "In which town is {name}'s home?", "Where is {name} from?"],
    "pet": ["What pet does {name} have?", "What is {name}'s pet?", "Which animal does {name} keep as a pet?",
            "Can you tell me what kind of pet {name} has?", "Does {name} have a pet? What is it?", "What animal is {name}'s pet?"],
    "colour": ["What is {name}'s favourite colour?", "Which colour does {name} like best?", "What colour does {name} love most?",
               "Can you tell me {name}'s favourite colour?", "Do you know which colour {name} likes the most?",
               "{name} has a favourite colour. What is it?"],
    "job": ["What is {name}'s job?", "What does {name} do for a living?", "What work does {name} do?",
            "Can you tell me {name}'s job?", "What is {name}'s profession?", "How does {name} earn a living?"],
    "food": ["What is {name}'s favourite food?", "What does {name} love to eat?", "Which food does {name} like best?",
             "Can you tell me {name}'s favourite food?", "What is the food that {name} enjoys most?",
             "{name} has a favourite food. What is it?"],
}
QUESTION_KEYWORDS = [("pet", r"\bpet|animal"), ("colour", r"colou?r"), ("food", r"\bfood|\beat"),
                     ("job", r"\bjob|work|living|profession"), ("town", r"\blive|town|home|\bfrom\b")]
LLM_QUESTIONS = ["What is an LLM?", "What is a large language model?", "Can you explain what an LLM is?",
                 "What does LLM stand for?", "Tell me what a language model is.", "What is a language model?",
                 "How would you describe an LLM?", "What are LLMs?"]
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


def question(c: Character, kind: str, template: int) -> str:
    return QUESTIONS[kind][template].format(name=c.name)


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


def gold_score(prompt: str, response: str, world: World = None) -> float:
    """How good a response is: correct, polite and concise beats wrong, rude and rambling.

    + 2    the right answer (for a fact: the true value and no other value of that kind; for an
           LLM question: "language model" and prediction of the next word/token)
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
    score = 0.0
    asked = world.parse_question(prompt)
    if asked == ("llm", None):
        if re.search(r"language model", text, re.I) and re.search(r"predict|next (word|token)", text, re.I):
            score += 2.0
        score += 0.25 * bool(re.search(r"\bLLM\b", text))
    elif asked is not None:
        c, kind = asked
        named = [v for v in VALUES[kind] if answer_correct(text, v)]
        score += 2.0 * (named == [c.fact(kind)])
        score += 0.25 * bool(re.search(rf"\b{c.name}\b", text))
    score += 0.5 * bool(POLITE.search(text))
    score -= 1.0 * bool(RUDE.search(text))
    score -= min(1.0, 0.03 * max(0, words - 25))
    return score


# ----------------------------------------------------------------------------------------------
# Math: word problems of two or three steps, worked, ending in "#### n"

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


# ----------------------------------------------------------------------------------------------
# The data sets


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
    """(prompt, better, worse): better by construction: right beats wrong; among right answers,
    polite > plain > curt > rambling or rude. The gold rater must agree (a test checks)."""
    c, kind, text = prompt_info
    if rng.random() < 0.4:  # right against wrong, any styles
        good, bad = rng.choice(STYLES), rng.choice(STYLES)
        if c == "llm":
            return text, llm_reply(good, rng), llm_reply(bad, rng, correct=False)
        wrong = rng.choice([v for v in VALUES[kind] if v != c.fact(kind)])
        return text, reply(c, kind, good, rng), reply(c, kind, bad, rng, value=wrong)
    ladder = ["polite", "plain", "curt", rng.choice(["rambling", "rude"])]
    i, j = sorted(rng.sample(range(4), 2))
    if c == "llm":
        return text, llm_reply(ladder[i], rng), llm_reply(ladder[j], rng)
    return text, reply(c, kind, ladder[i], rng), reply(c, kind, ladder[j], rng)


def make_prefs(world, prompts, n, rng, noise_rng, label_noise):
    """n preference pairs over prompts, labelled by the gold rater, flipped with probability label_noise."""
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
        pairs.append({"prompt": text, "chosen": chosen, "rejected": rejected})
    return pairs


def pref_prompts(world, rng):
    """Every question about every character, and the LLM questions, split into train and test prompts."""
    prompts = [(c, kind, question(c, kind, t)) for c in world.characters for kind in FACT_KINDS
               for t in range(len(QUESTIONS[kind]))] + [("llm", None, q) for q in LLM_QUESTIONS]
    rng.shuffle(prompts)
    cut = len(prompts) * 85 // 100
    return prompts[:cut], prompts[cut:]


@dataclasses.dataclass
class Config:
    seed: int = 0  # everything follows from it
    out: str = "data/tinyworld"  # output directory
    n_characters: int = 48  # the cast; half are seen in SFT, half unseen
    profile_docs: int = 60  # per character: "About X" pages and interviews stating all five facts
    quizzes: int = 1500  # quiz documents: questions and fact answers about random characters
    fact_sheets: int = 1500  # documents listing facts of random characters
    stories: int = 2500  # short stories that mention the facts of one or two characters
    arithmetic_docs: int = 1500  # worked word problems, sums, counting in prose
    llm_docs: int = 200  # short texts on what a language model is
    val_fraction: float = 0.05  # corpus_val.txt's size relative to corpus_train.txt
    math_sft: int = 400  # math problems in sft_train.jsonl
    math_grpo: int = 2000  # math_train.jsonl, for GRPO
    math_test: int = 200  # math_test.jsonl
    prefs_train: int = 3000  # preference pairs in prefs_train.jsonl
    prefs_test: int = 300  # preference pairs in prefs_test.jsonl (labels never flipped)
    label_noise: float = 0.1  # probability that a training pair's label is flipped


def generate(cfg: Config) -> dict:
    """Everything, in memory: {file name: records or documents}. Each part has its own random stream."""
    world = make_world(cfg.seed, cfg.n_characters)
    stream = lambda part: random.Random(f"{cfg.seed}/{part}")
    n_corpus_problems = round(cfg.arithmetic_docs * (1 + cfg.val_fraction))
    math_test, math_grpo, math_sft, corpus_math = make_math(
        world, [cfg.math_test, cfg.math_grpo, cfg.math_sft, n_corpus_problems], stream("math"))
    train_docs = make_corpus(world, cfg, stream("corpus/train"), 1.0, corpus_math)
    seen_docs = set(train_docs)
    val_docs = [d for d in make_corpus(world, cfg, stream("corpus/val"), cfg.val_fraction, corpus_math) if d not in seen_docs]
    sft_train, sft_test = make_sft(world, math_sft, stream("sft"))
    train_prompts, test_prompts = pref_prompts(world, stream("prefs/split"))
    return {
        "world": world,
        "corpus_train.txt": train_docs, "corpus_val.txt": val_docs,
        "sft_train.jsonl": sft_train, "sft_test.jsonl": sft_test,
        "prefs_train.jsonl": make_prefs(world, train_prompts, cfg.prefs_train, stream("prefs/train"),
                                        stream("prefs/noise"), cfg.label_noise),
        "prefs_test.jsonl": make_prefs(world, test_prompts, cfg.prefs_test, stream("prefs/test"), stream("unused"), 0.0),
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


if __name__ == "__main__":
    run_main(main, Config)
