"""Faults and bad input, for every training script: nothing lost, every mistake explained.

Each training script is a row of SCRIPTS: the flags of a tiny CPU run, the checkpoint it may start
from, and the mistakes only it can meet (its data files, as it reads them, and its own flags). The tests
run over every row:

- interrupted training: SIGKILL at a random moment leaves a checkpoint that loads, and --resume ends
  with the losses of a run never interrupted; Ctrl-C saves, says how to resume, and resumes exactly;
- a mistake (bad data, bad configuration, a checkpoint that would run code, an output directory that
  cannot be written): one line on stderr naming the file, the line and the fix, exit code 2, and not
  one file changed;
- a NaN loss stops training, naming the step and leaving the last good checkpoint as it was;
- the same seed and flags give the same losses, twice.

Adding a script is adding a row: a function giving the flags of its tiny run (as sft_flags), the
fixture of a checkpoint it starts from, a stage it must refuse, a dict of its own mistakes (as
SFT_CASES), and where they are not "loss/train" and --batch_size, the log.jsonl value its runs must agree on
(curve) and the flag of its batch (batch). The tiny run must change the weights: one whose steps do
not (as GRPO's from tiny_sft, whose answers the verifier never rewards) shows nothing by resuming
exactly, and no learning rate makes it NaN. The script is expected to follow the project's
conventions: --out, --init, --resume, --max_steps, --eval_every (a checkpoint), --log_every (a line
"stage step/total | ..."), and a log.jsonl row per step.

The mistakes of one script run in one Python process (`runpy`, as `python script.py ...` runs the
script), so that its two dozen of them pay for importing torch once; each run that trains is a
process of its own, and the rows' runs go side by side, two cores' worth.
"""
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import cli
import common
from cli import UserError
from conftest import ROOT, error_line, run_script
from data.tokenizer import load_ranks, save_tokenizer

# Every tiny run has the same schedule, so the tests can name steps: 64 steps, a checkpoint and a printed
# line every 2, on the CPU (where a run repeats exactly). A tiny step takes 10-40 ms, so 64 of them leave
# room to stop a run twice, mid-run, even when the lines reach the test a few steps late.
STEPS, EVERY = 64, 2
SCHEDULE = [f"--max_steps={STEPS}", f"--eval_every={EVERY}", f"--log_every={EVERY}", "--warmup_steps=2",
            "--device=cpu"]


@dataclass
class Case:
    """A mistake: the flags that make it (after the row's, so they win), and fragments its error line
    must hold: the file, the line where it applies, the fix."""
    args: list
    expect: list


def write(path, content):
    """Write a file, return its path (so a case can make its file inside its flags)."""
    path = Path(path)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# ----------------------------------------------------------------------------- the rows: pre-training


def pretrain_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
            f"--tokenizer={fx.tiny_world['tokenizer']}", f"--out={out}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=4", "--eval_batches=2", "--eval_facts=false"]


# Each case is (fixtures, a directory of its own) -> Case; the directory holds the files it makes.
PRETRAIN_CASES = {
    "a missing corpus": lambda fx, tmp: Case(
        [f"--data={tmp / 'none.txt'}"], [str(tmp / "none.txt"), "run `python -m data.tinyworld`"]),
    "a missing validation corpus": lambda fx, tmp: Case(
        [f"--val_data={tmp / 'none.txt'}"], [str(tmp / "none.txt"), "run `python -m data.tinyworld`"]),
    "an empty corpus": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'empty.txt', '')}"], [str(tmp / "empty.txt"), "has no text", "give a corpus"]),
    "a corpus that is not UTF-8": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.txt', b'A story.' + bytes([10, 10, 0xFF]))}"],
        [str(tmp / "bad.txt"), "is not UTF-8 text (byte 10)", "convert it"]),
    "a corpus shorter than one window": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'short.txt', 'A story.')}"],
        [str(tmp / "short.txt"), "fewer than one window", "give more text or a smaller --block_size"]),
    "a JSONL file given as the corpus": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'sft_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'sft_train.jsonl'}:1", "not text", "a corpus of plain text"]),
    "fact evaluation on a corpus without a TinyWorld": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'stories.txt', 'A story.')}", "--eval_facts=true"], [str(tmp), "--eval_facts=false"]),
    "a missing tokenizer": lambda fx, tmp: Case(
        [f"--tokenizer={tmp / 'none'}"], [str(tmp / "none"), "python -m data.tokenizer"]),
    "a block size beyond the --init model's context": lambda fx, tmp: Case(
        [f"--init={fx.tiny_pretrained}", "--block_size=256"], ["--block_size=256", "use --block_size=128 or less"]),
    "a dropout of 1": lambda fx, tmp: Case(["--dropout=1"], ["--dropout is a probability below 1"]),
    "no attention heads": lambda fx, tmp: Case(["--n_head=0"], ["--n_head must be a positive number"]),
}

