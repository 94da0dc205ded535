"""make gpu, dry: its plumbing on a CPU (Triton's interpreter, tiny shapes), and the whole journey at toy size.

Without a GPU, bench/gpu.py runs every benchmark section and `make demo PRESET=smoke` in a fresh copy of the
repository: every stage from TinyWorld's files to the report, chained as `make demo` chains them. The
kernel tests it would run first are left out here (--only=...): the suite runs them itself.
"""
import dataclasses
import hashlib
import json

import pytest
import torch

import cli
import common
from studies import report_writing as report_py
import configs
from bench.demo_times import bench_demo_times
from conftest import ROOT, run_script


DRY_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, make gpu is the real run, not a dry one")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    committed = ROOT / "bench" / "RESULTS-gpu.md"
    before = hashlib.sha256(committed.read_bytes()).hexdigest() if committed.is_file() else None
    r = run_script("bench/gpu.py", "--only=attention,cross_entropy,training,journey", f"--out={out}", timeout=600)
    after = hashlib.sha256(committed.read_bytes()).hexdigest() if committed.is_file() else None
    return r, out, before == after


@DRY_ONLY
def test_dry_run_writes_every_table_and_leaves_the_gpu_results_alone(dry_run):
    r, out, untouched = dry_run
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert untouched  # a dry run never replaces the committed GPU results
    results = (out / "RESULTS-dry.md").read_text()
    assert "- device: CPU" in results and "dry run, CPU" in results
    for title in ("## Attention, causal", "## Cross-entropy forward+backward", "## Training: GPT",
                  "## The TinyWorld journey, toy size (PRESET=smoke)"):
        assert title in results, title
    assert "| ours (kernels: triton/triton) | eager |" in results  # the Triton code ran, not a fallback
    assert "| plain (SDPA + F.cross_entropy) | torch.compile |" in results
    summary = r.stdout.strip().splitlines()[-6:]  # the summary is the last lines
    assert summary[0].startswith("make gpu (dry run, CPU)") and summary[-1].startswith("wrote ")
    assert any(line.strip().startswith("journey: ") and "GRPO's math" in line for line in summary), summary


@DRY_ONLY
def test_the_toy_journey_chains_every_stage_and_the_report_reads_them_all(dry_run):
    r, out, _ = dry_run
    journey = out / "journey" / "out"
    report = (journey / "report.md").read_text()
    for row in ("0 random init", "1 pre-trained", "2 SFT", "3 reward model", "3 PPO", "3 DPO", "4 GRPO"):
        assert f"| {row} |" in report, row
    for stage in ("Pre-training", "SFT", "The reward model", "PPO", "DPO", "GRPO"):  # a sentence each, measured
        line = next(line for line in report.splitlines() if line.startswith(f"- **{stage}**"))
        assert "?" not in line.replace("?)", ""), line
    assert "(PPO, where it started)" in report  # make demo's GRPO starts from PPO's policy
    assert "| worked step by step |" in report  # the reasoning table: answers that write steps, per stage
    sft_row = next(line for line in report.splitlines() if line.startswith("| 2 SFT | ") and "%, " in line)
    assert 0 <= int(sft_row.rstrip(" |").rsplit("| ", 1)[1].rstrip("%")) <= 100, sft_row
    assert "What is an LLM?" in report
    # every curve report.py asks for is in its stage's log: a renamed metric would show as "Not drawn"
    assert "Not drawn" not in report and all((journey / f"report-{s}.png").is_file() for s in report_py.CURVES)
    results = json.loads((journey / "report.json").read_text())  # the same figures, for programs (make seeds)
    assert [label for label in results["stages"] if label in report] == list(results["stages"])
    assert 0 <= results["stages"]["2 SFT"]["format"] <= 1 and 0 <= results["stages"]["3 reward model"]["rm_acc"] <= 1
    assert 0 <= results["facts_curve"]["last"] <= 1 and set(results["facts_curve"]["first_step"]) == {"10%", "50%", "90%"}
    assert set(results["stage_seconds"]) == {"pretrain", "sft", "sft_answers_only", "rm", "ppo", "dpo", "grpo"}
    for stage, steps in (("pretrain", 6), ("sft", 4), ("sft_answers_only", 4), ("rm", 2), ("ppo", 2), ("dpo", 2),
                         ("grpo", 2)):  # each stage ran the smoke preset's steps and wrote its checkpoint
        assert (journey / stage / "ckpt.pt").is_file(), stage
        metrics = json.loads((journey / stage / "metrics.json").read_text())
        assert metrics["steps"] == steps, stage
        # its phases, timed: the start-up counts the imports (a second or more), training its own seconds
        seconds = metrics["seconds"]
        assert seconds["start-up"] > 0.5 and seconds["evaluation"] >= 0, (stage, seconds)
        assert abs(seconds["training"] - metrics["train_seconds"]) < 0.5, (stage, seconds)
    title, header, rows = bench_demo_times(out=journey)  # make bench's table of where the demo's time goes
    assert [row[0] for row in rows] == ["pretrain", "sft", "sft_answers_only", "rm", "ppo", "dpo", "grpo",
                                        "report", "all"]


def test_a_gpu_makes_tinyworld_gpu_sized_unless_told_otherwise(monkeypatch, capsys):
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    gpu = cli.parse_config(configs.Pretrain, [], configs.PRESETS["pretrain"])
    assert (gpu.n_layer, gpu.n_embd) == (6, 384) and gpu.max_steps > configs.Pretrain.max_steps
    assert "--preset=tinyworld_gpu" in capsys.readouterr().out  # said, not silent
    cpu = configs.Pretrain()
    assert cli.parse_config(configs.Pretrain, ["--preset=cpu"], configs.PRESETS["pretrain"]) == cpu
    on_cpu = cli.parse_config(configs.Pretrain, ["--device=cpu"], configs.PRESETS["pretrain"])
    assert dataclasses.replace(on_cpu, device="auto") == cpu
    assert cli.parse_config(configs.Pretrain, ["--n_layer=2"], configs.PRESETS["pretrain"]).n_layer == 2
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    assert cli.parse_config(configs.Pretrain, [], configs.PRESETS["pretrain"]) == cpu


@DRY_ONLY
def test_the_journey_gets_what_the_budget_leaves_and_is_reported_stopped(tmp_path):
    """make gpu must write its results inside a lent GPU's command limit: the journey, last, is cut to
    the budget's remainder (here 1 s) and reported as stopped, with the exit code that flags it."""
    r = run_script("bench/gpu.py", "--only=journey", "--budget=1", f"--out={tmp_path}", timeout=120)
    assert r.returncode == 1 and "journey: stopped after 1 s" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "## The TinyWorld journey" in (tmp_path / "RESULTS-dry.md").read_text()
