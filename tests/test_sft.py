"""Stage 2: the SFT loss's properties, the mask after the shift, a tiny run end to end. Bad input:
test_faults.py."""
import json

import pytest
import torch
from hypothesis import given, strategies as st

import common
from conftest import run_script
from data.tokenizer import load_tokenizer
from faults import Case, Script, data_file_cases, jsonl, write, wrong_file
from model import GPT, GPTConfig
from train_sft import collate, get_batch, sft_loss

# ----------------------------------------------------------------------------- the loss


@st.composite
def logprobs_and_mask(draw, min_rows=1):
    B, T = draw(st.integers(min_rows, 6)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 10
    mask = (torch.rand(B, T, generator=gen) < 0.6).double()
    mask[0, 0] = 1.0  # at least one token counts
    return logprobs, mask


@given(logprobs_and_mask(), st.floats(-50, 0))
def test_masked_tokens_do_not_change_the_loss(lm, other):
    logprobs, mask = lm
    changed = torch.where(mask.bool(), logprobs, torch.full_like(logprobs, other))
    assert sft_loss(changed, mask).item() == pytest.approx(sft_loss(logprobs, mask).item(), rel=1e-12)


@given(logprobs_and_mask())
def test_an_all_ones_mask_gives_the_plain_mean(lm):
    logprobs, _ = lm
    assert sft_loss(logprobs, torch.ones_like(logprobs)).item() == pytest.approx(-logprobs.mean().item(), rel=1e-12)


@given(logprobs_and_mask(min_rows=2), st.data())
def test_micro_batches_normalised_by_the_total_count_add_up_to_the_batch_loss(lm, data):
    logprobs, mask = lm
    cuts = sorted(data.draw(st.sets(st.integers(1, len(mask) - 1), max_size=len(mask) - 1)))
    parts = list(zip(torch.tensor_split(logprobs, cuts), torch.tensor_split(mask, cuts)))
    total = mask.sum()
    accumulated = sum(sft_loss(lp, m, n_tokens=total) for lp, m in parts)
    assert accumulated.item() == pytest.approx(sft_loss(logprobs, mask).item(), rel=1e-12)


def test_the_loss_is_minus_the_mean_logprob_of_the_counted_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert sft_loss(logprobs, mask).item() == pytest.approx((2 + 3 + 4) / 3)


# ----------------------------------------------------------------------------- the data


def test_the_mask_marks_the_assistant_tokens_after_the_shift(tiny_world):
    tok = load_tokenizer(tiny_world["tokenizer"])
    chats = [[{"role": "user", "content": "Where does Ada live?"}, {"role": "assistant", "content": "In Oakvale."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]]
    x, y, m = collate([tok.render_chat(c) for c in chats])
    for row, chat in enumerate(chats):
        ids, _ = tok.render_chat(chat)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and y[row, :n].tolist() == ids[1:]
        assert (y[row, n:] == -100).all() and (m[row, n:] == 0).all()  # padding counts for nothing
        learned = [int(t) for t, keep in zip(y[row], m[row]) if keep]
        expected = []
        for msg in chat:
            if msg["role"] == "assistant":
                expected += tok.encode(msg["content"]) + [tok.end_id]
        assert learned == expected
        # each learned run starts right after <|assistant|>: the model is given the role, learns the reply
        starts = [t for t in range(n) if m[row, t] and (t == 0 or not m[row, t - 1])]
        assert [int(x[row, t]) for t in starts] == [tok.assistant_id] * len(starts)


# ----------------------------------------------------------------------------- end to end


def sft_flags(tiny_world, init, out, *extra):
    d = tiny_world["data"]
    return [f"--data={d / 'sft_train.jsonl'}", f"--qa_data={d / 'sft_test.jsonl'}",
            f"--replay_data={d / 'corpus_train.txt'}", f"--init={init}",
            f"--out={out}", "--batch_size=4", "--warmup_steps=2", "--log_every=4", *extra]


def test_tiny_run_fine_tunes_evaluates_and_saves(tiny_world, tiny_pretrained, tmp_path):
    out = tmp_path / "sft"
    val = tiny_world["data"] / "sft_train.jsonl"
    r = run_script("train_sft.py", *sft_flags(tiny_world, tiny_pretrained, out, "--max_steps=8", "--eval_every=4",
                                             "--max_new_tokens=8", f"--val_data={val}"))
    assert r.returncode == 0, r.stderr
    assert "sft 8/8" in r.stdout and "before fine-tuning: held-out QA" in r.stdout and "after fine-tuning" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("qa_before", "qa_after"):
        assert set(metrics[when]) >= {"accuracy", "format", "seen", "unseen", "n"}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [row["loss/train"] for row in rows if "loss/train" in row]
    assert len(losses) == 8 and losses[-1] < losses[0]  # it learned something
    assert metrics["val_loss"] is not None
    ckpt = common.load_checkpoint(out / "ckpt.pt", ["sft"])
    assert ckpt["step"] == 8 and ckpt["model_args"]["n_embd"] == 32 and "optimizer" in ckpt
    # an sft checkpoint is a valid start for more fine-tuning; here through the GPU preset's path (a validation
    # loss, no QA, no replay), on TinyWorld's files instead of the real chat set
    r = run_script("train_sft.py", "--preset=gpu", *sft_flags(tiny_world, out / "ckpt.pt", tmp_path / "more"),
                   "--qa_data=", "--replay_data=", f"--val_data={val}", "--max_steps=1", "--grad_accum=1",
                   "--compile=false")
    assert r.returncode == 0, r.stderr
    assert "validation loss before fine-tuning" in r.stdout and "replaying" not in r.stdout


# ----------------------------------------------------------------------------- its row of the fault table (test_faults.py)

def fault_flags(fx, out):
    d = fx.tiny_world["data"]
    return [f"--data={d / 'sft_train.jsonl'}", f"--init={fx.tiny_pretrained}", f"--out={out}", "--qa_data=",
            f"--replay_data={d / 'corpus_train.txt'}", "--replay_batch=2", "--batch_size=4"]


def good_conversation(fx):
    return (fx.tiny_world["data"] / "sft_train.jsonl").read_text().splitlines()[0]


USER = {"role": "user", "content": "Where does Lucy live?"}
LONG = {"role": "user", "content": "tell me " * 200}  # some 400 tokens: beyond the tiny model's 128
LATIN1 = '{"messages": [{"role": "user", "content": "Caf\u00e9?"}]}'.encode("latin-1")  # not UTF-8

SFT_CASES = {
    **data_file_cases(good_conversation, "conversations"),
    # the blank line: a record's number is not its line, and the error names the line
    "a record without messages": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_conversation(fx), '', {'conversation': [USER]}))}"],
        f"{tmp / 'bad.jsonl'}:3", "not a conversation"),
    "a message without content": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_conversation(fx), {'messages': [{'role': 'user'}]}))}"],
        f"{tmp / 'bad.jsonl'}:2", "'content': str"),
    "a conversation without an answer": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'bad.jsonl', jsonl(good_conversation(fx), {'messages': [USER]}))}"],
        f"{tmp / 'bad.jsonl'}:2", "no assistant turn"),
    "conversations longer than the context": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'long.jsonl', jsonl({'messages': [LONG, {'role': 'assistant', 'content': 'No.'}]}))}"],
        str(tmp / "long.jsonl"), "too long for the context (129 tokens)"),
    "a data file that is not UTF-8": lambda fx, tmp: Case(
        [f"--data={write(tmp / 'latin1.jsonl', good_conversation(fx).encode() + bytes([10]) + LATIN1)}"],
        str(tmp / "latin1.jsonl"), "is not UTF-8 text"),
    "preferences given to SFT": wrong_file("data", "prefs_train.jsonl", "preference pair"),
    "math problems given to SFT": wrong_file("data", "math_train.jsonl", "math problem"),
    "a held-out question longer than the context": lambda fx, tmp: Case(
        [f"--qa_data={write(tmp / 'qa.jsonl', jsonl({'messages': [LONG], 'answer': 'Riverton'}))}"],
        f"{tmp / 'qa.jsonl'}:1", "leaves no room for an answer"),
    "conversations given as held-out questions": wrong_file("qa_data", "sft_train.jsonl", 'needs "messages"'),
    "a missing replay corpus": lambda fx, tmp: Case(
        [f"--replay_data={tmp / 'none.txt'}"], str(tmp / "none.txt"), "run `python -m data.tinyworld`"),
}


