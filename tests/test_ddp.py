"""Every post-training stage under torchrun with two processes on the CPU (gloo), at tiny size: it runs,
logs every step once and writes a checkpoint that loads. Where the stage is deterministic (SFT, the reward
model, DPO: each rank takes its share of the same batch), two processes follow one process's loss
curve; PPO and GRPO sample their own replies on each rank, so theirs differ. (Pre-training's test is in
test_pretrain.py.)"""
import json
import re

import pytest
import torch

import common
from conftest import run_script

STEPS = 4


def flags(stage, fx, out):
    d, sft = fx["world"]["data"], fx["sft"]
    return {
        "sft": [f"--data={d / 'sft_train.jsonl'}", f"--init={fx['pretrained']}", "--qa_data=",
                f"--replay_data={d / 'corpus_train.txt'}", "--replay_batch=2", "--batch_size=4"],
        "rm": [f"--data={d / 'prefs_train.jsonl'}", f"--init={sft}", "--test_data=", "--world=", "--batch_size=4",
               "--zero_prompts=0", "--best_of=0"],
        "dpo": [f"--data={d / 'prefs_train.jsonl'}", f"--init={sft}", "--test_data=", "--qa_data=", "--world=",
                "--batch_size=4", f"--replay_data={d / 'corpus_train.txt'}", "--replay_batch=2"],
        "ppo": [f"--data={d / 'prefs_train.jsonl'}", f"--init={sft}", f"--reward_model={fx['rm']}", "--test_data=",
                "--qa_data=", f"--world={d}", "--batch_size=4", "--minibatch_size=2", "--max_new_tokens=8"],
        "grpo": [f"--data={d / 'math_train.jsonl'}", f"--init={sft}", "--test_data=", f"--world={d}",
                 "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--micro_batch=2"],
    }[stage] + [f"--out={out}", f"--max_steps={STEPS}", f"--eval_every={STEPS}", "--warmup_steps=1", "--device=cpu"]


CURVE = {"sft": "loss/train", "rm": "loss/train", "dpo": "loss/train", "ppo": "rollout/score", "grpo": "loss/policy"}


def curve(stage, out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[CURVE[stage]]) for r in rows if CURVE[stage] in r]


def torchrun(stage, fx, out, *extra):
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"train_{stage}.py",
                   *flags(stage, fx, out), *extra, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo"])  # PPO: the resume test below
def test_two_processes_run_every_stage(stage, tiny_world, tiny_pretrained, tiny_sft, tiny_rm, tmp_path):
    fx = {"world": tiny_world, "pretrained": tiny_pretrained, "sft": tiny_sft, "rm": tiny_rm}
    one, two = tmp_path / "one", tmp_path / "two"
    single = {"OMP_NUM_THREADS": "1"}
    torchrun(stage, fx, two)
    assert [step for step, _ in curve(stage, two)] == list(range(1, STEPS + 1))  # each step logged once
    assert common.load_checkpoint(two / "ckpt.pt", [stage])["step"] == STEPS
    if stage in ("sft", "rm", "dpo"):  # deterministic: the same curve as one process
        r = run_script(f"train_{stage}.py", *flags(stage, fx, one), env=single)
        assert r.returncode == 0, r.stderr
        assert [v for _, v in curve(stage, two)] == pytest.approx([v for _, v in curve(stage, one)], rel=1e-4)


