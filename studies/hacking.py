"""Reward hacking, seen and prevented: PPO against a weak reward model, without and with its KL penalty,
and against an ensemble of reward models, each run scored by TinyWorld's gold rater as it trains.

    make hacking                       # after the demo's SFT: writes out/hacking/ (SEED=N: world N)
    python -m studies.hacking --init=out/sft/ckpt.pt --out=out/hacking
    make hacking PRESET=smoke          # the plumbing at toy size

The weak reward model is the field's usual one: a head on the last token (train_rm.py --head_only), from
the same SFT model and the same pairs as the demo's. It learns the gold rater's taste for manner (polite,
concise) but not its facts: it orders pairs where one reply is wrong no better than a coin toss, as
reward models that prefer a confident style to a correct answer do. PPO then runs four times, each
with the same budget from the same SFT policy:
  1. no_kl:    against it, without the KL penalty (--kl_coef=0): the pitfall;
  2. kl:       against it, with the default KL penalty: remedy one;
  3. ens_min:  without KL, against k such reward models (other seeds: other heads' starts and data
               orders), paid the minimum of their scores: remedy two;
  4. ens_mstd: the same, paid their mean less their spread (train_ppo.conservative_score);
  5. ens_diverse: the same minimum, one of the k swapped for the demo's reward model, whose score also
               reads how much each reply token surprises the trunk (model.RewardModel): an ensemble whose
               members differ in what they can check, not only in their seeds.
Each run's log holds the learned score (what PPO maximises) and the gold rater's score of the same
rollouts, step by step; hacking.json and hacking.md hold, per run, the gold score at its peak and at
the end (means over blocks of steps), the learned score's rise, the KL travelled, and the replies the
learned reward paid most for; hacking.png draws the two scores per run.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import common
import measures
from data import read_jsonl, tinyworld, write_atomic
from data.batches import score_replies
from data.tokenizer import load_tokenizer
from train_ppo import conservative_score

RUNS = {  # name -> (PPO's extra flags, its reward models, what the table calls it)
    "no_kl": (["--kl_coef=0"], "one", "no KL penalty"),
    "kl": ([], "one", "the default KL penalty"),
    "ens_min": (["--kl_coef=0", "--ensemble=min"], "alike", "no KL, k alike: their minimum"),
    "ens_mstd": (["--kl_coef=0", "--ensemble=mean_std"], "alike", "no KL, k alike: mean - spread"),
    "ens_diverse": (["--kl_coef=0", "--ensemble=min"], "diverse", "no KL, k diverse: their minimum"),
}


@dataclass
class Config:
    init: str = "out/sft/ckpt.pt"      # the SFT checkpoint: every reward model's and policy's start
    data: str = "data/tinyworld"       # TinyWorld: preference pairs, prompts, the gold rater
    out: str = "out/hacking"           # each run in its own folder here, then hacking.md, .json and .png
    reward_model: str = "out/rm/ckpt.pt"  # the demo's reward model: the diverse ensemble's other kind of member
    reward_models: int = 3             # k: the ensembles' size (the first is the single runs' reward model)
    steps: int = 40                    # PPO steps of each run
    block: int = 10                    # steps per block: the gold score's peak and end are block means
    seed: int = 1337                   # the first reward model's and every PPO run's seed; member i takes seed + i
    stages_preset: str = ""            # a preset each stage script runs with (--preset=smoke sets smoke: toy size)


PRESETS = {"smoke": dict(stages_preset="smoke", block=1)}  # the plumbing only: each stage at toy size


def blocks(rows, key, size):
    """Means of key over consecutive blocks of `size` steps (the last block may be shorter)."""
    values = [r[key] for r in rows if key in r]
    return [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]


def summary(log_path, size):
    """The run's curve, reduced: gold at its peak block and at the end, the learned score at the same two
    blocks, and the KL per reply at the end."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    rows = [r for r in rows if "rollout/gold" in r]
    gold, score, kl = (blocks(rows, k, size) for k in ("rollout/gold", "rollout/score", "rollout/kl"))
    peak = max(range(len(gold)), key=gold.__getitem__)
    return {"gold_start": gold[0], "gold_peak": gold[peak], "gold_end": gold[-1], "gold_drop": gold[peak] - gold[-1],
            "score_start": score[0], "score_at_peak": score[peak], "score_end": score[-1], "kl_end": kl[-1],
            "peak_step": rows[min(peak * size, len(rows) - 1)]["step"], "steps": rows[-1]["step"]}


