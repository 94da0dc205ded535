"""The whole journey at toy size: every stage chained through the checkpoints the previous one wrote,
laid out as `make demo` lays them out, then report.py over all of them."""
import json

from conftest import run_script


def test_every_stage_chains_into_the_next_and_the_report_reads_them_all(tiny_world, tmp_path):
    d, out = tiny_world["data"], tmp_path / "out"
    small = ["--batch_size=4", "--warmup_steps=1", "--log_every=1"]
    stages = [
        ("train_pretrain.py", f"--data={d / 'corpus_train.txt'}", f"--val_data={d / 'corpus_val.txt'}",
         f"--tokenizer={tiny_world['tokenizer']}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_steps=3",
         "--eval_every=3", "--eval_batches=1", "--eval_facts=false", *small),
        ("train_sft.py", f"--data={d / 'sft_train.jsonl'}", "--qa_data=", "--replay_data=", "--max_steps=2", *small),
        ("train_rm.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--world=", "--max_steps=2", "--zero_prompts=4",
         "--max_new_tokens=8", *small),
        ("train_ppo.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=", "--max_steps=2",
         "--minibatch_size=2", "--ppo_epochs=1", "--max_new_tokens=8", *small),
        ("train_dpo.py", f"--data={d / 'prefs_train.jsonl'}", "--test_data=", "--qa_data=", "--world=",
         "--max_steps=2", *small),
        ("train_grpo.py", f"--data={d / 'math_train.jsonl'}", f"--test_data={d / 'math_test.jsonl'}",
         "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--pass_k=2", "--test_limit=2",
         "--max_steps=2", "--log_every=1"),
    ]
    for script, *flags in stages:
        stage = script[len("train_"):-len(".py")]
        chain = {"train_sft.py": f"--init={out / 'pretrain' / 'ckpt.pt'}",
                 "train_rm.py": f"--init={out / 'sft' / 'ckpt.pt'}",
                 "train_ppo.py": f"--init={out / 'sft' / 'ckpt.pt'} --reward_model={out / 'rm' / 'ckpt.pt'}",
                 "train_dpo.py": f"--init={out / 'sft' / 'ckpt.pt'}",
                 "train_grpo.py": f"--init={out / 'ppo' / 'ckpt.pt'}"}.get(script, "").split()
        r = run_script(script, *flags, *chain, f"--out={out / stage}")
        assert r.returncode == 0, (script, r.stderr[-2000:])
        ckpt_file = out / stage / "ckpt.pt"
        assert ckpt_file.is_file() and (out / stage / "metrics.json").is_file(), script

    r = run_script("report.py", f"--out={out}", f"--data={d}", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "report.md").read_text()
    for row in ("0 random init", "1 pre-trained", "2 SFT", "3 reward model", "3 PPO", "3 DPO", "4 GRPO"):
        assert f"| {row} |" in report, row
    assert "What is an LLM?" in report and "report-ppo.png" in report
    assert json.loads((out / "grpo" / "metrics.json").read_text())  # written, and valid JSON
