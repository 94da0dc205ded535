"""Stage 1: its loss against its definition; end to end, a tiny run, exact resume, DDP equals one process.
Bad input: test_faults.py."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common
import measures
from conftest import run_script
from faults import Case, Script, write, wrong_file
from train_pretrain import pretrain_loss

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_batches=2",
        "--log_every=2", "--warmup_steps=2"]


@settings(max_examples=30)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(2, 50), st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_pretrain_loss_is_the_mean_next_token_negative_log_likelihood(B, T, V, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    targets = torch.randint(0, V, (B, T), generator=g)
    want = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(pretrain_loss(logits, targets).double(), want, rtol=1e-5, atol=1e-6)


def flags(tiny_world, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
            f"--tokenizer={tiny_world['tokenizer']}", f"--out={out}", *TINY, *extra]


def losses(out):
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    return [r["loss/train"] for r in rows if "loss/train" in r]


def test_tiny_run_trains_evaluates_and_saves(tiny_world, tmp_path):
    r = run_script("train_pretrain.py", *flags(tiny_world, tmp_path / "pt", "--max_steps=30", "--eval_every=10",
                                               "--facts_every=15"))
    assert r.returncode == 0, r.stderr
    assert "pretrain 30/30" in r.stdout and "fact completion" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "pt" / "log.jsonl").read_text().splitlines()]
    curve = [(row["step"], row["eval/facts"]) for row in rows if "eval/facts" in row]  # the facts curve
    assert [step for step, _ in curve] == [0, 15, 30] and all(0.0 <= v <= 1.0 for _, v in curve)
    metrics = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    assert metrics["val_loss"] < metrics["val_loss_init"] - 0.5  # it learned something
    assert 0.0 <= metrics["fact_accuracy"] <= 1.0
    ckpt = common.load_checkpoint(tmp_path / "pt" / "ckpt.pt", ["pretrain"])
    assert ckpt["step"] == 30 and ckpt["model_args"]["n_embd"] == 32


def test_ddp_two_processes_match_one(tiny_world, tmp_path):
    """Across the curriculum's end (step 2 of 4), with Muon: every rank draws the same windows and keeps its share."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--max_steps=4", "--eval_every=4", "--focus_steps=2", "--focus_cast=2"]
    assert run_script("train_pretrain.py", *flags(tiny_world, one, *extra)).returncode == 0
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_pretrain.py",
                   *flags(tiny_world, two, *extra), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


# ----------------------------------------------------------------------------- its row of the fault table (test_faults.py)

def fault_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
            f"--tokenizer={fx.tiny_world['tokenizer']}", f"--out={out}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=4", "--eval_batches=2", "--eval_facts=false"]


# Each case is (fixtures, a directory of its own) -> Case; the directory holds the files it makes.
PRETRAIN_CASES = {
    "a missing corpus": lambda fx, tmp: Case(
        [f"--data={tmp / 'none.txt'}"], str(tmp / "none.txt"), "run `python -m data.tinyworld`"),
    "a missing validation corpus": lambda fx, tmp: Case(
        [f"--val_data={tmp / 'none.txt'}"], str(tmp / "none.txt"), "run `python -m data.tinyworld`"),
    "an empty corpus": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'empty.txt', '')}"], str(tmp / "empty.txt"), "has no text"),
    "a corpus that is not UTF-8": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.txt', b'A story.' + bytes([10, 10, 0xFF]))}"],
        str(tmp / "bad.txt"), "is not UTF-8 text (byte 10)"),
    "a corpus shorter than one window": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'short.txt', 'A story.')}"],
        str(tmp / "short.txt"), "fewer than one window"),
    "a JSONL file given as the corpus": wrong_file("data", "sft_train.jsonl", "not text"),
    "fact evaluation on a corpus without a TinyWorld": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'stories.txt', 'A story.')}", "--eval_facts=true"], str(tmp), "--eval_facts=false"),
    "a missing tokenizer": lambda fx, tmp: Case(
        [f"--tokenizer={tmp / 'none'}"], str(tmp / "none"), "python -m data.tokenizer"),
    "a block size beyond the --init model's context": lambda fx, tmp: Case(
        [f"--init={fx.tiny_pretrained}", "--block_size=256"], None, "--block_size=256"),
    "a dropout of 1": lambda fx, tmp: Case(["--dropout=1"], None, "--dropout is a probability below 1"),
    "no attention heads": lambda fx, tmp: Case(["--n_head=0"], None, "--n_head must be a positive number"),
}


