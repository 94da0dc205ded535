"""The journey in one page: every stage's checkpoint on the same measures and the same prompts.

    python -m studies.report               # reads out/*/ckpt.pt, writes out/report.md, out/report.json and the figures
    python -m studies.report --out=/tmp/run --data=/tmp/world

For each stage whose checkpoint exists (0 random init, 1 pre-training, 2 SFT, 3 PPO, 3 DPO, 4 GRPO)
every measure is computed fresh from the checkpoint by the functions the stages use (measures.py) on
TinyWorld's held-out sets: validation loss on the corpus, fact completion, held-out answers about
seen and unseen characters and their format, head-to-head wins against SFT by the gold rater, the
reasoning problems solved, their steps right and the share worked step by step (per level too,
beside the answers-only SFT run when out/sft_answers_only exists), and KL to SFT; the reward model gets its pairwise accuracy. Then the
same three prompts are put to every stage, and each stage's training curves are drawn from its log.jsonl.
This file measures; report_writing.py writes report.md, report.json and the figures from what it measured.
"""
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import common
import measures
from cli import UserError
from configs import QA_TOKENS
from data import read_documents, read_jsonl, tinyworld
from data.tokenizer import load_tokenizer
from model import GPT, GPTConfig
from studies.report_writing import STAGES, cell, write_report


@dataclass
class Config:
    out: str = "out"                   # the stages' output directories are here; report.md goes here too
    data: str = "data/tinyworld"       # TinyWorld's files: the held-out sets the measures use
    max_new_tokens: int = QA_TOKENS  # reply length limit (the context's room permitting), QA's as everywhere
    math_tokens: int = 72              # answer length limit on the reasoning problems, as train_grpo.py's
    device: str = "auto"               # auto (cuda, mps, cpu), or a torch device name
    seed: int = 1337                   # seeds the random model and the sampled replies of the KL



def math_measures(model, tok, sets, cfg):
    """Greedy pass@1 on the held-out problems, the share of their steps stated right and the share of
    answers that write steps before "####", per level too, and which problems were solved."""
    m = measures.math_eval(model, tok, sets["math"], cfg.math_tokens, k=0, world=sets["world"])
    return {"math": m["pass@1"], "steps": m["steps"], "worked": m["worked"], "levels": m["levels"], "solved": m["solved"]}



def held_out_sets(data, world, tok):
    """What the measures read: TinyWorld's held-out QA, problems, questions and validation text."""
    return {"world": world, "qa": read_jsonl(data / "sft_test.jsonl"), "math": read_jsonl(data / "math_test.jsonl"),
            "questions": sorted({r["prompt"] for r in read_jsonl(data / "prefs_test.jsonl")}),
            "val_ids": torch.tensor([i for d in read_documents(data / "corpus_val.txt") for i in tok.encode_document(d)])}


def measure(model, tok, sets, sft, sft_gold, cfg):
    """Every column of the table for one model. SFT's own gold scores and its KL to itself (zero, term by
    term) are known without generating again."""
    qa = measures.qa_accuracy(model, tok, sets["qa"], cfg.max_new_tokens)
    is_sft = model is sft
    gold = sft_gold if is_sft else measures.gold_scores(model, tok, sets["questions"], cfg.max_new_tokens, sets["world"])[0]
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    reasoning = math_measures(model, tok, sets, cfg)
    kl = None if sft is None else 0.0 if is_sft else measures.kl_to_reference(model, sft, tok, sets["questions"],
                                                                              generator=gen)
    return {"val_loss": measures.text_loss(model, sets["val_ids"]), "facts": measures.fact_accuracy(model, tok, sets["world"])[0],
            "seen": qa.get("seen"), "unseen": qa.get("unseen"), "format": qa["format"],
            "win": measures.win_rate(gold, sft_gold) if sft_gold else None, **reasoning, "kl": kl}



def reply(model, label, tok, prompt, cfg):
    """A stage's answer to a prompt. The chat stages get it through the chat template, greedy; the
    pre-trained model has never seen the template, so it continues the prompt as text; the random
    model's greedy choice is one token repeated, so it samples at temperature 1 to show its soup."""
    if label.startswith(("0", "1")):
        gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
        ids = [tok.eot_id] + tok.encode(prompt)
        room = min(48, model.config.block_size - len(ids))
        if room <= 0:
            return "(the prompt fills the context)"
        out = measures.generate_batched(model, [ids], room, stop_tokens=[tok.eot_id],
                                     temperature=1.0 if label.startswith("0") else 0.0, generator=gen)[0]
        return "(continues) " + tok.decode(t for t in out if t != tok.eot_id)
    return measures.chat_replies(model, tok, [prompt], cfg.max_new_tokens)[2][0]



