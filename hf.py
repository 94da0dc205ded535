"""Hugging Face model directories, in and out: GPT-2's weights into any stage, any stage's weights out.

In: every script's --init (and sample.py's) also takes a directory as `save_pretrained` writes it or
the hub serves it: config.json, model.safetensors or pytorch_model.bin, and the tokenizer
(data/hf_tokenizer.py). `--init=gpt2` (gpt2-medium, gpt2-large, gpt2-xl) downloads the hub's files
once into ~/.cache/four-stages/. GPT-2 has no chat tokens: ours become new rows of the embedding, set
to the mean row, so the chat template works while, on ordinary text, the logits over GPT-2's own
tokens stay GPT-2's.

Out: export.py writes any stage's checkpoint as such a directory. A model with learned positions is
written as GPT-2 (GPT2LMHeadModel); one with rotary positions, which GPT-2 cannot hold, as GPT-NeoX
(GPTNeoXForCausalLM with a sequential residual, rotary on every channel, equal input and output
embeddings), which computes the same thing. Both layouts read back here.
"""
import dataclasses
import json
import os
import urllib.request
from pathlib import Path

import torch

from cli import UserError
from data import hf_tokenizer
from data.tokenizer import SPECIAL_TOKENS, load_tokenizer

HUB = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
STAGE_KEY = "training_stage"  # in an exported config.json: the stage that wrote it (GPT-2's own: pretrain)
HEADS = "reward_head.safetensors"  # the reward model's head and gate, beside its trunk
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_model_dir(path) -> bool:
    return str(path) in HUB or Path(path).is_dir()


def load(name_or_dir) -> dict:
    """A checkpoint in our format (stage, model_args, model, tokenizer) from a Hugging Face directory."""
    path = local_dir(name_or_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/config.json cannot be read ({type(e).__name__}): --init takes a ckpt.pt "
                        "or a Hugging Face model directory (config.json, model.safetensors, the tokenizer)") from None
    if not hf_tokenizer.is_hf_tokenizer(path):
        raise UserError(f"{path} has no tokenizer: it needs vocab.json and merges.txt, or a tokenizer.json")
    tok = load_tokenizer(path)
    weights = read_weights(path)
    kind = config.get("model_type")
    if kind not in ("gpt2", "gpt_neox"):
        raise UserError(f"{path} holds a {kind!r} model; this project's GPT loads GPT-2, and GPT-NeoX as export.py writes it")
    try:
        model_args, sd = (from_gpt2 if kind == "gpt2" else from_neox)(weights, config)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"the weights in {path} do not fit its config.json ({type(e).__name__}: {e})") from None
    model_args, sd = with_rows_for(tok, model_args, sd, path)
    if (path / HEADS).is_file():
        sd.update(read_weights(path, HEADS))
    return {"stage": config.get(STAGE_KEY, "pretrain"), "model_args": model_args, "model": sd,
            "tokenizer": str(path), "tokenizer_fingerprint": tok.fingerprint}


def local_dir(name_or_dir) -> Path:
    """The directory itself, or the hub's GPT-2 of that name, downloaded on first use."""
    name = str(name_or_dir)
    if name not in HUB:
        return Path(name)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "four-stages" / name
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    for file in HUB_FILES:
        if (cache / file).is_file():
            continue
        url = f"{endpoint}/openai-community/{name}/resolve/main/{file}"
        print(f"downloading {url} -> {cache / file}", flush=True)
        part = cache / f"{file}.{os.getpid()}.part"  # under torchrun every rank may fetch at once
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as out:
                while block := r.read(1 << 22):
                    out.write(block)
        except OSError as e:
            raise UserError(f"cannot download {name} from {endpoint} ({e}): where the hub can be reached, run "
                            f"`hf download openai-community/{name} {' '.join(HUB_FILES)} --local-dir {name}`, "
                            f"copy that directory here, and pass --init=DIR") from None
        os.replace(part, cache / file)
    return cache


