"""hacking.py (make hacking) end to end at toy size: two reward models, the five PPO runs, the table, the
figure and the most rewarded replies; and its one-line mistakes."""
import json

from conftest import error_line, run_script


def test_the_five_runs_their_table_figure_and_replies(tiny_world, tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "hacking"
    r = run_script("-m", "studies.hacking", f"--init={tiny_sft}", f"--reward_model={tiny_rm}", f"--data={tiny_world['data']}",
                   f"--out={out}", "--preset=smoke", "--reward_models=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    results = json.loads((out / "hacking.json").read_text())
    assert list(results) == ["no_kl", "kl", "ens_min", "ens_mstd", "ens_diverse"]
    for name, run in results.items():
        assert run["gold_peak"] >= max(run["gold_start"], run["gold_end"]) and run["steps"] == 2
        assert len(run["top"]) == 3 and all({"question", "reply", "learned", "gold"} <= set(t) for t in run["top"])
        assert [t["learned"] for t in run["top"]] == sorted((t["learned"] for t in run["top"]), reverse=True)
    configs = {name: json.loads((out / name / "metrics.json").read_text()) for name in results}
    ckpt_flags = lambda name: __import__("torch").load(out / name / "ckpt.pt", weights_only=True)["config"]
    assert ckpt_flags("no_kl")["kl_coef"] == 0 and ckpt_flags("kl")["kl_coef"] > 0
    assert ckpt_flags("ens_min")["reward_model"].count(",") == 1 and ckpt_flags("ens_min")["ensemble"] == "min"
    assert ckpt_flags("ens_mstd")["ensemble"] == "mean_std" and ckpt_flags("ens_mstd")["kl_coef"] == 0
    assert ckpt_flags("ens_diverse")["reward_model"] == f"{out / 'rm_0' / 'ckpt.pt'},{tiny_rm}"
    assert all("qa_ppo" in m for m in configs.values())
    md = (out / "hacking.md").read_text()
    assert "no KL penalty" in md and "k diverse: their minimum" in md and (out / "hacking.png").stat().st_size > 10_000


def test_mistakes_are_one_line(tmp_path):
    r = run_script("-m", "studies.hacking", f"--init={tmp_path / 'none.pt'}", f"--out={tmp_path}")
    assert "no checkpoint at" in error_line(r) and "make demo" in error_line(r)