# ----------------------------------------------------------------------------- the rows: SFT


def sft_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'sft_train.jsonl'}", f"--init={fx.tiny_pretrained}", f"--out={out}", "--qa_data=",
            f"--replay_data={d / 'corpus_train.txt'}", "--replay_batch=2", "--batch_size=4"]


def data_file_cases(good_record, records):
    """The mistakes every reader of --data meets: the file missing, empty ("holds no <records>"), or a
    malformed line after a good record (good_record: fixtures -> one line of a right file)."""
    return {
        "a missing data file": lambda fx, tmp: Case(
            [f"--data={tmp / 'none.jsonl'}"], [str(tmp / "none.jsonl"), "run `python -m data.tinyworld`"]),
        "an empty data file": lambda fx, tmp: Case(
            [f"--data={write(tmp / 'empty.jsonl', '')}"], [str(tmp / "empty.jsonl"), f"holds no {records}", "give"]),
        "a malformed JSONL line": lambda fx, tmp: Case(
            [f"--data={write(tmp / 'bad.jsonl', jsonl(good_record(fx), MALFORMED))}"],
            [f"{tmp / 'bad.jsonl'}:2", "malformed JSON", "fix or delete that line"]),
    }


def good_conversation(fx):
    return (fx.tiny_world["data"] / "sft_train.jsonl").read_text().splitlines()[0]


USER = {"role": "user", "content": "Where does Lucy live?"}
LONG = {"role": "user", "content": "tell me " * 200}  # some 400 tokens: beyond the tiny model's 128
MALFORMED = '{"messages": [oops'
LATIN1 = '{"messages": [{"role": "user", "content": "Caf\u00e9?"}]}'.encode("latin-1")  # not UTF-8

SFT_CASES = {
    **data_file_cases(good_conversation, "conversations"),
    # the blank line: a record's number is not its line, and the error names the line
    "a record without messages": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_conversation(fx), '', {'conversation': [USER]}))}"],
        [f"{tmp / 'bad.jsonl'}:3", "not a conversation", "each line must be"]),
    "a message without content": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_conversation(fx), {'messages': [{'role': 'user'}]}))}"],
        [f"{tmp / 'bad.jsonl'}:2", "'content': str", "fix or delete that line"]),
    "a conversation without an answer": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_conversation(fx), {'messages': [USER]}))}"],
        [f"{tmp / 'bad.jsonl'}:2", "no assistant turn", "add one or delete that line"]),
    "conversations longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl({'messages': [LONG, {'role': 'assistant', 'content': 'No.'}]}))}"],
        [str(tmp / "long.jsonl"), "too long for the context (129 tokens)", "line 1", "shorten them"]),
    "a data file that is not UTF-8": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'latin1.jsonl', good_conversation(fx).encode() + bytes([10]) + LATIN1)}"],
        [str(tmp / "latin1.jsonl"), "is not UTF-8 text", "convert it"]),
    "preferences given to SFT": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'prefs_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'prefs_train.jsonl'}:1", "preference pair", 'must be {"messages": [']),
    "math problems given to SFT": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'math_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'math_train.jsonl'}:1", "math problem", 'must be {"messages": [']),
    "a held-out question longer than the context": lambda fx, tmp: Case(
        [f"--qa_data={write(tmp / 'qa.jsonl', jsonl({'messages': [LONG], 'answer': 'Riverton'}))}"],
        [f"{tmp / 'qa.jsonl'}:1", "leaves no room for an answer", "shorten it or delete that line"]),
    "conversations given as held-out questions": lambda fx, tmp: Case(
        [f"--qa_data={fx.tiny_world['data'] / 'sft_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'sft_train.jsonl'}:1", 'needs "messages"', '"answer"', "--qa_data= to skip"]),
    "a missing replay corpus": lambda fx, tmp: Case(
        [f"--replay_data={tmp / 'none.txt'}"], [str(tmp / "none.txt"), "run `python -m data.tinyworld`"]),
}

# ----------------------------------------------------------------------------- the rows: reward model and PPO


def rm_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--world=", f"--init={fx.tiny_sft}", f"--out={out}",
            "--batch_size=4", "--zero_prompts=4", "--max_new_tokens=8"]


def good_pair(fx):
    return (fx.tiny_world["data"] / "prefs_train.jsonl").read_text().splitlines()[0]


LONG_PAIR = {"prompt": "tell me " * 200, "chosen": "No.", "rejected": "Yes."}

RM_CASES = {
    **data_file_cases(good_pair, "preference pairs"),
    "a pair without its rejected reply": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_pair(fx), '', {'prompt': 'Hi?', 'chosen': 'Hello.'}))}"],
        [f"{tmp / 'bad.jsonl'}:3", "not a preference pair", '"rejected"']),
    "pairs longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"], [str(tmp / "long.jsonl"), "too long for the context",
                                                                   "shorten them"]),
    "conversations given to the reward model": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'sft_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'sft_train.jsonl'}:1", "a conversation (SFT's data)", "not a preference pair"]),
}


