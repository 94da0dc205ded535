"""Faults and bad input, for every training script: nothing lost, every mistake explained.

Each training script is a row (a faults.Script, defined beside that stage's own tests as FAULTS: the
flags of a tiny CPU run, the checkpoint it may start from, and the mistakes only it can meet). The tests
here run every row through the same trials (the harness is faults.py):

- interrupted training: SIGKILL at a random moment leaves a checkpoint that loads, and --resume ends
  with the losses of a run never interrupted; Ctrl-C saves, says how to resume, and resumes exactly;
- a mistake (bad data, bad configuration, a checkpoint that would run code, an output directory that
  cannot be written): one line on stderr, exit code 2, saying where (the file and line) with its
  keyword, and not one file changed;
- a NaN loss stops training, naming the step and leaving the last good checkpoint as it was;
- the same seed and flags give the same losses, twice.

One mistake alone: pytest tests/test_faults.py -k "train_sft.py and empty".
"""
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cli
import common
import test_dpo
import test_grpo
import test_ppo
import test_pretrain
import test_rm
import test_sft
from cli import UserError
from conftest import error_line
from faults import (CODE_CASES, EVERY, STEPS, Background, Fixtures, cases_of, checkpoint_that_runs_code, interrupt,
                    losses, prepare_mistakes, run_mistakes, run_to_the_end, side_by_side, tiny)

SCRIPTS = {m.FAULTS.name: m.FAULTS for m in (test_pretrain, test_sft, test_rm, test_ppo, test_dpo, test_grpo)}


@pytest.fixture(scope="module")
def mistakes(request, tmp_path_factory):
    """script -> {case: outcome} (see run_mistakes), for the cases this session runs only: one case asked
    for alone (pytest -k) costs one process of one script, not the whole table."""
    asked = {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module.__name__ == __name__ and "mistakes" in item.fixturenames and "case" in params:
            asked.setdefault(params["script"], set()).add(params["case"])
    fx, roots = Fixtures(request), {script: tmp_path_factory.mktemp("mistakes") for script in asked}
    made = {script: prepare_mistakes(SCRIPTS[script], fx, roots[script], sorted(names))
            for script, names in asked.items()}
    return side_by_side({script: lambda s=script: run_mistakes(made[s], roots[s]) for script in asked})


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """script -> the out dir of an uninterrupted tiny run: what a resumed run must end up equal to."""
    fx = Fixtures(request)
    outs = {script: tmp_path_factory.mktemp("reference") for script in SCRIPTS}
    argvs = {script: tiny(row, fx, outs[script]) for script, row in SCRIPTS.items()}
    side_by_side({script: lambda s=script: run_to_the_end(argvs[s]) for script in SCRIPTS})
    for script in SCRIPTS:
        assert [s for s, _ in losses(SCRIPTS[script], outs[script])] == list(range(1, STEPS + 1))
    return outs


@pytest.fixture(scope="module")
def interrupted(request, tmp_path_factory):
    """script -> what interrupt() returns."""
    fx, outs = Fixtures(request), {script: tmp_path_factory.mktemp("interrupted") for script in SCRIPTS}
    runs = {s: (tiny(row, fx, outs[s]), tiny(row, fx, outs[s], "--resume")) for s, row in SCRIPTS.items()}
    return side_by_side({s: lambda s=s: interrupt(SCRIPTS[s], *runs[s], outs[s]) for s in SCRIPTS})


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("script, case", [(s, c) for s, row in SCRIPTS.items() for c in cases_of(row)])
def test_a_mistake_is_one_line_and_changes_nothing(mistakes, script, case):
    result, expected, _, before, after = mistakes[script][case]
    line = error_line(result)  # exit code 2, one "error: ..." line, no traceback
    assert expected.where is None or expected.where in line, (expected.where, line)
    assert expected.keyword in line, (expected.keyword, line)
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
    row = SCRIPTS[script]
    assert losses(row, interrupted[script]["out"])[:ctrl_c_step] == losses(row, reference[script])[:ctrl_c_step]


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
    assert losses(SCRIPTS[script], interrupted[script]["out"]) == losses(SCRIPTS[script], reference[script])


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
        argv = tiny(SCRIPTS[script], fx, out, "--resume", f"--max_steps={STEPS + 4}", "--lr=1e10", "--eval_every=1")
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
