"""Stage 1, pre-training: teach a random GPT language and the world's facts by next-token prediction.

    python -m data.tinyworld && python -m data.tokenizer       # the data and the tokenizer, once
    python train_pretrain.py                                   # TinyWorld on a CPU
    python train_pretrain.py --preset=gpu                      # TinyStories on one GPU (python -m data.prepare_tinystories first)
    torchrun --standalone --nproc_per_node=8 train_pretrain.py --preset=gpu

The loss is the mean over tokens of -log p(x_{t+1} | x_<=t). The corpus is tokenized once into a
memmap of token ids. Each step: 1. random windows of it, --grad_accum batches; 2. each batch's loss,
backward; 3. the update (clipped gradient, AdamW). Writes out/pretrain/ckpt.pt.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import cli
import common
import evals
import kernels
from cli import UserError
from common import print0
from data import read_documents, tinyworld
from data.tokenizer import load_tokenizer
from model import GPT, GPTConfig
from run import Run


# ----------------------------------------------------------------------------- the loss

def pretrain_loss(logits, targets):
    """Mean over tokens of -log p(y_t | x_<=t) = -log softmax(logits_t)[y_t], the next-token loss:
    logits (B, T, V) from the model on x, targets (B, T) = x shifted by one. The fused cross-entropy
    kernel computes it in one pass over the vocabulary (kernels.cross_entropy)."""
    return kernels.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------- the data

def get_batch(data, batch_size, block_size, gen, rank, world):
    """Random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1]. Every rank draws the same starts from
    the same generator and keeps its own slice, so the global batch does not depend on the world size."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)[rank::world]
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts.tolist()])
    return x, y


# ----------------------------------------------------------------------------- training

def main(cfg):
    check_config(cfg)
    run = Run("pretrain", cfg)
    facts_of = world_of(cfg)

    # the model: fresh, continued from a pre-training checkpoint, or resumed exactly
    torch.manual_seed(cfg.seed)
    ckpt = run.resumed()
    if ckpt is None and cfg.init != "scratch":
        ckpt = common.load_checkpoint(cfg.init, ["pretrain"], made_by="python train_pretrain.py")
    tokenizer = cfg.tokenizer or (ckpt["tokenizer"] if ckpt else "out/tokenizer")
    tok = load_tokenizer(tokenizer)
    model_cfg = GPTConfig(vocab_size=tok.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, rope=cfg.rope)
    model = GPT(model_cfg) if ckpt is None else common.gpt_from_checkpoint(ckpt, tok)
    if cfg.block_size > model.config.block_size:
        raise UserError(f"--block_size={cfg.block_size} is larger than the context of {run.ckpt_path if cfg.resume else cfg.init} "
                        f"({model.config.block_size} tokens): use --block_size={model.config.block_size} or less")
    train_data, val_data = load_data(cfg, tok)
    model = run.start(model, ckpt, tok, tokenizer, keep=lambda: dict(val_loss=val_loss, val_loss_init=first_val),
                      unit="perf/tokens_per_s", flops_per_unit=model.flops_per_token(cfg.block_size))
    print0(f"pretrain: {run.raw.num_params() / 1e6:.2f}M parameters, vocab {tok.n_vocab}, {len(train_data):,} training "
           f"tokens, {cfg.batch_size * cfg.grad_accum * cfg.block_size:,} tokens per step, {cfg.max_steps} steps "
           f"on {run.device} x{run.world}")
    if run.step == 0:
        run.logger.phase("evaluation")
        val_loss = first_val = evaluate(model, val_data, cfg, run)
        print0(f"pretrain: validation loss at init {val_loss:.4f} (ln V = {np.log(tok.n_vocab):.4f})")
        run.logger.log(0, printed=False, **{"loss/val": val_loss})
    else:
        val_loss, first_val = ckpt["val_loss"], ckpt["val_loss_init"]

    for step in run.steps():
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):  # 1-2. windows, their loss, backward
            x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, run.data_gen, run.rank, run.world)
            x, y = x.to(run.device), y.to(run.device)
            run.sync(micro == cfg.grad_accum - 1)
            with common.autocast(run.device):
                loss = pretrain_loss(model(x), y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            run.count(x.numel())
        train_loss = common.all_mean(loss_sum / cfg.grad_accum)
        run.update(train_loss)  # 3.
        metrics = {"loss/train": train_loss, "lr": run.lr}
        if run.due():  # the weights after a step can be broken while its loss (from before it) was fine
            val_loss = metrics["loss/val"] = evaluate(model, val_data, cfg, run)
            run.check(val_loss, "validation loss")
        run.log(metrics, printed=run.due(), save=run.due())

    metrics = {"val_loss": val_loss, "val_loss_init": first_val, "params": run.raw.num_params()}
    if common.is_master():
        show_samples(run.raw, tok, cfg, run.device)
        if facts_of is not None:
            metrics["fact_accuracy"], examples = evals.fact_accuracy(run.raw, tok, facts_of)
            print0(f"pretrain: fact completion {metrics['fact_accuracy']:.1%} of {len(examples)} facts, e.g. "
                   + "; ".join(f"{p!r} -> {t!r}" for p, _, t in examples[:3]))
    run.finish(metrics, f", validation loss {val_loss:.4f}")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, data, cfg, run):
    """Validation loss on fixed, evenly spaced windows (the same every time, so curves compare)."""
    model.eval()
    n = cfg.eval_batches * cfg.batch_size
    starts = np.linspace(0, len(data) - cfg.block_size - 1, n).astype(np.int64)[run.rank::run.world]
    losses = []
    for chunk in np.array_split(starts, cfg.eval_batches):
        if len(chunk) == 0:
            continue
        x = torch.stack([torch.from_numpy(data[i:i + cfg.block_size].astype(np.int64)) for i in chunk])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in chunk])
        with common.autocast(run.device):
            losses.append(pretrain_loss(model(x.to(run.device)), y.to(run.device)).item())
    model.train()
    return common.all_mean(sum(losses) / len(losses))