def ppo_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=", f"--init={fx.tiny_sft}",
            f"--reward_model={fx.tiny_rm}", f"--out={out}", "--batch_size=4", "--minibatch_size=2", "--ppo_epochs=1",
            "--max_new_tokens=8"]


PPO_CASES = {
    **data_file_cases(good_pair, "prompts"),
    "a record with no prompt": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_pair(fx), {'question': 'Hi?'}))}"],
        [f"{tmp / 'bad.jsonl'}:2", "not a prompt", "a preference pair"]),
    "a prompt longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"], ["do not fit in the context",
                                                                   "lower --max_new_tokens or shorten the prompts"]),
    "an SFT checkpoint as the reward model": lambda fx, tmp: Case(
        [f"--reward_model={fx.tiny_sft}"], [str(fx.tiny_sft), "'sft' checkpoint", "['rm']"]),
}

# ----------------------------------------------------------------------------- the rows: DPO and GRPO


def dpo_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=", f"--init={fx.tiny_sft}",
            f"--out={out}", "--batch_size=4"]


# DPO reads preference pairs as the reward model does, but with a loader and errors of its own
DPO_CASES = {
    **data_file_cases(good_pair, "preference pairs"),
    "a pair without its rejected reply": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_pair(fx), '', {'prompt': 'Hi?', 'chosen': 'Hello.'}))}"],
        [f"{tmp / 'bad.jsonl'}:3", '"rejected" is missing', "each line must be"]),
    "pairs longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"],
        [str(tmp / "long.jsonl"), "too long for the context", "line 1", "shorten them"]),
    "conversations given to DPO": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'sft_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'sft_train.jsonl'}:1", "a conversation (SFT's data), not a preference pair"]),
    "math problems given to DPO": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'math_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'math_train.jsonl'}:1", "a math problem (GRPO's data), not a preference pair"]),
    "held-out pairs that do not fit the context": lambda fx, tmp: Case(
        [f"--test_data={write(tmp / 'long.jsonl', jsonl(LONG_PAIR))}"],
        [f"--test_data={tmp / 'long.jsonl'}", "holds no pair that fits the context", "--test_data= for none"]),
    "conversations given as held-out questions": lambda fx, tmp: Case(
        [f"--qa_data={fx.tiny_world['data'] / 'sft_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'sft_train.jsonl'}:1", 'needs "messages"', '"answer"', "--qa_data= to skip"]),
    "a win rate without held-out prompts": lambda fx, tmp: Case(
        [f"--world={fx.tiny_world['data']}"], ["--world", "--test_data", "give one, or --world="]),
    "a --world that is not a TinyWorld": lambda fx, tmp: Case(
        [f"--test_data={fx.tiny_world['data'] / 'prefs_test.jsonl'}", f"--world={tmp}"],
        [f"no TinyWorld in {tmp}", "python -m data.tinyworld"]),
    "an unknown loss": lambda fx, tmp: Case(["--loss_type=kto"], ["--loss_type=kto", "sigmoid, ipo, robust"]),
    "label smoothing of one half": lambda fx, tmp: Case(
        ["--label_smoothing=0.5"], ["--label_smoothing is a probability below 0.5"]),
    "label smoothing given to IPO": lambda fx, tmp: Case(
        ["--loss_type=ipo", "--label_smoothing=0.1"], ["--loss_type=ipo takes no --label_smoothing"]),
}


@pytest.fixture(scope="module")
def tiny_solver(tiny_world, tiny_sft, tmp_path_factory):
    """GRPO's start: tiny_sft fine-tuned to answer TinyWorld's math problems "#### 1" or "#### 2", and beside
    it problems.jsonl, those problems each with the answer 1. (tiny_sft itself never writes "####", so the
    verifier would reward nothing, no group would differ and no step would update: nothing to resume
    exactly, no NaN to catch.) Here about one answer in five is right at first, and the tiny run learns to
    answer 1: nearly one in two by its end."""
    out = tmp_path_factory.mktemp("solver")
    d = tiny_world["data"]
    questions = [json.loads(line)["question"] for line in (d / "math_train.jsonl").read_text().splitlines()]
    answers = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"#### {n}"}]}
               for q in questions for n in (1, 2)]
    write(out / "problems.jsonl", jsonl(*({"question": q, "answer": "#### 1"} for q in questions)))
    r = run_script("train_sft.py", f"--data={write(out / 'answers.jsonl', jsonl(*answers))}", f"--init={tiny_sft}",
                   f"--out={out}", "--qa_data=", "--replay_data=", "--batch_size=8", "--max_steps=60", "--lr=1e-2",
                   "--warmup_steps=2", "--eval_every=60", "--device=cpu")
    assert r.returncode == 0, r.stderr
    return out / "ckpt.pt"


