"""serve.py: the OpenAI-compatible API through the official openai client against a live server on the
tests' tiny world; greedy replies against sample.py's, logprobs against the model's own log-softmax;
/score; every error case; many clients at once, some malformed or leaving mid-stream."""
import http.client
import json
import threading
import time

import openai
import pytest
import torch

import common
from conftest import error_line, run_scripts, start_server
from data import read_jsonl
from data.tokenizer import load_tokenizer

@pytest.fixture(scope="module")
def served(served):
    """conftest's live server, and the official OpenAI client pointed at it."""
    return {**served, "client": openai.OpenAI(base_url=served["base"] + "/v1", api_key="none", max_retries=0, timeout=60)}


def raw(base, method, path, body=b"", headers=None):
    """(status, parsed JSON body) of one request sent as bytes, whatever they are."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data.startswith(b"{") else data


def ask(client, **kw):
    return client.chat.completions.create(messages=[{"role": "user", "content": "Where does Ann live?"}], **kw)


# ----------------------------------------------------------------------------- the API


def test_every_stage_is_a_model(served):
    ids = [m.id for m in served["client"].models.list()]
    assert ids == ["random", "pretrain", "sft", "ppo", "dpo", "grpo"]  # the reward model judges, it does not chat


PROMPTS = {True: "Where does Ann live?", False: "Ann lives in"}


@pytest.fixture(scope="module")
def scripts(served, tiny_sft, tmp_path_factory):
    """sample.py's greedy replies, chat and completion, and serve.py's two start-up mistakes, all run in
    one process (one import of torch for the four)."""
    tmp = tmp_path_factory.mktemp("scripts")
    sample = ["sample.py", f"--init={tiny_sft}", "--temperature=0", "--max_new_tokens=20"]
    port = served["base"].rsplit(":", 1)[1]
    runs = run_scripts([sample + [f"--prompt={PROMPTS[True]}", "--chat"], sample + [f"--prompt={PROMPTS[False]}"],
                        ["-m", "explorer.serve", f"--out={tmp}", "--port=0"],
                        ["-m", "explorer.serve", f"--out={served['out']}", f"--data={served['data']}", f"--port={port}"]], tmp)
    return {"chat": runs[0], "completion": runs[1], "no checkpoints": runs[2], "taken port": runs[3]}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_greedy_replies_equal_sample_py(served, scripts, chat):
    r = scripts["chat" if chat else "completion"]
    assert r.returncode == 0, r.stderr
    expected = r.stdout.rsplit("\n---\n", 1)[0]
    client, prompt = served["client"], PROMPTS[chat]
    if chat:
        got = ask(client, model="sft", temperature=0, max_tokens=20).choices[0].message.content
    else:
        got = prompt + client.completions.create(model="sft", prompt=prompt, temperature=0, max_tokens=20).choices[0].text
    assert got == expected


def test_top_logprobs_are_the_models_own_log_softmax(served, tiny_sft):
    client = served["client"]
    r = ask(client, model="sft", temperature=0, max_tokens=12, logprobs=True, top_logprobs=5)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens > 0
    ckpt = common.load_checkpoint(tiny_sft)
    tok = load_tokenizer(ckpt["tokenizer"])
    model = common.gpt_from_checkpoint(ckpt, tok).eval()
    ids = tok.render_prompt([{"role": "user", "content": "Where does Ann live?"}])
    reply = tok.encode(r.choices[0].message.content)
    assert [e.token for e in entries] == [tok.decode([t]) for t in reply]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + reply]))[0, len(ids) - 1:-1].float(), -1)
    for e, t, row in zip(entries, reply, logp):
        assert e.logprob == pytest.approx(row[t].item(), abs=1e-4)
        top = torch.topk(row, 5)
        assert [a.token for a in e.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
        assert [a.logprob for a in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].logprob >= e.logprob  # greedy: the chosen token is the most likely
        assert bytes(e.bytes) == tok.encoding.decode_single_token_bytes(t)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_streamed_equals_whole_for_the_same_seed(served, chat):
    client = served["client"]
    kw = dict(model="pretrain", temperature=1.0, top_p=0.9, max_tokens=24, seed=7)
    if chat:
        whole = ask(client, logprobs=True, **kw)
        chunks = list(ask(client, stream=True, logprobs=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        tokens = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert text == whole.choices[0].message.content
        assert tokens == [e.token for e in whole.choices[0].logprobs.content]
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    else:
        whole = client.completions.create(prompt="Ann", **kw)
        chunks = list(client.completions.create(prompt="Ann", stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    text = lambda r: r.choices[0].message.content if chat else r.choices[0].text
    again = ask(client, **kw) if chat else client.completions.create(prompt="Ann", **kw)
    other = ask(client, **{**kw, "seed": 8}) if chat else client.completions.create(prompt="Ann", **{**kw, "seed": 8})
    assert text(again) == text(whole)
    assert text(other) != text(whole)  # another seed, another sample (24 tokens at temperature 1)


def test_completion_logprobs_and_stop(served):
    client = served["client"]
    r = client.completions.create(model="pretrain", prompt="Ann lives in", temperature=0, max_tokens=16, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(top) == 3 and max(top.values()) >= p for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    text = r.choices[0].text
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:2]
    cut = client.completions.create(model="pretrain", prompt="Ann lives in", temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="pretrain", prompt="Ann lives in", temperature=0, max_tokens=16,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


# ----------------------------------------------------------------------------- /score and the pages


def test_score_judges_a_reply(served, tiny_world):
    base = served["base"]
    q = {"model": "sft", "messages": [{"role": "user", "content": "What is an LLM?"}]}
    good = "An LLM is a large language model: it predicts the next word."
    status, v = raw(base, "POST", "/score", json.dumps({**q, "reply": good}).encode())
    assert status == 200 and v["gold"] > 2 and v["kl_to_sft"] == 0.0 and v["math"] is None
    status, w = raw(base, "POST", "/score", json.dumps({**q, "reply": "Ugh. A boat."}).encode())
    assert w["gold"] < v["gold"] and isinstance(w["reward_model"], float)
    status, p = raw(base, "POST", "/score", json.dumps({**q, "model": "pretrain", "reply": good}).encode())
    assert p["kl_to_sft"] != 0.0
    problems = read_jsonl(tiny_world["data"] / "math_test.jsonl") + read_jsonl(tiny_world["data"] / "math_train.jsonl")
    problem = next(p for p in problems if p["level"] == 1)  # short enough for the tiny tokenizer's context
    ask_math = {"model": "sft", "messages": [{"role": "user", "content": problem["question"]}]}
    status, m = raw(base, "POST", "/score", json.dumps({**ask_math, "reply": problem["answer"]}).encode())
    steps = problem["answer"].split("####")[0].strip().splitlines()
    assert m["math"]["verified"] and m["math"]["right"] == m["math"]["total"] == len(steps)
    assert [s["right"] for s in m["math"]["steps"]] == [True] * len(steps)
    wrong = problem["answer"].replace("####", "They make 99.\n####").rsplit(" ", 1)[0] + " 1000"
    status, m = raw(base, "POST", "/score", json.dumps({**ask_math, "reply": wrong}).encode())
    assert not m["math"]["verified"] and m["math"]["steps"][-1] == {"line": "They make 99.", "right": False}


def test_the_page_info_and_report(served):
    base = served["base"]
    status, page = raw(base, "GET", "/")
    assert status == 200 and b"<title>The stage explorer</title>" in page
    status, info = raw(base, "GET", "/info")
    assert [s["id"] for s in info["stages"]] == ["random", "pretrain", "sft", "ppo", "dpo", "grpo"]
    assert len(info["presets"]) == 3 and info["reward_model"] and info["gold_rater"]
    status, report = raw(base, "GET", "/report")
    assert status == 200 and b"make demo" in report  # no report in this out/ yet: it says how to make one


@pytest.mark.parametrize("path", ["/serve.py", "/serve_replies.py", "/__init__.py", "/../model.py", "/%2e%2e/model.py", "/explorer/../model.py", "/..%2fmodel.py",
                                  "/report/../sft/ckpt.pt", "/nothing.html"])
def test_only_the_pages_own_folder_is_served(served, path):
    status, body = raw(served["base"], "GET", path)
    assert status == 404 and body["error"]["code"] == "not_found"


# ----------------------------------------------------------------------------- bad input

ERRORS = {  # body -> (status, the param it names)
    "not json": ({"raw": b"{\"model\": "}, 400, None),
    "not an object": ({"raw": b"[1, 2]"}, 400, None),
    "unknown model": ({"model": "gpt-9"}, 404, "model"),
    "no messages": ({"messages": []}, 400, "messages"),
    "a bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    "ends with the assistant": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "Ann " * 300}]}, 400, "messages"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens"),
    "max_tokens over the room": ({"max_tokens": 10_000}, 400, "max_tokens"),
    "max_tokens a string": ({"max_tokens": "64"}, 400, "max_tokens"),
    "max_tokens a bool": ({"max_tokens": True}, 400, "max_tokens"),
    "temperature 3": ({"temperature": 3}, 400, "temperature"),
    "temperature a list": ({"temperature": [1]}, 400, "temperature"),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, 400, "top_logprobs"),
    "five stops": ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "n 2": ({"n": 2}, 400, "n"),
    "stream a string": ({"stream": "yes"}, 400, "stream"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_requests_get_a_4xx_in_openais_shape(served, case):
    body, status, param = ERRORS[case]
    request = {"model": "sft", "messages": [{"role": "user", "content": "Where does Ann live?"}], **body}
    got, answer = raw(served["base"], "POST", "/v1/chat/completions", body.get("raw") or json.dumps(request).encode())
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param


def test_errors_through_the_openai_client(served):
    client = served["client"]
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, model="nope")
    assert "GET /v1/models" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sft", prompt="Ann " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sft", prompt="Ann", logprobs=6)
    status, answer = raw(served["base"], "POST", "/v1/chat/completions", b"x" * 2_000_000)
    assert status == 413
    status, answer = raw(served["base"], "POST", "/score", json.dumps({"model": "sft", "prompt": "Ann"}).encode())
    assert status == 400 and answer["error"]["param"] == "reply"


def test_starting_without_checkpoints_or_on_a_taken_port_is_one_line(scripts):
    assert "run `make demo` first" in error_line(scripts["no checkpoints"])
    assert "choose another --port" in error_line(scripts["taken port"])


# ----------------------------------------------------------------------------- load


def test_many_clients_at_once_some_malformed_or_leaving(served):
    """50 requests from 8 threads: every fifth a bad request or a stream dropped after its first chunk.
    Every valid one gets the same greedy reply as a request alone; every bad one a 4xx; the server lives."""
    base, client = served["base"], served["client"]
    expected = {m: ask(client, model=m, temperature=0, max_tokens=16).choices[0].message.content for m in ("sft", "pretrain")}
    results, lock = [], threading.Lock()

    def one(i):
        model = ("sft", "pretrain")[i % 2]
        if i % 10 == 3:  # malformed
            status, body = raw(base, "POST", "/v1/chat/completions", b'{"model": "sft", "messages": [')
            outcome = ("bad", status)
        elif i % 10 == 7:  # a stream the client leaves after its first chunk
            host, port = base.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"model": model, "stream": True, "max_tokens": 60, "messages": [{"role": "user", "content": "Hi"}]}))
            r = conn.getresponse()
            r.fp.readline()
            conn.close()
            outcome = ("left", r.status)
        elif i % 2:
            chunks = ask(client, model=model, temperature=0, max_tokens=16, stream=True)
            outcome = ("ok", "".join(c.choices[0].delta.content or "" for c in chunks) == expected[model])
        else:
            outcome = ("ok", ask(client, model=model, temperature=0, max_tokens=16).choices[0].message.content == expected[model])
        with lock:
            results.append(outcome)

    queue = list(range(50))

    def client_thread():
        while True:
            try:
                i = queue.pop()
            except IndexError:
                return
            one(i)

    workers = [threading.Thread(target=client_thread) for _ in range(8)]
    started = time.time()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=240 - (time.time() - started))
    assert len(results) == 50, f"only {len(results)} of 50 answered in 240 s"
    assert sorted(set(r for r in results if r[0] == "ok")) == [("ok", True)]
    assert [r for r in results if r[0] == "bad"] == [("bad", 400)] * 5
    assert [r for r in results if r[0] == "left"] == [("left", 200)] * 5
    assert [m.id for m in client.models.list()][0] == "random" and served["proc"].poll() is None


def test_a_hugging_face_directory_is_served_too(tmp_path):
    from test_hf import write_gpt2_dir
    hf = write_gpt2_dir(tmp_path / "gpt2-tiny")
    proc, base = start_server(f"--out={tmp_path / 'no-stages'}", f"--init={hf}")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == [str(hf)]  # no pre-trained stage: no random model either
        r = client.completions.create(model=str(hf), prompt="the", temperature=0, max_tokens=5, logprobs=2)
        assert len(r.choices[0].logprobs.tokens) == 5 and "".join(r.choices[0].logprobs.tokens) == r.choices[0].text
        status, v = raw(base, "POST", "/score", json.dumps({"model": str(hf), "prompt": "the", "reply": " cat"}).encode())
        assert status == 200 and v == {"reward_model": None, "gold": None, "kl_to_sft": None, "math": None}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_other_methods_and_a_browsers_preflight(served):
    status, body = raw(served["base"], "DELETE", "/v1/models")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    host, port = served["base"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                             "Access-Control-Request-Method": "POST"})
    r = conn.getresponse()
    assert r.status == 204 and r.getheader("Access-Control-Allow-Origin") == "*" and "POST" in r.getheader(
        "Access-Control-Allow-Methods")
    conn.close()
