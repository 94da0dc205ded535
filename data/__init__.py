"""Small helpers that every data script shares: file formats, downloads, record conversion.

File formats (every stage reads these):
- a corpus is UTF-8 text whose documents are separated by one blank line, and a document has no
  blank line inside it (`read_documents` / `write_documents`); the pre-training script ends each
  document's tokens with the tokenizer's end-of-text token;
- every other data set is JSON Lines, one record per line (`read_jsonl` / `write_jsonl`).
"""
import gzip
import hashlib
import json
import os
import re
import urllib.request
from collections import Counter
from pathlib import Path

from cli import UserError  # every user mistake is cli.UserError: one line, exit code 2

# ----------------------------------------------------------------------------------------------
# Files


def write_atomic(path, text: str) -> None:
    """Write text to path through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clean_document(text: str) -> str:
    """A document as the corpus format wants it: no blank lines inside, no surrounding whitespace."""
    return re.sub(r"\n\s*\n", "\n", text.strip())


def write_documents(path, docs) -> int:
    """Write documents separated by blank lines (each cleaned first); returns how many."""
    docs = [clean_document(d) for d in docs]
    docs = [d for d in docs if d]
    write_atomic(path, "\n\n".join(docs) + "\n")
    return len(docs)


def read_documents(path) -> list[str]:
    """The documents of a corpus file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus file {path} not found: run `python -m data.tinyworld` (or a data/prepare_*.py script)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # any line ending, as text mode reads
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line} is not UTF-8 text (byte {e.start}): convert it, or run it through a "
                        "data/prepare_*.py script") from None
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def write_jsonl(path, records) -> int:
    """Write records as JSON Lines; returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path) -> list[dict]:
    """Read JSON Lines; a malformed line is a UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found: run `python -m data.tinyworld` (or a data/prepare_*.py script)")
    records = []
    offset = 0
    with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte's line can be named
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno} is not UTF-8 text (byte {offset + e.start}): convert it, or "
                                "write it with a data/prepare_*.py script") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}): fix or delete that line") from None
    return records


def numbered_records(path):
    """(line number, record) for each record of a JSON Lines file, so that an error about a record can
    name its line (data.read_jsonl skips blank lines, so a record's index need not be its line)."""
    records = read_jsonl(path)  # a missing file, a bad byte and a malformed line get its error lines
    with open(path, "rb") as f:  # its lines as read_jsonl splits them
        lines = [n for n, raw in enumerate(f, 1) if raw.decode("utf-8").strip()]
    return list(zip(lines, records))


# ----------------------------------------------------------------------------------------------
# Sources for the data/prepare_*.py scripts


class Malformed(Exception):
    """A source record that cannot be converted; the message is the reason, counted in the report."""


def fetch(src: str, cache_dir="data/real/raw") -> Path:
    """A local path as is; a URL downloaded once into cache_dir (kept for the next run)."""
    if "://" not in src:
        path = Path(src)
        if not path.is_file():
            raise UserError(f"source file {path} not found: pass --src=PATH or --src=URL")
        return path
    name = src.rstrip("/").split("/")[-1].split("?")[0]
    path = Path(cache_dir) / f"{hashlib.sha1(src.encode()).hexdigest()[:8]}-{name}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {src} -> {path}")
        try:
            with urllib.request.urlopen(src, timeout=60) as r, open(path.with_suffix(".part"), "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
        except OSError as e:
            raise UserError(f"cannot download {src} ({e}): download it by hand and pass --src=FILE") from None
        os.replace(path.with_suffix(".part"), path)
    return path


def open_text(path):
    """Open a text file for reading, decompressing .gz transparently; bad bytes become U+FFFD."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_records(path):
    """The records of a JSON Lines file or of a JSON array; None stands for a line that is not JSON."""
    with open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a valid JSON array ({e.msg} at line {e.lineno})") from None
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(None)
    return records


def convert_records(records, convert) -> tuple[list, Counter]:
    """Apply convert to each record; (converted, {reason: count}) for those it skips.

    convert raises Malformed(reason) for a record it rejects; a missing or mistyped field
    (KeyError, TypeError, AttributeError) counts as malformed too.
    """
    kept, skipped = [], Counter()
    for record in records:
        try:
            if not isinstance(record, dict):
                raise Malformed("not a JSON object")
            kept.append(convert(record))
        except Malformed as e:
            skipped[str(e)] += 1
        except (KeyError, TypeError, AttributeError):
            skipped["missing or mistyped field"] += 1
    return kept, skipped


def report(src, out, n_kept: int, skipped: Counter, unit="records") -> None:
    """One line per converted source: what was kept, where it went, what was skipped and why."""
    if n_kept == 0:
        raise UserError(f"{src}: no usable {unit} ({dict(skipped)}): is it the right file?")
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    print(f"{src}: {n_kept:,} {unit} -> {out}; skipped {sum(skipped.values()):,}" + (f" ({why})" if why else ""))



def convert_file(src, out, convert) -> None:
    """A source (file or URL) of JSON records to our JSONL format at out, with the one-line report."""
    kept, skipped = convert_records(read_records(fetch(src)), convert)
    report(src, out, len(kept), skipped)
    write_jsonl(out, kept)