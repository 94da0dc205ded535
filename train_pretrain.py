"""Stage 1, pre-training: teach a random GPT language and the world's facts by next-token prediction.

    python -m data.tinyworld && python -m data.tokenizer       # the data and the tokenizer, once
    python train_pretrain.py                                   # TinyWorld on a CPU
    python train_pretrain.py --preset=gpu                      # TinyStories on one GPU (python -m data.prepare_tinystories first)
    python -m data.tokenizer --input=my.txt --out=out/my_tok && python train_pretrain.py --data=my.txt --tokenizer=out/my_tok
                                                               # your own text: validated on its last 5%, not trained on
    torchrun --standalone --nproc_per_node=8 train_pretrain.py --preset=gpu

The loss is the mean over tokens of -log p(x_{t+1} | x_<=t). The corpus is tokenized once into a
memmap of token ids. Each step: 1. random windows of it, --grad_accum batches (for the first
--focus_steps, only windows of the documents about a few characters: a curriculum, focus_starts);
2. each batch's loss, backward; 3. the update: the gradient clipped, then Muon's step for the blocks'
weight matrices and AdamW's for the rest (optim.py), at a learning rate that warms up, holds, and
decays over the last --cooldown of the steps (run.lr_at). Flags: configs.Pretrain. Writes out/pretrain/.
"""

import re

import numpy as np
import torch

import cli
import common
import configs
import gpt_kernels
import loaders
import measures
import stage_evals
from cli import UserError
from model import GPT
from run import Run


# ----------------------------------------------------------------------------- the loss

def pretrain_loss(logits, targets):
    """Mean over tokens of -log p(y_t | x_<=t) = -log softmax(logits_t)[y_t], the next-token loss:
    logits (B, T, V) from the model on x, targets (B, T) = x shifted by one. The fused cross-entropy
    kernel computes it in one pass over the vocabulary (gpt_kernels.cross_entropy)."""
    return gpt_kernels.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------- training

def main(cfg):
    run = Run("pretrain", cfg)
    torch.manual_seed(cfg.seed)  # the fresh model's weights
    ckpt, _, tok = run.load(["pretrain"], made_by="python train_pretrain.py", keeps_init=False)
    model = GPT(cfg.model_config(tok.n_vocab)) if ckpt is None else common.gpt_from_checkpoint(ckpt, tok)
    train_data, val_data, world = loaders.pretrain(cfg, tok, model.config.block_size, run)
    focus = focus_starts(train_data, tok, world, cfg) if cfg.focus_steps and world is not None else None
    world = world if cfg.eval_facts else None  # the facts measured
    model = run.start(model, ckpt, keep=lambda: dict(val_loss=val_loss, val_loss_init=first_val),
                      unit="perf/tokens_per_s", flops_per_unit=model.flops_per_token(cfg.block_size))
    common.print0(f"pretrain: vocab {tok.n_vocab}, {len(train_data):,} training tokens, "
                  f"{cfg.batch_size * cfg.grad_accum * cfg.block_size:,} per step")
    if focus is not None:
        common.print0(f"pretrain: the first {cfg.focus_steps} steps draw from the documents about {cfg.focus_cast} "
                      f"characters and those about none ({len(focus):,} window starts), then from all")
    if cfg.resume:
        val_loss, first_val = ckpt["val_loss"], ckpt["val_loss_init"]
    else:
        val_loss = first_val = evaluate(model, val_data, cfg, run)
        common.print0(f"pretrain: validation loss at init {val_loss:.4f} (ln V = {np.log(tok.n_vocab):.4f})")
        run.logger.log(0, printed=False, **{"loss/val": val_loss, **facts_curve(run, tok, world, cfg)})

    for step in run.steps():
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):  # 1-2. windows, their loss, backward
            x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, run.data_gen, run.rank, run.world,
                             focus if run.step < cfg.focus_steps else None)
            x, y = x.to(run.device), y.to(run.device)
            run.sync(micro == cfg.grad_accum - 1)
            with common.autocast(run.device):
                loss = pretrain_loss(model(x), y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            run.count(x.numel())
        train_loss = common.all_mean(loss_sum / cfg.grad_accum)
        run.check(train_loss, "loss", run.step + 1)  # 3. the update, never from a broken loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        metrics = {"loss/train": train_loss, "lr": run.lr, **facts_curve(run, tok, world, cfg)}
        if run.due():  # the weights after a step can be broken while its loss (from before it) was fine
            val_loss = metrics["loss/val"] = evaluate(model, val_data, cfg, run)
            run.check(val_loss, "validation loss")
        run.log(metrics, printed=run.due(), save=run.due())

    metrics = {"val_loss": val_loss, "val_loss_init": first_val, "params": run.raw.num_params()}
    if common.is_master():
        metrics.update(stage_evals.after_pretrain(run.raw, tok, world, cfg, run.device))
    run.finish(metrics, f", validation loss {val_loss:.4f}")


# ----------------------------------------------------------------------------- the data, and the validation loss on it

def get_batch(data, batch_size, block_size, gen, rank, world, allowed=None):
    """Random windows (starting at one of `allowed`, when given). Every rank draws the same starts
    from the same generator and keeps its own slice, so the global batch does not depend on the world size."""
    if allowed is None:
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)[rank::world]
    else:
        starts = torch.from_numpy(allowed)[torch.randint(len(allowed), (batch_size,), generator=gen)][rank::world]
    return windows(data, starts.tolist(), block_size)