def test_a_lora_dpo_run_in_two_processes_equals_one(tiny_world, tiny_pretrained, tiny_sft, tiny_rm, tmp_path):
    """Adapters only, and the reference the policy with its adapters off: DDP averages the adapters'
    gradients alone, and the two processes follow one process's curve."""
    fx = {"world": tiny_world, "pretrained": tiny_pretrained, "sft": tiny_sft, "rm": tiny_rm}
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun("dpo", fx, two, "--lora_rank=2")
    r = run_script("train_dpo.py", *flags("dpo", fx, one), "--lora_rank=2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "lora" in common.load_checkpoint(two / "ckpt.pt", ["dpo"])
    assert [v for _, v in curve("dpo", two)] == pytest.approx([v for _, v in curve("dpo", one)], rel=1e-4)


def test_two_processes_resume_exactly_each_rank_with_its_own_random_state(tiny_world, tiny_pretrained, tiny_sft,
                                                                       tiny_rm, tmp_path):
    """PPO samples other replies on each rank (seed + rank): stopped at step 2 and resumed, two processes
    end with the scores, losses and weights of a run never stopped, which they do only if each rank got
    its own random state back, not rank 0's. (The fault table resumes every stage in one process.)"""
    fx = {"world": tiny_world, "pretrained": tiny_pretrained, "sft": tiny_sft, "rm": tiny_rm}
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    torchrun("ppo", fx, whole)
    torchrun("ppo", fx, halves, f"--stop_at={STEPS // 2}")
    first = common.load_checkpoint(halves / "ckpt.pt", ["ppo"])
    assert first["step"] == STEPS // 2 and first["train_seconds"] > 0
    torchrun("ppo", fx, halves, "--resume")
    # the seconds of training count both runs: the first half's, kept in its checkpoint, and the second's
    assert json.loads((halves / "metrics.json").read_text())["train_seconds"] > first["train_seconds"]
    rows = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (whole, halves)]
    assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1))  # each step logged once
    keys = ("rollout/score", "rollout/kl", "loss/policy", "loss/value")
    assert [[r[k] for k in keys] for r in rows[1]] == [[r[k] for k in keys] for r in rows[0]]
    ckpts = [common.load_checkpoint(out / "ckpt.pt", ["ppo"]) for out in (whole, halves)]
    assert ckpts[0]["step"] == ckpts[1]["step"] == STEPS
    assert all(torch.equal(ckpts[0]["model"][k], ckpts[1]["model"][k]) for k in ckpts[0]["model"])


def times(stdout, what):
    """{rank: time} from the worker's "rank R <what> at T" lines. The two ranks share one pipe, and a
    line's end can come after the other rank's next line, so the lines are found in the whole text."""
    return {rank: float(t) for rank, t in re.findall(rf"rank (\d) {what} at (\d+\.\d{{6}})", stdout)}


def run_exit_worker(*flags):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/ddp_exit.py",
                      *flags, env={"OMP_NUM_THREADS": "1"}, timeout=120)


def test_a_run_ends_cleanly_while_a_gloo_worker_still_frees_the_last_collectives_tensor():
    """The flake's cause, made certain: a gloo worker thread still freeing the last collective's tensor
    as the process ends. Before cli.leave, Python's shutdown ended that thread mid-free and the process
    aborted (SIGABRT, "terminate called without an active exception"); now each rank exits 0."""
    r = run_exit_worker("--ending=done")
    assert r.returncode == 0, r.stderr
    assert "terminate called" not in r.stderr
    assert sorted(times(r.stdout, "left")) == ["0", "1"]


def test_a_user_error_under_torchrun_keeps_its_exit_code_and_its_line():
    """A mistake found on every rank (a non-finite loss, say) ends each with code 2 and its one line,
    not an abort, even with a gloo worker thread still busy."""
    r = run_exit_worker("--ending=error")
    assert r.returncode != 0 and "terminate called" not in r.stderr and "SIGABRT" not in r.stderr, r.stderr
    assert "exitcode  : 2" in r.stderr
    # the first rank to fail ends the run: torchrun stops the other, which may not have said its line yet
    assert re.search(r"error: rank [01] stopped on purpose", r.stderr), r.stderr


def test_no_rank_leaves_the_process_group_before_the_others_reach_it():
    """Rank 0 works a second longer than rank 1 (as it evaluates alone after training): rank 1 leaves only
    once rank 0 has reached the teardown too."""
    r = run_exit_worker("--ending=done", "--alone=1.0")
    assert r.returncode == 0, r.stderr
    reached, left = times(r.stdout, "reached the teardown"), times(r.stdout, "left")
    assert left["1"] >= reached["0"] > reached["1"] + 0.5
