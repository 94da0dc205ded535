"""The BPE trainer against a naive one, tiktoken's encoding against a naive BPE, the chat template."""
import base64
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings, strategies as st

from cli import UserError
from data.tokenizer import SPLIT_PATTERN, SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parent.parent

TEXT = """Alice's favourite colour is blue. Bob lives in Millbrook with his dog, and he's a baker!
Numbers: 12345 678, 3.14 -- 'quoted' "double" (parens) [brackets] {braces}   extra   spaces
Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🙂 and tabs\tand\r\nwindows lines.
What is an LLM? A large language model predicts the next token. It'll learn; we've seen it.
""" * 8


# ----------------------------------------------------------------------------------------------
# Naive references: slow, and obviously what BPE means


def naive_train(text, vocab_size):
    """Recount every pair after every merge; the most frequent wins, ties to the smallest pair."""
    chunks = [list(c.encode()) for c in regex.findall(SPLIT_PATTERN, text)]
    token_bytes = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(token_bytes)}
    while len(token_bytes) < vocab_size:
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:]))
        candidates = [(-n, p) for p, n in counts.items() if token_bytes[p[0]] + token_bytes[p[1]] not in ranks]
        if not candidates:
            break
        _, (a, b) = min(candidates)
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        ranks[token_bytes[-1]] = new_id
        for ids in chunks:
            i = 0
            while i < len(ids) - 1:
                if ids[i] == a and ids[i + 1] == b:
                    ids[i:i + 2] = [new_id]
                i += 1
    return ranks


def naive_encode(text, ranks):
    """Per chunk: merge the adjacent pair whose bytes have the lowest rank (leftmost on ties) until none."""
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode()]
        while True:
            scored = [(ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1)]
            best = min(scored, default=(float("inf"), 0))
            if best[0] == float("inf"):
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe(TEXT, 450), out)
    return load_tokenizer(out)


# ----------------------------------------------------------------------------------------------
# Training


@settings(max_examples=40)
@given(st.text(alphabet="aab cd'\n1.é", max_size=120), st.integers(256, 300))
def test_train_bpe_matches_naive_trainer(text, vocab_size):
    assert train_bpe(text, vocab_size) == naive_train(text, vocab_size)


def test_train_bpe_matches_naive_trainer_on_real_text():
    assert train_bpe(TEXT, 256 + 120) == naive_train(TEXT, 256 + 120)


def test_train_bpe_learns_frequent_words_and_is_deterministic():
    ranks = train_bpe(TEXT, 450)
    assert len(ranks) == 450 and sorted(ranks.values()) == list(range(450))
    assert b" colour" in ranks and b"brackets" in ranks
    assert train_bpe(TEXT, 450) == ranks


# ----------------------------------------------------------------------------------------------
# Encoding through tiktoken

texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.sampled_from(sorted(set(TEXT))), max_size=200),
    st.lists(st.sampled_from(TEXT.split(" ")), max_size=30).map(" ".join),
)


@settings(max_examples=200)
@given(texts)
def test_encode_matches_naive_bpe(tok, text):
    ranks = tok.encoding._mergeable_ranks
    assert tok.encode(text) == naive_encode(text, ranks)


@settings(max_examples=200)
@given(texts)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_not_parsed_in_text(tok):
    ids = tok.encode("<|endoftext|> <|user|>")
    assert tok.eot_id not in ids and tok.user_id not in ids
    assert tok.decode(tok.encode_document("hi")) == "hi<|endoftext|>"


def test_saved_files(tok, tmp_path):
    save_tokenizer(train_bpe(TEXT, 300), tmp_path)
    first = (tmp_path / "tokenizer.bpe").read_text().splitlines()[:2]
    assert first == [base64.b64encode(b"\x00").decode() + " 0", base64.b64encode(b"\x01").decode() + " 1"]
    t = load_tokenizer(tmp_path)
    assert t.n_vocab == 300 + len(SPECIAL_TOKENS)
    assert t.fingerprint == load_tokenizer(tmp_path).fingerprint != tok.fingerprint
    assert [t.eot_id, t.user_id, t.assistant_id, t.system_id, t.end_id] == list(range(300, 305))


def test_missing_directory_names_the_command(tmp_path):
    with pytest.raises(UserError, match="python -m data.tokenizer"):
        load_tokenizer(tmp_path / "nope")


def test_gpt2_without_network_is_one_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError) as e:
        load_tokenizer("gpt2")
    assert "\n" not in str(e.value) and "python -m data.tokenizer" in str(e.value)


# ----------------------------------------------------------------------------------------------
# The chat template

chat = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is Alice's pet?"},
    {"role": "assistant", "content": "Alice's pet is a cat."},
    {"role": "user", "content": "And Bob's?"},
    {"role": "assistant", "content": "A dog."},
]


def test_chat_mask_is_exactly_assistant_content_and_end(tok):
    ids, mask = tok.render_chat(chat)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    expected = [tok.eot_id]
    for m in chat:
        expected += [tok.role_ids[m["role"]]] + tok.encode(m["content"]) + [tok.end_id]
    assert ids == expected
    learned = [i for i, m in zip(ids, mask) if m]
    answers = [tok.encode(m["content"]) + [tok.end_id] for m in chat if m["role"] == "assistant"]
    assert learned == answers[0] + answers[1]
    # every masked position sits inside an assistant turn: after <|assistant|>, before the next role token
    role = None
    for i, m in zip(ids, mask):
        if i in tok.role_ids.values():
            role = i
        assert m == (role == tok.assistant_id and i != tok.assistant_id)
        if i == tok.end_id:
            role = None


@given(st.lists(st.text(max_size=20), min_size=2, max_size=6).filter(lambda xs: len(xs) % 2 == 0))
@settings(max_examples=50)
def test_render_prompt_is_prefix_of_render_chat(tok, contents):
    messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
    ids, mask = tok.render_chat(messages)
    prompt = tok.render_prompt(messages[:-1])
    assert ids[:len(prompt)] == prompt and prompt[-1] == tok.assistant_id
    assert mask[len(prompt):] == [1] * (len(ids) - len(prompt))  # the rest is the last answer


def test_bad_messages_are_refused(tok):
    with pytest.raises(ValueError):
        tok.render_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError):
        tok.render_prompt(chat)


# ----------------------------------------------------------------------------------------------
# Command line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data.tokenizer", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_trains_and_reports(tmp_path):
    (tmp_path / "corpus_train.txt").write_text(TEXT + "\n\n" + TEXT)
    (tmp_path / "corpus_val.txt").write_text(TEXT[:500])
    r = run_cli(f"--input={tmp_path / 'corpus_train.txt'}", "--vocab_size=300", f"--out={tmp_path / 'tok'}")
    assert r.returncode == 0, r.stderr
    assert "bytes/token" in r.stdout and "300 tokens" in r.stdout
    assert load_tokenizer(tmp_path / "tok").n_vocab == 300 + len(SPECIAL_TOKENS)


@pytest.mark.parametrize("args, message", [
    (["--input=/no/such/file"], "not found"),
    (["--vocab_sise=300"], "unknown flag --vocab_sise"),
    (["--vocab_size=lots"], "--vocab_size expects int"),
])
def test_cli_user_errors(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