def focus_starts(data, tok, world, cfg):
    """The curriculum's window starts: every token of the documents that name no character outside the
    first --focus_cast of the cast (those about them, and those about no one). Few characters, each met
    often, make the recall circuit form sooner (the plateau of Zucchet et al. 2025 shortens when a few
    individuals dominate); once it has, every character's facts are learned through it."""
    names = [c.name for c in world.characters]
    focus = set(names[:cfg.focus_cast])
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    keep = np.zeros(len(data), dtype=bool)
    start = 0
    for end in np.flatnonzero(np.asarray(data) == tok.eot_id):  # each document ends with <|endoftext|>
        if set(pattern.findall(tok.decode(data[start:end].tolist()))) <= focus:
            keep[start:end + 1] = True
        start = end + 1
    keep[len(data) - cfg.block_size - 1:] = False  # a window must fit before the end
    if not keep.any():
        raise UserError(f"no document of {cfg.data} is about only the first {cfg.focus_cast} characters or none: "
                        "raise --focus_cast, or --focus_steps=0 for no curriculum")
    return np.flatnonzero(keep)


def windows(data, starts, block_size):
    """x = tokens[i:i+T] and y = tokens[i+1:i+T+1] for each start i."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return x, y


def facts_curve(run, tok, world, cfg):
    """{"eval/facts": greedy fact completion on every second fact} every --facts_every steps, else {}: the
    curve that shows the facts arriving (a plateau, then a jump). Rank 0 measures; the others go on."""
    if world is None or not cfg.facts_every or run.step % cfg.facts_every or not common.is_master():
        return {}
    return {"eval/facts": measures.fact_accuracy(run.raw, tok, world, every=2)[0]}  # generate_batched: eval mode, then back


@torch.no_grad()
def evaluate(model, data, cfg, run):
    """Validation loss on fixed, evenly spaced windows (the same every time, so curves compare)."""
    starts = np.linspace(0, len(data) - cfg.block_size - 1, cfg.eval_batches * cfg.batch_size).astype(np.int64)
    chunks = [c for c in np.array_split(starts[run.rank::run.world], cfg.eval_batches) if len(c)]
    model.eval()
    with common.autocast(run.device):
        losses = [pretrain_loss(model(x.to(run.device)), y.to(run.device)).item()
                  for x, y in (windows(data, c, cfg.block_size) for c in chunks)]
    model.train()
    return common.all_mean(sum(losses) / len(losses))


if __name__ == "__main__":
    cli.run_main(main, configs.Pretrain, configs.PRESETS["pretrain"])
