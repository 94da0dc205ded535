"""The replies serve.py sends: generated a token at a time, each with its log-probability and the
likeliest alternatives, and judged (the reward model, the gold rater, the KL to SFT, a reasoning
problem's verifier and step checker). The HTTP and the API's shapes are serve.py's (its requests: serve_requests.py).
"""
import re
import threading

import torch

from data import tinymath, tinyworld
from data.batches import score_replies
from model import KVCache, sample_next


# ----------------------------------------------------------------------------- generation, a token at a time

LOCK = threading.Lock()  # one forward pass at a time: the streams take turns token by token


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature, top_k, top_p, generator, top_n=0):
    """Yield (token, its log-prob, the top_n most likely (token, log-prob)) for each new token after ids.
    The same computation as model.generate on one prompt (the same masks, so greedy replies are the
    same to the bit), one step per next(), so that each token can be sent as soon as it exists."""
    device = model.lm_head.weight.device
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, device, model.lm_head.weight.dtype)
    x = torch.tensor([ids], device=device)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
    mask = torch.zeros(1, 1, len(ids), len(ids), device=device, dtype=cache.k.dtype).masked_fill(~causal, float("-inf"))
    for _ in range(max_new_tokens):
        with LOCK:
            logits = model.lm_head(model.hidden(x, mask=mask, cache=cache)[:, -1]).float()
            token = sample_next(logits, temperature, top_k, top_p, generator)
            logp = torch.log_softmax(logits[0], -1)
            top = torch.topk(logp, top_n) if top_n else None
        token = token.item()
        yield token, logp[token].item(), list(zip(top.indices.tolist(), top.values.tolist())) if top_n else []
        x = torch.tensor([[token]], device=device)
        mask = torch.zeros(1, 1, 1, cache.len + 1, device=device, dtype=cache.k.dtype)  # a new token sees all


def token_text(tok, token):
    return tok.decode([token])


def reply_stream(stage, ids, stop_ids, stops, opts):
    """Yield (new text, [(token, logprob, top)] of the tokens that text completes) as the reply grows, then
    a last (text, tokens, finish_reason). Stop strings end the reply before them, as OpenAI's do; text
    that might be the start of one is held back until it cannot be."""
    gen = torch.Generator(device=stage.model.lm_head.weight.device).manual_seed(opts["seed"] % 2 ** 64)
    tokens, sent_text, sent_tokens, finish, cut = [], 0, 0, "length", -1
    for token, logp, top in generate(stage.model, ids, opts["max_tokens"], opts["temperature"], opts["top_k"],
                                     opts["top_p"], gen, opts["top_n"]):
        if token in stop_ids:
            finish = "stop"
            break
        tokens.append((token, logp, top))
        text = stage.tok.decode([t for t, _, _ in tokens])
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            finish = "stop"
            break
        safe = len(text) - held_back(text, stops)
        if safe > sent_text:
            done = tokens_within(stage.tok, tokens, safe)
            yield text[sent_text:safe], tokens[sent_tokens:done], None
            sent_text, sent_tokens = safe, done
    text = stage.tok.decode([t for t, _, _ in tokens])
    if cut >= 0:  # a stop string: the reply ends before it, and so do its tokens
        text = text[:cut]
        done = max(tokens_within(stage.tok, tokens, cut), sent_tokens)
    else:
        done = len(tokens)
    yield text[sent_text:], tokens[sent_tokens:done], finish


def held_back(text, stops):
    """How many characters at the end of text could still become a stop string (or a character whose
    bytes are not all generated yet)."""
    n = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(n, len(text) - len(text.rstrip("\ufffd")))


def tokens_within(tok, tokens, n_chars):
    """How many of tokens are needed to write the first n_chars of their text (the last may overrun it)."""
    count, length = 0, 0
    while count < len(tokens) and length < n_chars:
        length += len(token_text(tok, tokens[count][0]))
        count += 1
    return count


# ----------------------------------------------------------------------------- what /score says of a reply


@torch.no_grad()
def reply_logprob(model, ids, reply):
    """The sum of log p(reply token) after ids: a reply's log-probability under a model."""
    device = model.lm_head.weight.device
    seq = torch.tensor([ids + reply], device=device)
    with LOCK:
        logp = model.token_logprobs(seq[:, :-1], seq[:, 1:])[0, len(ids) - 1:]
    return logp.sum().item()


def math_reference(text, world):
    """The worked answer of a TinyWorld reasoning problem asked in text, or None if it is not one."""
    key = " ".join(text.split())
    people = [world.by_name[n] for n in re.findall(r"\w+", key) if n in world.by_name]
    for kind in tinymath.KINDS:
        if people and len(people) <= 3:
            p = tinymath.problem(people, kind)
            if p["question"] == key:
                return p["answer"]
    return None


def reply_tokens(tok, reply, chat):
    """A reply's tokens as the model wrote them: a special token it wrote (shown as "<|user|>", say) is
    read back as that token, and a chat reply ends with <|end|>."""
    return tok.encoding.encode(reply, allowed_special="all") + ([tok.end_id] if chat else [])


def judge(server, stage, prompt_ids, question, reply, chat):
    """The reward model's score, the gold rater's and the KL to SFT of one reply; a reasoning problem's
    verdicts. Each is None where it has no meaning (no reward model, a plain completion, not a problem)."""
    tok = stage.tok
    reply_ids = reply_tokens(tok, reply, chat)
    verdict = {"reward_model": None, "gold": None, "kl_to_sft": None, "math": None}
    sft = server.stages.get("sft")
    if sft is not None and sft.tok.fingerprint == tok.fingerprint:
        # log stage(reply) - log SFT(reply): one sample's estimate of KL(stage || SFT), the quantity PPO's penalty charges
        verdict["kl_to_sft"] = reply_logprob(stage.model, prompt_ids, reply_ids) - reply_logprob(sft.model, prompt_ids, reply_ids)
    if chat and server.rm is not None and server.rm.config.vocab_size == tok.n_vocab:
        with LOCK:
            verdict["reward_model"] = score_replies(server.rm, [prompt_ids], [reply_ids])[0].item()
    if server.world is not None:
        if chat:
            verdict["gold"] = tinyworld.gold_score(question, reply, server.world)
        reference = math_reference(question, server.world)
        if reference is not None:
            marks, right, total = tinymath.check_steps(reply, reference, server.world)
            verdict["math"] = {"verified": tinymath.check_answer(reply, reference),
                               "expected": tinymath.extract_answer(reference), "answer": tinymath.extract_answer(reply),
                               "steps": [{"line": line, "right": ok} for line, ok in marks],
                               "right": right, "total": total}
    return verdict