def grpo_flags(fx, out):
    return [f"--data={fx.tiny_solver.parent / 'problems.jsonl'}", "--test_data=", f"--init={fx.tiny_solver}",
            f"--out={out}", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=8"]


def good_problem(fx):
    return (fx.tiny_world["data"] / "math_train.jsonl").read_text().splitlines()[0]


LONG_PROBLEM = {"question": "tell me " * 200, "answer": "#### 1"}
WORDS = {"question": "What is 2 + 2?", "answer": "four"}  # no "#### <number>" for the verifier to read

GRPO_CASES = {
    **data_file_cases(good_problem, "problems"),
    "a problem without its answer": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_problem(fx), '', {'question': 'What is 2 + 2?'}))}"],
        [f"{tmp / 'bad.jsonl'}:3", "not a math problem", '"answer": "... #### <number>"']),
    "an answer without its number": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_problem(fx), WORDS))}"],
        [f"{tmp / 'bad.jsonl'}:2", "not a math problem", '"answer": "... #### <number>"']),
    "conversations given to GRPO": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'sft_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'sft_train.jsonl'}:1", "a conversation (SFT's data), not a math problem"]),
    "preference pairs given to GRPO": lambda fx, tmp: Case(
        [f"--data={fx.tiny_world['data'] / 'prefs_train.jsonl'}"],
        [f"{fx.tiny_world['data'] / 'prefs_train.jsonl'}:1", "a preference pair", "not a math problem"]),
    "problems longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl(LONG_PROBLEM))}"],
        [str(tmp / "long.jsonl"), "too long for the context", "lower --max_new_tokens"]),
    "answers as long as the context": lambda fx, tmp: Case(
        ["--max_new_tokens=128"], ["--max_new_tokens=128 leaves no room for a prompt", "lower it"]),
    "a missing held-out problem file": lambda fx, tmp: Case(
        [f"--test_data={tmp / 'none.jsonl'}"], [str(tmp / "none.jsonl"), "run `python -m data.tinyworld`"]),
    "a group of one answer": lambda fx, tmp: Case(
        ["--group_size=1"], ["--group_size must be 2 or more", "judged against its group"]),
    "an unknown loss": lambda fx, tmp: Case(["--loss_type=ppo"], ["--loss_type must be grpo or dr_grpo or dapo"]),
}


# ----------------------------------------------------------------------------- the table


@dataclass
class Script:
    flags: Callable   # (fixtures, out dir) -> the flags of a tiny CPU run writing to out (SCHEDULE is added)
    init: str         # the fixture holding a checkpoint it may start from (--init)
    wrong_stage: str  # a stage whose checkpoints it must refuse for --init
    cases: dict = field(default_factory=dict)  # its own mistakes, as PRETRAIN_CASES
    curve: str = "loss/train"  # the value of each log.jsonl row that runs must agree on
    batch: str = "batch_size"  # the flag of its batch size (a count that must be positive)


SCRIPTS = {
    "train_pretrain.py": Script(pretrain_flags, init="tiny_pretrained", wrong_stage="sft", cases=PRETRAIN_CASES),
    "train_sft.py": Script(sft_flags, init="tiny_pretrained", wrong_stage="rm", cases=SFT_CASES),
    "train_rm.py": Script(rm_flags, init="tiny_sft", wrong_stage="pretrain", cases=RM_CASES),
    "train_ppo.py": Script(ppo_flags, init="tiny_sft", wrong_stage="rm", cases=PPO_CASES, curve="rollout/score"),
    "train_dpo.py": Script(dpo_flags, init="tiny_sft", wrong_stage="pretrain", cases=DPO_CASES),
    "train_grpo.py": Script(grpo_flags, init="tiny_solver", wrong_stage="rm", cases=GRPO_CASES,
                            batch="prompts_per_step", curve="loss/policy"),
}


class RunsCode:
    """Unpickled, this creates a file: what a malicious checkpoint could do, made harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def edited_checkpoint(src, dst, **changes):
    """A copy of a checkpoint with some of its keys changed; model_args={...} changes those args alone."""
    ckpt = torch.load(src, weights_only=True)
    if "model_args" in changes:
        changes["model_args"] = {**ckpt["model_args"], **changes["model_args"]}
    common.save_checkpoint(dst, {**ckpt, **changes})
    return dst


def checkpoint_that_runs_code(path):
    """A checkpoint that, unpickled without weights_only, creates the file "ran" beside its directory's files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stage": "pretrain", "model": RunsCode(path.parent / "ran"), "model_args": {}}, path)
    return path


