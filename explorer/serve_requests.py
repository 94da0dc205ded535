"""An OpenAI request as serve.py reads it: its prompt (chat messages or plain text) through the model's
tokenizer, its sampling options checked against OpenAI's ranges and defaults, and the error a request
the server will not take gets, in OpenAI's shape. The HTTP is serve.py's; the replies, serve_replies.py's.
"""
import json
import random

MAX_STOPS = 4  # stop strings, as OpenAI allows


class ApiError(Exception):
    """A request the server will not take: an HTTP status and OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def option(body, name, kinds, default, low=None, high=None):
    """body[name], checked to be of kinds (bool is never a number here) and within [low, high]."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join("boolean" if k is bool else "integer" if k is int else "number" if k is float else "string"
                            for k in kinds)
        raise ApiError(400, f"'{name}' must be a {names}, got {json.dumps(value)[:40]}", name, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def sampling(body, room):
    """The sampling options of a completion request, checked, with OpenAI's defaults."""
    stops = body.get("stop")
    stops = [stops] if isinstance(stops, str) else stops or []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop", "invalid_value")
    if option(body, "n", (int,), 1, 1, 1) != 1:
        raise ApiError(400, "'n' must be 1", "n")
    limit = option(body, "max_completion_tokens", (int,), None, 1) or option(body, "max_tokens", (int,), None, 1)
    if limit is not None and limit > room:
        raise ApiError(400, f"the prompt leaves room for {room} new tokens in this model's context, but "
                            f"max_tokens is {limit}: ask for fewer or shorten the prompt",
                       "max_tokens", "context_length_exceeded")
    return {"temperature": float(option(body, "temperature", (int, float), 1.0, 0, 2)),
            "top_p": float(option(body, "top_p", (int, float), 1.0, 0, 1)) or 1e-9,
            "top_k": option(body, "top_k", (int,), 0, 0) or None,
            "max_tokens": limit or room, "stop": stops,
            "seed": option(body, "seed", (int,), None) if body.get("seed") is not None else random.randrange(2 ** 62),
            "stream": option(body, "stream", (bool,), False),
            "ignore_eos": option(body, "ignore_eos", (bool,), False)}


def chat_prompt(body, tok):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    turns = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        role = {"developer": "system"}.get(m.get("role"), m.get("role")) if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, "each message needs a role (system, user or assistant) and text content", "messages")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's: it is what the model writes", "messages")
    question = next(t["content"] for t in reversed(turns) if t["role"] == "user") if any(t["role"] == "user" for t in turns) else ""
    return tok.render_prompt(turns), question


def text_prompt(body, tok):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", "prompt")
    return [tok.eot_id] + tok.encode(prompt), prompt
