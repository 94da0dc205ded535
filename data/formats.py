"""The stages' data files, read and checked: conversations (SFT), preference pairs (reward model, DPO),
prompts (PPO), held-out questions, math problems (GRPO). Each is JSON Lines, one record per line; a bad
line is one error that names the file and line, and, when the line belongs to another stage's file,
which (the commonest mistake is passing the wrong file). Records too long for the model's context are
dropped and counted, never cut. A reader given part (a slice of the file's records, see split) reads
those alone: the part trained on, or the part held out for evaluation."""
from pathlib import Path

from cli import UserError
from data import numbered_records
from data.tinymath import extract_answer

CONVERSATION = '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'
PAIR = '{"prompt": ..., "chosen": ..., "rejected": ...}'
PROBLEM = '{"question": ..., "answer": "... #### <number>"}'
KINDS = {"a conversation": ("SFT's data", ("messages",)),  # the fields that tell each stage's records apart
         "a preference pair": ("the reward model's and DPO's data", ("prompt", "chosen", "rejected")),
         "a math problem": ("GRPO's data", ("question", "answer"))}


def not_a(path, line, record, wanted, form, fields=()):
    """The error for a line that is not the record wanted: which other stage's it is, if any, or which of
    the fields it lacks, and the form a line must have."""
    kind = next((f"{k} ({whose})" for k, (whose, keys) in KINDS.items()
                 if k != wanted and isinstance(record, dict) and set(keys) <= set(record)), None)
    lacks = [f for f in fields if not isinstance(record, dict) or not isinstance(record.get(f), str)]
    what = (f"this is {kind}, not {wanted}" if kind else
            f'not {wanted} ("{lacks[0]}" is missing or not a string)' if lacks else f"not {wanted}")
    return UserError(f"{path}:{line}: {what}: each line must be {form}")


def held_out_count(n, share):
    """How many of n records a held-out share takes: at least one, and never the last one left to train on."""
    return min(n - 1, max(1, round(n * share))) if share > 0 and n > 1 else 0


def split(path, share):
    """(the records of path trained on, those held out: its last `share`), as slices of its records."""
    n = len(numbered_records(path))
    cut = n - held_out_count(n, share)
    return slice(0, cut), slice(cut, n)


def require_some(kept, dropped, path, what, context, fix="shorten them, or use a model with a longer context"):
    """The error when a file leaves nothing to train on: it is empty, or every record is too long."""
    if not kept and not dropped:
        raise UserError(f"{path} holds no {what}: give a JSON Lines file of them, one per line")
    if not kept:
        raise UserError(f"{path}: every one of its {what} is too long for the context ({context} tokens), "
                        f"the first at line {dropped[0]}: {fix}")


def conversations(path, tok, block_size, part=slice(None)):
    """Every conversation as (ids, mask) from the chat template; those longer than the context
    (block_size + 1 tokens: inputs and targets are shifted by one) are dropped.
    Returns (examples, the line numbers of the dropped ones)."""
    examples, dropped = [], []
    for line, record in numbered_records(path)[part]:
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise not_a(path, line, record, "a conversation", CONVERSATION)
        try:
            ids, mask = tok.render_chat(messages)
        except ValueError as e:
            raise UserError(f"{path}:{line}: {e}: fix or delete that line") from None
        if not any(mask):
            raise UserError(f"{path}:{line}: no assistant turn, so nothing to learn: add one or delete that line")
        if len(ids) > block_size + 1:
            dropped.append(line)
        else:
            examples.append((ids, mask))
    return examples, dropped


def pairs(path, tok, most, part=slice(None)):
    """Every preference pair as (prompt ids, chosen ids, rejected ids, prompt text): the prompt is one user
    turn through the chat template, ending with <|assistant|>; a reply is its tokens and <|end|>. A pair
    whose prompt and longer reply exceed `most` tokens is dropped. Returns (pairs, dropped line numbers)."""
    kept, dropped = [], []
    for line, r in numbered_records(path)[part]:
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected"))):
            raise not_a(path, line, r, "a preference pair", PAIR + " with string values", ("prompt", "chosen", "rejected"))
        prompt = tok.render_prompt([{"role": "user", "content": r["prompt"]}])
        chosen, rejected = tok.encode(r["chosen"]) + [tok.end_id], tok.encode(r["rejected"]) + [tok.end_id]
        if len(prompt) + max(len(chosen), len(rejected)) > most:
            dropped.append(line)
        else:
            kept.append((prompt, chosen, rejected, r["prompt"]))
    return kept, dropped


def prompts(path):
    """The distinct user prompts of a file of preference pairs ("prompt") or conversations (the first turn)."""
    found = []
    for line, r in numbered_records(path):
        if isinstance(r, dict) and isinstance(r.get("prompt"), str):
            found.append(r["prompt"])
        elif isinstance(r, dict) and isinstance(r.get("messages"), list) and r["messages"] \
                and isinstance(r["messages"][0], dict) and isinstance(r["messages"][0].get("content"), str):
            found.append(r["messages"][0]["content"])
        else:
            raise not_a(path, line, r, "a prompt", f"a preference pair {PAIR} or a conversation {CONVERSATION}")
    return sorted(set(found))


def questions(path, tok, block_size):
    """The held-out questions ({"messages": [user turn], "answer", "split"} records), checked now: a bad
    one would otherwise fail after training, or score a question it could not ask as wrong."""
    if not Path(path).is_file():
        raise UserError(f"no held-out questions at {path}: run `python -m data.tinyworld`, or pass --qa_data=")
    records = []
    for line, record in numbered_records(path):
        if not (isinstance(record, dict) and isinstance(record.get("messages"), list)
                and isinstance(record.get("answer"), str)):
            raise UserError(f'{path}:{line}: a held-out question needs "messages" (ending with the user\'s turn) and '
                            '"answer": fix that line, or pass --qa_data= to skip the evaluation')
        try:
            prompt = tok.render_prompt(record["messages"])
        except ValueError as e:
            raise UserError(f"{path}:{line}: {e}: fix or delete that line") from None
        if len(prompt) >= block_size:
            raise UserError(f"{path}:{line}: the question is {len(prompt)} tokens, which leaves no room for an answer "
                            f"in the model's context of {block_size}: shorten it or delete that line")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no questions: give a JSONL file of them, or pass --qa_data=")
    return records


def problems(path, tok, room, part=slice(None)):
    """Every math problem with its chat prompt; those whose prompt leaves fewer than `room` tokens of the
    context for the answer are dropped. Returns (problems, dropped line numbers)."""
    kept, dropped = [], []
    for line, r in numbered_records(path)[part]:
        if not (isinstance(r, dict) and isinstance(r.get("question"), str) and extract_answer(str(r.get("answer")))):
            raise not_a(path, line, r, "a math problem", PROBLEM, ("question",))
        prompt = tok.render_prompt([{"role": "user", "content": r["question"]}])
        if len(prompt) > room:
            dropped.append(line)
        else:
            kept.append({**r, "prompt": prompt})
    return kept, dropped
