"""Byte-level BPE: trained here, in plain Python; encoded by tiktoken; plus the chat template.

Train a tokenizer on the TinyWorld corpus (after `python -m data.tinyworld`):

    python -m data.tokenizer                                  # 4096 tokens -> out/tokenizer
    python -m data.tokenizer --input=data/real/tinystories_train.txt --vocab_size=8192

Byte-pair encoding starts from the 256 byte values and repeatedly fuses the most frequent adjacent
pair of tokens into a new token. The text is first cut into chunks by a regular expression (words,
numbers of up to three digits with their leading space, punctuation runs, whitespace), and pairs never cross a chunk, so a
token never spans, say, the end of one word and the start of the next.

A trained tokenizer is a directory with two files:
- tokenizer.bpe  — tiktoken's rank file: base64 of each token's bytes, a space, its rank; a token's
  rank is also its id, and a lower rank means an earlier merge;
- tokenizer.json — the split pattern and the special tokens with their ids.

The chat template (see `Tokenizer.render_chat`): a conversation starts with <|endoftext|>, which
also ends every pre-training document, so a conversation reads like a fresh document; then each
turn is <|role|>, the content's tokens, <|end|>:

    <|endoftext|><|user|>What is an LLM?<|end|><|assistant|>A large language model ...<|end|>
"""
import base64
import dataclasses
import hashlib
import heapq
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

from cli import UserError, run_main
from data import hf_tokenizer, write_atomic

# GPT-4's split pattern, but for numbers: contractions; a letter run with at most one leading
# non-letter (so " the" and "(the" are chunks); 1-3 digits with an optional leading space, as GPT-2
# keeps it (so " 42" is one chunk, and a number is one token that a small model can copy by the word
# before it, where " " then "42" would need the two words before); a punctuation run with an
# optional leading space; newlines; whitespace, leaving one space to start the next word.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+| ?\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
ROLES = ("user", "assistant", "system")


# ----------------------------------------------------------------------------------------------
# Training


