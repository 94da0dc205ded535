"""Hugging Face directories in and out (hf.py, data/hf_tokenizer.py, export.py), without the network and
without transformers: a GPT-2 in the hub's layout and a small byte-level BPE written here, checked
against a GPT-2 forward pass and a BPE written out below. Where transformers or tokenizers is
installed (make test installs them: requirements-test.txt), the exported directory is also checked with
them, from the project's root too."""
import dataclasses
import functools
import http.server
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import regex
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import cli
import common
import hf
from data import hf_tokenizer
from data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe
from model import GPT, GPTConfig, RewardModel

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("Lucy lives in Millbrook. She has 3 apples and a dog called Max! Sam's cat sleeps; Sam lives in Ashford.\n"
        "How many apples does Lucy have?  Lucy has 3 apples. #### 3\n") * 3 + "naïve café — 42 x 7 = 294\n"
N_EMBD, N_HEAD, N_LAYER, BLOCK = 32, 2, 2, 64


# ----------------------------------------------------------------------------------------------
# The fixture: a GPT-2 directory as the hub serves it, with random weights and a small BPE


def how_built(token, ranks):
    """The two tokens tiktoken's BPE joins last to reach `token`, using only tokens ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.cache
def small_bpe():
    """vocab.json and merges.txt of a 300-token byte-level BPE, byte ids in GPT-2's order, <|endoftext|> last."""
    ranks = train_bpe(TEXT, 300, pattern=hf_tokenizer.GPT2_PATTERN)
    chars = hf_tokenizer.byte_chars()
    spell = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    gpt2_order = sorted(range(256), key=lambda b: (chars[b] != chr(b), b))  # printable bytes first
    vocab = {chars[b]: i for i, b in enumerate(gpt2_order)}
    merges = []
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            vocab[spell(token)] = r
            merges.append(" ".join(spell(p) for p in how_built(token, ranks)))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def gpt2_weights(vocab_size, seed=0):
    """GPT-2's state dict as the hub's model.safetensors holds it: no "transformer." prefix, Conv1D (in, out)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    C = N_EMBD
    sd = {"wte.weight": r(vocab_size, C), "wpe.weight": r(BLOCK, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(N_LAYER):
        for name, shape in [("ln_1", None), ("ln_2", None), ("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)),
                            ("mlp.c_fc", (C, 4 * C)), ("mlp.c_proj", (4 * C, C))]:
            sd[f"h.{i}.{name}.weight"] = 1 + r(C) if shape is None else r(*shape)
            sd[f"h.{i}.{name}.bias"] = r(C if shape is None else shape[1])
    return sd


def write_gpt2_dir(path, fmt="safetensors", weights=None):
    vocab, merges = small_bpe()
    weights = gpt2_weights(len(vocab)) if weights is None else weights
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": len(vocab), "n_positions": BLOCK,
        "n_embd": N_EMBD, "n_layer": N_LAYER, "n_head": N_HEAD, "activation_function": "gelu_new"}))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:  # as older save_pretrained wrote it: prefixed keys, the causal-mask buffers, an lm_head
        sd = {"transformer." + k: v for k, v in weights.items()}
        sd.update({f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, BLOCK, BLOCK)) for i in range(N_LAYER)})
        sd["lm_head.weight"] = weights["wte.weight"]
        torch.save(sd, path / "pytorch_model.bin")
    return path


def gpt2_logits(sd, idx):
    """GPT-2's forward pass, written from its state dict alone, in float64."""
    g = {k: v.double() for k, v in sd.items()}
    C, T, D = N_EMBD, idx.size(1), N_EMBD // N_HEAD
    ln = lambda x, name: F.layer_norm(x, (C,), g[name + ".weight"], g[name + ".bias"], 1e-5)  # noqa: E731
    conv = lambda x, name: x @ g[name + ".weight"] + g[name + ".bias"]  # noqa: E731
    x = g["wte.weight"][idx] + g["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(N_LAYER):
        q, k, v = conv(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, -1)
        q, k, v = (t.view(1, T, N_HEAD, D).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, -math.inf).softmax(-1)
        x = x + conv((att @ v).transpose(1, 2).reshape(1, T, C), f"h.{i}.attn.c_proj")
        h = F.gelu(conv(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc"), approximate="tanh")
        x = x + conv(h, f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ g["wte.weight"].T


def bpe_ids(text, vocab, merges):
    """Byte-level BPE as GPT-2 defines it: split by the pattern, then join the pair merged earliest, again and again."""
    order = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    chars = hf_tokenizer.byte_chars()
    ids = []
    for chunk in regex.findall(hf_tokenizer.GPT2_PATTERN, text):
        parts = [chars[b] for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            best, i = min((order.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if best == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def run(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


def load(path, **kw):
    ckpt = common.load_checkpoint(path)
    tok = load_tokenizer(ckpt["tokenizer"])
    return common.gpt_from_checkpoint(ckpt, tok, **kw).eval(), tok, ckpt


# ----------------------------------------------------------------------------------------------
# In


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_init_dir_gives_the_state_dicts_logits_and_the_vocabularys_ids(tmp_path, fmt):
    vocab, merges = small_bpe()
    weights = gpt2_weights(len(vocab))
    model, tok, ckpt = load(write_gpt2_dir(tmp_path / "gpt2", fmt, weights))
    assert ckpt["stage"] == "pretrain" and model.config.n_head == N_HEAD and not model.config.rope
    assert tok.encode(TEXT) == bpe_ids(TEXT, vocab, merges)
    assert tok.eot_id == vocab["<|endoftext|>"]
    idx = torch.tensor([tok.encode(TEXT)[:BLOCK]])
    with torch.no_grad():
        logits = model(idx).double()
    torch.testing.assert_close(logits[..., :len(vocab)], gpt2_logits(weights, idx), atol=1e-4, rtol=1e-4)
    # our chat tokens: after GPT-2's, embedded at the mean row, so the chat template works
    chat = [tok.user_id, tok.assistant_id, tok.system_id, tok.end_id]
    assert sorted(chat) == list(range(len(vocab), len(vocab) + 4)) and model.config.vocab_size == len(vocab) + 4
    wte = model.transformer.wte.weight
    torch.testing.assert_close(wte[chat], weights["wte.weight"].mean(0).expand(4, -1))
    assert tok.decode(tok.render_prompt([{"role": "user", "content": "Hi"}])) == "<|endoftext|><|user|>Hi<|end|><|assistant|>"


def test_sample_runs_from_a_gpt2_directory(tmp_path):
    r = run("sample.py", f"--init={write_gpt2_dir(tmp_path / 'gpt2')}", "--max_new_tokens=5", "--chat",
            "--prompt=Where does Lucy live?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 1


def test_the_hubs_name_downloads_once_into_the_cache(tmp_path, monkeypatch, capsys):
    d = write_gpt2_dir(tmp_path / "hub" / "openai-community" / "gpt2" / "resolve" / "main")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "hub"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        cached = hf.local_dir("gpt2")
        assert capsys.readouterr().out.count("downloading") == 4
        assert all((cached / f).read_bytes() == (d / f).read_bytes() for f in hf.HUB_FILES)
    finally:
        server.shutdown()
    ckpt = common.load_checkpoint("gpt2")  # the server is gone: the cache serves
    assert "downloading" not in capsys.readouterr().out and ckpt["tokenizer"] == str(cached)


# ----------------------------------------------------------------------------------------------
# Out and back


def save_ckpt(path, model, tok_dir, stage):
    common.save_checkpoint(path, {"stage": stage, "model_args": dataclasses.asdict(model.config),
                                  "model": model.state_dict(), "tokenizer": str(tok_dir)})
    return path


@pytest.mark.parametrize("rope", [False, True])
def test_export_then_init_is_a_round_trip(tmp_path, rope):
    d = write_gpt2_dir(tmp_path / "gpt2")
    torch.manual_seed(0)
    tok = load_tokenizer(d)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32, rope=rope)).eval()
    ckpt = save_ckpt(tmp_path / "sft.pt", model, d, "sft")
    r = run("export.py", f"--init={ckpt}", f"--out={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    assert ("GPT-NeoX" if rope else "GPT-2") in r.stdout
    back, tok2, ckpt2 = load(tmp_path / "out")
    assert ckpt2["stage"] == "sft" and back.config == model.config
    assert tok2.encode(TEXT) == tok.encode(TEXT) and tok2.n_vocab == tok.n_vocab and tok2.end_id == tok.end_id
    idx = torch.tensor([tok.encode(TEXT)[:BLOCK]])
    with torch.no_grad():
        torch.testing.assert_close(back(idx), model(idx))


def test_a_reward_models_heads_go_beside_its_trunk_and_come_back(tmp_path):
    d = write_gpt2_dir(tmp_path / "gpt2")
    tok = load_tokenizer(d)
    torch.manual_seed(1)
    rm = RewardModel(GPTConfig(vocab_size=tok.n_vocab, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32, rope=True))
    out = tmp_path / "out"
    r = run("export.py", f"--init={save_ckpt(tmp_path / 'rm.pt', rm, d, 'rm')}", f"--out={out}")
    assert r.returncode == 0 and hf.HEADS in r.stdout, r.stderr
    back, _, ckpt = load(out, reward=True)
    idx = torch.randint(0, tok.n_vocab, (2, 12))
    start, end = torch.tensor([3, 4]), torch.tensor([11, 9])
    with torch.no_grad():
        torch.testing.assert_close(back(idx, start, end)[0], rm.eval()(idx, start, end)[0])


@settings(max_examples=10)
@given(st.integers(257, 340), st.sampled_from([hf_tokenizer.GPT2_PATTERN, r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"]))
def test_tokenizer_json_reads_back_as_the_same_ranks(tmp_path_factory, vocab_size, pattern):
    ranks = train_bpe(TEXT, vocab_size, pattern=pattern)
    special = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_text(hf_tokenizer.write_json(pattern, ranks, special), encoding="utf-8")
    assert hf_tokenizer.read(d) == (pattern, ranks, special)


def test_byte_chars_are_gpt2s():
    chars = hf_tokenizer.byte_chars()
    assert len(set(chars)) == 256 and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ" and chars[ord("A")] == "A"


def test_the_exported_tokenizer_json_encodes_to_our_ids(tmp_path, tiny_world):
    tokenizers = pytest.importorskip("tokenizers")
    tok = load_tokenizer(write_gpt2_dir(tmp_path / "gpt2"))
    path = tmp_path / "tokenizer.json"
    enc = tok.encoding
    path.write_text(hf_tokenizer.write_json(enc._pat_str, enc._mergeable_ranks, enc._special_tokens), encoding="utf-8")
    theirs = tokenizers.Tokenizer.from_file(str(path))
    text = TEXT + (tiny_world["data"] / "corpus_val.txt").read_text(encoding="utf-8")[:50_000]
    assert theirs.encode(text).ids == tok.encode(text)
    assert theirs.encode("<|user|>Hi<|end|>").ids == [tok.user_id, *tok.encode("Hi"), tok.end_id]


@pytest.mark.parametrize("rope", [False, True])
def test_transformers_loads_the_export_with_our_logits(tmp_path, rope):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(write_gpt2_dir(tmp_path / "gpt2"))
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, rope=rope)).eval()
    hf.save(model, tok, "sft", tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.tensor([tok.encode(TEXT)[:BLOCK]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx), atol=1e-4, rtol=1e-4)


# A learner at the project's root, checking an export in the Python they opened there: our modules come
# first on sys.path, so none of their names may shadow a package transformers imports (ours was once
# `kernels`, which transformers >= 5 needs under that name). Either import order, in one process.
BOTH_IN_ONE = r"""
import sys
import torch
first, export = sys.argv[1:]
if first == "ours":
    import common, model
    import transformers
else:
    import transformers
    import common, model
theirs = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
ours = common.gpt_from_checkpoint(common.load_checkpoint(export)).eval()
assert isinstance(ours, model.GPT)
idx = torch.arange(24)[None]
with torch.no_grad():
    print(type(theirs).__name__, (theirs(idx).logits - ours(idx)).abs().max().item())
"""


@pytest.mark.parametrize("first", ["ours", "transformers"])
def test_our_gpt_and_transformers_run_in_one_process_from_the_projects_root(tmp_path, first):
    pytest.importorskip("transformers")
    tok = load_tokenizer(write_gpt2_dir(tmp_path / "gpt2"))
    torch.manual_seed(3)
    hf.save(GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)), tok, "sft",
            tmp_path / "out")
    r = run("-c", BOTH_IN_ONE, first, tmp_path / "out", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    name, diff = r.stdout.split()
    assert name == "GPT2LMHeadModel" and float(diff) < 1e-4


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


class Evil:
    def __reduce__(self):
        return (print, ("this .bin ran code",))


def broken(tmp_path, what):
    d = write_gpt2_dir(tmp_path / "gpt2", "bin" if what == "code" else "safetensors")
    if what == "missing weights":
        (d / "model.safetensors").unlink()
    elif what == "corrupt weights":
        (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    elif what == "code":
        torch.save({"wte.weight": Evil()}, d / "pytorch_model.bin")
    elif what == "mismatch":
        write_gpt2_dir(d, weights=gpt2_weights(len(small_bpe()[0]) - 7))
    elif what == "no tokenizer":
        (d / "vocab.json").unlink()
    elif what == "not a directory":
        return tmp_path / "nowhere"
    return d


@pytest.mark.parametrize("what, words", [
    ("missing weights", "no model.safetensors"), ("corrupt weights", "cannot be read safely"),
    ("code", "cannot be read safely"), ("mismatch", "do not belong together"), ("no tokenizer", "no tokenizer"),
    ("not a directory", "no checkpoint at")])
def test_a_bad_directory_is_a_user_error(tmp_path, capsys, what, words):
    with pytest.raises(cli.UserError, match=words):
        common.load_checkpoint(broken(tmp_path, what))
    assert "ran code" not in capsys.readouterr().out


def test_a_bad_directory_is_one_line_and_exit_2(tmp_path):
    r = run("sample.py", f"--init={broken(tmp_path, 'code')}")
    assert r.returncode == 2 and "cannot be read safely" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "ran code" not in r.stdout + r.stderr


def test_an_unreachable_hub_is_one_line_naming_the_download_command(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "XDG_CACHE_HOME": str(tmp_path)}
    r = run("sample.py", "--init=gpt2-medium", env=env)
    assert r.returncode == 2 and "hf download openai-community/gpt2-medium" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_export_never_writes_over_a_directory(tmp_path):
    d = write_gpt2_dir(tmp_path / "gpt2")
    before = sorted(p.name for p in d.iterdir())
    r = run("export.py", f"--init={d}", f"--out={d}")
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert sorted(p.name for p in d.iterdir()) == before