def main(cfg):
    t0 = time.time()
    out, data = Path(cfg.out), Path(cfg.data)
    device = common.pick_device(cfg.device)
    if not (out / "pretrain" / "ckpt.pt").is_file():
        raise UserError(f"no pre-trained checkpoint in {out / 'pretrain'}: run `make demo` (or train_pretrain.py) first")
    world = tinyworld.load_world(data)
    base = common.load_checkpoint(out / "pretrain" / "ckpt.pt")
    tok = load_tokenizer(base["tokenizer"])
    sets = held_out_sets(data, world, tok)
    models = load_stages(out, base, tok, cfg)
    found = measure_stages(models, tok, sets, world, out, data, device, cfg)
    found["journey"], found["grpo_from"], found["newly"] = journey(models, found["rows"], sets, tok, cfg)
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
    table = write_report(out, base, models, found, machine, t0, cfg)
    print("\n".join(table))
    print(f"report: {out / 'report.md'} in {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------- measuring

def load_stages(out, base, tok, cfg):
    """label -> (model, its stage's metrics.json): every stage whose checkpoint exists, and the random init."""
    models = {}
    for label, stage in STAGES:
        if stage is None:
            torch.manual_seed(cfg.seed)
            models[label] = (GPT(GPTConfig(**base["model_args"])), {})
        elif (out / stage / "ckpt.pt").is_file():
            ckpt = common.load_checkpoint(out / stage / "ckpt.pt", [stage])
            metrics = out / stage / "metrics.json"
            models[label] = (common.gpt_from_checkpoint(ckpt, tok), json.loads(metrics.read_text()) if metrics.is_file() else {})
    return models


def measure_stages(models, tok, sets, world, out, data, device, cfg):
    """Every stage on the report's measures (rows), the reward model on the held-out pairs, and the
    answers-only SFT contrast on the reasoning problems."""
    sft = models.get("2 SFT", (None,))[0]
    sft = sft.to(device).eval() if sft is not None else None
    sft_gold = measures.gold_scores(sft, tok, sets["questions"], cfg.max_new_tokens, world)[0] if sft is not None else None
    rows = {}
    for label, (model, metrics) in models.items():
        print(f"report: measuring {label} ...", flush=True)
        model.to(device).eval()
        rows[label] = {**measure(model, tok, sets, sft, sft_gold, cfg), "seconds": metrics.get("train_seconds")}
    rm_metrics, rm_style_pairs = {}, None
    if (out / "rm" / "ckpt.pt").is_file():
        print("report: measuring 3 reward model ...", flush=True)
        rm = common.gpt_from_checkpoint(common.load_checkpoint(out / "rm" / "ckpt.pt", ["rm"]), tok, reward=True)
        rm_metrics = json.loads((out / "rm" / "metrics.json").read_text()) if (out / "rm" / "metrics.json").is_file() else {}
        acc = measures.reward_accuracy(rm.to(device), tok, read_jsonl(data / "prefs_test.jsonl"), world)
        rows["3 reward model"] = {"rm_acc": acc["all"], "rm_facts": acc.get("facts"), "rm_style": acc.get("style"),
                                  "rm_facts_unseen": acc.get("facts_unseen"),
                                  "seconds": rm_metrics.get("train_seconds")}
        rm_style_pairs = acc.get("style_pairs")
    contrast = None
    if (out / "sft_answers_only" / "ckpt.pt").is_file():  # SFT on the same set with "#### n" for each worked answer
        print("report: measuring the answers-only SFT contrast ...", flush=True)
        short = common.gpt_from_checkpoint(common.load_checkpoint(out / "sft_answers_only" / "ckpt.pt", ["sft"]), tok)
        contrast = math_measures(short.to(device).eval(), tok, sets, cfg)
    return {"rows": rows, "rm_metrics": rm_metrics, "rm_style_pairs": rm_style_pairs, "contrast": contrast}


def journey(models, rows, sets, tok, cfg):
    """The same prompts, every stage's greedy reply: (Markdown lines, the stage GRPO started from, the
    held-out problems GRPO solves and that stage did not). The problem shown is the first of those, when
    there is one: the change stage 4 makes, shown."""
    started = Path(models.get("4 GRPO", (None, {}))[1].get("init", "")).parent.name  # out/<stage>/ckpt.pt
    grpo_from = next((label for label, stage in STAGES if stage == started), "2 SFT")
    unseen = next((r for r in sets["qa"] if r.get("split") == "unseen"), sets["qa"][0])
    newly = [i for i, (a, b) in enumerate(zip(rows.get("4 GRPO", {}).get("solved", []),
                                              rows.get(grpo_from, {}).get("solved", []))) if a and not b]
    problem = sets["math"][newly[0] if newly else 0]["question"]
    lines = []
    for prompt in ["What is an LLM?", unseen["messages"][-1]["content"], problem]:
        lines += [f"**{prompt}**", "", "| stage | reply |", "|---|---|"]
        for label, (model, _) in models.items():
            lines.append(f"| {label} | {cell(reply(model, label, tok, prompt, cfg))} |")
        lines.append("")
    return lines, grpo_from, newly


PRESETS = {"smoke": dict(max_new_tokens=8, math_tokens=8)}  # make demo PRESET=smoke: the plumbing in a minute


if __name__ == "__main__":
    cli.run_main(main, Config, PRESETS)