def main(cfg):
    smoke = [f"--preset={cfg.stages_preset}"] if cfg.stages_preset else []
    cli.require_positive(cfg, "reward_models", "steps", "block")
    common.load_checkpoint(cfg.init, ["sft"], made_by="make demo")  # fail now, not after the first run
    common.load_checkpoint(cfg.reward_model, ["rm"], made_by="make demo")
    out, data = Path(cfg.out), Path(cfg.data)
    cli.check_writable(out)
    rms = []
    for i in range(cfg.reward_models):
        rm = out / f"rm_{i}"
        cli.script("hacking", "train_rm.py", f"--init={cfg.init}", f"--out={rm}", f"--data={data / 'prefs_train.jsonl'}",
                   f"--test_data={data / 'prefs_test.jsonl'}", f"--world={data}", "--head_only", "--best_of=0",
                   f"--seed={cfg.seed + i}", *smoke)
        rms.append(rm / "ckpt.pt")
    results = {}
    members = {"one": rms[:1], "alike": rms, "diverse": rms[:-1] + [Path(cfg.reward_model)]}
    for name, (flags, kind, _) in RUNS.items():
        run = out / name
        cli.script("hacking", "train_ppo.py", f"--init={cfg.init}", f"--reward_model={','.join(map(str, members[kind]))}",
               f"--out={run}", f"--data={data / 'prefs_train.jsonl'}", "--test_data=", f"--qa_data={data / 'sft_test.jsonl'}",
               f"--world={data}", f"--seed={cfg.seed}", *flags, *(smoke or [f"--max_steps={cfg.steps}", f"--eval_every={cfg.steps}"]))
        results[name] = summary(run / "log.jsonl", cfg.block)
        results[name]["qa"] = json.loads((run / "metrics.json").read_text()).get("qa_ppo")
        results[name]["top"] = most_rewarded(run, members[kind], flags, data, cfg.seed)
    write_atomic(out / "hacking.json", json.dumps(results, indent=1))
    plot(out, cfg.block)
    md = table(results) + "\n\n" + replies(results)
    write_atomic(out / "hacking.md", md + "\n")
    print("\n" + md + f"\n\nhacking: {out / 'hacking.md'}, {out / 'hacking.json'} and {out / 'hacking.png'}")


@torch.no_grad()
def most_rewarded(run, rms, flags, data, seed, n=3):
    """The final policy's replies that the reward it was trained on pays most for: one reply sampled at
    temperature 1 (as PPO samples) per held-out question, scored as in training; the n best, each with
    its learned score and the gold rater's."""
    ckpt = common.load_checkpoint(run / "ckpt.pt", ["ppo"])
    tok = load_tokenizer(ckpt["tokenizer"])
    policy = common.gpt_from_checkpoint(ckpt, tok).eval()
    models = [common.gpt_from_checkpoint(common.load_checkpoint(p, ["rm"]), tok, reward=True).eval() for p in rms]
    questions = sorted({r["prompt"] for r in read_jsonl(data / "prefs_test.jsonl")})
    prompts, outs, texts = measures.chat_replies(policy, tok, questions, ckpt["config"]["max_new_tokens"], temperature=1.0,
                                                 generator=torch.Generator().manual_seed(seed))
    how = next((f.split("=")[1] for f in flags if f.startswith("--ensemble=")), "min")
    scores = conservative_score(torch.stack([score_replies(m, prompts, outs)[0] for m in models]), how)
    world = tinyworld.load_world(data)
    best = scores.argsort(descending=True)[:n].tolist()
    return [{"question": questions[i], "reply": texts[i], "learned": scores[i].item(),
             "gold": tinyworld.gold_score(questions[i], texts[i], world)} for i in best]


def plot(out, size):
    """hacking.png: the learned score and the gold rater's per step (means over blocks), a line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for name, (_, _, label) in RUNS.items():
        rows = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "rollout/gold" in r]
        steps = [rows[min(i + size, len(rows)) - 1]["step"] for i in range(0, len(rows), size)]
        for ax, key in zip(axes, ("rollout/score", "rollout/gold")):
            ax.plot(steps, blocks(rows, key, size), marker="o", label=label)
    axes[0].set_title("learned score (what PPO maximises)")
    axes[1].set_title("gold rater's score (the truth)")
    for ax in axes:
        ax.set_xlabel(f"PPO step (means over {size} steps)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hacking.png", dpi=110)
    plt.close(fig)


def table(results):
    lines = ["| run | gold: start -> peak -> end | gold's drop from its peak | learned score: start -> at gold's peak -> end "
             "| KL to SFT at the end | held-out QA right |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        qa = f"{r['qa']['accuracy']:.0%}" if r.get("qa") else ""
        lines.append(f"| {RUNS[name][2]} | {r['gold_start']:.2f} -> {r['gold_peak']:.2f} -> {r['gold_end']:.2f} | "
                     f"{r['gold_drop']:.2f} | {r['score_start']:.2f} -> {r['score_at_peak']:.2f} -> {r['score_end']:.2f} | "
                     f"{r['kl_end']:.1f} | {qa} |")
    return "\n".join(lines)


def replies(results):
    """The replies each run's reward paid most for, quoted."""
    lines = ["The replies each final policy wrote that its own reward paid most for (one sampled reply per held-out "
             "question; learned score / gold score):", ""]
    for name, r in results.items():
        lines += [f"- {RUNS[name][2]}:"] + [f"  - \"{t['question']}\" -> \"{t['reply']}\" ({t['learned']:.2f} / {t['gold']:.2f})"
                                              for t in r["top"]]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