def tokenizer_like(src, dst, drop=0, pattern=None):
    """A copy of a tokenizer with its last `drop` merges left out, or its text split by another pattern."""
    ranks = load_ranks(Path(src) / "tokenizer.bpe")
    kept = dict(sorted(ranks.items(), key=lambda kv: kv[1])[:len(ranks) - drop])
    meta = json.loads((Path(src) / "tokenizer.json").read_text())
    save_tokenizer(kept, dst, pattern or meta["pattern"])
    return dst


# Mistakes any script can meet; (fixtures, a directory of its own, the row) -> Case.
COMMON_CASES = {
    "an unknown flag": lambda fx, tmp, row: Case(
        ["--max_step=3"], ["unknown flag --max_step", "--max_steps"]),
    "a flag of the wrong type": lambda fx, tmp, row: Case(
        [f"--{row.batch}=four"], [f"--{row.batch} expects int", "'four'"]),
    "a batch size of 0": lambda fx, tmp, row: Case(
        [f"--{row.batch}=0"], [f"--{row.batch} must be a positive number"]),
    "a learning rate that is not a number": lambda fx, tmp, row: Case(
        ["--lr=nan"], ["--lr must be a positive number"]),
    "a device that does not exist": lambda fx, tmp, row: Case(
        ["--device=gpu"], ["--device=gpu is not a device", "use auto, cpu"]),
    # we may run as root, whom no file mode stops: a path under a regular file cannot be made by anyone
    "an output directory that cannot be made": lambda fx, tmp, row: Case(
        [f"--out={write(tmp / 'a_file', 'x') / 'out'}"],
        [f"cannot write to {tmp / 'a_file' / 'out'}", "choose another --out"]),
    "--resume with no checkpoint": lambda fx, tmp, row: Case(
        [f"--out={tmp / 'empty'}", "--resume"], [f"no checkpoint at {tmp / 'empty' / 'ckpt.pt'}", "first"]),
    "an --init that does not exist": lambda fx, tmp, row: Case(
        [f"--init={tmp / 'none.pt'}"], [f"no checkpoint at {tmp / 'none.pt'}", "first"]),
    "an --init of the wrong stage": lambda fx, tmp, row: Case(
        [f"--init={edited_checkpoint(getattr(fx, row.init), tmp / 'other.pt', stage=row.wrong_stage)}"],
        [str(tmp / "other.pt"), f"is a '{row.wrong_stage}' checkpoint", "this needs one of"]),
    "an --init whose weights do not fit its shape": lambda fx, tmp, row: Case(
        [f"--init={edited_checkpoint(getattr(fx, row.init), tmp / 'wider.pt', model_args={'n_embd': 64})}"],
        ["weights do not fit its model_args", "size mismatch", "unedited"]),
    "an --init cut short": lambda fx, tmp, row: Case(
        [f"--init={write(tmp / 'cut.pt', getattr(fx, row.init).read_bytes()[:5000])}"],
        [str(tmp / "cut.pt"), "not a checkpoint this project can load safely", "use a ckpt.pt written by"]),
    "an --init that would run code": lambda fx, tmp, row: Case(
        [f"--init={checkpoint_that_runs_code(tmp / 'evil.pt')}"],
        [str(tmp / "evil.pt"), "not a checkpoint this project can load safely"]),
    "a --resume checkpoint that would run code": lambda fx, tmp, row: Case(
        [f"--out={checkpoint_that_runs_code(tmp / 'evil' / 'ckpt.pt').parent}", "--resume"],
        [str(tmp / "evil" / "ckpt.pt"), "not a checkpoint this project can load safely"]),
    "a tokenizer with fewer tokens than the checkpoint": lambda fx, tmp, row: Case(
        [f"--init={getattr(fx, row.init)}",
         f"--tokenizer={tokenizer_like(fx.tiny_world['tokenizer'], tmp / 'tok', drop=5)}"],
        ["the checkpoint expects", "tokens but the tokenizer has", "use the tokenizer it was trained with"]),
    "a tokenizer with the checkpoint's size but other tokens": lambda fx, tmp, row: Case(
        [f"--init={getattr(fx, row.init)}",
         f"--tokenizer={tokenizer_like(fx.tiny_world['tokenizer'], tmp / 'tok', pattern=r'[^ ]+| +')}"],
        [f"the tokenizer {tmp / 'tok'} has as many tokens", "use the tokenizer it was trained with"]),
}
CODE_CASES = ["an --init that would run code", "a --resume checkpoint that would run code"]


def cases_of(script):
    return [*COMMON_CASES, *SCRIPTS[script].cases]


