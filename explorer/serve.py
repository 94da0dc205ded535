"""The stage explorer: every stage's checkpoint answers the same prompt, side by side, in the browser,
and an OpenAI-compatible API to each of them.

    python -m explorer.serve            # loads out/*/ckpt.pt, prints http://127.0.0.1:8000/
    python -m explorer.serve --init=DIR         # also a checkpoint of your own, or a Hugging Face directory
    make serve

The page (index.html, beside this file) streams each stage's reply token by token, each token coloured by the
probability its stage gave it, and under each reply the reward model's score, the gold rater's, the
reply's KL to SFT, and for a reasoning problem the verifier and the step checker's marks.

The API is OpenAI's, so any OpenAI client or chat front end can talk to a stage (the model is the
stage: GET /v1/models lists them):
    POST /v1/chat/completions, POST /v1/completions   streamed (server-sent events) or not, with
        temperature, top_p, max_tokens, seed, stop, logprobs and top_logprobs as OpenAI defines them,
        and two that OpenAI has not: top_k, and ignore_eos (vLLM's name: write max_tokens whatever
        the model says, end tokens included, as the benchmark does). A logprob is the stage's own log-softmax at that position
        (before temperature, top-k and top-p), what the model believes, not how it was sampled.
What is not OpenAI's has plain names of its own:
    POST /score     {"model", "messages" or "prompt", "reply"}: the reward model's score, the gold
                    rater's, the reply's KL to SFT in nats, and a reasoning problem's verdicts
    GET /info       the stages with their labels, the journey's prompts, what /score can judge
    GET /report     out/report.md and its figures
A request the server cannot take gets a 4xx in OpenAI's error shape; nothing a client sends or drops
stops the server.

Why the standard library's server: the page is one file and the replies are a few hundred tokens a
second, so a threaded http.server serves both, and a reader can read every line between the socket
and the model here. The models share one lock, taken for one token's forward pass at a time, so
several streams (the page's six columns, several clients) advance together rather than one after
another.
"""
import json
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

import cli
import common
from cli import UserError
from data import read_jsonl, tinyworld
from data.tokenizer import load_tokenizer
from model import GPT
from explorer.serve_replies import judge, reply_stream, reply_tokens, token_text
from explorer.serve_requests import ApiError, chat_prompt, option, sampling, text_prompt

PAGE_DIR = Path(__file__).resolve().parent  # index.html, beside this file
PAGE_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
STAGES = [("random", "0 random init"), ("pretrain", "1 pre-trained"), ("sft", "2 SFT"), ("ppo", "3 PPO"),
          ("dpo", "3 DPO"), ("grpo", "4 GRPO")]
MAX_BODY = 1 << 20  # bytes of a request body


@dataclass
class Config:
    out: str = "out"                # the stages' checkpoints: <out>/<stage>/ckpt.pt, and the reward model's
    data: str = "data/tinyworld"    # TinyWorld's files: the gold rater's world, the journey's prompts
    init: str = ""                  # more models to serve, comma-separated: ckpt.pt files or Hugging Face directories
    host: str = "127.0.0.1"         # the address to bind (0.0.0.0 lets other machines in: nothing here is authenticated)
    port: int = 8000                # 0: any free port (the address printed says which)
    device: str = "auto"            # auto (cuda, mps, cpu), or a torch device name
    seed: int = 1337                # the random model's initialisation


# ----------------------------------------------------------------------------- the models


@dataclass
class Stage:
    name: str     # the model id of the API
    label: str    # what the page calls it
    model: GPT
    tok: object


def load_stages(cfg, device):
    """Every stage checkpoint under cfg.out (the random model given the pre-trained one's shape), the
    --init models, and the reward model when there is one."""
    out, stages = Path(cfg.out), []
    for name, label in STAGES[1:]:
        if (out / name / "ckpt.pt").is_file():
            ckpt = common.load_checkpoint(out / name / "ckpt.pt")
            tok = load_tokenizer(ckpt["tokenizer"])
            stages.append(Stage(name, label, common.gpt_from_checkpoint(ckpt, tok), tok))
    for path in filter(None, (p.strip() for p in cfg.init.split(","))):
        ckpt = common.load_checkpoint(path)
        tok = load_tokenizer(ckpt["tokenizer"])
        stages.append(Stage(path, path, common.gpt_from_checkpoint(ckpt, tok), tok))
    if not stages:
        raise UserError(f"no checkpoint under {out}/*/ckpt.pt and no --init: run `make demo` first")
    if stages[0].name == "pretrain":  # the random model: the pre-trained one's shape, untrained
        torch.manual_seed(cfg.seed)
        stages.insert(0, Stage("random", STAGES[0][1], GPT(stages[0].model.config), stages[0].tok))
    rm = None
    if (out / "rm" / "ckpt.pt").is_file():
        ckpt = common.load_checkpoint(out / "rm" / "ckpt.pt", ["rm"])
        rm = common.gpt_from_checkpoint(ckpt, load_tokenizer(ckpt["tokenizer"]), reward=True).to(device).eval()
    for s in stages:
        s.model.to(device).eval()
    return {s.name: s for s in stages}, rm


