"""Stage 2, instruction fine-tuning (SFT): teach a pre-trained GPT to answer in a chat format.

    python train_sft.py                 # TinyWorld on a CPU, from out/pretrain/ckpt.pt
    python train_sft.py --preset=gpu    # Dolly 15k on one GPU (python -m data.prepare_chat first), starting
                                        # from a GPU pre-training run (train_pretrain.py --preset=gpu)
    torchrun --standalone --nproc_per_node=8 train_sft.py --preset=gpu
    python train_sft.py --data=my_chats.jsonl --lora_rank=8   # your own conversations (validated on their last 5%),
                                        # LoRA at its own learning rate and steps (configs.LORA_SETTINGS)

Each conversation is rendered through the chat template into token ids and a loss mask that is 1 on
the assistant's tokens and on the <|end|> closing each assistant turn: the model learns to answer,
and to stop, but not to imitate the user. The loss is the mean of -log p over those tokens of the
whole batch (`sft_loss`).

Pre-training supplied the knowledge; this stage supplies the format. TinyWorld shows it: the held-out
questions ask about characters that SFT never mentions, whose facts only the pre-training text holds,
and they are scored before and after. Fine-tuned on the SFT set alone, the model learns to name the
characters SFT talks about ("Joan's pet is a dog." when asked about Lucy); so each step also replays
windows of the pre-training text with their next-token loss (--replay_data, --replay_coef), which keeps
the other names and facts in use. Each step: 1. the step's batches of conversations and the count
of learned tokens over all of them; 2. each batch's loss (and the replayed text's), backward; 3. the
update. Flags: configs.SFT. Writes out/sft/ckpt.pt, log.jsonl and metrics.json.
"""
import torch

import cli
import common
import configs
import stage_evals
from common import print0
import loaders
from data.batches import length_groups
from run import Run


# ----------------------------------------------------------------------------- the loss

def sft_loss(logprobs, mask, n_tokens=None):
    """-sum(mask * logprobs) / n_tokens, where n_tokens = sum(mask) unless given.

    logprobs (B, T) are log p(target_t | tokens_<=t); mask (B, T) is 1 on the targets the model should
    learn to produce (assistant tokens and their <|end|>) and 0 on the rest, padding included: a
    token-level mean over the batch, so a long answer weighs more than a short one. With gradient
    accumulation, pass the token count of the whole accumulated batch as n_tokens: the micro-batch
    losses then add up to the mean over all of it, whatever the split into micro-batches.
    """
    mask = mask.to(logprobs.dtype)
    if n_tokens is None:
        n_tokens = mask.sum().clamp(min=1)
    return -(mask * logprobs).sum() / n_tokens


# ----------------------------------------------------------------------------- training

