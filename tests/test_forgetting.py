"""forgetting.py (make forgetting) end to end at toy size: DPO run four ways (SFT and GRPO go through the
same code; GRPO's replay is in the fault table), every run measured, the table, the seeds' table side by
side; and its one-line mistakes."""
import json

import pytest

import common
from studies import forgetting
from cli import UserError
from conftest import error_line, run_script, stage_folders


def test_four_ways_each_measured_and_tabled(tiny_world, tiny_pretrained, tiny_sft, tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    stage_folders(demo, {"pretrain": tiny_pretrained, "sft": tiny_sft})
    out = tmp_path / "forgetting"
    r = run_script("-m", "studies.forgetting", f"--stages={demo}", f"--data={tiny_world['data']}", f"--out={out}",
                   "--preset=smoke", "--only=dpo", "--low_rank=1", "--high_rank=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    results = json.loads((out / "forgetting.json").read_text())
    assert list(results["stages"]) == ["dpo"]
    for stage, rows in results["stages"].items():
        assert list(rows) == ["start", "full", "replay", "lora_low", "lora_high"]
        for way in ("start", "full", "replay", "lora_low", "lora_high"):
            assert {"val_loss", "facts", "seen", "unseen", "win", "math"} <= set(rows[way])
        trained = [rows[w]["trained_params"] for w in ("lora_low", "lora_high", "full")]
        assert trained == sorted(trained) and trained[-1] == rows["replay"]["trained_params"] == results["params"]
        flags = {w: common.load_checkpoint(out / f"{stage}_{w}" / "ckpt.pt")["config"] for w in ("full", "replay", "lora_low")}
        assert flags["replay"]["replay_data"] == str(tiny_world["data"] / "corpus_train.txt")
        assert flags["full"]["replay_data"] == flags["lora_low"]["replay_data"] == "" and flags["lora_low"]["lora_rank"] == 1
        lora = json.loads((out / f"{stage}_lora_high" / "metrics.json").read_text())
        assert lora["adapters_bytes"] > 0 and (out / f"{stage}_lora_high" / "adapters.pt").is_file()
    assert "loss/replay" in (out / "dpo_replay" / "log.jsonl").read_text()
    md = (out / "forgetting.md").read_text()
    assert "| LoRA r1 |" in md and "| full + replay |" in md and "**DPO**" in md and "**SFT**" not in md

    forgetting.combine([out, out], tmp_path)
    side_by_side = (tmp_path / "forgetting-seeds.md").read_text()
    start = next(line for line in side_by_side.splitlines() if line.startswith("| start (sft)"))
    assert start.count(" / ") == 6  # two seeds: one "a / b" per measure


def test_mistakes_are_one_line(tmp_path):
    r = run_script("-m", "studies.forgetting", f"--stages={tmp_path}", f"--out={tmp_path / 'f'}")
    assert "no checkpoint at" in error_line(r) and "make demo" in error_line(r)
    with pytest.raises(UserError, match="--only takes stages among sft,dpo,grpo"):
        forgetting.main(forgetting.Config(only="ppo", out=str(tmp_path / "f")))
    with pytest.raises(UserError, match="make forgetting SEED=N"):
        forgetting.main(forgetting.Config(combine=str(tmp_path), out=str(tmp_path / "f")))