# ----------------------------------------------------------------------------- running the scripts


class Fixtures:
    """The fixtures (the session's tiny_world, tiny_pretrained, tiny_sft and tiny_rm, this module's tiny_solver),
    each made when a row first asks for it."""

    def __init__(self, request):
        self.request = request

    def __getattr__(self, name):
        return self.request.getfixturevalue(name)


def tiny(script, fx, out, *extra):
    return [script, *SCRIPTS[script].flags(fx, out), *SCHEDULE, *extra]


def snapshot(root):
    """Every file under root with its bytes and modification time: what "nothing changed" compares."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def losses(script, out):
    """(step, loss) of every training step in out/log.jsonl: a step logged twice, or not at all, shows."""
    key = SCRIPTS[script].curve
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def script_env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # as conftest.run_script: scripts run as they would for a user
    return env


class Background:
    """A process running in the background; the step lines it prints, timestamped as they come."""

    STEP_LINE = re.compile(r"^\w+ (\d+)/\d+ \|")

    def __init__(self, argv):
        self.p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=script_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines, self.stdout, self.stderr = queue.Queue(), [], []
        self.readers = [threading.Thread(target=self._read, args=(self.p.stdout, self.stdout, self.lines)),
                        threading.Thread(target=self._read, args=(self.p.stderr, self.stderr, None))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, into, lines):
        for line in stream:
            into.append(line)
            if lines is not None:
                lines.put((time.monotonic(), line))
        if lines is not None:
            lines.put((time.monotonic(), None))

    def wait_for_step_line(self, timeout=120):
        """(time read, step) of the next step line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                when, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.p.kill()
                pytest.fail(f"no step line within {timeout}s:\n" + "".join(self.stdout + self.stderr))
            if line is None:
                self.finish()
                pytest.fail("the run ended before its step line:\n" + "".join(self.stdout + self.stderr))
            if m := self.STEP_LINE.match(line):
                return when, int(m.group(1))

    def stop_past(self, step, rng, sig):
        """Send sig at a random moment after the step line of `step` (or a later one): within the interval
        that follows it, as long as the last two lines took to arrive."""
        lines = [self.wait_for_step_line()]
        while lines[-1][1] < step:
            lines.append(self.wait_for_step_line())
        gap = lines[-1][0] - lines[-2][0] if len(lines) > 1 else 0.0
        time.sleep(rng.uniform(0, min(gap, 1.0)))
        assert self.p.poll() is None, "the run ended before it could be stopped: give it more steps"
        self.p.send_signal(sig)

    def last_step_printed(self):
        """The step of the last step line the process printed (read after it ended: no delay counts)."""
        return max(int(m.group(1)) for line in self.stdout if (m := self.STEP_LINE.match(line)))

    def finish(self, timeout=300):
        """(exit code, stdout, stderr) once it has ended."""
        try:
            self.p.wait(timeout=timeout)
        finally:
            self.p.kill()
            for t in self.readers:
                t.join()
        return self.p.returncode, "".join(self.stdout), "".join(self.stderr)


def side_by_side(jobs):
    """{script: job()} for {script: job}, the jobs run at once: each waits on processes of its own, so the
    rows share the machine's cores. (Fixtures are looked up before, here in the main thread.)"""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {script: pool.submit(job) for script, job in jobs.items()}
        return {script: f.result() for script, f in futures.items()}


# Runs each argv of a JSON list as `python argv[0] argv[1:]` would, one after another in this one
# process; writes [exit code, stdout, stderr] for each. Usage: python -c IN_ONE_PROCESS argvs.json results.json
IN_ONE_PROCESS = r"""
import contextlib, io, json, runpy, sys, traceback
runs, results_file = json.load(open(sys.argv[1])), sys.argv[2]
results = []
for argv in runs:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter does: an int is the code, a message goes to stderr
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
with open(results_file, "w") as f:
    json.dump(results, f)
"""


def prepare_mistakes(script, fx, root):
    """Every case of a script, each in a directory of its own whose --out holds an earlier run's files.
    Returns {case: (argv, the case, its directory)}."""
    row, made = SCRIPTS[script], {}
    for i, name in enumerate(cases_of(script)):
        tmp = root / f"case{i}"
        (tmp / "out").mkdir(parents=True)
        for f in ("ckpt.pt", "log.jsonl", "metrics.json"):  # stand-ins for an earlier run's results
            write(tmp / "out" / f, f"an earlier run's {f}\n")
        case = COMMON_CASES[name](fx, tmp, row) if name in COMMON_CASES else row.cases[name](fx, tmp)
        made[name] = (tiny(script, fx, tmp / "out", *case.args), case, tmp)
    return made


