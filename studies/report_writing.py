"""The report's writing: report.md (the table, what each stage did, reasoning by level, the same prompts
to every stage, the training curves) and report.json, from what studies/report.py measured."""
import json
import math
import os
import sys
import time

import measures
from data import read_jsonl

# the stages the report measures: (its label, its folder under out/); the random init has none
STAGES = [("0 random init", None), ("1 pre-trained", "pretrain"), ("2 SFT", "sft"), ("3 PPO", "ppo"),
          ("3 DPO", "dpo"), ("4 GRPO", "grpo")]
# the table's columns: (the key in a stage's measured row, its heading, its format)
COLUMNS = [("val_loss", "val loss", "{:.2f}"), ("facts", "facts", "{:.0%}"), ("seen", "QA seen", "{:.0%}"),
           ("unseen", "QA unseen", "{:.0%}"), ("format", "format", "{:.0%}"), ("win", "wins vs SFT", "{:.0%}"),
           ("math", "math", "{:.0%}"), ("steps", "steps right", "{:.0%}"), ("rm_acc", "RM accuracy", "{:.0%}"), ("kl", "KL to SFT", "{:.1f}"),
           ("seconds", "train s", "{:.0f}")]
# each stage's curves, by the names every stage logs (run.py's docstring lists them)
CURVES = {"pretrain": ["loss/train", "loss/val", "eval/facts"], "sft": ["loss/train", "loss/replay"],
          "rm": ["train/accuracy", "eval/accuracy"], "ppo": ["rollout/score", "rollout/gold", "rollout/kl"],
          "dpo": ["loss/train", "rewards/accuracy"], "grpo": ["rollout/reward", "rollout/accuracy"]}


def reasoning_table(rows, grpo_metrics, contrast):
    """Greedy pass@1 and steps right per level for the stages that write answers, the answers-only SFT
    contrast when it ran, and GRPO's own pass@k before and after (train_grpo.py's measure)."""
    labels = [l for l in rows if not l.startswith(("0", "1")) and rows[l].get("levels")]
    levels = sorted(next(iter(rows[l]["levels"] for l in labels), {}))
    if not levels:
        return []
    lines = ["| stage | " + " | ".join(f"level {lv}: pass@1, steps right" for lv in levels) + " | worked step by step |",
             "|---|" + "---|" * (len(levels) + 1)]
    for label, r in [(l, rows[l]) for l in labels] + ([("2 SFT, answers only (contrast)", contrast)] if contrast else []):
        cells = [f"{r['levels'][lv]['pass@1']:.0%}, {r['levels'][lv]['steps']:.0%}" for lv in levels]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['worked']:.0%} |")
    before, after = grpo_metrics.get("before"), grpo_metrics.get("after")
    if before and after:
        k = next(key for key in after if key.startswith("pass@") and key != "pass@1")
        measured = sorted(set(before.get("levels", {})) & set(after.get("levels", {})), key=int)  # JSON keys: "1", ...
        lines += ["", f"GRPO's own measure on its held-out problems (greedy pass@1, and {k}: solved by at least one "
                      f"of {k[5:]} answers sampled at temperature 1), before -> after:", "",
                  "| | " + " | ".join(f"level {lv}" for lv in measured) + " | all |",
                  "|---|" + "---|" * (len(measured) + 1)]
        for key in ("pass@1", k):
            cells = [f"{before['levels'][lv][key]:.0%} -> {after['levels'][lv][key]:.0%}" for lv in measured]
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {before[key]:.0%} -> {after[key]:.0%} |")
    return lines


