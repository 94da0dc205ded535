"""Every figure of the demo on several seeds, side by side, with the worst and the middle of them.

    make seeds                          # SEEDS="0 1 2": the demo once per seed, then this
    python -m studies.seeds --seeds="0 1 2" # reads out/seeds/<N>/report.json, writes out/seeds.md

A figure that one run shows may be luck: another world (SEED=N draws TinyWorld N and seeds every stage
with 1337 + N) can land elsewhere. `make seeds` keeps each seed's report (report.md, report.json, the
figures, each stage's metrics.json and log.jsonl) in out/seeds/<N>/; this reads their report.json
(report.py writes it) and writes one row per figure, one column per seed, then the minimum and the
median: the README's across-seeds table comes from here, not from notes.
"""
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import cli
from cli import UserError
from data import write_atomic

SKIP = {"seed", "machine"}  # what describes a run rather than measures it; the machine is printed once


@dataclass
class Config:
    seeds: str = "0 1 2"               # the seeds whose reports to read, separated by spaces
    dir: str = "out/seeds"             # each seed's report is in <dir>/<seed>/report.json
    out: str = "out/seeds.md"          # the table


def flatten(value, path=()):
    """(("stages", "2 SFT", "seen"), 0.98), ...: every number of a report.json with the keys leading to it."""
    if isinstance(value, dict):
        for key, v in value.items():
            if not (path == () and key in SKIP):
                yield from flatten(v, path + (str(key),))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def fmt(value):
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def table(reports):
    """Markdown lines: a row per figure (in the first report's order, then any the others add), a column
    per seed, the minimum and the median of the seeds that have it."""
    columns = {seed: dict(flatten(r)) for seed, r in reports.items()}
    rows = list(dict.fromkeys(path for figures in columns.values() for path in figures))
    lines = ["| figure | " + " | ".join(f"seed {s}" for s in columns) + " | min | median |",
             "|---|" + "---:|" * (len(columns) + 2)]
    for path in rows:
        values = [columns[s].get(path) for s in columns]
        have = [v for v in values if v is not None]
        cells = ["" if v is None else fmt(v) for v in values] + [fmt(min(have)), fmt(statistics.median(have))]
        lines.append(f"| {' / '.join(path)} | " + " | ".join(cells) + " |")
    return lines


def pct(x):
    return "" if x is None else f"{x:.1%}"


def headline(r):
    """The README's across-seeds columns, from one report.json."""
    st = r.get("stages", {})
    get = lambda stage, key: (st.get(stage) or {}).get(key)  # noqa: E731
    before, after = (r.get("grpo") or {}).get("before") or {}, (r.get("grpo") or {}).get("after") or {}
    k = next((key for key in after if key.startswith("pass@") and key != "pass@1"), None)
    grpo = (f"{pct(before.get('pass@1'))} -> {pct(after.get('pass@1'))}" +
            (f" ({pct(before.get(k))} -> {pct(after.get(k))})" if k else "")) if after else ""
    return [pct(get("1 pre-trained", "facts")),
            f"{pct(get('2 SFT', 'seen'))} / {pct(get('2 SFT', 'unseen'))}",
            ", ".join(pct(get("3 reward model", key)) for key in ("rm_acc", "rm_style", "rm_facts", "rm_facts_unseen")),
            f"{pct(get('3 PPO', 'win'))}, {pct(get('3 PPO', 'seen'))} / {pct(get('3 PPO', 'unseen'))}",
            grpo, f"{((r.get('stage_seconds') or {}).get('pretrain') or {}).get('training', 0):.0f}, "
                  f"{sum((v or {}).get('training', 0) for v in (r.get('stage_seconds') or {}).values()):.0f}"]


HEADLINE = ["seed", "facts", "SFT QA seen / unseen", "RM: all, manner, facts, unseen characters",
            "PPO: wins, QA seen / unseen", "GRPO pass@1 (pass@k), before -> after",
            "training s: pre-training, all stages"]


def main(cfg):
    seeds = cfg.seeds.split()
    if not seeds:
        raise UserError("--seeds is empty: give one or more seeds, e.g. --seeds=\"0 1 2\"")
    reports = {}
    for seed in seeds:
        path = Path(cfg.dir) / seed / "report.json"
        if not path.is_file():
            raise UserError(f"no report for seed {seed} at {path}: run `make seeds SEEDS=\"{cfg.seeds}\"` "
                            f"(or `make demo SEED={seed}` and copy out/report.json there)")
        reports[seed] = json.loads(path.read_text())
    machines = sorted({r.get("machine", "?") for r in reports.values()})
    lines = [f"# Every figure on seeds {', '.join(seeds)}", "",
             "Each seed is a TinyWorld of its own and its own initialisations (`make demo SEED=N`); each seed's "
             f"report is in {cfg.dir}/<seed>/report.md. Fractions are shares (0.95 = 95%); seconds are on "
             f"{' and '.join(machines)}.", "",
             "| " + " | ".join(HEADLINE) + " |", "|---" * len(HEADLINE) + "|",
             *(f"| {seed} | " + " | ".join(headline(r)) + " |" for seed, r in reports.items()), "",
             "Every figure:", "", *table(reports), ""]
    write_atomic(cfg.out, "\n".join(lines))
    print(f"seeds: every figure on {len(seeds)} seeds in {cfg.out}")


if __name__ == "__main__":
    cli.run_main(main, Config)
