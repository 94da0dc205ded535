"""Pre-training's time, the settings before the curriculum, Muon and the warmup-stable-decay schedule
against today's defaults, timed in turns on one machine.

    python bench/pretrain_budget.py                  # world 0, two pairs: about 10 minutes on 2 cores
    python bench/pretrain_budget.py --world=3 --pairs=3

Each run is a whole `train_pretrain.py` on the same TinyWorld and seed; the two settings take turns
(old, new, old, new, ...) so that whatever else the machine is doing falls on both alike. Per pair: the
training seconds (metrics.json's train_seconds: the loop, with the evaluations inside it), the ratio
new / old, and each run's fact completion. Writes bench/RESULTS-pretrain.md.
"""
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cli  # noqa: E402
from cli import UserError  # noqa: E402
from data import write_atomic  # noqa: E402
from measure import device_name, markdown_table  # noqa: E402  (bench/ is on sys.path)

# the defaults before: 1200 steps of AdamW on a cosine, every step over the whole cast
OLD = ["--optimizer=adamw", "--schedule=cosine", "--focus_steps=0", "--max_steps=1200"]


@dataclass
class Config:
    world: int = 0                      # the TinyWorld (its seed) both settings train on
    pairs: int = 2                      # old-new pairs, run in turns
    out: str = "out/bench-pretrain"     # the world and the runs
    results: str = "bench/RESULTS-pretrain.md"


def run(cmd, log):
    with open(log, "w") as f:
        if subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT) != 0:
            raise UserError(f"{' '.join(cmd)} failed: see {log}")


def main(cfg):
    if cfg.pairs < 1:
        raise UserError(f"--pairs must be 1 or more, got {cfg.pairs}")
    out = Path(cfg.out)
    data, tok = out / f"world{cfg.world}", out / f"tokenizer{cfg.world}"
    out.mkdir(parents=True, exist_ok=True)
    if not (tok / "tokenizer.json").is_file():
        run([sys.executable, "-m", "data.tinyworld", f"--seed={cfg.world}", f"--out={data}"], out / "world.log")
        run([sys.executable, "-m", "data.tokenizer", f"--input={data / 'corpus_train.txt'}", f"--out={tok}"],
            out / "tokenizer.log")
    common = [sys.executable, "train_pretrain.py", f"--data={data / 'corpus_train.txt'}",
              f"--val_data={data / 'corpus_val.txt'}", f"--tokenizer={tok}", f"--seed={1337 + cfg.world}"]
    rows = []
    for i in range(cfg.pairs):
        pair = {}
        for name, flags in (("old", OLD), ("new", [])):
            run_dir = out / f"{name}{i}"
            print(f"pair {i + 1}/{cfg.pairs}: {name} settings -> {run_dir}", flush=True)
            run(common + [f"--out={run_dir}"] + flags, out / f"{name}{i}.log")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            pair[name] = (metrics["train_seconds"], metrics.get("fact_accuracy"), metrics["steps"])
        rows.append(pair)
        old, new = pair["old"][0], pair["new"][0]
        print(f"  old {old:.0f} s, new {new:.0f} s: {new / old:.2f}", flush=True)
    ratios = [p["new"][0] / p["old"][0] for p in rows]
    machine = f"{device_name(torch.device('cpu'))} ({torch.backends.cpu.get_cpu_capability()})"
    lines = ["# Pre-training's time: the old settings against today's defaults", "",
             f"- command: `python bench/pretrain_budget.py --world={cfg.world} --pairs={cfg.pairs}`; "
             f"{time.strftime('%Y-%m-%d')}, {machine}",
             f"- old: `{' '.join(OLD)}`; new: the defaults (configs.Pretrain); TinyWorld {cfg.world}, seed "
             f"{1337 + cfg.world}; run in turns, old first", ""]
    cell = lambda r: f"{r[2]}, {r[0]:.0f} s" + (f", {r[1]:.1%}" if r[1] is not None else "")  # noqa: E731
    table = [[i + 1, cell(p["old"]), cell(p["new"]), f"{r:.2f}"] for i, (p, r) in enumerate(zip(rows, ratios))]
    header = ["pair", "old: steps, train s, facts", "new: steps, train s, facts", "new / old"]
    lines.append(markdown_table(header, table))
    lines += ["", f"Median ratio of training seconds, new / old: **{statistics.median(ratios):.2f}**.", ""]
    write_atomic(cfg.results, "\n".join(lines))
    print(f"pretrain budget: new / old = {statistics.median(ratios):.2f} (median of {len(ratios)}), in {cfg.results}")


if __name__ == "__main__":
    cli.run_main(main, Config)