FAULTS = Script("train_pretrain.py", fault_flags, init="tiny_pretrained", wrong_stage="sft", cases=PRETRAIN_CASES)


def test_facts_arrival_finds_where_the_curve_first_crosses_each_level():
    log = [{"step": 0, "loss/val": 7.0}] + [{"step": s, "eval/facts": v} for s, v in
                                            [(0, 0.0), (50, 0.02), (100, 0.3), (150, 0.6), (200, 0.45), (250, 0.95)]]
    assert measures.facts_arrival(log) == ({0.1: 100, 0.5: 150, 0.9: 250}, 0.95)  # the first crossing, not a later one
    assert measures.facts_arrival(log[:4]) == ({0.1: 100, 0.5: None, 0.9: None}, 0.3)
    said = measures.describe_facts_arrival(log[:4])
    assert "10% at step 100" in said and "never 50% or 90%" in said and "ends at 30%" in said
    assert "no facts curve" in measures.describe_facts_arrival([{"step": 1, "loss/train": 2.0}])


# ----------------------------------------------------------------------------- the curriculum, the schedule, Muon

def test_the_curriculum_draws_from_the_focus_cast_then_from_everyone(tiny_world, tmp_path):
    import re

    import configs
    import loaders
    from data import tinyworld
    from data.tokenizer import load_tokenizer
    from train_pretrain import focus_starts, get_batch
    tok, world = load_tokenizer(tiny_world["tokenizer"]), tinyworld.load_world(tiny_world["data"])
    data = loaders.tokenize_to_memmap(tiny_world["data"] / "corpus_train.txt", tok, cache_dir=tmp_path)
    cfg = configs.Pretrain(focus_cast=2, block_size=32)
    allowed = focus_starts(data, tok, world, cfg)
    names = [c.name for c in world.characters]
    pattern = re.compile(r"\b(" + "|".join(names) + r")\b")
    ends = [int(e) for e in (data == tok.eot_id).nonzero()[0]]

    def document(i):  # the text of the document that token i is in
        end = next(e for e in ends if e >= i)
        start = max([e + 1 for e in ends if e < i], default=0)
        return tok.decode(data[start:end].tolist())

    def named(starts):
        return set().union(*(pattern.findall(document(int(s))) for s in starts))

    def draw(seed, allowed, steps):
        gen = torch.Generator().manual_seed(seed)
        return [get_batch(data, 8, 32, gen, 0, 1, allowed) for _ in range(steps)]

    assert 0 < len(allowed) < len(data) and named(allowed) == set(names[:2])  # only the focus cast's documents
    first, again = draw(0, allowed, 3), draw(0, allowed, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # the same seed, the same windows
    windows = torch.cat([x for x, _ in draw(0, None, 60)])  # after the curriculum: every window of the corpus
    seen = set(pattern.findall(" ".join(tok.decode(w.tolist()) for w in windows)))
    assert seen == set(names)  # every character, by the end


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_is_exact_across_the_curriculum_and_the_schedule(tiny_world, tmp_path, optimizer):
    """Stopped at step 3 and resumed: the same losses and weights as one run, across the end of the
    curriculum (step 4) and the start of the learning rate's decay (step 6 of 8), with Muon's momentum."""
    extra = ["--max_steps=8", "--eval_every=4", "--focus_steps=4", "--focus_cast=2", "--schedule=wsd",
             "--cooldown=0.25", f"--optimizer={optimizer}", "--facts_every=0"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert run_script("train_pretrain.py", *flags(tiny_world, whole, *extra)).returncode == 0
    r = run_script("train_pretrain.py", *flags(tiny_world, halves, *extra, "--stop_at=3"))
    assert r.returncode == 0, r.stderr
    r = run_script("train_pretrain.py", *flags(tiny_world, halves, *extra, "--resume"))
    assert r.returncode == 0, r.stderr
    assert losses(halves) == losses(whole) and len(losses(whole)) == 8
    a, b = (common.load_checkpoint(d / "ckpt.pt", ["pretrain"]) for d in (whole, halves))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
