"""GSM8K, grade-school math word problems, in the format of TinyWorld's math files (for GRPO).

    python -m data.prepare_gsm8k          # -> data/real/gsm8k_train.jsonl, data/real/gsm8k_test.jsonl
    python -m data.prepare_gsm8k --src=train.jsonl --test_src=test.jsonl

A source record is {"question", "answer"}, the answer worked in steps with calculator notes like
<<48/2=24>> and ending in "#### 72". We drop the calculator notes (TinyWorld's answers have none)
and keep the rest: {"question", "answer"}, checked by data.tinyworld.check_answer.
"""
import dataclasses
import re

from cli import run_main
from data import Malformed, convert_file
from data.tinyworld import extract_answer

BASE = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"


@dataclasses.dataclass
class Config:
    src: str = BASE + "train.jsonl"  # training problems: a local file or a URL
    test_src: str = BASE + "test.jsonl"  # held-out problems (empty: skip)
    out: str = "data/real/gsm8k_train.jsonl"  # where the training problems go
    test_out: str = "data/real/gsm8k_test.jsonl"  # where the held-out problems go


def convert(record: dict) -> dict:
    question, answer = record["question"].strip(), re.sub(r"<<[^>]*>>", "", record["answer"]).strip()
    if not question:
        raise Malformed("empty question")
    if extract_answer(answer) is None:
        raise Malformed("answer without '#### n'")
    return {"question": question, "answer": answer}


def main(cfg: Config) -> None:
    for src, out in [(cfg.src, cfg.out), (cfg.test_src, cfg.test_out)]:
        if src:
            convert_file(src, out, convert)


if __name__ == "__main__":
    run_main(main, Config)
