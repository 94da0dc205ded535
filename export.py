"""Any stage's checkpoint as a Hugging Face model directory, for transformers and the tools built on it.

    python export.py --init=out/sft/ckpt.pt --out=out/hf/sft
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('out/hf/sft'))"
    python sample.py --init=out/hf/sft --chat --prompt="Where does Lucy live?"   # and back in

It writes config.json and model.safetensors (GPT-2's layout, or GPT-NeoX's for a model with rotary
positions: see hf.py), tokenizer.json (our byte-level BPE: the same split pattern, ids and special
tokens) and tokenizer_config.json with the chat template. A reward model's trunk goes out as the
language model, its head and gate beside it in reward_head.safetensors, which transformers ignores
and --init=DIR reads back.
"""
from dataclasses import dataclass
from pathlib import Path

import cli
import common
import hf
from cli import UserError
from data.tokenizer import load_tokenizer


@dataclass
class Config:
    init: str = "out/sft/ckpt.pt"  # a checkpoint of any stage (or a Hugging Face directory)
    out: str = ""                  # the directory to write; default out/hf/<stage>; must be new or empty
    tokenizer: str = ""            # default: the one the checkpoint was trained with


def main(cfg):
    ckpt = common.load_checkpoint(cfg.init)
    tok = load_tokenizer(cfg.tokenizer or ckpt["tokenizer"])
    model = common.gpt_from_checkpoint(ckpt, tok, reward=ckpt["stage"] == "rm")
    out = Path(cfg.out or f"out/hf/{ckpt['stage']}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory: pass another --out, or remove it")
    files = hf.save(model, tok, ckpt["stage"], out)
    layout = "GPT-NeoX (rotary positions)" if model.config.rope else "GPT-2"
    print(f"{ckpt['stage']} model, {model.num_params(False) / 1e6:.2f}M parameters, {tok.n_vocab} tokens, "
          f"as {layout} -> {out}/: {', '.join(files)}")
    if hf.HEADS in files:
        print(f"the reward model's head and gate are in {out}/{hf.HEADS}; transformers loads the trunk only")


if __name__ == "__main__":
    cli.run_main(main, Config)
