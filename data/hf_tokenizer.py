"""Hugging Face's byte-level BPE files: read as tiktoken's ranks, written as a tokenizer.json.

A Hugging Face directory spells its tokenizer as GPT-2's vocab.json (token -> id) and merges.txt
(one merge per line, in order), or as one tokenizer.json, which also holds the split pattern and
the special tokens. Both spell each token's bytes with one printable character per byte.
`data.tokenizer.load_tokenizer` reads them; export.py writes tokenizer.json.
"""
import json
from pathlib import Path

import regex

from cli import UserError

# GPT-2's split pattern, for a vocab.json and merges.txt, which come without one
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_chars() -> list[str]:
    """GPT-2's spelling of each byte in its vocab.json: a printable byte stands for itself; each other
    byte (space, controls, a few more), in byte order, for the next character from U+0100 on, so a
    token is always a printable string (a leading space shows as 'Ġ')."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, n = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + n))
        n += b not in printable
    return chars


def is_hf_tokenizer(path: Path) -> bool:
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return True
    try:
        return "model" in json.loads((path / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False


def read(path: Path) -> tuple[str, dict[bytes, int], dict[str, int]]:
    """A Hugging Face byte-level BPE as tiktoken's split pattern, ranks and special tokens. A token's id is its rank, which holds when the
    ids follow the merge order, as GPT-2's do: the 256 bytes, then each merge's result in turn.
    Vocabulary entries that are neither a byte nor a merge's result are special (<|endoftext|>)."""
    meta = json.loads((path / "tokenizer.json").read_text()) if (path / "tokenizer.json").is_file() else {}
    try:
        if "model" in meta:
            if meta["model"].get("type") != "BPE":
                raise UserError(f"{path}/tokenizer.json is a {meta['model'].get('type')} tokenizer, not byte-level BPE")
            vocab, merges = meta["model"]["vocab"], meta["model"]["merges"]
            special = {t["content"]: t["id"] for t in meta.get("added_tokens", [])}
            pattern = split_pattern(meta.get("pre_tokenizer")) or GPT2_PATTERN
        else:
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = [line for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if line and not line.startswith("#version")]
            special, pattern = {}, GPT2_PATTERN
        merged = [tuple(m.split(" ") if isinstance(m, str) else m) for m in merges]
        made = {a + b for a, b in merged}
        ids = [vocab[a + b] for a, b in merged]
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} holds no readable byte-level BPE ({type(e).__name__}: {e}): "
                        "it needs vocab.json and merges.txt, or a tokenizer.json, as save_pretrained writes them") from None
    if any(b < a for a, b in zip(ids, ids[1:])):
        raise UserError(f"the ids in {path} do not follow its merge order, which tiktoken's ranks need")
    to_byte = {c: b for b, c in enumerate(byte_chars())}
    ranks = {}
    for token, i in vocab.items():
        if token in special:
            continue
        if not (len(token) == 1 or token in made) or any(c not in to_byte for c in token):
            special[token] = i
        else:
            ranks[bytes(to_byte[c] for c in token)] = i
    if sum(len(t) == 1 for t in ranks) != 256:
        raise UserError(f"{path} is not a byte-level BPE: its vocabulary lacks some of the 256 byte tokens")
    return pattern, ranks, special


def split_pattern(pre_tokenizer) -> str | None:
    """The regular expression of a tokenizer.json's Split pre-tokenizer; GPT-2's for a ByteLevel one
    that splits by itself; None when there is neither."""
    if not isinstance(pre_tokenizer, dict):
        return None
    if pre_tokenizer.get("type") == "Split":
        return pre_tokenizer["pattern"].get("Regex") or regex.escape(pre_tokenizer["pattern"]["String"])
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return GPT2_PATTERN
    for inner in pre_tokenizer.get("pretokenizers", []):
        if found := split_pattern(inner):
            return found
    return None


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every way to build each token from two earlier ones, in the order of the token's rank: the merge
    list under which Hugging Face's BPE splits text as tiktoken's ranks do."""
    found = []
    for token, r in ranks.items():
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if ranks.get(a, r) < r and ranks.get(b, r) < r:
                found.append((r, ranks[a], ranks[b], a, b))
    return [(a, b) for *_, a, b in sorted(found)]


def write_json(pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> str:
    """tokenizer.json for Hugging Face's tokenizers library: our ranks as ids, our split pattern, our
    special tokens. ignore_merges makes a chunk that is itself a token one token, as in tiktoken."""
    chars = byte_chars()
    spell = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(special.items(), key=lambda kv: kv[1])]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {spell(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [f"{spell(a)} {spell(b)}" for a, b in merges_of(ranks)]},
    }, ensure_ascii=False, indent=1) + "\n"