FAULTS = Script("train_sft.py", fault_flags, init="tiny_pretrained", wrong_stage="rm", cases=SFT_CASES)


# ----------------------------------------------------------------------------- batches padded by length group

conversation = st.lists(st.tuples(st.integers(0, 63), st.booleans()), min_size=2, max_size=30)


@given(st.lists(conversation, min_size=1, max_size=12), st.integers(0, 2**31 - 1))
def test_a_batch_in_length_groups_has_the_loss_of_one_padded_batch(conversations, seed):
    """get_batch pads a few groups of similar length instead of one batch: the loss over the step's
    learned tokens, summed over the groups, is the one padded batch's."""
    examples = [([t for t, _ in c], [int(m) for _, m in c]) for c in conversations]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=1, n_head=2, n_embd=16, rope=True)).eval()
    picks = torch.randint(len(examples), (8,), generator=torch.Generator().manual_seed(seed))
    groups = get_batch(examples, 8, torch.Generator().manual_seed(seed), 0, 1)
    x, y, m = collate([examples[i] for i in picks.tolist()])
    n_tokens = m.sum().item()
    if n_tokens == 0:
        return
    with torch.no_grad():
        whole = sft_loss(-model(x, y, reduction="none"), m)
        grouped = sum(sft_loss(-model(gx, gy, reduction="none"), gm, n_tokens=n_tokens) for gx, gy, gm in groups)
    assert sum(gm.sum().item() for _, _, gm in groups) == n_tokens
    assert grouped.item() == pytest.approx(whole.item(), abs=1e-5)
