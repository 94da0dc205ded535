"""Talk to, or complete text with, any stage's checkpoint.

    python sample.py --init=out/pretrain/ckpt.pt --prompt="Once upon a time"   # complete text
    python sample.py --init=out/sft/ckpt.pt --chat --prompt="What is an LLM?"  # through the chat template
    python sample.py --init=out/sft/ckpt.pt --chat --interactive               # one prompt per line of stdin
    python sample.py --init=scratch                                            # stage 0: the random model
"""
import sys
from dataclasses import dataclass

import torch

import cli
import common
from cli import UserError
from data.tokenizer import load_tokenizer
from model import GPT, GPTConfig


@dataclass
class Config:
    init: str = "out/pretrain/ckpt.pt"  # a checkpoint of any stage, or scratch for a random model
    tokenizer: str = ""                 # default: the one the checkpoint was trained with (out/tokenizer for scratch)
    prompt: str = "Once upon a time"    # the text to complete, or the user's message with --chat
    chat: bool = False                  # wrap the prompt in the chat template and stop at the end of the turn
    interactive: bool = False           # read prompts from stdin, one per line, until end of input
    num_samples: int = 1                # completions per prompt
    max_new_tokens: int = 100           # tokens to generate at most
    temperature: float = 0.8            # 0 is greedy
    top_k: int = 50                     # sample among the k most likely tokens (0: all)
    top_p: float = 1.0                  # sample among the smallest set reaching this probability (1: all)
    device: str = "auto"                # auto (cuda, mps, cpu), or a torch device name
    seed: int = 1337                    # for the sampling


def load_model(cfg, device):
    if cfg.init == "scratch":
        tok = load_tokenizer(cfg.tokenizer or "out/tokenizer")
        torch.manual_seed(cfg.seed)
        return GPT(GPTConfig(vocab_size=tok.n_vocab)), tok
    ckpt = common.load_checkpoint(cfg.init)
    tok = load_tokenizer(cfg.tokenizer or ckpt["tokenizer"])
    return common.gpt_from_checkpoint(ckpt, tok), tok


def complete(model, tok, cfg, text, gen):
    if cfg.chat:
        ids, stop = tok.render_prompt([{"role": "user", "content": text}]), [tok.end_id, tok.eot_id]
    else:
        ids, stop = [tok.eot_id] + tok.encode(text), [tok.eot_id]
    room = model.config.block_size - len(ids)
    if room <= 0:
        raise UserError(f"the prompt has {len(ids)} tokens, the context only {model.config.block_size}: shorten it")
    outs = model.generate([ids] * cfg.num_samples, min(cfg.max_new_tokens, room), cfg.temperature,
                          cfg.top_k or None, cfg.top_p, stop_tokens=stop, generator=gen)
    for out in outs:
        reply = tok.decode([t for t in out if t not in stop])
        print(reply if cfg.chat else text + reply)
        print("---", flush=True)


def main(cfg):
    if cfg.num_samples <= 0 or cfg.max_new_tokens <= 0:
        raise UserError("--num_samples and --max_new_tokens must be positive")
    device = common.pick_device(cfg.device)
    model, tok = load_model(cfg, device)
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if not cfg.interactive:
        complete(model, tok, cfg, cfg.prompt, gen)
        return
    print("one prompt per line; end of input (Ctrl-D) to quit", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            complete(model, tok, cfg, line.rstrip("\n"), gen)


if __name__ == "__main__":
    cli.run_main(main, Config)
