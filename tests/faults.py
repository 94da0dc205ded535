"""The fault table's harness: every training script is a row (a Script, defined beside that stage's tests:
FAULTS in test_pretrain.py, test_sft.py, ...), and tests/test_faults.py runs every row through the same
trials: mistakes (one line, exit code 2, nothing on disk changed), Ctrl-C and kill -9 at random moments
(an exact resume), a NaN loss (the last good checkpoint kept), the same seed twice (the same losses).

A row: the flags of a tiny CPU run (`flags(fixtures, out)`), the fixture of a checkpoint it starts from,
a stage it must refuse, its own mistakes (`cases`: name -> (fixtures, a directory of its own) -> Case),
and where they are not "loss/train" and --batch_size, the log.jsonl value its runs must agree on (curve)
and the flag of its batch (batch). The tiny run must change the weights: one whose steps do not shows
nothing by resuming exactly, and no learning rate makes it NaN. The script is expected to follow the
project's conventions: --out, --init, --resume, --max_steps, --eval_every (a checkpoint), --log_every
(a line "stage step/total | ..."), and a log.jsonl row per step.

The mistakes of one script run in one Python process (`runpy`, as `python script.py ...` runs the
script), so that its cases pay for importing torch once; each run that trains is a process of its own,
and the rows' runs go side by side, two cores' worth.
"""
import json
import os
import queue
import random
import re
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

import common
from cli import UserError
from conftest import ROOT, run_scripts
from data.tokenizer import load_ranks, save_tokenizer

# Every tiny run has the same schedule, so the tests can name steps: 64 steps, a checkpoint and a printed
# line every 2, on the CPU (where a run repeats exactly). A tiny step takes 10-40 ms, so 64 of them leave
# room to stop a run twice, mid-run, even when the lines reach the test a few steps late.
STEPS, EVERY = 64, 2
SCHEDULE = [f"--max_steps={STEPS}", f"--eval_every={EVERY}", f"--log_every={EVERY}", "--warmup_steps=2",
            "--device=cpu"]


@dataclass
class Case:
    """A mistake: the flags that make it (after the row's, so they win); where its error line must say it
    is (the file, its line; None for a flag), and one keyword of the error (not its wording)."""
    args: list
    where: str | None
    keyword: str


def write(path, content):
    """Write a file, return its path (so a case can make its file inside its flags)."""
    path = Path(path)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# ----------------------------------------------------------------------------- records of TinyWorld's files, good and bad

MALFORMED = '{"messages": [oops'
LONG_PAIR = {"prompt": "tell me " * 200, "chosen": "No.", "rejected": "Yes."}  # beyond the tiny model's context


def good_pair(fx):
    return (fx.tiny_world["data"] / "prefs_train.jsonl").read_text().splitlines()[0]


def data_file_cases(good_record, records):
    """The mistakes every reader of --data meets: the file missing, empty ("holds no <records>"), or a
    malformed line after a good record (good_record: fixtures -> one line of a right file)."""
    return {
        "a missing data file": lambda fx, tmp: Case(
            [f"--data={tmp / 'none.jsonl'}"], str(tmp / "none.jsonl"), "run `python -m data.tinyworld`"),
        "an empty data file": lambda fx, tmp: Case(
            [f"--data={write(tmp / 'empty.jsonl', '')}"], str(tmp / "empty.jsonl"), f"holds no {records}"),
        "a malformed JSONL line": lambda fx, tmp: Case(
            [f"--data={write(tmp / 'bad.jsonl', jsonl(good_record(fx), MALFORMED))}"],
            f"{tmp / 'bad.jsonl'}:2", "malformed JSON"),
    }


def wrong_file(flag, name, keyword):
    """The case of another stage's TinyWorld file (name, e.g. "sft_train.jsonl") given as --flag: the
    error names the file's first line and says, with keyword, what it is."""
    return lambda fx, tmp: Case([f"--{flag}={fx.tiny_world['data'] / name}"], f"{fx.tiny_world['data'] / name}:1",
                                keyword)


# ----------------------------------------------------------------------------- the rows and the mistakes they share


