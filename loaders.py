"""Each stage's data, read and checked before training starts, so that a wrong file or a too small
context fails in one line before minutes of work: one function per stage, named after it."""
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import is_master, print0
from cli import UserError
from data import formats, read_documents, tinyworld

# ----------------------------------------------------------------------------- held out from --data


def split_off(cfg):
    """(the records of --data trained on, those held out for evaluation, or None): with --held_out (your own
    --data's default, data.own_data), its last records are evaluated on and never trained on."""
    if not getattr(cfg, "held_out", 0):
        return slice(None), None
    return formats.split(cfg.data, cfg.held_out)


def held_source(cfg, held):
    """Where the held-out records are: (--data, its held-out part), or (--test_data, all of it; "" for none)."""
    return (cfg.data, held) if held else (cfg.test_data, slice(None))


def held_out_note(held, kept):
    """What the stage's line adds when its held-out records come from --data."""
    if not held:
        return ""
    if held.start == held.stop:
        return " (--data has too few records to hold any out: no evaluation)"
    n = held.stop - held.start
    fit = "" if kept else ", none of which fits the context"
    return f" (from the end of --data: {n} record{'s' * (n > 1)}, not trained on{fit})"


# ----------------------------------------------------------------------------- pre-training


def pretrain(cfg, tok, block_size, run):
    """The training and validation text as token ids, tokenized once (this can take minutes), and the
    TinyWorld beside them (None when neither --eval_facts nor --focus_steps needs it). block_size: the
    model's context, which --block_size must fit in."""
    if cfg.block_size > block_size:
        source = run.ckpt_path if cfg.resume else run.init
        raise UserError(f"--block_size={cfg.block_size} is larger than the context of {source} ({block_size} "
                        f"tokens): use --block_size={block_size} or less")
    world = world_beside(cfg)
    train = tokenize_to_memmap(cfg.data, tok)
    data = (train, tokenize_to_memmap(cfg.val_data, tok)) if cfg.val_data else held_out_text(train, tok, cfg)
    for name, d in zip(("data", "val_data"), data):
        if len(d) <= cfg.block_size + 1:
            raise UserError(f"--{name}={getattr(cfg, name)} has {len(d)} tokens, fewer than one window of "
                            f"{cfg.block_size + 1}: give more text or a smaller --block_size")
    return *data, world


def held_out_text(ids, tok, cfg):
    """(the tokens trained on, the validation tokens): --data's last --held_out, at least a window's worth,
    cut where a document starts so that none is on both sides (within a document only when the last
    documents would hold more than twice the share), both parts contiguous and the same every run."""
    window = cfg.block_size + 1
    if len(ids) < 2 * (window + 1):
        raise UserError(f"--data={cfg.data} has {len(ids)} tokens, fewer than one window of {window} to train on and "
                        "one held out to validate on: give more text, a smaller --block_size, or --val_data=FILE")
    want = max(int(len(ids) * cfg.held_out), window + 1)
    starts = np.flatnonzero(np.asarray(ids[:-1]) == tok.eot_id) + 1  # each document ends with <|endoftext|>
    starts = starts[(starts <= len(ids) - want) & (starts >= len(ids) - 2 * want) & (starts >= window + 1)]
    cut = int(starts[-1]) if len(starts) else len(ids) - want
    docs = int((np.asarray(ids[cut:]) == tok.eot_id).sum())
    print0(f"pretrain: validating on the last {len(ids) - cut:,} tokens of {cfg.data} ({(len(ids) - cut) / len(ids):.1%}: "
           f"{docs} documents{'' if len(starts) else ', the first from its middle'}), which training leaves out")
    return ids[:cut], ids[cut:]


