"""common.py: the command line from a dataclass, the schedule, atomic checkpoints. How they refuse
bad input (flags, unsafe checkpoints, unwritable output): test_faults.py."""
import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, strategies as st

import cli
import common
from data.batches import by_length, length_groups, pack_responses
import run
from cli import UserError


@dataclass
class Demo:
    steps: int = 10        # how many steps
    lr: float = 1e-3       # the learning rate
    name: str = "run"      # a label
    fast: bool = False     # go fast


def test_flags_are_typed():
    cfg = cli.parse_config(Demo, ["--steps=3", "--lr=0.5", "--name=x", "--fast"])
    assert cfg == Demo(steps=3, lr=0.5, name="x", fast=True)
    assert cli.parse_config(Demo, ["--fast=false"]).fast is False


def test_preset_sets_defaults_and_flags_win():
    presets = {"small": {"steps": 1, "name": "s"}}
    assert cli.parse_config(Demo, ["--preset=small", "--steps=5"], presets) == Demo(steps=5, name="s")


def test_help_lists_fields_defaults_and_comments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_config(Demo, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("--steps=10", "how many steps", "--lr=0.001", "the learning rate", "--fast=False"):
        assert line in out


@dataclass
class Stage(Demo):
    steps: int = 20        # this stage's steps
    beta: float = 0.1      # this stage's own knob


def test_help_puts_the_stage_flags_first_and_keeps_the_shared_ones_comments(capsys):
    """A stage's config extends the shared one (configs.Common): --help shows the script's docstring, the
    stage's own flags with their comments, then the shared ones with theirs."""
    with pytest.raises(SystemExit):
        cli.parse_config(Stage, ["--help"], doc="what the script does")
    out = capsys.readouterr().out
    flags = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert out.startswith("what the script does")
    assert flags == ["--steps=20", "--beta=0.1", "--lr=0.001", "--name=run", "--fast=False"]
    assert "this stage's steps" in out and "how many steps" not in out and "the learning rate" in out


def test_every_stage_config_has_a_comment_for_each_flag_and_accepts_its_defaults():
    import configs
    for cls in (configs.Pretrain, configs.SFT, configs.RM, configs.DPO, configs.PPO, configs.GRPO):
        comments = cli.field_comments(cls)
        assert [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)] == [], cls.__name__
        cls().check()  # the defaults pass their own checks


def test_require_choice_names_the_choices():
    cli.require_choice(Demo(name="b"), "name", ("a", "b"))
    with pytest.raises(UserError, match=r"--name must be a or b, got 'c'"):
        cli.require_choice(Demo(name="c"), "name", ("a", "b"))


