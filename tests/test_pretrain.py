"""Stage 1 end to end: a tiny run, exact resume, DDP equals one process, and bad input."""
import json

import pytest

import common
from conftest import error_line, run_script

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_batches=2",
        "--log_every=2", "--warmup_steps=2"]


def flags(tiny_world, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
            f"--tokenizer={tiny_world['tokenizer']}", f"--out={out}", *TINY, *extra]


def losses(out):
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def test_tiny_run_trains_evaluates_and_saves(tiny_world, tmp_path):
    r = run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt", "--max_steps=30", "--eval_every=10"))
    assert r.returncode == 0, r.stderr
    assert "pretrain 30/30" in r.stdout and "fact completion" in r.stdout
    metrics = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    assert metrics["val_loss"] < metrics["val_loss_init"] - 0.5  # it learned something
    assert 0.0 <= metrics["fact_accuracy"] <= 1.0
    ckpt = common.load_checkpoint(tmp_path / "pt" / "ckpt.pt", ["pretrain"])
    assert ckpt["step"] == 30 and ckpt["model_args"]["n_embd"] == 32


def test_resume_continues_exactly(tiny_world, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_script("train_pretrain.py", *flags(tiny_world, whole, "--max_steps=8", "--eval_every=4")).returncode == 0
    r = run_script("train_pretrain.py", *flags(tiny_world, parts, "--max_steps=8", "--eval_every=4", "--stop_at=4"))
    assert r.returncode == 0, r.stderr
    assert common.load_checkpoint(parts / "ckpt.pt")["step"] == 4
    r = run_script("train_pretrain.py", *flags(tiny_world, parts, "--max_steps=8", "--eval_every=4", "--resume"))
    assert r.returncode == 0, r.stderr
    assert len(losses(whole)) == 8
    assert losses(parts) == pytest.approx(losses(whole), abs=1e-6)


def test_ddp_two_processes_match_one(tiny_world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_script("train_pretrain.py", *flags(tiny_world, one, "--max_steps=4", "--eval_every=4")).returncode == 0
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_pretrain.py",
                   *flags(tiny_world, two, "--max_steps=4", "--eval_every=4"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


def test_missing_tokenizer_names_the_command(tiny_world, tmp_path):
    args = flags(tiny_world, tmp_path / "pt") + [f"--tokenizer={tmp_path / 'none'}"]
    assert "python -m data.tokenizer" in error_line(run_script("train_pretrain.py", *args))


def test_missing_corpus_names_the_command(tiny_world, tmp_path):
    args = flags(tiny_world, tmp_path / "pt") + [f"--data={tmp_path / 'none.txt'}"]
    assert "python -m data.tinyworld" in error_line(run_script("train_pretrain.py", *args))


def test_unknown_flag_lists_the_valid_ones(tiny_world, tmp_path):
    line = error_line(run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt"), "--max_step=3"))
    assert "--max_step" in line and "--max_steps" in line


def test_init_from_the_wrong_kind_of_checkpoint(tiny_world, tmp_path):
    common.save_checkpoint(tmp_path / "sft.pt", {"stage": "sft", "model": {}, "model_args": {}})
    line = error_line(run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt"), f"--init={tmp_path / 'sft.pt'}"))
    assert "'sft' checkpoint" in line


def test_a_corpus_that_is_not_utf8(tiny_world, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"A story.\n\n\xff\xfe not text")
    line = error_line(run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt"), f"--data={bad}",
                                 "--eval_facts=false"))
    assert "is not UTF-8 text" in line


def test_fact_evaluation_on_a_corpus_without_a_world(tiny_world, tmp_path):
    other = tmp_path / "stories.txt"
    other.write_text("A story.\n\nAnother story.\n")
    line = error_line(run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt"), f"--data={other}"))
    assert "--eval_facts=false" in line