def world_beside(cfg):
    """The world whose facts the model should learn (for --eval_facts) and whose cast the curriculum
    starts on (--focus_steps), read now so that a missing one fails before training. None when neither
    asks for it, or when only the curriculum does and --data is another corpus: it then has no cast
    to start on, and every step draws from all of the text."""
    here = Path(cfg.data).parent / "meta.json"
    if not (cfg.eval_facts or cfg.focus_steps) or not Path(cfg.data).is_file():  # a missing corpus: its own error
        return None
    if not here.is_file():
        if cfg.eval_facts:
            raise UserError(f"--eval_facts measures TinyWorld's facts, but {here.parent} holds no TinyWorld "
                            "(meta.json): pass --eval_facts=false for another corpus")
        print0(f"pretrain: {here.parent} holds no TinyWorld, so no curriculum: every step draws from all of --data")
        return None
    return tinyworld.load_world(here.parent)


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
        if is_master():
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


# ----------------------------------------------------------------------------- instruction fine-tuning


def sft(cfg, tok, block_size):
    """The conversations to learn (and those dropped as too long), the held-out ones, the held-out
    questions and the replayed pre-training text: all read and checked before training starts."""
    context = block_size + 1  # tokens in a conversation the model can learn whole
    train, held = split_off(cfg)
    examples, dropped = formats.conversations(cfg.data, tok, block_size, train)
    formats.require_some(examples, dropped, cfg.data, "conversations", context,
                         "shorten them, or fine-tune a model with a longer context")
    val_examples = []
    if held:
        val_examples = formats.conversations(cfg.data, tok, block_size, held)[0]
    elif cfg.val_data:
        val_examples = formats.conversations(cfg.val_data, tok, block_size)[0]
        if not val_examples:
            raise UserError(f"--val_data={cfg.val_data} holds no conversation that fits the context "
                            f"({context} tokens): give shorter ones, or --val_data= for none")
    questions = formats.questions(cfg.qa_data, tok, block_size) if cfg.qa_data else None
    n_learned = sum(sum(mask) for _, mask in examples)
    first = f", the first at line {dropped[0]}" if dropped else ""
    print0(f"sft: {len(examples):,} conversations from {cfg.data} ({n_learned:,} tokens learned), "
           f"{len(dropped)} dropped as longer than the context ({context} tokens{first})"
           + (f"; {len(val_examples)} held out for validation{held_out_note(held, val_examples)}" if held else ""))
    return examples, dropped, val_examples, questions, replay(cfg, tok, block_size, "sft")


def replay(cfg, tok, block_size, stage, per="micro-step"):
    """The pre-training text a stage replays (--replay_data) as one tensor of token ids, each document
    followed by <|endoftext|>; None without it."""
    if not cfg.replay_data:
        return None
    ids = torch.tensor([i for doc in read_documents(cfg.replay_data) for i in tok.encode_document(doc)])
    if len(ids) <= block_size + 1:
        raise UserError(f"--replay_data={cfg.replay_data} has {len(ids)} tokens, fewer than one window: "
                        "give more text, or --replay_data= for none")
    print0(f"{stage}: replaying {cfg.replay_batch} windows of {cfg.replay_data} ({len(ids):,} tokens) per {per}"
           + (f", weight {cfg.replay_coef}" if cfg.replay_coef != 1 else ""))
    return ids


def get_replay_batch(ids, batch_size, block_size, gen, rank, world):
    """Random windows of the replayed text, x = ids[i:i+T] and y = ids[i+1:i+T+1], as in pre-training.
    Every rank draws the same starts and keeps its own slice, as the stages' batches do."""
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=gen)[rank::world].tolist()
    return (torch.stack([ids[i:i + block_size] for i in starts]),
            torch.stack([ids[i + 1:i + 1 + block_size] for i in starts]))


# ----------------------------------------------------------------------------- the reward model


def rm(cfg, tok, block_size):
    """The training pairs (and how many were dropped as too long) and the held-out ones, checked now."""
    train, held = split_off(cfg)
    pairs, dropped = formats.pairs(cfg.data, tok, block_size, train)  # prompt and reply within the context
    formats.require_some(pairs, dropped, cfg.data, "preference pairs", block_size)
    path, part = held_source(cfg, held)
    test_pairs = formats.pairs(path, tok, block_size, part)[0] if path else []
    print0(f"rm: {len(pairs):,} pairs from {cfg.data} ({len(dropped)} dropped as longer than the context), "
           f"{len(test_pairs):,} held out" + held_out_note(held, test_pairs))
    return [p[:3] for p in pairs], len(dropped), [p[:3] for p in test_pairs]