@dataclass
class Script:
    """A row of the fault table: a training script and how to run it tiny."""
    name: str         # the script, e.g. "train_sft.py"
    flags: Callable   # (fixtures, out dir) -> the flags of a tiny CPU run writing to out (SCHEDULE is added)
    init: str         # the fixture holding a checkpoint it may start from (--init)
    wrong_stage: str  # a stage whose checkpoints it must refuse for --init
    cases: dict = field(default_factory=dict)  # its own mistakes, as PRETRAIN_CASES
    curve: str = "loss/train"  # the value of each log.jsonl row that runs must agree on
    batch: str = "batch_size"  # the flag of its batch size (a count that must be positive)


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
        ["--max_step=3"], None, "unknown flag --max_step"),
    "a flag of the wrong type": lambda fx, tmp, row: Case(
        [f"--{row.batch}=four"], None, f"--{row.batch} expects int"),
    "a batch size of 0": lambda fx, tmp, row: Case(
        [f"--{row.batch}=0"], None, f"--{row.batch} must be a positive number"),
    "a learning rate that is not a number": lambda fx, tmp, row: Case(
        ["--lr=nan"], None, "--lr must be a positive number"),
    "a device that does not exist": lambda fx, tmp, row: Case(
        ["--device=gpu"], None, "--device=gpu is not a device"),
    # we may run as root, whom no file mode stops: a path under a regular file cannot be made by anyone
    "an output directory that cannot be made": lambda fx, tmp, row: Case(
        [f"--out={write(tmp / 'a_file', 'x') / 'out'}"],
        f"cannot write to {tmp / 'a_file' / 'out'}", "choose another --out"),
    "--resume with no checkpoint": lambda fx, tmp, row: Case(
        [f"--out={tmp / 'empty'}", "--resume"], f"no checkpoint at {tmp / 'empty' / 'ckpt.pt'}", "first"),
    "an --init that does not exist": lambda fx, tmp, row: Case(
        [f"--init={tmp / 'none.pt'}"], f"no checkpoint at {tmp / 'none.pt'}", "first"),
    "an --init of the wrong stage": lambda fx, tmp, row: Case(
        [f"--init={edited_checkpoint(getattr(fx, row.init), tmp / 'other.pt', stage=row.wrong_stage)}"],
        str(tmp / "other.pt"), f"is a '{row.wrong_stage}' checkpoint"),
    "an --init whose weights do not fit its shape": lambda fx, tmp, row: Case(
        [f"--init={edited_checkpoint(getattr(fx, row.init), tmp / 'wider.pt', model_args={'n_embd': 64})}"],
        None, "weights do not fit its model_args"),
    "an --init cut short": lambda fx, tmp, row: Case(
        [f"--init={write(tmp / 'cut.pt', getattr(fx, row.init).read_bytes()[:5000])}"],
        str(tmp / "cut.pt"), "not a checkpoint this project can load safely"),
    "an --init that would run code": lambda fx, tmp, row: Case(
        [f"--init={checkpoint_that_runs_code(tmp / 'evil.pt')}"],
        str(tmp / "evil.pt"), "not a checkpoint this project can load safely"),
    "a --resume checkpoint that would run code": lambda fx, tmp, row: Case(
        [f"--out={checkpoint_that_runs_code(tmp / 'evil' / 'ckpt.pt').parent}", "--resume"],
        str(tmp / "evil" / "ckpt.pt"), "not a checkpoint this project can load safely"),
    "a tokenizer with fewer tokens than the checkpoint": lambda fx, tmp, row: Case(
        [f"--init={getattr(fx, row.init)}",
         f"--tokenizer={tokenizer_like(fx.tiny_world['tokenizer'], tmp / 'tok', drop=5)}"],
        None, "the checkpoint expects"),
    "a tokenizer with the checkpoint's size but other tokens": lambda fx, tmp, row: Case(
        [f"--init={getattr(fx, row.init)}",
         f"--tokenizer={tokenizer_like(fx.tiny_world['tokenizer'], tmp / 'tok', pattern=r'[^ ]+| +')}"],
        f"the tokenizer {tmp / 'tok'} has as many tokens", "use the tokenizer it was trained with"),
}
CODE_CASES = ["an --init that would run code", "a --resume checkpoint that would run code"]


def cases_of(row):
    return [*COMMON_CASES, *row.cases]


# ----------------------------------------------------------------------------- running the scripts


class Fixtures:
    """The fixtures (the session's tiny_world, tiny_pretrained, tiny_sft and tiny_rm, this module's tiny_solver),
    each made when a row first asks for it."""

    def __init__(self, request):
        self.request = request

    def __getattr__(self, name):
        return self.request.getfixturevalue(name)


def tiny(row, fx, out, *extra):
    return [row.name, *row.flags(fx, out), *SCHEDULE, *extra]


def snapshot(root):
    """Every file under root with its bytes and modification time: what "nothing changed" compares."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def losses(row, out):
    """(step, loss) of every training step in out/log.jsonl: a step logged twice, or not at all, shows."""
    key = row.curve
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


def prepare_mistakes(row, fx, root, names):
    """The cases `names` of a row, each in a directory of its own whose --out holds an earlier run's files.
    Returns {case: (argv, the case, its directory)}."""
    made = {}
    for i, name in enumerate(names):
        tmp = root / f"case{i}"
        (tmp / "out").mkdir(parents=True)
        for f in ("ckpt.pt", "log.jsonl", "metrics.json"):  # stand-ins for an earlier run's results
            write(tmp / "out" / f, f"an earlier run's {f}\n")
        case = COMMON_CASES[name](fx, tmp, row) if name in COMMON_CASES else row.cases[name](fx, tmp)
        made[name] = (tiny(row, fx, tmp / "out", *case.args), case, tmp)
    return made


def run_mistakes(made, root):
    """Run the prepared cases in one process. Returns {case: (result, the case, its directory, the
    directory's files before, after)}."""
    before = {name: snapshot(tmp) for name, (_, _, tmp) in made.items()}
    results = run_scripts([argv for argv, _, _ in made.values()], root, timeout=600)
    return {name: (result, case, tmp, before[name], snapshot(tmp))
            for (name, (_, case, tmp)), result in zip(made.items(), results)}


def run_to_the_end(argv):
    code, _, err = Background(argv).finish()
    assert code == 0, err


def interrupt(row, start, resume, out):
    """A run stopped twice at random moments (seeded: the same steps every time, the moment within the
    step as timing allows): Ctrl-C, most likely in the middle of a step, in the first third of the run;
    then, resumed, a kill halfway through what was left; then resumed again to the end. The moments are
    counted in the run's own step lines, so a test that reads them late stops the run later, not never.
    Returns {"ctrl_c": (exit code, stdout, stderr, last step printed, checkpoint step after),
    "kill": (last step printed, checkpoint step after), "out": the out dir}."""
    result, rng = {"out": out}, random.Random(f"interrupt {row.name}")
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


def step_of(ckpt_path):
    """The step of a checkpoint, or the error that loading it gives (a broken file, a missing one)."""
    try:
        return common.load_checkpoint(ckpt_path)["step"]
    except UserError as e:
        return str(e)
