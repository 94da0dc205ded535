"""Stage 1 end to end: a tiny run, exact resume, DDP equals one process. Bad input: test_faults.py."""
import json

import pytest

import common
from conftest import run_script

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_batches=2",
        "--log_every=2", "--warmup_steps=2"]


def flags(tiny_world, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
            f"--tokenizer={tiny_world['tokenizer']}", f"--out={out}", *TINY, *extra]


def losses(out):
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    return [r["loss/train"] for r in rows if "loss/train" in r]


def test_tiny_run_trains_evaluates_and_saves(tiny_world, tmp_path):
    r = run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt", "--max_steps=30", "--eval_every=10"))
    assert r.returncode == 0, r.stderr
    assert "pretrain 30/30" in r.stdout and "fact completion" in r.stdout
    metrics = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    assert metrics["val_loss"] < metrics["val_loss_init"] - 0.5  # it learned something
    assert 0.0 <= metrics["fact_accuracy"] <= 1.0
    ckpt = common.load_checkpoint(tmp_path / "pt" / "ckpt.pt", ["pretrain"])
    assert ckpt["step"] == 30 and ckpt["model_args"]["n_embd"] == 32


def test_ddp_two_processes_match_one(tiny_world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_script("train_pretrain.py", *flags(tiny_world, one, "--max_steps=4", "--eval_every=4")).returncode == 0
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_pretrain.py",
                   *flags(tiny_world, two, "--max_steps=4", "--eval_every=4"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
