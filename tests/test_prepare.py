"""The real-data preparers, on small fixture files written in each source's schema (no network)."""
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli import UserError
from data import fetch, read_documents, read_jsonl
from data import prepare_chat, prepare_gsm8k, prepare_hh_rlhf, prepare_tinystories
from data.tinyworld import check_answer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_tinystories(tmp_path, capsys):
    out = tmp_path / "train.txt"
    prepare_tinystories.main(prepare_tinystories.Config(src=str(FIXTURES / "tinystories_sample.txt"), val_src="", out=str(out)))
    docs = read_documents(out)
    assert len(docs) == 4
    assert docs[0].startswith("Once there was a small red kite.") and docs[-1].startswith("Lily found")
    assert docs[1] == "Tom had a box of crayons. He drew a big yellow sun.\nHis mum put the picture on the fridge. Tom smiled all day."
    assert "skipped 2 (1 empty, 1 undecodable bytes)" in capsys.readouterr().out
    prepare_tinystories.main(prepare_tinystories.Config(src=str(FIXTURES / "tinystories_sample.txt"), val_src="",
                                                        out=str(out), max_docs=2))
    assert len(read_documents(out)) == 2


def test_chat_dolly_and_alpaca(tmp_path, capsys):
    out, val = tmp_path / "chat.jsonl", tmp_path / "val.jsonl"
    prepare_chat.main(prepare_chat.Config(src=str(FIXTURES / "dolly_sample.jsonl"), out=str(out), val_out=str(val),
                                          val_fraction=0.0))
    records = read_jsonl(out)
    assert len(records) == 4 and read_jsonl(val) == []
    users = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    assert users["How many legs does the animal in the text have?\n\nA spider is an arachnid with eight legs."] == "Eight."
    assert users["Is water wet?"] == "It makes other things wet."
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    assert "skipped 3 (1 not a JSON object, 1 missing or mistyped field, 1 empty instruction or response)" in capsys.readouterr().out

    prepare_chat.main(prepare_chat.Config(src=str(FIXTURES / "alpaca_sample.json"), out=str(out), val_out=str(val),
                                          val_fraction=0.5))
    records = read_jsonl(out) + read_jsonl(val)
    assert len(read_jsonl(val)) == 1 and len(records) == 2
    assert {r["messages"][0]["content"] for r in records} == {"Give a synonym for happy.", "Translate to French.\n\nGood morning"}


def test_chat_records_render_through_the_chat_template(tmp_path):
    from data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
    save_tokenizer(train_bpe("a small text to train on " * 20, 270), tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    prepare_chat.main(prepare_chat.Config(src=str(FIXTURES / "dolly_sample.jsonl"), out=str(tmp_path / "c.jsonl"),
                                          val_out=str(tmp_path / "v.jsonl"), val_fraction=0.0))
    for r in read_jsonl(tmp_path / "c.jsonl"):
        ids, mask = tok.render_chat(r["messages"])
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == r["messages"][1]["content"] + "<|end|>"


def test_hh_rlhf(tmp_path, capsys):
    src = tmp_path / "train.jsonl.gz"  # the real files are gzipped
    with open(FIXTURES / "hh_rlhf_sample.jsonl", "rb") as f, gzip.open(src, "wb") as g:
        shutil.copyfileobj(f, g)
    out = tmp_path / "hh.jsonl"
    prepare_hh_rlhf.main(prepare_hh_rlhf.Config(src=str(src), test_src="", out=str(out)))
    records = read_jsonl(out)
    assert records[0] == {"prompt": "How do I boil an egg?", "chosen": "Put it in boiling water for about eight minutes.",
                          "rejected": "Eggs are round."}
    assert [r["prompt"] for r in records] == ["How do I boil an egg?", "What is the capital of Italy?",
                                              "Can you help me write a thank-you note?"]
    report = capsys.readouterr().out
    for reason in ("1 multi-turn", "1 empty or identical replies", "1 transcripts differ before the last reply",
                   "1 not a JSON object", "1 transcript does not start with a turn"):
        assert reason in report


def test_gsm8k(tmp_path, capsys):
    out = tmp_path / "gsm.jsonl"
    prepare_gsm8k.main(prepare_gsm8k.Config(src=str(FIXTURES / "gsm8k_sample.jsonl"), test_src="", out=str(out)))
    records = read_jsonl(out)
    assert len(records) == 3 and all("<<" not in r["answer"] for r in records)
    assert records[0]["answer"] == "Mia has 4*6=24 pens.\nAfter giving some away she has 24-5=19 pens.\n#### 19"
    assert check_answer("so... #### 2400", records[1]["answer"]) and check_answer("#### -5", records[2]["answer"])
    assert "skipped 3 (" in capsys.readouterr().out


def test_a_url_is_downloaded_once_into_the_cache(tmp_path):
    url = (FIXTURES / "gsm8k_sample.jsonl").resolve().as_uri()  # file:// goes through the same download code
    path = fetch(url, cache_dir=tmp_path)
    assert path.parent == tmp_path and path.read_bytes() == (FIXTURES / "gsm8k_sample.jsonl").read_bytes()
    assert fetch(url, cache_dir=tmp_path) == path
    with pytest.raises(UserError, match="--src"):
        fetch(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("args, message", [
    (["--src=/no/such/file.jsonl"], "not found"),
    (["--source=x"], "unknown flag --source"),
    ([f"--src={FIXTURES / 'tinystories_sample.txt'}", "--test_src="], "no usable records"),
])
def test_user_errors(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "data.prepare_gsm8k", *args, f"--out={tmp_path / 'o.jsonl'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()  # nothing written
