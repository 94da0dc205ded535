"""Where `make demo`'s time goes: each stage's start-up, training and evaluation, from its metrics.json.

Every stage times its phases (run.Logger): start-up is the process's imports, data and model until
its logger exists; training is the training loop (with the validations inside it); evaluation is the
measures before and after it. report.py is all start-up and evaluation; its own time is read from
out/report.md. No figure here is measured by this script: it reads what the last `make demo` wrote.

    python bench/demo_times.py        # this table alone; bench/speed.py puts it in bench/RESULTS.md
"""
import json
import re
import sys
from pathlib import Path

STAGES = ["pretrain", "sft", "sft_answers_only", "rm", "ppo", "dpo", "grpo"]


def bench_demo_times(device=None, out=Path("out")):
    rows, totals = [], {"start-up": 0.0, "training": 0.0, "evaluation": 0.0}
    for stage in STAGES:
        path = out / stage / "metrics.json"
        seconds = json.loads(path.read_text()).get("seconds") if path.is_file() else None
        if not seconds:
            continue
        for k in totals:
            totals[k] += seconds.get(k, 0.0)
        wall = sum(seconds.values())
        rows.append([stage] + [f"{seconds.get(k, 0.0):.0f}" for k in totals] + [f"{wall:.0f}",
                                                                              f"{seconds.get('evaluation', 0.0) / wall:.0%}"])
    report = out / "report.md"
    found = re.search(r"in (\d+) s, from", report.read_text()) if report.is_file() else None
    if found:
        rows.append(["report", "", "", found.group(1), found.group(1), "100%"])
        totals["evaluation"] += int(found.group(1))
    if not rows:
        return None
    wall = sum(totals.values())
    rows.append(["all"] + [f"{v:.0f} ({v / wall:.0%})" for v in totals.values()] + [f"{wall:.0f}", ""])
    title = (f"The demo's time per stage, seconds (from {out.name}/*/metrics.json of the last make demo; "
             f"the installation and TinyWorld's data and tokenizer are not counted)")
    return title, ["stage", "start-up", "training", "evaluation", "wall", "evaluation share"], rows


if __name__ == "__main__":
    section = bench_demo_times(out=Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out"))
    if section is None:
        print("error: no stage in that directory has timed phases yet: run make demo first", file=sys.stderr)
        sys.exit(2)
    title, header, rows = section
    print(title)
    for row in [header] + rows:
        print(" | ".join(row))