# ----------------------------------------------------------------------------- the server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tinyworld-explorer"

    def log_message(self, fmt, *args):  # one line per request, without the client's address
        print(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True)

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def do_OPTIONS(self):  # a browser's check before a chat front end on another origin may POST here
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self):
        self.answer(lambda path: self.refuse(405, f"{self.command} is not served here: GET or POST"))

    do_DELETE = do_PATCH = do_PUT

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")  # any local front end may call the API
        super().end_headers()

    def answer(self, route):
        self.streaming = False
        try:
            route(urlparse(self.path).path)
        except ApiError as e:
            self.send_json(e.body, e.status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; the server goes on
        except Exception as e:  # a bug: a 500 for this request, the traceback for the server's log
            import traceback
            traceback.print_exc()
            self.close_connection = True
            if not self.streaming:  # once a stream has begun, its status is sent: it just ends
                self.send_json(ApiError(500, f"internal error ({type(e).__name__})", kind="server_error").body, 500)

    def refuse(self, status, message):
        raise ApiError(status, message, code="method_not_allowed")

    # --- plumbing

    def send_bytes(self, body, kind, status=200):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, obj, status=200):
        self.send_bytes(json.dumps(obj).encode(), "application/json", status)

    def read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "a bad Content-Length header") from None
        if length > MAX_BODY:
            # read and dropped (up to a bound), so that the client is still listening when the answer comes
            # rather than finding the connection closed under the body it is sending
            left = min(length, 16 * MAX_BODY)
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            self.close_connection = True
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def stage(self, body):
        name = body.get("model")
        if name not in self.server.stages:
            raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists them", "model", "model_not_found")
        return self.server.stages[name]

    # --- routes

    def get(self, path):
        if path == "/v1/models":
            return self.send_json({"object": "list", "data": [
                {"id": s.name, "object": "model", "created": self.server.started, "owned_by": "tinyworld"}
                for s in self.server.stages.values()]})
        if path == "/info":
            return self.send_json(self.server.info)
        if path == "/report" or path.startswith("/report/"):
            return self.report(path)
        name = unquote(path).lstrip("/") or "index.html"
        file = (PAGE_DIR / name).resolve()
        kind = PAGE_TYPES.get(file.suffix)
        # only the page's own files: nothing under or above its folder, and not the server's code beside it
        if file.parent != PAGE_DIR or kind is None or not file.is_file():
            raise ApiError(404, f"no such page: {path}", code="not_found")
        self.send_bytes(file.read_bytes(), kind)

    def report(self, path):
        """The report, as text, with its figures under it; a figure by its name (report-<stage>.png, rm/best_of_n.png)."""
        out = Path(self.server.cfg.out)
        figures = sorted(out.glob("report-*.png")) + sorted(out.glob("rm/best_of_n.png"))
        names = {str(f.relative_to(out)): f for f in figures}
        if path == "/report":
            md = (out / "report.md").read_text() if (out / "report.md").is_file() else "No report yet: run `make demo`."
            esc = md.replace("&", "&amp;").replace("<", "&lt;")
            imgs = "".join(f'<p><img src="/report/{n}" style="max-width:100%"></p>' for n in names)
            page = f"<!doctype html><meta charset=utf-8><title>report</title><pre style='white-space:pre-wrap'>{esc}</pre>{imgs}"
            return self.send_bytes(page.encode(), "text/html; charset=utf-8")
        name = path[len("/report/"):]
        if name not in names:
            raise ApiError(404, f"no such figure: {name}", code="not_found")
        self.send_bytes(names[name].read_bytes(), "image/png")

    def post(self, path):
        if path not in ("/v1/chat/completions", "/v1/completions", "/score"):
            raise ApiError(404, f"no such endpoint: POST {path}", code="not_found")
        body = self.read_json()
        stage = self.stage(body)
        chat = path == "/v1/chat/completions" or (path == "/score" and "messages" in body)
        ids, question = (chat_prompt if chat else text_prompt)(body, stage.tok)
        room = stage.model.config.block_size - len(ids)
        if room <= 0:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, and this model's context is "
                                f"{stage.model.config.block_size}: shorten it", "messages" if chat else "prompt",
                           "context_length_exceeded")
        if path == "/score":
            reply = body.get("reply")
            if not isinstance(reply, str):
                raise ApiError(400, "'reply' must be a string: the reply to judge", "reply")
            if len(ids) + len(reply_tokens(stage.tok, reply, chat)) > stage.model.config.block_size:
                raise ApiError(400, "the prompt and reply are longer than the model's context", "reply", "context_length_exceeded")
            return self.send_json(judge(self.server, stage, ids, question, reply, chat))
        opts = sampling(body, room)
        if chat:
            opts["logprobs"] = option(body, "logprobs", (bool,), False)
            opts["top_n"] = option(body, "top_logprobs", (int,), 0, 0, 20)
            if opts["top_n"] and not opts["logprobs"]:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        else:
            n = option(body, "logprobs", (int,), None, 0, 5)
            opts["logprobs"], opts["top_n"] = n is not None, n or 0
        stop_ids = [] if opts["ignore_eos"] else [stage.tok.end_id, stage.tok.eot_id] if chat else [stage.tok.eot_id]
        steps = reply_stream(stage, ids, stop_ids, opts["stop"], opts)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": stage.name}
        if opts["stream"]:
            return self.stream(steps, meta, chat, opts, len(ids), body, stage.tok)
        text, tokens, finish = "", [], None
        for piece, toks, finish in steps:
            text, tokens = text + piece, tokens + toks
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}
        logprobs = self.logprobs(stage.tok, tokens, chat) if opts["logprobs"] else None
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        self.send_json({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                        "usage": usage})

    def stream(self, steps, meta, chat, opts, n_prompt, body, tok):
        """Server-sent events: one chunk per piece of text as it is generated, then "data: [DONE]". The
        connection closes after it (no length is known in advance)."""
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        kind = "chat.completion.chunk" if chat else "text_completion"
        send = lambda obj: (self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode()), self.wfile.flush())
        if chat:
            send({**meta, "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]})
        n_tokens = 0
        for piece, toks, finish in steps:
            n_tokens += len(toks)
            if not piece and not toks and finish is None:
                continue
            logprobs = self.logprobs(tok, toks, chat) if opts["logprobs"] else None
            if chat:
                choice = {"index": 0, "delta": {"content": piece} if piece or finish is None else {},
                          "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": finish}
            send({**meta, "object": kind, "choices": [choice]})
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            send({**meta, "object": kind, "choices": [],
                  "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_tokens, "total_tokens": n_prompt + n_tokens}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    @staticmethod
    def logprobs(tok, tokens, chat):
        """Log-probabilities in OpenAI's shape: chat's list of {token, logprob, bytes, top_logprobs}, or
        completions' parallel lists (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset)."""
        piece = lambda t: tok.encoding.decode_single_token_bytes(t)
        if chat:
            entry = lambda t, lp: {"token": token_text(tok, t), "logprob": lp, "bytes": list(piece(t))}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                                for t, lp, top in tokens]}
        texts = [token_text(tok, t) for t, _, _ in tokens]
        offsets = [sum(map(len, texts[:i])) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
                "top_logprobs": [{token_text(tok, a): alp for a, alp in top} for _, _, top in tokens],
                "text_offset": offsets}


def journey_prompts(data):
    """The report's three prompts: what an LLM is, a held-out question about a character SFT never saw,
    and a held-out reasoning problem."""
    prompts = ["What is an LLM?"]
    if (data / "sft_test.jsonl").is_file():
        qa = read_jsonl(data / "sft_test.jsonl")
        prompts.append(next((r for r in qa if r.get("split") == "unseen"), qa[0])["messages"][-1]["content"])
    if (data / "math_test.jsonl").is_file():
        prompts.append(read_jsonl(data / "math_test.jsonl")[0]["question"])
    return prompts


def make_server(cfg):
    """The server, its models loaded, bound but not yet serving."""
    device = common.pick_device(cfg.device)
    stages, rm = load_stages(cfg, device)
    data = Path(cfg.data)
    world = tinyworld.load_world(data) if (data / "meta.json").is_file() else None
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): choose another --port") from None
    server.daemon_threads = True
    server.cfg, server.stages, server.rm, server.world, server.started = cfg, stages, rm, world, int(time.time())
    server.info = {"stages": [{"id": s.name, "label": s.label, "context": s.model.config.block_size}
                              for s in stages.values()],
                   "presets": journey_prompts(data), "reward_model": rm is not None, "gold_rater": world is not None,
                   "report": (Path(cfg.out) / "report.md").is_file()}
    return server


def main(cfg):
    if not 0 <= cfg.port < 65536:
        raise UserError(f"--port must be between 0 and 65535, got {cfg.port}")
    server = make_server(cfg)
    host, port = server.server_address[:2]
    print(f"serving {', '.join(server.stages)}{' and the reward model' if server.rm else ''}", flush=True)
    print(f"open http://{host}:{port}/  (the API: http://{host}:{port}/v1; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()


if __name__ == "__main__":
    cli.run_main(main, Config)
