"""What each way of fine-tuning gains and forgets: SFT, DPO and GRPO each run four ways from the demo's
checkpoints, every run measured on what its stage is for and on what came before it.

    make forgetting                          # after the demo: out/forgetting/ (SEED=N: world N)
    python -m studies.forgetting --stages=out --out=out/forgetting
    python -m studies.forgetting --combine=a,b,c # one table over several seeds' out/forgetting folders
    make forgetting PRESET=smoke             # the plumbing at toy size

The four ways, each with the stage's default flags and seed from the checkpoint the demo starts it from
(SFT: the pre-trained model; DPO: SFT; GRPO: PPO):
  full:    every weight trains on the stage's loss alone;
  replay:  every weight, and each step also learns windows of the pre-training text (--replay_data,
           SFT's default): the field's first remedy for forgetting;
  LoRA r:  the weights frozen, only a rank-r update beside each of the blocks' matrices trains
           (gpt_lora), at two ranks, with the learning rate (and for SFT the steps) it needs.
The demo's own run stands for the way it equals (SFT: replay; DPO and GRPO: full). Every run, and each
stage's start, gets the report's measures (report.measure): validation loss on the pre-training text,
fact completion, held-out QA about seen and unseen characters, wins against SFT by the gold rater, the
held-out reasoning problems solved. forgetting.md has, per stage and way, the parameters trained, the
stage's own gain and how each earlier measure moved from the stage's start; forgetting.json the figures.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import common
import configs
import measures
from studies import report
from cli import UserError
from data import tinyworld, write_atomic
from data.tokenizer import load_tokenizer

# stage -> (the demo's folder it starts from, the way the demo's own run is, what it is for)
STAGES = {"sft": ("pretrain", "replay", "held-out QA"), "dpo": ("sft", "full", "wins vs SFT"),
          "grpo": ("ppo", "full", "math")}
# what each way adds to the stage's command line ({corpus}, {low}, {high} filled in)
WAYS = {"full": ["--replay_data="], "replay": ["--replay_data={corpus}"], "lora_low": ["--replay_data=", "--lora_rank={low}"],
        "lora_high": ["--replay_data=", "--lora_rank={high}"]}
MEASURES = [("val_loss", "val loss", "{:.3f}"), ("facts", "facts", "{:.0%}"), ("seen", "QA seen", "{:.0%}"),
            ("unseen", "QA unseen", "{:.0%}"), ("win", "wins vs SFT", "{:.0%}"), ("math", "math", "{:.0%}")]


@dataclass
class Config:
    stages: str = "out"                # the demo's output folder: pretrain, sft, ppo (GRPO's start), dpo, grpo
    data: str = "data/tinyworld"       # TinyWorld: every stage's data and the held-out sets
    out: str = "out/forgetting"        # each run in its own folder here, then forgetting.md and .json
    low_rank: int = 2                  # LoRA's two ranks
    high_rank: int = 8
    seed: int = 1337                   # every run's seed (the demo's: 1337 + SEED)
    only: str = "sft,dpo,grpo"         # the stages studied (comma-separated)
    combine: str = ""                  # comma-separated forgetting folders of other seeds: their table, side by side
    stages_preset: str = ""            # a preset each stage script runs with (smoke: toy size)


PRESETS = {"smoke": dict(stages_preset="smoke")}


def way_label(way, cfg):
    return {"full": "full", "replay": "full + replay", "lora_low": f"LoRA r{cfg.low_rank}",
            "lora_high": f"LoRA r{cfg.high_rank}"}[way]


def train(stage, way, cfg, data, out):
    """One stage trained one way into out/<stage>_<way>; the demo's own run where it is that way."""
    start, demo_way, _ = STAGES[stage]
    if way == demo_way and not cfg.stages_preset:
        return Path(cfg.stages) / stage
    run = out / f"{stage}_{way}"
    flags = [f.format(corpus=data / "corpus_train.txt", low=cfg.low_rank, high=cfg.high_rank) for f in WAYS[way]]
    if way.startswith("lora") and not cfg.stages_preset:  # LoRA's own settings (configs.LORA_SETTINGS), said in the command
        flags += [f"--{k}={v:g}" for group in configs.LORA_SETTINGS[stage] for k, v in group.items()]
    own = {"sft": ["--qa_data=", f"--data={data / 'sft_train.jsonl'}"],
           "dpo": ["--qa_data=", "--test_data=", "--world=", f"--data={data / 'prefs_train.jsonl'}"],
           "grpo": ["--test_data=", f"--data={data / 'math_train.jsonl'}", f"--world={data}"]}[stage]
    preset = [f"--preset={cfg.stages_preset}"] if cfg.stages_preset else []
    cli.script("forgetting", f"train_{stage}.py", f"--init={Path(cfg.stages) / start / 'ckpt.pt'}", f"--out={run}",
               f"--seed={cfg.seed}", *own, *flags, *preset)
    return run


