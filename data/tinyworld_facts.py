"""TinyWorld's cast and their facts: what is true, how it is said, and how it is asked.

The world itself (`Character`, `World`, `make_world`, `load_world`, `default_world`), the sentences
that state a fact (the first phrasing of each is the completion form of `fact_prompts`), and the
questions that ask for one, which `World.parse_question` reads back for the gold rater. The oracles
for knowledge are here too: `completes_fact` after pre-training, `answer_correct` after SFT.
It imports no other TinyWorld module, so that all of them can import it.
"""
import dataclasses
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from cli import UserError

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
# Questions: the ways a user asks for a fact, or what an LLM is

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


def question(c: Character, kind: str, template: int) -> str:
    return QUESTIONS[kind][template].format(name=c.name)