def train_bpe(text: str, vocab_size: int, pattern: str = SPLIT_PATTERN, verbose: bool = False) -> dict[bytes, int]:
    """Learn vocab_size - 256 merges; returns tiktoken's mergeable ranks {token bytes: rank}.

    The work is done on distinct chunks, each with its count, so a chunk that occurs a thousand
    times is merged once. Three structures stay up to date as merges happen:
    - pair_counts[pair]: how often the pair occurs in the whole text;
    - chunks_with[pair]: which chunks contain the pair (it may still list a chunk that lost it);
    - heap: (-count, pair) entries; an entry whose count is no longer current is skipped when
      popped, so the heap's top valid entry is the most frequent pair. Ties go to the smallest
      pair of ids, which makes training deterministic.
    A merge rewrites only the chunks that contain the pair and adjusts the counts of the pairs
    those chunks lose and gain.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte tokens), got {vocab_size}")
    t0 = time.time()
    chunk_counts = Counter(regex.findall(pattern, text))
    chunks = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # token ids of each chunk
    counts = list(chunk_counts.values())
    token_bytes = [bytes([i]) for i in range(256)]  # id -> bytes; the id is also the rank
    ranks = {b: i for i, b in enumerate(token_bytes)}

    pair_counts = defaultdict(int)
    chunks_with = defaultdict(set)
    for i, ids in enumerate(chunks):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[i]
            chunks_with[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    unmergeable = set()
    if verbose:
        print(f"{len(text):,} characters, {sum(counts):,} chunks, {len(chunks):,} distinct, {time.time() - t0:.1f}s")

    n_merges = vocab_size - 256
    while len(token_bytes) < vocab_size and heap:
        neg_n, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_n or pair in unmergeable:
            continue  # a stale entry: this pair's count has changed since it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in ranks:
            # The same bytes already form a token, made from a different pair; tiktoken's ranks
            # are keyed by bytes, so this pair cannot get an id of its own: never merge it.
            unmergeable.add(pair)
            continue
        new_id = len(token_bytes)
        token_bytes.append(merged)
        ranks[merged] = new_id
        changed = set()
        for i in chunks_with.pop(pair):
            old = chunks[i]
            new = merge_pair(old, pair, new_id)
            if len(new) == len(old):
                continue  # the index was stale: this chunk lost the pair to an earlier merge
            for p in zip(old, old[1:]):
                pair_counts[p] -= counts[i]
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += counts[i]
                chunks_with[p].add(i)
                changed.add(p)
            chunks[i] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
        done = new_id - 255
        if verbose and (done % 256 == 0 or done == n_merges):
            print(f"merge {done:5d}/{n_merges}  count {-neg_n:8,}  {merged!r:24}  {time.time() - t0:6.1f}s")
    if len(token_bytes) < vocab_size:
        print(f"warning: the text only supports {len(token_bytes)} tokens, fewer than vocab_size={vocab_size}")
    return ranks


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of pair in ids, left to right, by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------------------------
# The tokenizer: encoding through tiktoken, and the chat template


class Tokenizer:
    """A tiktoken encoding with our special tokens, and the chat template on top of it."""

    def __init__(self, encoding: tiktoken.Encoding, path: str):
        self.encoding = encoding
        self.name = encoding.name
        self.path = path  # the directory it was loaded from, or "gpt2"
        self.n_vocab = encoding.n_vocab  # including the special tokens
        # Changes whenever the vocabulary does: a key for caches of token ids.
        self.fingerprint = hashlib.sha1(
            repr(sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1])).encode()
            + repr(sorted(encoding._special_tokens.items())).encode() + encoding._pat_str.encode()
        ).hexdigest()[:16]
        special = encoding._special_tokens
        self.eot_id = special["<|endoftext|>"]
        self.user_id = special["<|user|>"]
        self.assistant_id = special["<|assistant|>"]
        self.system_id = special["<|system|>"]
        self.end_id = special["<|end|>"]
        self.role_ids = {"user": self.user_id, "assistant": self.assistant_id, "system": self.system_id}

    def __repr__(self):
        return f"Tokenizer({self.path!r}, n_vocab={self.n_vocab})"

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; text that looks like a special token is encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        """Ids (special ones included) back to text."""
        return self.encoding.decode(list(ids))

    def encode_document(self, text: str) -> list[int]:
        """A pre-training document: its tokens, then <|endoftext|>."""
        return self.encode(text) + [self.eot_id]

    def render_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A conversation to (ids, mask); mask is 1 on the tokens the model learns to produce.

        Those are the content of assistant turns and the <|end|> that closes each of them: the
        model must learn to stop. The <|assistant|> token itself is given, so its mask is 0.
        """
        ids, mask = [self.eot_id], [0]
        for m in messages:
            role, content = check_message(m)
            body = self.encode(content) + [self.end_id]
            ids += [self.role_ids[role]] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far (ending with a user turn), then <|assistant|>: where the answer begins."""
        if messages and messages[-1].get("role") == "assistant":
            raise ValueError("render_prompt: the last message is the assistant's; drop it to get the prompt")
        ids, _ = self.render_chat(messages)
        return ids + [self.assistant_id]


def check_message(m) -> tuple[str, str]:
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"a message must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")
    return m["role"], m["content"]


# ----------------------------------------------------------------------------------------------
# Saving and loading


def save_tokenizer(ranks: dict[bytes, int], out_dir, pattern: str = SPLIT_PATTERN) -> None:
    """Write out_dir/tokenizer.bpe (tiktoken's rank file) and out_dir/tokenizer.json."""
    out_dir = Path(out_dir)
    lines = [f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    write_atomic(out_dir / "tokenizer.bpe", "".join(lines))
    special = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    meta = {"pattern": pattern, "special_tokens": special, "n_vocab": len(ranks) + len(special)}
    write_atomic(out_dir / "tokenizer.json", json.dumps(meta, indent=1) + "\n")


def load_ranks(path) -> dict[bytes, int]:
    """Read a tiktoken rank file: `base64-token rank` per line."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_tokenizer(path_or_name="out/tokenizer") -> Tokenizer:
    """A tokenizer directory written by save_tokenizer, a Hugging Face one (vocab.json and merges.txt,
    or tokenizer.json), or "gpt2" (tiktoken's); our chat tokens are added where they are missing."""
    if str(path_or_name) == "gpt2":
        return load_gpt2()
    path = Path(path_or_name)
    if not (path / "tokenizer.bpe").is_file() and hf_tokenizer.is_hf_tokenizer(path):
        pattern, ranks, special = hf_tokenizer.read(path)
        try:
            encoding = tiktoken.Encoding(name=f"hf-{path.name}", pat_str=pattern, mergeable_ranks=ranks,
                                         special_tokens=with_chat_tokens(special))
        except ValueError as e:
            raise UserError(f"{path}: tiktoken cannot use this tokenizer ({e})") from None
        return Tokenizer(encoding, str(path))
    if not (path / "tokenizer.bpe").is_file() or not (path / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {path}: make one with `python -m data.tokenizer --out={path}`")
    meta = json.loads((path / "tokenizer.json").read_text())
    encoding = tiktoken.Encoding(
        name=f"tinybpe-{path.name}",
        pat_str=meta["pattern"],
        mergeable_ranks=load_ranks(path / "tokenizer.bpe"),
        special_tokens=meta["special_tokens"],
    )
    return Tokenizer(encoding, str(path))


def load_gpt2() -> Tokenizer:
    """tiktoken's GPT-2 encoding (ids 0..50256, <|endoftext|> = 50256), our chat tokens after it."""
    try:
        base = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network, a proxy, a blocked host: tiktoken raises many kinds
        raise UserError(
            f"cannot fetch tiktoken's gpt2 encoding ({type(e).__name__}); use a trained tokenizer "
            f"directory instead: `python -m data.tokenizer --out=out/tokenizer`, then --tokenizer=out/tokenizer"
        ) from None
    encoding = tiktoken.Encoding(name="gpt2-chat", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens=with_chat_tokens(base._special_tokens))
    return Tokenizer(encoding, "gpt2")


def with_chat_tokens(special: dict[str, int]) -> dict[str, int]:
    """The special tokens, plus ours that are missing, numbered after the largest id."""
    special = dict(special)
    for tok in SPECIAL_TOKENS:
        if tok not in special:
            special[tok] = max(special.values(), default=-1) + 1
    return special


# ----------------------------------------------------------------------------------------------
# Command line


@dataclasses.dataclass
class Config:
    input: str = "data/tinyworld/corpus_train.txt"  # text to train on (a corpus file or any text)
    vocab_size: int = 4096  # tokens including the 256 bytes, excluding the special tokens
    out: str = "out/tokenizer"  # directory for tokenizer.bpe and tokenizer.json
    eval: str = "auto"  # text to measure bytes per token on; auto: corpus_val.txt beside --input
    max_bytes: int = 50_000_000  # train on at most this many bytes from the start of --input


def main(cfg: Config) -> None:
    path = Path(cfg.input)
    if not path.is_file():
        hint = "run `python -m data.tinyworld` first" if "tinyworld" in cfg.input else "pass --input=FILE"
        raise UserError(f"input file {path} not found: {hint}")
    if cfg.vocab_size < 256 + 1:
        raise UserError(f"--vocab_size={cfg.vocab_size}: must be more than 256 (the byte tokens)")
    eval_path = Path(cfg.eval if cfg.eval != "auto" else path.with_name("corpus_val.txt"))
    if cfg.eval != "auto" and not eval_path.is_file():
        raise UserError(f"eval file {eval_path} not found: pass --eval=FILE, or --eval=auto")
    with open(path, "rb") as f:
        text = f.read(cfg.max_bytes).decode("utf-8", errors="ignore")

    t0 = time.time()
    ranks = train_bpe(text, cfg.vocab_size, verbose=True)
    seconds = time.time() - t0
    save_tokenizer(ranks, cfg.out)
    tok = load_tokenizer(cfg.out)
    n_bytes = len(text.encode("utf-8"))
    print(f"trained {len(ranks)} tokens (+{len(SPECIAL_TOKENS)} special = {tok.n_vocab}) on {n_bytes:,} bytes "
          f"in {seconds:.1f}s -> {cfg.out}")
    if eval_path.is_file():
        val = eval_path.read_text(encoding="utf-8")
        n_tokens = len(tok.encode(val))
        print(f"{eval_path}: {len(val.encode('utf-8')):,} bytes, {n_tokens:,} tokens, "
              f"{len(val.encode('utf-8')) / max(n_tokens, 1):.2f} bytes/token")


PRESETS = {"smoke": dict(vocab_size=320)}  # make demo PRESET=smoke: the journey's plumbing in a minute


if __name__ == "__main__":
    run_main(main, Config, PRESETS)