def plot(log_path, names, title, png):
    """One stage's curves from its log.jsonl: each name that the log has, against the step. Returns the
    names it has not (a run without held-out data, say), so the report can say which are missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    missing = [n for n in names if not any(n in r for r in rows)]
    names = [n for n in names if n not in missing]
    if not names:
        return missing
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return missing


def cell(text):
    text = text if len(text) <= 300 else text[:300] + " ..."
    return text.replace("|", "\\|").replace("\n", "<br>") or "(nothing)"


def story(rows, vocab_size, grpo_from, grpo_metrics, rm_style_pairs=None):
    """What each stage changed, in a sentence each, from the measured rows (a stage not run is left out).
    grpo_from: the label of the stage whose checkpoint GRPO started from; grpo_metrics: its metrics.json;
    rm_style_pairs: measures.reward_accuracy's "style_pairs", to say where the reward model's manner errs."""
    def pct(label, key):
        v = rows.get(label, {}).get(key)
        return "?" if v is None else f"{v:.0%}"

    def num(label, key, fmt="{:.2f}"):
        v = rows.get(label, {}).get(key)
        return "?" if v is None else fmt.format(v)

    r, p, s = "0 random init", "1 pre-trained", "2 SFT"
    credit = (grpo_metrics.get("format_reward", 0.0), grpo_metrics.get("step_reward", 0.0))
    grpo, start = rows.get("4 GRPO", {}), rows.get(grpo_from, {})
    paid = grpo.get("worked", 0) > start.get("worked", 1) + 0.1 and grpo.get("math", 0) > start.get("math", 1)
    if any(credit):
        reward = (f"The reward is the final number plus partial credit (--format_reward={credit[0]}, "
                  f"--step_reward={credit[1]}).")
    else:
        reward = "The reward is the final number alone" + (
            ": nothing asked for the steps, yet working them out is what paid." if paid else ".")
    lines = {
        p: f"**Pre-training** (next-token prediction on the corpus): validation loss {num(r, 'val_loss')} -> "
           f"{num(p, 'val_loss')} (a uniform guess over {vocab_size:,} tokens scores ln {vocab_size} = "
           f"{math.log(vocab_size):.2f}); facts completed {pct(r, 'facts')} -> {pct(p, 'facts')}. It has never seen "
           f"the chat format: replies that end their turn {pct(p, 'format')}.",
        s: f"**SFT** (the loss on assistant replies only): replies that end their turn {pct(p, 'format')} -> "
           f"{pct(s, 'format')}; right answers about characters seen in SFT {pct(p, 'seen')} -> {pct(s, 'seen')}, "
           f"about unseen ones {pct(p, 'unseen')} -> {pct(s, 'unseen')} (their facts are only in the pre-training text). "
           f"Its set answers some reasoning problems step by step and others with the number alone; greedily it "
           f"works {pct(s, 'worked')} of the held-out ones step by step and solves {pct(s, 'math')}.",
        "3 reward model": f"**The reward model** (Bradley-Terry on preference pairs) orders "
                          f"{pct('3 reward model', 'rm_acc')} of held-out pairs as the gold rater does: "
                          f"{pct('3 reward model', 'rm_style')} of those where both replies are right and differ in "
                          f"manner, {pct('3 reward model', 'rm_facts')} of those where one of them is wrong about a "
                          f"character the training pairs mention, and {pct('3 reward model', 'rm_facts_unseen')} of "
                          "those about characters that no training pair mentions: there it can only check a reply "
                          "against what pre-training taught the trunk." + manner_mistakes(rm_style_pairs),
        "3 PPO": f"**PPO** (maximise the learned reward, minus a KL penalty to SFT): wins {pct('3 PPO', 'win')} "
                 f"against SFT by the gold rater, {num('3 PPO', 'kl', '{:.1f}')} nats per reply from SFT. Where "
                 "its replies in the journey below pick up habits, those are what the reward model scores highly, "
                 "whether or not the gold rater does.",
        "3 DPO": f"**DPO** (the same pairs, no reward model): wins {pct('3 DPO', 'win')} against SFT, "
                 f"{num('3 DPO', 'kl', '{:.1f}')} nats per reply from it.",
        "4 GRPO": f"**GRPO** (reinforce the sampled solutions a checker marks right): held-out problems solved "
                  f"greedily {pct(grpo_from, 'math')} ({grpo_from[2:]}, where it started) -> {pct('4 GRPO', 'math')}, "
                  f"answers that work the steps rather than give a number alone {pct(grpo_from, 'worked')} -> "
                  f"{pct('4 GRPO', 'worked')}, their steps stated right {pct(grpo_from, 'steps')} -> "
                  f"{pct('4 GRPO', 'steps')}. {reward} By level below.",
    }
    return [f"- {line}" for label, line in lines.items() if label in rows]


def manner_mistakes(style_pairs):
    """The end of the reward model's sentence: the pairs of styles it orders wrong, the worst share first
    ("" when it orders none wrong)."""
    wrong = sorted(((n - right) / n, k, n - right, n) for k, (right, n) in (style_pairs or {}).items() if right < n)
    if not wrong:
        return ""
    return (" Where it orders manner wrong, by the pair's styles (the better first): "
            + ", ".join(f"{k} {bad} of {n}" for _, k, bad, n in reversed(wrong)) + ".")


def write_report(out, base, models, found, machine, t0, cfg):
    """report.md (the table, what each stage did, reasoning by level, the journey, the curves) and
    report.json from what was measured; returns the table's lines."""
    rows, grpo_from, grpo = found["rows"], found["grpo_from"], models.get("4 GRPO", (None, {}))[1]
    order = [label for label, _ in STAGES[:3]] + ["3 reward model"] + [label for label, _ in STAGES[3:]]
    table = ["| stage | " + " | ".join(name for _, name, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for label in (l for l in order if l in rows):
        values = [fmt.format(rows[label][k]) if rows[label].get(k) is not None else "" for k, _, fmt in COLUMNS]
        table.append(f"| {label} | " + " | ".join(values) + " |")
    md = ["# The journey: from random weights to an assistant", "",
          f"Measured by `python -m studies.report` on {machine} in {time.time() - t0:.0f} s, from the checkpoints in "
          f"`{out}/`. Columns: validation loss on the corpus; greedy fact completion (all characters); held-out "
          "questions about characters seen in SFT and unseen (whose facts only pre-training supplied), and the share "
          "of replies that end with <|end|>; head-to-head wins against SFT by the gold rater (ties count half); "
          "held-out reasoning problems solved greedily, and the share of their steps stated right; the reward "
          "model's accuracy on held-out preference pairs; KL to SFT in nats per "
          "sampled reply; seconds of training.", "", *table, "", "## What each stage did", "",
          *story(rows, base["model_args"]["vocab_size"], grpo_from, grpo, found["rm_style_pairs"]), "",
          "## Reasoning, level by level", "",
          "Held-out problems about the characters' facts (level = how many characters a problem is about), greedy: "
          "the share solved and the share of their steps stated right (`tinymath.check_steps`), and the share of answers "
          "that write steps before `####` rather than the number alone. The contrast row, when present, is SFT with the "
          "same budget on the same set whose worked answers were cut to `#### n`: what writing the steps buys.", "",
          *reasoning_table(rows, grpo, found["contrast"]), "",
          f"The journey's problem below is {'the first held-out one GRPO solves and ' + grpo_from[2:] + ' did not' if found['newly'] else 'the first held-out one'}.", "",
          "## The same prompts, every stage", "", *found["journey"], "## Training curves", "",
          *figures(out, base, found["rm_metrics"]), *forgetting(out)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    write_results(out / "report.json", rows, found["contrast"], grpo, found["rm_metrics"], out, cfg,
                  machine, time.time() - t0)
    return table


def figures(out, base, rm_metrics):
    """The training curves (report-<stage>.png), the facts curve's account, best of n and make hacking's
    table and picture where they exist: Markdown lines."""
    lines = []
    for stage, names in CURVES.items():
        log = out / stage / "log.jsonl"
        missing = plot(log, names, f"{stage}: training curves", out / f"report-{stage}.png") if log.is_file() else names
        if len(missing) < len(names):
            lines += [f"![{stage}](report-{stage}.png)", ""]
        if missing:
            lines += [f"Not drawn for {stage}: {', '.join(missing)} ({log} has no such rows).", ""]
            print(f"report: {log} has no {', '.join(missing)}: not drawn", file=sys.stderr)
    if (out / "pretrain" / "log.jsonl").is_file():
        arrival = measures.describe_facts_arrival(read_jsonl(out / "pretrain" / "log.jsonl"))
        focus = base["config"].get("focus_steps", 0)
        curriculum = (f" Its first {focus} steps saw only the documents about {base['config']['focus_cast']} "
                      "characters (the curriculum): few characters met often make that circuit form sooner, and "
                      "once it has, every character's facts come through it." if focus else "")
        lines += [f"The facts curve (the pre-training panel's third): {arrival} The validation loss falls from "
                  "the first steps, while fact completion sits on a plateau, then jumps and most facts come at "
                  "once: the three phases Zucchet et al. (2025) describe, the jump coming once the model can "
                  f"recall a fact from a character's name.{curriculum}", ""]
    best = rm_metrics.get("best_of_n")
    if best and "gold" in best and (out / "rm" / "best_of_n.png").is_file():  # written by train_rm.py
        lines += [f"Best of n, the reward model's cheap use: sample n SFT replies per held-out question and keep "
                  f"the one it scores highest. From n = {best['n'][0]} to {best['n'][-1]} its own score of the kept "
                  f"reply goes {best['rm'][0]:.2f} -> {best['rm'][-1]:.2f}, the gold rater's {best['gold'][0]:.2f} -> "
                  f"{best['gold'][-1]:.2f}; where the gold curve flattens or turns down while the reward model's "
                  "still climbs, picking harder for the reward model picks its mistakes (over-optimisation, "
                  "without any RL).", "", "![best of n](rm/best_of_n.png)", ""]
    if (out / "hacking" / "hacking.md").is_file() and (out / "hacking" / "hacking.png").is_file():  # make hacking's
        lines += ["Reward hacking, seen and prevented (`make hacking`, studies/hacking.py): PPO against the field's "
                  "usual reward model (a head on the last token, which learns the rater's taste for manner but not its "
                  "facts), without its KL penalty, with it, and without it against an ensemble of such reward models; "
                  "the gold rater scores every rollout. Gold and learned scores are means over blocks of steps.", "",
                  (out / "hacking" / "hacking.md").read_text().strip(), "", "![reward hacking](hacking/hacking.png)", ""]
    return lines


def forgetting(out):
    """make forgetting's table (studies/forgetting.py), when it has run: what each way of fine-tuning gained and forgot."""
    md = out / "forgetting" / "forgetting.md"
    if not md.is_file():
        return []
    return ["## What each way of fine-tuning gains and forgets", "",
            "`make forgetting` (studies/forgetting.py) ran SFT, DPO and GRPO four ways from the same starts: every weight "
            "trained on the stage's loss alone; the same with the pre-training text replayed each step; LoRA at two "
            "ranks. Each block's first row is the stage's start: the stage's own measure should rise from it, and the "
            "others (validation loss on the pre-training text, facts, QA, wins, math) show what it kept.", "",
            md.read_text().strip(), ""]


def write_results(path, rows, contrast, grpo_metrics, rm_metrics, out, cfg, machine, seconds):
    """report.json: the report's figures for programs (make seeds reads it), unrounded: each stage's row of the
    table with its reasoning levels, the answers-only contrast, GRPO's own before and after, best of n, where
    pre-training's facts curve crossed 10/50/90%, each stage's seconds (metrics.json's), the report's own."""
    drop = lambda r: {k: v for k, v in (r or {}).items() if k != "solved"} or None  # per problem: report.md's
    log = out / "pretrain" / "log.jsonl"
    first, last = measures.facts_arrival(read_jsonl(log)) if log.is_file() else ({}, None)
    stage_seconds = {}
    for stage in ("pretrain", "sft", "sft_answers_only", "rm", "ppo", "dpo", "grpo"):
        if (out / stage / "metrics.json").is_file():
            stage_seconds[stage] = json.loads((out / stage / "metrics.json").read_text()).get("seconds")
    results = {"seed": cfg.seed, "machine": machine, "report_seconds": round(seconds, 1),
               "stages": {label: drop(r) for label, r in rows.items()}, "answers_only_sft": drop(contrast),
               "grpo": {k: drop(grpo_metrics.get(k)) for k in ("before", "after")},
               "best_of_n": rm_metrics.get("best_of_n"),
               "facts_curve": {"first_step": {f"{level:.0%}": step for level, step in first.items()}, "last": last},
               "stage_seconds": stage_seconds}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
