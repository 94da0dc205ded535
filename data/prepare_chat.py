"""An open instruction set as SFT conversations, in the format of TinyWorld's sft_train.jsonl.

    python -m data.prepare_chat           # Dolly 15k -> data/real/chat_train.jsonl, data/real/chat_val.jsonl
    python -m data.prepare_chat --src=alpaca_data.json

Reads Dolly's schema (JSON Lines of {"instruction", "context", "response"}) or Alpaca's (a JSON
array of {"instruction", "input", "output"}). The instruction, then a blank line and the context or
input when there is one, is the user's turn; the response is the assistant's. A fixed, seeded
fraction of the conversations is held out as the validation file.
"""
import dataclasses
import random

from cli import run_main
from data import Malformed, convert_records, fetch, read_records, report, write_jsonl

DOLLY = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"


@dataclasses.dataclass
class Config:
    src: str = DOLLY  # a local file or a URL, in Dolly's or Alpaca's schema
    out: str = "data/real/chat_train.jsonl"  # the training conversations
    val_out: str = "data/real/chat_val.jsonl"  # the held-out conversations
    val_fraction: float = 0.02  # the share held out
    seed: int = 0  # which conversations are held out


def convert(record: dict) -> dict:
    instruction = record["instruction"].strip()
    context = (record.get("context") or record.get("input") or "").strip()
    response = (record["response"] if "response" in record else record["output"]).strip()
    if not instruction or not response:
        raise Malformed("empty instruction or response")
    user = instruction + ("\n\n" + context if context else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}]}


def main(cfg: Config) -> None:
    kept, skipped = convert_records(read_records(fetch(cfg.src)), convert)
    report(cfg.src, cfg.out, len(kept), skipped)
    random.Random(cfg.seed).shuffle(kept)
    n_val = round(len(kept) * cfg.val_fraction)
    write_jsonl(cfg.out, kept[n_val:])
    write_jsonl(cfg.val_out, kept[:n_val])
    print(f"{len(kept) - n_val:,} for training, {n_val:,} held out -> {cfg.val_out}")


if __name__ == "__main__":
    run_main(main, Config)