def run_mistakes(made, root):
    """Run the prepared cases in one process. Returns {case: (result, the case, its directory, the
    directory's files before, after)}."""
    before = {name: snapshot(tmp) for name, (_, _, tmp) in made.items()}
    argvs = [argv for argv, _, _ in made.values()]
    write(root / "argvs.json", json.dumps(argvs))
    code, _, err = Background(["-c", IN_ONE_PROCESS, str(root / "argvs.json"), str(root / "results.json")]).finish()
    assert code == 0, err
    results = json.loads((root / "results.json").read_text())
    return {name: (subprocess.CompletedProcess(argv, *result), case, tmp, before[name], snapshot(tmp))
            for (name, (argv, case, tmp)), result in zip(made.items(), results)}


@pytest.fixture(scope="module")
def mistakes(request, tmp_path_factory):
    """script -> {case: outcome} (see run_mistakes)."""
    fx, roots = Fixtures(request), {script: tmp_path_factory.mktemp("mistakes") for script in SCRIPTS}
    made = {script: prepare_mistakes(script, fx, roots[script]) for script in SCRIPTS}
    return side_by_side({script: lambda s=script: run_mistakes(made[s], roots[s]) for script in SCRIPTS})


def run_to_the_end(argv):
    code, _, err = Background(argv).finish()
    assert code == 0, err


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """script -> the out dir of an uninterrupted tiny run: what a resumed run must end up equal to."""
    fx = Fixtures(request)
    outs = {script: tmp_path_factory.mktemp("reference") for script in SCRIPTS}
    argvs = {script: tiny(script, fx, outs[script]) for script in SCRIPTS}
    side_by_side({script: lambda s=script: run_to_the_end(argvs[s]) for script in SCRIPTS})
    for script in SCRIPTS:
        assert [s for s, _ in losses(script, outs[script])] == list(range(1, STEPS + 1))
    return outs