def show_samples(model, tok, cfg, device):
    """A few samples, so the reader sees what the model learned."""
    model.eval()
    prompts = [[tok.eot_id] + tok.encode(p) for p in ("Once upon a time", "A language model is", "The")]
    room = model.config.block_size - max(map(len, prompts))
    outs = model.generate(prompts, min(40, room), temperature=0.8, top_k=50, stop_tokens=[tok.eot_id],
                          generator=torch.Generator(device=device).manual_seed(cfg.seed))
    for p, o in zip(prompts, outs):
        print0(f"--- {tok.decode(p[1:] + o)!r}")


# ----------------------------------------------------------------------------- checks and loading

def check_config(cfg):
    cli.require_positive(cfg, "batch_size", "grad_accum", "max_steps", "block_size", "eval_every", "eval_batches",
                         "log_every", "n_layer", "n_head", "n_embd", "lr")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout is a probability below 1, got {cfg.dropout}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")


def world_of(cfg):
    """The world whose facts the model should learn, read now so that a missing one fails before training."""
    if not cfg.eval_facts or not Path(cfg.data).is_file():  # a missing corpus gets its own error
        return None
    if not (Path(cfg.data).parent / "meta.json").is_file():
        raise UserError(f"--eval_facts measures TinyWorld's facts, but {Path(cfg.data).parent} holds no TinyWorld "
                        "(meta.json): pass --eval_facts=false for another corpus")
    return tinyworld.load_world(Path(cfg.data).parent)


def load_data(cfg, tok):
    """The training and validation text as token ids, tokenized once (after the quick checks: this can take minutes)."""
    data = tokenize_to_memmap(cfg.data, tok), tokenize_to_memmap(cfg.val_data, tok)
    for name, d in zip(("data", "val_data"), data):
        if len(d) <= cfg.block_size + 1:
            raise UserError(f"--{name}={getattr(cfg, name)} has {len(d)} tokens, fewer than one window of "
                            f"{cfg.block_size + 1}: give more text or a smaller --block_size")
    return data