# ----------------------------------------------------------------------------- DPO


def dpo(cfg, tok, block_size):
    """The training pairs (and those dropped as too long), the held-out pairs and questions, and the
    world the gold rater knows: everything the final evaluation reads, checked before training."""
    context = block_size + 1
    train, held = split_off(cfg)
    pairs, dropped = formats.pairs(cfg.data, tok, context, train)
    formats.require_some(pairs, dropped, cfg.data, "preference pairs", context)
    path, part = held_source(cfg, held)
    test_pairs = formats.pairs(path, tok, context, part)[0] if path else []
    if cfg.test_data and not test_pairs:
        raise UserError(f"--test_data={cfg.test_data} holds no pair that fits the context ({context} tokens): "
                        "give shorter ones, or --test_data= for none")
    questions = formats.questions(cfg.qa_data, tok, block_size) if cfg.qa_data else None
    rater = tinyworld.load_world(cfg.world) if cfg.world else None
    first = f", the first at line {dropped[0]}" if dropped else ""
    print0(f"dpo: {len(pairs):,} pairs from {cfg.data}, {len(dropped)} dropped as longer than the context "
           f"({context} tokens{first}); {len(test_pairs)} held out{held_out_note(held, test_pairs)}; "
           f"{cfg.loss_type} loss, beta {cfg.beta}"
           + (f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""))
    return pairs, dropped, test_pairs, questions, rater, replay(cfg, tok, block_size, "dpo")


# ----------------------------------------------------------------------------- PPO


def ppo(cfg, tok, block_size):
    """The prompts, checked against the context; the world the gold rater knows, and whether it can judge them."""
    questions = formats.prompts(cfg.data)
    if not questions:
        raise UserError(f"{cfg.data} holds no prompts: give a JSONL file of preference pairs or conversations")
    longest = max(len(tok.render_prompt([{"role": "user", "content": q}])) for q in questions)
    if longest + cfg.max_new_tokens > block_size:
        raise UserError(f"a prompt of {longest} tokens and --max_new_tokens={cfg.max_new_tokens} do not fit in the "
                        f"context ({block_size}): lower --max_new_tokens or shorten the prompts")
    rater = tinyworld.load_world(cfg.world) if cfg.world else None  # the world the gold rater knows
    judge = rater is not None and rater.parse_question(questions[0]) is not None
    print0(f"ppo: {len(questions):,} prompts from {cfg.data}; policy and reference from {cfg.init}, "
           f"critic and reward model from {cfg.reward_model}")
    return questions, rater, judge


# ----------------------------------------------------------------------------- GRPO


def grpo(cfg, tok, block_size):
    """The training problems and the held-out ones that fit the context beside the answers, and the
    world the steps are marked against (wanted by the evaluation and the step reward)."""
    room = block_size - cfg.max_new_tokens
    if room <= 0:
        raise UserError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the context "
                        f"({block_size} tokens): lower it")
    train, held = split_off(cfg)
    problems, dropped = formats.problems(cfg.data, tok, room, train)
    formats.require_some(problems, dropped, cfg.data, "problems", f"{room} for a prompt beside --max_new_tokens="
                         f"{cfg.max_new_tokens}", "lower --max_new_tokens, or give shorter problems")
    path, part = held_source(cfg, held)
    test = formats.problems(path, tok, room, part)[0][:cfg.test_limit or None] if path else []
    rater = tinyworld.load_world(cfg.world) if cfg.world and (test or cfg.step_reward) else None
    print0(f"grpo: {len(problems):,} problems from {cfg.data}, {len(dropped)} dropped as too long for the context; "
           f"{cfg.prompts_per_step} problems x {cfg.group_size} answers per step"
           + (f"; {len(test)} held out{held_out_note(held, test)}" if held else ""))
    return problems, test, rater, replay(cfg, tok, block_size, "grpo", per="step")
