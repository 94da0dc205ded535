"""TinyStories as a pre-training corpus, in the format of TinyWorld's corpus files.

    python -m data.prepare_tinystories    # -> data/real/tinystories_train.txt (2 GB), tinystories_val.txt
    python -m data.prepare_tinystories --src=TinyStoriesV2-GPT4-valid.txt --val_src= --max_docs=10000

The source is plain text, stories separated by lines holding only "<|endoftext|>". A story becomes
one document: blank lines inside it are closed up (our corpus separates documents by blank lines).
Stories that are empty or hold undecodable bytes are skipped and counted. Written as it is read,
so the 2 GB training file never has to fit in memory.
"""
import dataclasses
import os
from collections import Counter
from pathlib import Path

from cli import run_main
from data import clean_document, fetch, open_text, report

BASE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"


@dataclasses.dataclass
class Config:
    src: str = BASE + "TinyStoriesV2-GPT4-train.txt"  # training stories: a local file or a URL
    val_src: str = BASE + "TinyStoriesV2-GPT4-valid.txt"  # validation stories (empty: skip)
    out: str = "data/real/tinystories_train.txt"  # the training corpus
    val_out: str = "data/real/tinystories_val.txt"  # the validation corpus
    max_docs: int = 0  # keep at most this many stories per file (0: all)


def stories(path):
    """The stories of a TinyStories text file, as written (separator lines removed)."""
    lines = []
    with open_text(path) as f:
        for line in f:
            if line.strip() == "<|endoftext|>":
                yield "".join(lines)
                lines = []
            else:
                lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines)


def convert(src, out, max_docs) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n_kept, skipped = 0, Counter()
    with open(tmp, "w", encoding="utf-8") as f:
        for story in stories(fetch(src)):
            doc = clean_document(story)
            if not doc:
                skipped["empty"] += 1
            elif "\ufffd" in doc:
                skipped["undecodable bytes"] += 1
            else:
                f.write(("\n\n" if n_kept else "") + doc)
                n_kept += 1
                if n_kept == max_docs:
                    break
        f.write("\n")
    if n_kept == 0:
        tmp.unlink()
    report(src, out, n_kept, skipped, unit="stories")  # an error when nothing was kept
    os.replace(tmp, out)


def main(cfg: Config) -> None:
    for src, out in [(cfg.src, cfg.out), (cfg.val_src, cfg.val_out)]:
        if src:
            convert(src, out, cfg.max_docs)


if __name__ == "__main__":
    run_main(main, Config)
