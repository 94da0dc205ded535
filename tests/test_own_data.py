"""Your own data, as a user brings it: a text file and a tokenizer trained on it, pre-training, then SFT,
DPO and GRPO on JSONL files of their own, each run as a user runs it, at toy size. With --data not a
TinyWorld's, the flags left at TinyWorld's defaults fall back (data.own_data): the held-out set
is the end of --data, never trained on, and TinyWorld's own measures are off, each said in one line. A
file with one bad line is one error line naming it. Then the fallbacks and LoRA's settings, unit by unit."""
import json
import random

import numpy as np
import pytest

import cli
import configs
import loaders
from conftest import error_line, run_scripts
from data import formats
from data.own_data import HELD_OUT

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--max_steps=4",
        "--eval_every=4", "--eval_batches=1", "--warmup_steps=1", "--log_every=2"]
AFTER = ["--max_steps=2", "--eval_every=2", "--log_every=1", "--warmup_steps=1"]


def own_text(n=150):
    """A corpus that is no TinyWorld's: short notes about sums, documents separated by blank lines."""
    r = random.Random(0)
    docs = []
    for i in range(n):
        a, b = r.randint(2, 49), r.randint(2, 49)
        docs.append(f"Note {i}. What is {a} plus {b}? It is {a + b}.\nThe shelf holds {a} jars and {b} tins.")
    return "\n\n".join(docs) + "\n"


def sums(n=40):
    r = random.Random(1)
    return [(a, b) for a, b in ((r.randint(2, 49), r.randint(2, 49)) for _ in range(n))]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """Every run of the recipe in one process (torch imported once): tokenizer, the four stages, and the
    four files with one bad line. Returns {name: CompletedProcess} and the directory."""
    d = tmp_path_factory.mktemp("own")
    (d / "notes.txt").write_text(own_text())
    (d / "bad.txt").write_bytes(b"A first note.\nIts second line.\n\nA third line \xff here.\n")
    chat = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"It is {a + b}."}]} for a, b in sums()]
    pairs = [{"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b + 1}."}
             for a, b in sums()]
    problems = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                for a, b in sums()]
    write_jsonl(d / "chat.jsonl", chat)
    write_jsonl(d / "pairs.jsonl", pairs)
    write_jsonl(d / "problems.jsonl", problems)
    write_jsonl(d / "bad_chat.jsonl", [chat[0], '{"messages": [oops', chat[1]])
    write_jsonl(d / "bad_pairs.jsonl", [pairs[0], pairs[1], {"prompt": "Hi?", "chosen": "Hello."}])
    write_jsonl(d / "bad_problems.jsonl", [problems[0], {"question": "What is 2 plus 2?", "answer": "four"}])
    sft, pt = d / "sft" / "ckpt.pt", d / "pt" / "ckpt.pt"
    runs = {
        "tokenizer": ["-m", "data.tokenizer", f"--input={d / 'notes.txt'}", f"--out={d / 'tok'}", "--preset=smoke"],
        "pretrain": ["train_pretrain.py", f"--data={d / 'notes.txt'}", f"--tokenizer={d / 'tok'}", f"--out={d / 'pt'}",
                     *TINY],
        "sft": ["train_sft.py", f"--data={d / 'chat.jsonl'}", f"--init={pt}", f"--out={d / 'sft'}", "--batch_size=4", *AFTER],
        "dpo": ["train_dpo.py", f"--data={d / 'pairs.jsonl'}", f"--init={sft}", f"--out={d / 'dpo'}", "--batch_size=4", *AFTER,
                "--max_new_tokens=8"],
        "grpo": ["train_grpo.py", f"--data={d / 'problems.jsonl'}", f"--init={sft}", f"--out={d / 'grpo'}",
                 "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--pass_k=2", *AFTER],
        "bad pretrain": ["train_pretrain.py", f"--data={d / 'bad.txt'}", f"--tokenizer={d / 'tok'}",
                         f"--out={d / 'bad_pt'}", *TINY],
        "bad sft": ["train_sft.py", f"--data={d / 'bad_chat.jsonl'}", f"--init={pt}", f"--out={d / 'bad_sft'}", *AFTER],
        "bad dpo": ["train_dpo.py", f"--data={d / 'bad_pairs.jsonl'}", f"--init={sft}", f"--out={d / 'bad_dpo'}", *AFTER],
        "bad grpo": ["train_grpo.py", f"--data={d / 'bad_problems.jsonl'}", f"--init={sft}", f"--out={d / 'bad_grpo'}",
                     "--max_new_tokens=8", *AFTER],
    }
    results = run_scripts(list(runs.values()), d)
    return dict(zip(runs, results)), d


