"""The whole journey at toy size: every stage chained through the checkpoints the previous one wrote,
laid out as `make demo` lays them out, then report.py over all of them. Pre-training, SFT and the
reward model are the session's tiny checkpoints (conftest.py), which chain the same way."""
import json
import shutil

from conftest import run_script


def test_every_stage_chains_into_the_next_and_the_report_reads_them_all(tiny_world, tiny_pretrained, tiny_sft,
                                                                        tiny_rm, tmp_path):
    d, out = tiny_world["data"], tmp_path / "out"
    for stage, ckpt in (("pretrain", tiny_pretrained), ("sft", tiny_sft), ("rm", tiny_rm)):
        shutil.copytree(ckpt.parent, out / stage)
    small = ["--warmup_steps=1", "--log_every=1", "--max_steps=2"]
    stages = [
        ("train_ppo.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=",
         "--batch_size=4", "--minibatch_size=2", "--ppo_epochs=1", "--max_new_tokens=8",
         f"--init={out / 'sft' / 'ckpt.pt'}", f"--reward_model={out / 'rm' / 'ckpt.pt'}", *small),
        ("train_dpo.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=",
         "--batch_size=4", f"--init={out / 'sft' / 'ckpt.pt'}", *small),
        ("train_grpo.py", f"--data={d / 'math_train.jsonl'}", f"--test_data={d / 'math_test.jsonl'}", f"--world={d}",
         "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--pass_k=2", "--test_limit=2",
         f"--init={out / 'ppo' / 'ckpt.pt'}", *small),
    ]
    for script, *flags in stages:
        stage = script[len("train_"):-len(".py")]
        r = run_script(script, *flags, f"--out={out / stage}")
        assert r.returncode == 0, (script, r.stderr[-2000:])
        assert (out / stage / "ckpt.pt").is_file() and (out / stage / "metrics.json").is_file(), script

    r = run_script("report.py", f"--out={out}", f"--data={d}", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "report.md").read_text()
    for row in ("0 random init", "1 pre-trained", "2 SFT", "3 reward model", "3 PPO", "3 DPO", "4 GRPO"):
        assert f"| {row} |" in report, row
    for stage in ("Pre-training", "SFT", "The reward model", "PPO", "DPO", "GRPO"):  # a sentence each, measured
        line = next(line for line in report.splitlines() if line.startswith(f"- **{stage}**"))
        assert "?" not in line.replace("?)", ""), line
    assert "(PPO, where it started)" in report  # GRPO's --init above
    assert "| worked step by step |" in report  # the reasoning table: answers that write steps, per stage
    sft_row = next(line for line in report.splitlines() if line.startswith("| 2 SFT | ") and "%, " in line)
    assert 0 <= int(sft_row.rstrip(" |").rsplit("| ", 1)[1].rstrip("%")) <= 100, sft_row
    assert "What is an LLM?" in report and "report-ppo.png" in report and (out / "report-ppo.png").is_file()
    assert json.loads((out / "grpo" / "metrics.json").read_text())["steps"] == 2
