"""Anthropic's HH-RLHF preference pairs, in the format of TinyWorld's prefs_*.jsonl.

    python -m data.prepare_hh_rlhf        # helpful-base -> data/real/hh_train.jsonl, data/real/hh_test.jsonl
    python -m data.prepare_hh_rlhf --src=harmless-base/train.jsonl.gz --test_src=

A source record is {"chosen", "rejected"}: two whole transcripts ("\n\nHuman: ...\n\nAssistant:
..."), the same up to the final assistant reply. We keep the single-turn ones, as
{"prompt": the human's message, "chosen": the preferred reply, "rejected": the other}; multi-turn
conversations are skipped (and counted), since our preference format has one user turn.
"""
import dataclasses
import re

from cli import run_main
from data import Malformed, convert_file

BASE = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/"


@dataclasses.dataclass
class Config:
    src: str = BASE + "train.jsonl.gz"  # training pairs: a local file or a URL (.gz is fine)
    test_src: str = BASE + "test.jsonl.gz"  # held-out pairs (empty: skip)
    out: str = "data/real/hh_train.jsonl"  # where the training pairs go
    test_out: str = "data/real/hh_test.jsonl"  # where the held-out pairs go


def turns(transcript: str) -> list[tuple[str, str]]:
    """"\n\nHuman: hi\n\nAssistant: hello" -> [("Human", "hi"), ("Assistant", "hello")]."""
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + transcript.strip())
    if parts[0].strip():
        raise Malformed("transcript does not start with a turn")
    pairs = list(zip(parts[1::2], (p.strip() for p in parts[2::2])))
    if not pairs or [role for role, _ in pairs] != ["Human", "Assistant"] * (len(pairs) // 2) or len(pairs) % 2:
        raise Malformed("turns do not alternate Human, Assistant")
    return pairs


def convert(record: dict) -> dict:
    chosen, rejected = turns(record["chosen"]), turns(record["rejected"])
    if chosen[:-1] != rejected[:-1]:
        raise Malformed("transcripts differ before the last reply")
    if len(chosen) > 2:
        raise Malformed("multi-turn")
    prompt, good, bad = chosen[0][1], chosen[-1][1], rejected[-1][1]
    if not prompt or not good or not bad or good == bad:
        raise Malformed("empty or identical replies")
    return {"prompt": prompt, "chosen": good, "rejected": bad}


def main(cfg: Config) -> None:
    for src, out in [(cfg.src, cfg.out), (cfg.test_src, cfg.test_out)]:
        if src:
            convert_file(src, out, convert)


if __name__ == "__main__":
    run_main(main, Config)