def tokenize_to_memmap(text_path, tok, cache_dir="out/tokens"):
    """Token ids of a text file as a read-only memmap, tokenized once and cached by (file, tokenizer).
    Documents are separated by blank lines; each is followed by <|endoftext|>."""
    text_path = Path(text_path)
    if not text_path.is_file():  # checked here too: the cache key needs the file's time
        raise UserError(f"no corpus at {text_path}: run `python -m data.tinyworld` (or a data/prepare_*.py script)")
    refuse_json_lines(text_path)
    dtype = np.uint16 if tok.n_vocab <= 65535 else np.uint32
    key = hashlib.sha1(f"{text_path.resolve()}|{text_path.stat().st_mtime_ns}|{tok.fingerprint}".encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"{text_path.stem}-{key}.bin"
    if not cache.exists():
        if common.is_master():
            t0 = time.time()
            docs = read_documents(text_path)
            if not docs:
                raise UserError(f"{text_path} has no text: give a corpus with documents separated by blank lines")
            ids = np.array([i for d in docs for i in tok.encode_document(d)], dtype=dtype)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # runs tokenizing at once do not collide
            ids.tofile(tmp)
            tmp.replace(cache)
            print0(f"tokenized {text_path}: {len(docs)} documents, {len(ids):,} tokens in {time.time() - t0:.1f}s")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other ranks wait for rank 0's file
    return np.memmap(cache, dtype=dtype, mode="r")


def refuse_json_lines(text_path):
    """A later stage's JSONL file given as the corpus would train happily on its braces and keys: its
    first line, a JSON object, gives it away."""
    with open(text_path, encoding="utf-8", errors="replace") as f:
        line, text = next(((n, t) for n, t in enumerate(f, 1) if t.strip()), (0, ""))
    try:
        is_record = isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        is_record = False
    if is_record:
        raise UserError(f"{text_path}:{line} is a JSON record, not text: pre-training reads a corpus of plain text "
                        "(documents separated by blank lines), such as data/tinyworld/corpus_train.txt")


# ----------------------------------------------------------------------------- the settings

@dataclass
class Config:
    data: str = "data/tinyworld/corpus_train.txt"   # training text, documents separated by blank lines
    val_data: str = "data/tinyworld/corpus_val.txt"  # validation text, same format
    tokenizer: str = ""                # a directory from `python -m data.tokenizer`, or gpt2; default:
                                       # out/tokenizer, or the one the --init checkpoint was trained with
    init: str = "scratch"              # scratch, a pretrain checkpoint to continue from, or a GPT-2 directory
    out: str = "out/pretrain"          # where ckpt.pt, log.jsonl and metrics.json go
    resume: bool = False               # continue exactly from out/ckpt.pt (optimizer, step, RNG)
    n_layer: int = 4                   # transformer blocks
    n_head: int = 4                    # attention heads
    n_embd: int = 128                  # residual stream width
    rope: bool = True                  # rotary positions (false: GPT-2's learned position table)
    block_size: int = 128              # context length in tokens
    dropout: float = 0.0               # dropout probability (0: we see the data less than 3 times)
    batch_size: int = 16               # sequences per micro-step, over all processes
    grad_accum: int = 1                # micro-steps per optimizer step
    max_steps: int = 1200              # optimizer steps
    stop_at: int = 0                   # stop early at this step with a checkpoint (0: run to max_steps)
    lr: float = 3e-3                   # peak learning rate
    min_lr: float = 3e-4               # learning rate at the end of the cosine
    warmup_steps: int = 50             # linear warm-up steps
    weight_decay: float = 0.1          # AdamW decay on matrices
    grad_clip: float = 1.0             # clip the gradient norm to this (0: off)
    eval_every: int = 300              # steps between validation losses
    eval_batches: int = 8              # batches per validation loss
    log_every: int = 100               # steps between printed lines
    device: str = "auto"               # auto (cuda, mps, cpu), or a torch device name
    compile: bool = False              # torch.compile the model
    seed: int = 1337                   # seeds init, data order and dropout
    eval_facts: bool = True            # at the end, measure fact completion on the TinyWorld beside --data


PRESETS = {
    # GPT-2-small-sized model on TinyStories (python -m data.prepare_tinystories), one GPU, about an hour
    "gpu": dict(data="data/real/tinystories_train.txt", val_data="data/real/tinystories_val.txt",
                n_layer=12, n_head=12, n_embd=768, block_size=512, batch_size=64, grad_accum=2,
                max_steps=5000, lr=6e-4, min_lr=6e-5, warmup_steps=200, eval_every=500, eval_batches=20,
                log_every=50, compile=True, eval_facts=False),
    # TinyWorld on one CUDA GPU, the default there (make demo, make gpu): a 6x384 model (head dim 64, as the
    # kernels like), 2.5x the tokens; sized from the FLOPs a GPU gives in about a minute, not yet measured on one.
    # No dropout: the RL stages inherit the model, and dropout would make their log-prob ratios noisy.
    "tinyworld_gpu": dict(n_layer=6, n_head=6, n_embd=384, batch_size=32, max_steps=1500, lr=1e-3, min_lr=1e-4,
                          warmup_steps=100, eval_every=500, log_every=100),
    "cpu": {},  # the CPU sizes above, on a GPU too
    # the whole journey's plumbing in about a minute on a CPU, nothing learned (make demo PRESET=smoke)
    "smoke": dict(n_layer=1, n_head=2, n_embd=32, batch_size=4, max_steps=6, eval_every=6, eval_batches=1,
                  warmup_steps=2, log_every=2),
}


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