def main(cfg):
    run = Run("sft", cfg, per_rank=("batch_size", "replay_batch"))
    ckpt, _, tok = run.load(["pretrain", "sft"], made_by="python train_pretrain.py", keeps_init=False)
    model = common.gpt_from_checkpoint(ckpt, tok)
    block_size = model.config.block_size
    examples, dropped, val_examples, questions, replay = loaders.sft(cfg, tok, block_size)
    before = ckpt.get("qa_before") if cfg.resume else None
    model = run.start(model, ckpt, seed=cfg.seed, unit="perf/tokens_per_s", keep=lambda: dict(qa_before=before))
    if run.step == 0 and cfg.qa_data and common.is_master():  # the starting point, for the before -> after
        before = stage_evals.sft_qa(run, tok, questions, cfg, "before fine-tuning")
    val_loss = evaluate(model, val_examples, cfg, run) if val_examples else None
    if val_loss is not None and run.step == 0:
        print0(f"sft: validation loss before fine-tuning {val_loss:.4f}")
        run.logger.log(0, printed=False, **{"loss/val": val_loss})

    train_loss = None
    for step in run.steps():
        # 1. The whole step's micro-batches first: the loss divides by their total count of learned
        # tokens. DDP averages gradients over ranks, so each rank divides by that count / world.
        batches = [get_batch(examples, cfg.batch_size, run.data_gen, run.rank, run.world) for _ in range(cfg.grad_accum)]
        n_tokens = common.all_mean(sum(m.sum().item() for groups in batches for _, _, m in groups)) * run.world
        loss_sum = replay_sum = 0.0
        for micro, groups in enumerate(batches):  # 2.
            last = micro == cfg.grad_accum - 1
            run.sync(last and replay is None)
            loss = 0.0
            for x, y, m in groups:
                x, y, m = x.to(run.device), y.to(run.device), m.to(run.device)
                with common.autocast(run.device):
                    logprobs = -model(x, y, reduction="none")  # log p of each target, (B, T)
                    loss = loss + sft_loss(logprobs, m, n_tokens=n_tokens / run.world)
                run.count(x.numel())
            loss.backward()
            loss_sum += loss.item()
            if replay is not None:  # plus windows of pre-training text and their mean next-token loss
                run.sync(last)
                replay_loss = run.replay_loss(replay) / cfg.grad_accum
                (cfg.replay_coef * replay_loss).backward()
                replay_sum += replay_loss.item()
                run.count(cfg.replay_batch // run.world * block_size)
        train_loss, replay_loss = common.all_mean(loss_sum), common.all_mean(replay_sum)
        run.check(train_loss + replay_loss, "loss", run.step + 1)  # 3. the update, never from a broken loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        metrics = {"loss/train": train_loss, "lr": run.lr, **({"loss/replay": replay_loss} if replay is not None else {})}
        if run.due() and val_examples:  # the weights after a step can be broken while its loss was fine
            val_loss = metrics["loss/val"] = evaluate(model, val_examples, cfg, run)
            run.check(val_loss, "validation loss")
        elif run.due():
            run.check_after_update(lambda net: net(x, y))
        run.log(metrics, printed="loss/val" in metrics, save=run.due())

    metrics = {"loss": train_loss, "val_loss": val_loss, "conversations": len(examples), "dropped": len(dropped)}
    if cfg.qa_data and common.is_master():
        metrics.update(qa_before=before, qa_after=stage_evals.sft_qa(run, tok, questions, cfg, "after fine-tuning"))
    run.finish(metrics)


# ----------------------------------------------------------------------------- the data

def get_batch(examples, batch_size, gen, rank, world):
    """A random batch of conversations, as a few padded groups of similar length. Every rank draws the
    same indices from the same generator and keeps its own slice, so the global batch does not depend
    on the world size."""
    picks = torch.randint(len(examples), (batch_size,), generator=gen)[rank::world]
    batch = [examples[i] for i in picks.tolist()]
    return [collate([batch[i] for i in rows]) for rows in length_groups([len(ids) for ids, _ in batch])]


def collate(examples):
    """Pad conversations into one batch: inputs x = ids[:-1], targets y = ids[1:], and the mask shifted
    with the targets (m = mask[1:]), so m[t] says whether y[t], the token predicted at t, is learned.
    Padding on the right: x 0, y -100 (no loss), m 0."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    m = torch.zeros(len(examples), T)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        m[i, :n] = torch.tensor(mask[1:], dtype=torch.float)
    return x, y, m


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, examples, cfg, run):
    """Validation loss: the token-level mean over every held-out conversation."""
    model.eval()
    total, count = 0.0, 0
    for start in range(run.rank * cfg.batch_size, len(examples), run.world * cfg.batch_size):
        x, y, m = (t.to(run.device) for t in collate(examples[start:start + cfg.batch_size]))
        with common.autocast(run.device):
            total += sft_loss(-model(x, y, reduction="none"), m, n_tokens=1).item()
        count += m.sum().item()
    model.train()
    return common.all_mean(total) / max(common.all_mean(count), 1)


if __name__ == "__main__":
    cli.run_main(main, configs.SFT, configs.PRESETS["sft"])