def main(cfg):
    if cfg.combine:
        return combine([Path(p) for p in cfg.combine.split(",")], Path(cfg.out))
    cli.require_positive(cfg, "low_rank", "high_rank")
    only = cfg.only.split(",")
    if not only or not set(only) <= set(STAGES):
        raise UserError(f"--only takes stages among {','.join(STAGES)}, got {cfg.only!r}")
    demo, data, out = Path(cfg.stages), Path(cfg.data), Path(cfg.out)
    for stage in only:  # fail now, not after the first run: the start, and the demo's run that is one of the ways
        common.load_checkpoint(demo / STAGES[stage][0] / "ckpt.pt", made_by="make demo")
        if not cfg.stages_preset:
            common.load_checkpoint(demo / stage / "ckpt.pt", [stage], made_by="make demo")
    common.load_checkpoint(demo / "sft" / "ckpt.pt", ["sft"], made_by="make demo")  # wins are counted against it
    cli.check_writable(out)
    runs = {stage: {way: train(stage, way, cfg, data, out) for way in WAYS} for stage in STAGES if stage in only}

    print("\n=== forgetting: measuring every run ===", flush=True)
    base = common.load_checkpoint(demo / "pretrain" / "ckpt.pt")
    tok = load_tokenizer(base["tokenizer"])
    sets = report.held_out_sets(data, tinyworld.load_world(data), tok)
    rcfg = report.Config(**({"max_new_tokens": 8, "math_tokens": 8} if cfg.stages_preset else {}), seed=cfg.seed)
    load = lambda folder: common.gpt_from_checkpoint(common.load_checkpoint(folder / "ckpt.pt"), tok).eval()
    sft = load(demo / "sft")
    sft_gold = measures.gold_scores(sft, tok, sets["questions"], rcfg.max_new_tokens, sets["world"])[0]
    figures = lambda folder: {k: v for k, v in report.measure(load(folder), tok, sets, sft, sft_gold, rcfg).items()
                              if k in {key for key, _, _ in MEASURES}}
    results = {"seed": cfg.seed, "stages": {}, "params": sum(p.numel() for p in sft.parameters())}
    for stage, ways in runs.items():
        start = STAGES[stage][0]
        row = {"start": {"from": start, **figures(demo / start)}}
        for way, folder in ways.items():
            metrics = json.loads((folder / "metrics.json").read_text())
            trained = metrics.get("trained_params") or (None if way.startswith("lora") else results["params"])
            row[way] = {"label": way_label(way, cfg), "trained_params": trained,
                        "steps": metrics.get("steps"), "seconds": metrics.get("train_seconds"), **figures(folder)}
            print(f"forgetting: {stage}, {row[way]['label']}: " + ", ".join(
                f"{name} {fmt.format(row[way][k])}" for k, name, fmt in MEASURES), flush=True)
        results["stages"][stage] = row
    write_atomic(out / "forgetting.json", json.dumps(results, indent=1) + "\n")
    md = table([results])
    write_atomic(out / "forgetting.md", md + "\n")
    print("\n" + md + f"\n\nforgetting: {out / 'forgetting.md'} and {out / 'forgetting.json'}")


def table(seeds):
    """Per stage: its start, then each way: parameters trained, steps, seconds, every measure (several
    seeds: one value per seed, "a / b / c"), and what the stage's own gain and the earlier measures did."""
    first = seeds[0]
    names = ", ".join(str(s["seed"] - 1337) for s in seeds)
    lines = [(f"Seeds {names} (each cell: one value per seed, in that order)" if len(seeds) > 1 else f"Seed {names}")
             + f"; the model has {first['params']:,} parameters.", ""]
    for stage, (start, _, gain) in STAGES.items():
        if stage not in first["stages"]:
            continue
        lines += [f"**{stage.upper()}** (from {start}; what it is for: {gain})", "",
                  "| way | trained | steps | train s | " + " | ".join(n for _, n, _ in MEASURES) + " |",
                  "|---|---|---|---|" + "---|" * len(MEASURES)]
        rows = [s["stages"][stage] for s in seeds]
        cells = lambda way, k, fmt: " / ".join(fmt.format(r[way][k]) if r[way].get(k) is not None else "-" for r in rows)
        lines.append(f"| start ({start}) |  |  |  | " + " | ".join(cells("start", k, f) for k, _, f in MEASURES) + " |")
        for way in WAYS:
            r = rows[0][way]
            share = f"{r['trained_params'] / first['params']:.1%}" if r.get("trained_params") else "-"
            lines.append(f"| {r['label']} | {share} | {r['steps']} | {cells(way, 'seconds', '{:.0f}')} | "
                         + " | ".join(cells(way, k, f) for k, _, f in MEASURES) + " |")
        lines.append("")
    return "\n".join(lines)


def combine(folders, out):
    """The table over several seeds' forgetting.json, side by side, into <out>/forgetting-seeds.md."""
    seeds = []
    for folder in folders:
        path = folder / "forgetting.json"
        if not path.is_file():
            raise UserError(f"{path} not found: run `make forgetting SEED=N` for that seed first")
        seeds.append(json.loads(path.read_text()))
    md = table(seeds)
    write_atomic(out / "forgetting-seeds.md", md + "\n")
    print(md + f"\nforgetting: {out / 'forgetting-seeds.md'}")


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