def read_weights(path: Path, name=None) -> dict:
    """A state dict from safetensors, or from a .bin read with weights_only=True (no code unpickled)."""
    names = [name] if name else ["model.safetensors", "pytorch_model.bin"]
    file = next((path / n for n in names if (path / n).is_file()), None)
    if file is None:
        raise UserError(f"no {' or '.join(names)} in {path} (a sharded checkpoint is not supported)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise UserError("reading safetensors needs the safetensors package: pip install -r requirements.txt") from None
    except Exception as e:
        raise UserError(f"{file} cannot be read safely ({type(e).__name__}): download it again, or export it again") from None


def with_rows_for(tok, model_args, sd, path):
    """Add an embedding row, the mean of the others, for each of our chat tokens the model lacks."""
    rows = sd["transformer.wte.weight"]
    need = tok.n_vocab - rows.size(0)
    added = [t for t, i in tok.encoding._special_tokens.items() if i >= rows.size(0)]
    if need < 0 or max(tok.encoding._mergeable_ranks.values()) >= rows.size(0) or set(added) - set(SPECIAL_TOKENS):
        raise UserError(f"the weights in {path} have {rows.size(0)} token rows but its tokenizer "
                        f"{tok.n_vocab - len(added)} tokens: they do not belong together")
    if need:
        rows = torch.cat([rows, rows.mean(0, keepdim=True).expand(need, -1)])
        sd = {**sd, "transformer.wte.weight": rows, "lm_head.weight": rows}
    return {**model_args, "vocab_size": rows.size(0)}, sd


# ----------------------------------------------------------------------------------------------
# The two layouts, both ways


def from_gpt2(weights, config):
    from model import GPT
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {config['activation_function']}: our MLP is GPT-2's tanh GELU")
    model = GPT.from_gpt2(weights, n_head=config["n_head"])
    return dataclasses.asdict(model.config), model.state_dict()


def to_gpt2(model, ids):
    c = model.config
    sd = {k: (v.t() if k.endswith(CONV1D) else v) for k, v in trunk(model).items() if k != "lm_head.weight"}
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
              "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True, **ids}
    return config, sd


NEOX = {"ln_1": "input_layernorm", "attn.c_attn": "attention.query_key_value", "attn.c_proj": "attention.dense",
        "ln_2": "post_attention_layernorm", "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}


def from_neox(weights, config):
    """GPT-NeoX keeps each head's q, k and v together in query_key_value; we keep all heads' q, then k, then v."""
    C, H = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    act = config.get("hidden_act")
    checks = {"use_parallel_residual": (config.get("use_parallel_residual", True), False),
              "partial rotary": (rope.get("partial_rotary_factor", config.get("rotary_pct", 1.0)), 1.0),
              "rotary base": (rope.get("rope_theta", config.get("rotary_emb_base", 10000)), 10000),
              "intermediate_size": (config.get("intermediate_size"), 4 * C),
              "hidden_act": ("gelu_new" if act == "gelu_pytorch_tanh" else act, "gelu_new")}
    for what, (have, want) in checks.items():
        if have != want:
            raise ValueError(f"{what} is {have}; the GPT-NeoX this project's GPT can hold has {want}")
    if not torch.equal(weights["embed_out.weight"], weights["gpt_neox.embed_in.weight"]):
        raise ValueError("its output embedding differs from its input embedding; ours are one matrix")
    sd = {"transformer.wte.weight": weights["gpt_neox.embed_in.weight"]}
    for part in ("weight", "bias"):
        sd[f"transformer.ln_f.{part}"] = weights[f"gpt_neox.final_layer_norm.{part}"]
        for i in range(config["num_hidden_layers"]):
            for ours, theirs in NEOX.items():
                v = weights.get(f"gpt_neox.layers.{i}.{theirs}.{part}")
                if v is None and part == "bias":  # attention_bias=False
                    v = torch.zeros(weights[f"gpt_neox.layers.{i}.{theirs}.weight"].size(0))
                if ours == "attn.c_attn":  # (H, 3, D, ...) -> (3, H, D, ...)
                    v = v.reshape(H, 3, C // H, -1).transpose(0, 1).reshape(v.shape)
                sd[f"transformer.h.{i}.{ours}.{part}"] = v
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    args = dict(vocab_size=sd["lm_head.weight"].size(0), block_size=config["max_position_embeddings"],
                n_layer=config["num_hidden_layers"], n_head=H, n_embd=C, dropout=0.0, bias=True, rope=True)
    from model import GPT, GPTConfig
    GPT(GPTConfig(**args)).load_state_dict(sd)  # every weight there, every shape right, or a RuntimeError
    return args, sd


def to_neox(model, ids):
    c = model.config
    H, t = c.n_head, trunk(model)
    sd = {"gpt_neox.embed_in.weight": t["transformer.wte.weight"], "embed_out.weight": t["lm_head.weight"]}
    for part in ("weight", "bias"):
        sd[f"gpt_neox.final_layer_norm.{part}"] = t[f"transformer.ln_f.{part}"]
        for i in range(c.n_layer):
            for ours, theirs in NEOX.items():
                v = t[f"transformer.h.{i}.{ours}.{part}"]
                if ours == "attn.c_attn":  # (3, H, D, ...) -> (H, 3, D, ...)
                    v = v.reshape(3, H, c.n_embd // H, -1).transpose(0, 1).reshape(v.shape)
                sd[f"gpt_neox.layers.{i}.{theirs}.{part}"] = v
    config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": c.vocab_size,
              "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": H,
              "intermediate_size": 4 * c.n_embd, "hidden_act": "gelu_new", "max_position_embeddings": c.block_size,
              "rotary_pct": 1.0, "rotary_emb_base": 10000,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
              "use_parallel_residual": False, "attention_bias": True, "layer_norm_eps": 1e-5,
              "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False, **ids}
    return config, sd


def trunk(model) -> dict:
    """The language model's weights, biases as zeros where the model has none (both layouts need them)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "gate."))}
    for k in [k for k in sd if k.endswith(".weight") and k.rsplit(".", 2)[-2] in ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc")]:
        sd.setdefault(k[:-len("weight")] + "bias", torch.zeros(sd[k].size(0)))
    return sd


# ----------------------------------------------------------------------------------------------
# Writing a directory


def save(model, tok, stage, out: Path) -> list[str]:
    """config.json, model.safetensors, tokenizer.json and tokenizer_config.json (and the reward model's
    head beside its trunk), written into a temporary directory that becomes out only when complete."""
    from safetensors.torch import save_file
    ids = {"bos_token_id": tok.eot_id, "eos_token_id": [tok.eot_id, tok.end_id], STAGE_KEY: stage}
    config, sd = (to_neox if model.config.rope else to_gpt2)(model, ids)
    files = {"model.safetensors": sd}
    heads = {k: v for k, v in model.state_dict().items() if k.startswith(("head.", "gate."))}
    if heads:
        files[HEADS] = heads
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp / name, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    enc = tok.encoding
    (tmp / "tokenizer.json").write_text(hf_tokenizer.write_json(enc._pat_str, enc._mergeable_ranks,
                                                                enc._special_tokens), encoding="utf-8")
    chat = ("{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "model_max_length": model.config.block_size, "chat_template": chat}, indent=1) + "\n")
    os.replace(tmp, out)  # out is absent or an empty directory: export.py checks
    return [*files, "config.json", "tokenizer.json", "tokenizer_config.json"]