@given(max_lr=st.floats(1e-5, 1.0), frac=st.floats(0.0, 1.0), warmup=st.integers(1, 100), total=st.integers(101, 10_000))
def test_schedule_warms_up_then_decays_to_min(max_lr, frac, warmup, total):
    min_lr = max_lr * frac
    lrs = [run.lr_at(s, max_lr, min_lr, warmup, total) for s in (0, warmup - 1, warmup, total)]
    assert lrs[0] == pytest.approx(max_lr / warmup)
    assert lrs[1] == pytest.approx(max_lr) and lrs[2] == pytest.approx(max_lr)
    assert lrs[3] == pytest.approx(min_lr)
    mid = run.lr_at(warmup + (total - warmup) // 2, max_lr, min_lr, warmup, total)
    assert min_lr - 1e-12 <= mid <= max_lr + 1e-12


@given(max_lr=st.floats(1e-5, 1.0), frac=st.floats(0.0, 1.0), warmup=st.integers(1, 50), total=st.integers(200, 10_000),
       cooldown=st.floats(0.01, 0.5))
def test_warmup_stable_decay_holds_the_peak_then_falls_in_a_straight_line_to_min(max_lr, frac, warmup, total, cooldown):
    min_lr = max_lr * frac
    lr = lambda s: run.lr_at(s, max_lr, min_lr, warmup, total, cooldown)  # noqa: E731
    start = total - cooldown * total  # where the decay begins
    assert lr(0) == pytest.approx(max_lr / warmup) and lr(warmup - 1) == pytest.approx(max_lr)
    assert all(lr(s) == max_lr for s in (warmup, (warmup + int(start)) // 2, int(start)))  # the plateau
    assert lr(total) == pytest.approx(min_lr)
    one_step = (max_lr - min_lr) / max(1, total - start)  # the rounding of the middle step
    # (plus float rounding: with min_lr a hair under max_lr, one step is smaller than the last bit)
    assert lr(round((start + total) / 2)) == pytest.approx((max_lr + min_lr) / 2, abs=one_step + 1e-12 * max_lr)
    after = [lr(s) for s in range(warmup, total + 1, max(1, total // 100))]
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:]))  # never rises after the warm-up


def test_checkpoint_round_trip_and_stage_check(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"stage": "pretrain", "model": {"w": torch.ones(2)}, "step": 3})
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    ckpt = common.load_checkpoint(path, ["pretrain"])
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    with pytest.raises(UserError, match="is a 'pretrain' checkpoint, but this needs one of \\['sft'\\]"):
        common.load_checkpoint(path, ["sft"])
    with pytest.raises(UserError, match="run `python train_pretrain.py` first"):
        common.load_checkpoint(tmp_path / "none.pt", made_by="python train_pretrain.py")


def test_a_nan_on_any_rank_stops_every_rank(tmp_path, monkeypatch):
    """Run.check agrees over the ranks first: this rank's value is fine, another's was NaN, so the mean
    all of them see is NaN and every rank stops at the same step (none is left waiting on the others)."""
    stopping = run.Run.__new__(run.Run)
    stopping.ckpt_path, stopping.step = tmp_path / "ckpt.pt", 3
    stopping.check(1.0)  # one process: its own value
    monkeypatch.setattr(run, "all_mean", lambda value: (value + float("nan")) / 2)  # two ranks, the other's NaN
    with pytest.raises(cli.UserError, match="the loss became nan at step 3; no checkpoint was written"):
        stopping.check(1.0)


def test_peak_flops_on_cpu_is_a_positive_measurement():
    flops = run.peak_flops("cpu")
    assert flops > 1e8 and math.isfinite(flops)


@given(st.lists(st.integers(1, 128), min_size=1, max_size=70), st.integers(1, 9))
def test_length_groups_cut_the_rows_sorted_by_length_into_at_most_that_many(lengths, groups):
    runs = length_groups(lengths, groups)
    rows = [i for run in runs for i in run]
    assert sorted(rows) == list(range(len(lengths))) and len(runs) <= groups  # every row once
    assert [lengths[i] for i in rows] == sorted(lengths) and all(runs)
    assert max(map(len, runs)) - min(map(len, runs)) <= len(runs)  # near-equal sizes


@given(st.lists(st.integers(1, 128), min_size=1, max_size=40), st.integers(1, 9))
def test_by_length_gives_each_row_its_own_result_in_the_callers_order(lengths, groups):
    value = torch.tensor(lengths, dtype=torch.float32) * 10 + torch.arange(len(lengths))
    assert torch.equal(by_length(lengths, lambda rows: value[rows], groups), value)


@given(st.lists(st.tuples(st.lists(st.integers(1, 50), min_size=1, max_size=6),
                          st.lists(st.integers(1, 50), min_size=0, max_size=6)), min_size=1, max_size=5))
def test_pack_responses_masks_exactly_the_response_tokens(pairs):
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    if all(len(p) + len(r) < 2 for p, r in pairs):
        return
    x, y, mask = pack_responses(prompts, responses)
    for i, (p, r) in enumerate(pairs):
        assert y[i][mask[i].bool()].tolist() == r  # the targets under the mask are the response, in order
        n = len(p) + len(r) - 1
        assert x[i, :n].tolist() == (p + r)[:-1] and (y[i, n:] == -100).all()