def succeeded(journey, name):
    r = journey[0][name]
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_pre_training_on_your_own_text_validates_on_its_end_without_tinyworld_measures(journey):
    out = succeeded(journey, "pretrain")
    assert "notes.txt is your own data, not TinyWorld's, so validation text from the last 5% of --data" in out
    assert "no fact completion (--eval_facts)" in out and "no curriculum (--focus_steps)" in out
    assert "pretrain: validating on the last" in out and "which training leaves out" in out
    assert "fact completion" not in out.replace("no fact completion", "")
    metrics = json.loads((journey[1] / "pt" / "metrics.json").read_text())
    assert np.isfinite(metrics["val_loss"]) and "fact_accuracy" not in metrics


def test_sft_on_your_own_conversations_holds_out_their_end_with_no_tinyworld_qa_or_replay(journey):
    out = succeeded(journey, "sft")
    assert "no held-out QA on TinyWorld's questions (--qa_data)" in out and "no replay of TinyWorld's corpus" in out
    assert "38 conversations from" in out and "2 held out for validation (from the end of --data: 2 records" in out
    assert "replaying" not in out and "held-out QA" not in out.replace("no held-out QA", "")
    assert json.loads((journey[1] / "sft" / "metrics.json").read_text())["val_loss"] is not None


def test_dpo_on_your_own_pairs_evaluates_on_their_end(journey):
    out = succeeded(journey, "dpo")
    assert "no win rate by TinyWorld's gold rater (--world)" in out and "(--qa_data)" in out
    assert "38 pairs from" in out and "2 held out (from the end of --data" in out
    assert "on 2 held-out pairs, the implicit reward ranks" in out


def test_grpo_on_your_own_problems_evaluates_on_their_end(journey):
    out = succeeded(journey, "grpo")
    assert "no step checks against TinyWorld's facts (--world)" in out
    assert "38 problems from" in out and "2 held out (from the end of --data" in out
    assert "before: held-out pass@1" in out and "after: held-out pass@1" in out


@pytest.mark.parametrize("stage, file, line, says", [
    ("pretrain", "bad.txt", 4, "not UTF-8"), ("sft", "bad_chat.jsonl", 2, "malformed JSON"),
    ("dpo", "bad_pairs.jsonl", 3, '"rejected" is missing'), ("grpo", "bad_problems.jsonl", 2, "not a math problem")])
def test_one_bad_line_in_your_file_is_one_error_line_naming_it(journey, stage, file, line, says):
    succeeded(journey, stage)  # so that the start it needs is there
    said = error_line(journey[0][f"bad {stage}"])
    assert f"{journey[1] / file}:{line}" in said and says in said


# ----------------------------------------------------------------------------- the fallbacks, unit by unit


def parse(cls, *argv):
    return cli.parse_config(cls, ["--device=cpu", *argv], configs.PRESETS[cls.__name__.lower()])


@pytest.fixture
def own(tmp_path):
    """A file of your own, and one inside a TinyWorld (a directory with meta.json)."""
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "meta.json").write_text("{}")
    for path in (tmp_path / "mine.jsonl", tmp_path / "world" / "train.jsonl"):
        path.write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize("cls", [configs.Pretrain, configs.SFT, configs.RM, configs.DPO, configs.PPO, configs.GRPO])
def test_tinyworld_runs_keep_every_default(cls, own, capsys):
    assert parse(cls) == cls(device="cpu")
    assert parse(cls, f"--data={own / 'world' / 'train.jsonl'}") == cls(device="cpu", data=str(own / "world" / "train.jsonl"))
    assert parse(cls, f"--data={own / 'missing.jsonl'}") == cls(device="cpu", data=str(own / "missing.jsonl"))  # its own error
    assert capsys.readouterr().out == ""


def test_your_own_data_holds_out_its_end_and_turns_tinyworld_measures_off(own, capsys):
    mine = f"--data={own / 'mine.jsonl'}"
    cfg = parse(configs.Pretrain, mine)
    assert (cfg.val_data, cfg.held_out, cfg.eval_facts, cfg.focus_steps) == ("", HELD_OUT, False, 0)
    cfg = parse(configs.SFT, mine)
    assert (cfg.val_data, cfg.held_out, cfg.qa_data, cfg.replay_data) == ("", HELD_OUT, "", "")
    for cls in (configs.RM, configs.DPO, configs.GRPO):
        cfg = parse(cls, mine)
        assert (cfg.test_data, cfg.held_out, cfg.world) == ("", HELD_OUT, "")
    cfg = parse(configs.PPO, mine)
    assert (cfg.test_data, cfg.qa_data, cfg.world) == ("", "", "")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("mine.jsonl is your own data, not TinyWorld's, so" in line for line in lines)
    for cls in (configs.Pretrain, configs.SFT, configs.RM, configs.DPO, configs.PPO, configs.GRPO):
        parse(cls, mine).check()  # the settled flags go together


