"""make seeds: the demo on several seeds, each kept in its own folder, and seeds.py's table of every figure
with its minimum and median. End to end at toy size (PRESET=smoke) on two seeds, in a fresh copy of the
repository, as `make seeds` runs for a user."""
import json
import shutil
import subprocess
import sys

import pytest

from studies import seeds
from conftest import ROOT, run_script


def test_the_table_has_a_row_per_figure_a_column_per_seed_and_the_min_and_median():
    reports = {"0": {"seed": 1337, "machine": "x", "stages": {"2 SFT": {"seen": 0.9, "unseen": None}}, "s": 10},
               "1": {"seed": 1338, "machine": "x", "stages": {"2 SFT": {"seen": 1.0}}, "s": 12, "extra": 5},
               "2": {"seed": 1339, "machine": "x", "stages": {"2 SFT": {"seen": 0.95}}, "s": 11}}
    lines = seeds.table(reports)
    assert lines[0] == "| figure | seed 0 | seed 1 | seed 2 | min | median |"
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert rows["stages / 2 SFT / seen"] == ["0.9", "1", "0.95", "0.9", "0.95"]
    assert rows["s"] == ["10", "12", "11", "10", "11"]
    assert rows["extra"] == ["", "5", "", "5", "5"]  # a figure one seed lacks: the others' min and median
    assert not any(k.startswith(("seed", "machine")) or "unseen" in k for k in rows)  # not figures; None is absent
    assert len(seeds.headline({})) == len(seeds.HEADLINE) - 1  # a report without a stage: blank cells, no error


def test_a_missing_report_is_one_line_naming_the_command(tmp_path):
    r = run_script("-m", "studies.seeds", "--seeds=0 7", f"--dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"no report for seed 0 at {tmp_path / '0' / 'report.json'}" in r.stderr and "make seeds" in r.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_seeds_runs_the_demo_per_seed_into_its_own_folder_and_writes_the_table(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", "out", "tinyworld", "__pycache__",
                                                              ".pytest_cache", ".hypothesis", "tests", "bench"))
    r = subprocess.run(["make", "-C", str(work), "seeds", "SEEDS=3 4", "PRESET=smoke", f"PY={sys.executable}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    results = {s: json.loads((work / "out" / "seeds" / s / "report.json").read_text()) for s in ("3", "4")}
    assert [results[s]["seed"] for s in ("3", "4")] == [1340, 1341]  # each folder holds its own seed's run
    for s in ("3", "4"):
        assert (work / "out" / "seeds" / s / "report.md").is_file()
        assert (work / "out" / "seeds" / s / "pretrain" / "metrics.json").is_file()
        assert not list((work / "out" / "seeds" / s).glob("*/ckpt.pt"))  # the figures, not the weights
    table = (work / "out" / "seeds.md").read_text()
    assert "| figure | seed 3 | seed 4 | min | median |" in table
    headline = [line for line in table.splitlines() if line.startswith(("| 3 | ", "| 4 | "))]  # the README's columns
    assert len(headline) == 2 and all(line.count(" | ") == len(seeds.HEADLINE) - 1 for line in headline)
    facts = [results[s]["stages"]["1 pre-trained"]["facts"] for s in ("3", "4")]
    row = next(line for line in table.splitlines() if line.startswith("| stages / 1 pre-trained / facts |"))
    assert row.strip("| ").split(" | ")[1:] == [seeds.fmt(v) for v in (*facts, min(facts), (facts[0] + facts[1]) / 2)]