def interrupt(script, start, resume, out):
    """A run stopped twice at random moments (seeded: the same steps every time, the moment within the
    step as timing allows): Ctrl-C, most likely in the middle of a step, in the first third of the run;
    then, resumed, a kill halfway through what was left; then resumed again to the end. The moments are
    counted in the run's own step lines, so a test that reads them late stops the run later, not never.
    Returns {"ctrl_c": (exit code, stdout, stderr, last step printed, checkpoint step after),
    "kill": (last step printed, checkpoint step after), "out": the out dir}."""
    result, rng = {"out": out}, random.Random(f"interrupt {script}")
    run = Background(start)
    run.stop_past(rng.randrange(2 * EVERY, STEPS // 3, EVERY), rng, signal.SIGINT)
    code, stdout, stderr = run.finish()
    result["ctrl_c"] = (code, stdout, stderr, run.last_step_printed(), step_of(out / "ckpt.pt"))

    resumed_at = step_of(out / "ckpt.pt")
    assert isinstance(resumed_at, int), resumed_at
    run = Background(resume)
    run.stop_past(rng.randrange(resumed_at + EVERY, (resumed_at + STEPS) // 2 + EVERY), rng, signal.SIGKILL)
    run.finish()
    result["kill"] = (run.last_step_printed(), step_of(out / "ckpt.pt"))

    code, _, stderr = Background(resume).finish()
    assert code == 0, stderr
    return result


@pytest.fixture(scope="module")
def interrupted(request, tmp_path_factory):
    """script -> what interrupt() returns."""
    fx, outs = Fixtures(request), {script: tmp_path_factory.mktemp("interrupted") for script in SCRIPTS}
    runs = {script: (tiny(script, fx, outs[script]), tiny(script, fx, outs[script], "--resume")) for script in SCRIPTS}
    return side_by_side({script: lambda s=script: interrupt(s, *runs[s], outs[s]) for script in SCRIPTS})


def step_of(ckpt_path):
    """The step of a checkpoint, or the error that loading it gives (a broken file, a missing one)."""
    try:
        return common.load_checkpoint(ckpt_path)["step"]
    except UserError as e:
        return str(e)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("script, case", [(s, c) for s in SCRIPTS for c in cases_of(s)])
def test_a_mistake_is_one_line_and_changes_nothing(mistakes, script, case):
    result, expected, _, before, after = mistakes[script][case]
    line = error_line(result)  # exit code 2, one "error: ..." line, no traceback
    for fragment in expected.expect:
        assert fragment in line, (fragment, line)
    assert after == before  # no file written, rewritten or touched: the earlier run's checkpoint and log included


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", CODE_CASES)
def test_a_checkpoint_that_would_run_code_is_refused_unopened(mistakes, script, case):
    result, _, tmp, _, _ = mistakes[script][case]
    assert "not a checkpoint this project can load safely" in error_line(result)
    assert not list(tmp.rglob("ran"))  # unpickled, it would have created this


def test_the_crafted_checkpoint_does_run_code_when_unpickled_unsafely(tmp_path):
    """The check above means something only if the file is what it claims: here it runs, on purpose."""
    checkpoint_that_runs_code(tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()
    with pytest.raises(UserError, match="not a checkpoint this project can load safely"):
        common.load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_same_seed_gives_the_same_losses(interrupted, reference, script):
    """The steps up to the Ctrl-C were logged by another process than the reference's, with the same
    seed and flags: the same floats at the same steps, exactly."""
    ctrl_c_step = interrupted[script]["ctrl_c"][4]
    assert isinstance(ctrl_c_step, int), ctrl_c_step
    assert losses(script, interrupted[script]["out"])[:ctrl_c_step] == losses(script, reference[script])[:ctrl_c_step]


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_saves_at_the_end_of_the_step_and_says_how_to_resume(interrupted, script):
    result = interrupted[script]
    code, stdout, stderr, printed, step = result["ctrl_c"]
    assert code == 130 and "Traceback" not in stderr, stderr
    assert isinstance(step, int) and printed <= step < STEPS, step  # saved where it stopped, not at a checkpoint
    assert f"interrupted at step {step}: checkpoint saved to {result['out'] / 'ckpt.pt'}" in stdout
    assert f"continue with: python {script} --resume" in stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_kill_at_a_random_moment_leaves_the_previous_or_the_next_checkpoint(interrupted, script):
    printed, step = interrupted[script]["kill"]
    # killed after the line of step `printed`, before the next: the checkpoint before that line's,
    # that line's own (written just after it), or the next; whole, never a broken file
    assert step in (printed - EVERY, printed, printed + EVERY), step


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_interrupted_run_resumes_to_the_losses_of_one_never_interrupted(interrupted, reference, script):
    assert losses(script, interrupted[script]["out"]) == losses(script, reference[script])


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """What the random kill above hits only sometimes (the moment a checkpoint is being written), made
    certain: a write that stops halfway leaves the checkpoint before it, whole."""
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"stage": "pretrain", "model": {"w": torch.ones(3)}, "step": 2})

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"PK half of a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"stage": "pretrain", "model": {"w": torch.zeros(3)}, "step": 4})
    assert common.load_checkpoint(path)["step"] == 2


@pytest.fixture(scope="module")
def blown_up(request, reference, tmp_path_factory):
    """script -> (result, its out dir, the checkpoint's bytes before): each finished reference run continued
    for 4 more steps at an absurd learning rate, checkpointing every step; the rows side by side."""
    fx, made = Fixtures(request), {}
    for script in SCRIPTS:
        out = tmp_path_factory.mktemp("nan") / "out"
        shutil.copytree(reference[script], out)
        argv = tiny(script, fx, out, "--resume", f"--max_steps={STEPS + 4}", "--lr=1e10", "--eval_every=1")
        made[script] = (argv, out, (out / "ckpt.pt").read_bytes())

    def run(script):
        argv, out, kept = made[script]
        code, stdout, stderr = Background(argv).finish()
        return subprocess.CompletedProcess(argv, code, stdout, stderr), out, kept
    return side_by_side({script: lambda s=script: run(s) for script in SCRIPTS})


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(blown_up, script):
    """The loss before the first update is fine, the weights after it give NaN: the checkpoint of the last
    step must stay as it was, not be replaced by those weights."""
    r, out, kept = blown_up[script]
    line = error_line(r)
    m = re.search(r"became (nan|inf|-inf) at step (\d+); the last good checkpoint is kept in (\S+):", line)
    assert m and int(m.group(2)) > STEPS and m.group(3) == str(out / "ckpt.pt"), line
    assert "--resume and a lower --lr" in line
    assert (out / "ckpt.pt").read_bytes() == kept


# ----------------------------------------------------------------------------- the command line, unit by unit


@dataclass
class Demo:
    steps: int = 10        # how many steps
    lr: float = 1e-3       # the learning rate
    name: str = "run"      # a label
    fast: bool = False     # go fast


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "unknown flag --stpes; valid flags: --preset, --steps, --lr, --name, --fast"),
    (["--steps=three"], "--steps expects int, got 'three'"),
    (["--fast=maybe"], "--fast expects true or false"),
    (["steps=3"], "unexpected argument"),
    (["--preset=huge"], "unknown preset 'huge'"),
])
def test_bad_flags_name_the_fix(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cli.parse_config(Demo, argv, presets={"small": {"steps": 1}})


def test_a_script_without_presets_neither_takes_nor_lists_one():
    with pytest.raises(UserError, match=re.escape("unknown flag --preset; valid flags: --steps, --lr, --name, --fast")):
        cli.parse_config(Demo, ["--preset=small"])