def test_flags_you_give_are_kept(own):
    mine = f"--data={own / 'mine.jsonl'}"
    cfg = parse(configs.Pretrain, mine, "--val_data=v.txt", "--eval_facts=true")
    assert (cfg.val_data, cfg.held_out, cfg.eval_facts, cfg.focus_steps) == ("v.txt", 0.0, True, 0)
    cfg = parse(configs.SFT, mine, "--held_out=0.2", "--replay_data=c.txt")
    assert (cfg.val_data, cfg.held_out, cfg.replay_data, cfg.qa_data) == ("", 0.2, "c.txt", "")
    cfg = parse(configs.DPO, mine, "--test_data=", f"--world={own / 'world'}")
    assert (cfg.test_data, cfg.held_out, cfg.world) == ("", 0.0, str(own / "world"))
    cfg = parse(configs.GRPO, "--held_out=0.1")  # TinyWorld's own problems, with their end held out instead
    assert (cfg.test_data, cfg.held_out, cfg.world) == ("", 0.1, "data/tinyworld")
    with pytest.raises(cli.UserError, match="pass --test_data= with it"):
        parse(configs.RM, "--held_out=0.1", "--test_data=t.jsonl").check()
    with pytest.raises(cli.UserError, match="leaves nothing to validate on"):
        parse(configs.Pretrain, "--val_data=").check()


def test_lora_takes_the_settings_measured_for_it_unless_given(capsys):
    sft = parse(configs.SFT, "--lora_rank=8")
    assert (sft.lr, sft.max_steps) == (6e-3, 800)
    assert "sft: LoRA takes --lr=0.006 --max_steps=800" in capsys.readouterr().out
    assert (parse(configs.SFT, "--lora_rank=8", "--lr=1e-3").lr, parse(configs.SFT, "--lora_rank=8", "--lr=1e-3").max_steps) \
        == (1e-3, 800)
    assert parse(configs.SFT, "--lora_rank=8", "--preset=smoke").max_steps == 4  # a preset's flags are given too
    assert parse(configs.DPO, "--lora_rank=8").lr == 1.5e-3
    grpo = parse(configs.GRPO, "--lora_rank=8")
    assert (grpo.lr, grpo.min_lr, grpo.max_steps) == (1e-3, 1e-3, configs.GRPO.max_steps)
    assert parse(configs.PPO, "--lora_rank=8") == configs.PPO(device="cpu", lora_rank=8)  # none measured for PPO
    assert parse(configs.SFT, "--lora_rank=0") == configs.SFT(device="cpu")


def test_the_held_out_share_is_at_least_one_record_and_never_all():
    assert [formats.held_out_count(n, 0.05) for n in (0, 1, 2, 20, 40, 1000)] == [0, 0, 1, 1, 2, 50]
    assert formats.held_out_count(10, 0.0) == 0 and formats.held_out_count(10, 0.99) == 9


class Tok:
    eot_id = 0


@pytest.mark.parametrize("doc_lengths, held_out", [([30] * 40, 0.05), ([5] * 300, 0.1), ([1200], 0.05),
                                                    ([20, 1000, 15], 0.05)])
def test_held_out_text_is_the_end_of_the_corpus_cut_at_a_document_where_it_can_be(doc_lengths, held_out, capsys):
    ids = np.concatenate([np.r_[np.full(n - 1, 7), 0] for n in doc_lengths]).astype(np.uint16)
    cfg = configs.Pretrain(data="mine.txt", val_data="", held_out=held_out, block_size=16)
    train, val = loaders.held_out_text(ids, Tok(), cfg)
    assert np.array_equal(np.concatenate([train, val]), ids) and len(train) > 17 and len(val) > 17
    want = max(int(held_out * len(ids)), 18)  # the share, and at least a window
    assert want <= len(val) <= 2 * want
    ends = set(np.cumsum(doc_lengths)[:-1].tolist())
    assert (len(train) in ends) == ("from its middle" not in capsys.readouterr().out)
    with pytest.raises(cli.UserError, match="fewer than one window"):
        loaders.held_out_text(ids[:30], Tok(), cfg)
