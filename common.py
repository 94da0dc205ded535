"""What every script shares, and nothing more: the command line, the device, DDP, checkpoints, and one
way to report a user's mistake. A training run's skeleton (the loop, the log) is in run.py."""
import dataclasses
import inspect
import math
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- user errors


class UserError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2, no traceback."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_main(main, config_cls, presets=None):
    """main(config) with the config from the command line; a UserError becomes one line on stderr
    and exit code 2."""
    try:
        main(parse_config(config_cls, presets=presets))
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first: see StopOnSignal)
        print("\ninterrupted: files already written are left as they were", file=sys.stderr, flush=True)
        sys.exit(130)

# ----------------------------------------------------------------------------- the command line


def field_comments(cls):
    """{field: comment} from the `name: type = default  # comment` lines of a config dataclass."""
    src = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M))


def parse_value(name, text, kind):
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} expects {kind.__name__}, got {text!r}") from None


def parse_config(cls, argv=None, presets=None):
    """A config from `--field=value` arguments. `--preset=NAME` first applies a named set of
    defaults from `presets`; fields given on the command line win over it. Where a script has a
    `tinyworld_gpu` preset and a CUDA GPU is used, that preset is the default (`--preset=cpu`: none)."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print_help(cls, presets)
        sys.exit(0)
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: arguments look like --field=value (see --help)")
        name, eq, text = arg[2:].partition("=")
        if (name != "preset" or not presets) and name not in fields:
            valid = (["preset"] if presets else []) + list(fields)
            raise UserError(f"unknown flag --{name}; valid flags: " + ", ".join(f"--{n}" for n in valid))
        given[name] = text if eq else "true"
    values = {}
    preset = given.pop("preset", None)
    if preset is None and "tinyworld_gpu" in (presets or {}) and on_gpu(given.get("device", "auto")):
        preset = "tinyworld_gpu"
        print("a CUDA GPU: TinyWorld at GPU size (--preset=tinyworld_gpu; --preset=cpu for the CPU sizes)", flush=True)
    if preset is not None:
        if not presets or preset not in presets:
            raise UserError(f"unknown preset {preset!r}; presets: {', '.join(presets or {}) or 'none'}")
        values.update(presets[preset])
    for name, text in given.items():
        values[name] = parse_value(name, text, type(fields[name].default))
    return cls(**values)


def on_gpu(device):
    """Whether --device=DEVICE trains on a CUDA GPU (auto: where PyTorch sees one)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def print_help(cls, presets=None):
    print((sys.modules[cls.__module__].__doc__ or "").strip() + "\n\nflags (--field=value):")
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        print(f"  --{f.name}={f.default!s:<28} {comments.get(f.name, '')}")
    if presets:
        print("  --preset=NAME                  " + "; ".join(f"{k}: {v}" for k, v in presets.items()))

# ----------------------------------------------------------------------------- device and DDP


def pick_device(name="auto"):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device={name} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device={name}, but PyTorch sees no CUDA GPU here: use --device=auto or --device=cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device={name}, but there are {torch.cuda.device_count()} GPUs: use --device=cuda")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device={name}, but this machine has no MPS: use --device=auto or --device=cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device):
    """bf16 autocast on CUDA; full fp32 elsewhere (CPU bf16 is slow and MPS autocast is partial)."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def setup_ddp(device):
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPU). Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def teardown_ddp():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def all_mean(x):
    """The mean of a float over all ranks (itself when not distributed)."""
    if not dist.is_initialized():
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()

# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, ckpt):
    """Write atomically: a temporary file beside it, then a rename, so a crash leaves the old or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, stages=None, made_by=None):
    """Load a checkpoint without unpickling code (weights_only=True); check its stage is one of `stages`.
    `made_by` names the command that writes it, for the error when it is missing. A Hugging Face
    model directory (or a GPT-2 name on the hub) is read as a checkpoint too: see hf.py."""
    path = Path(path)
    if not path.is_file():
        import hf  # only when asked for: it reads formats the stages' own checkpoints do not need
        if not hf.is_model_dir(path):
            hint = f": run `{made_by}` first" if made_by else ""
            raise UserError(f"no checkpoint at {path}{hint}")
        ckpt = hf.load(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a checkpoint this project can load safely ({type(e).__name__}); "
                            "use a ckpt.pt written by one of the train_*.py scripts") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "stage" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by one of the train_*.py scripts")
    if stages and ckpt["stage"] not in stages:
        raise UserError(f"{path} is a {ckpt['stage']!r} checkpoint, but this needs one of {list(stages)}")
    return ckpt


def gpt_from_checkpoint(ckpt, tok=None, value_head=False, reward=False, **overrides):
    """The GPT a checkpoint holds, checked against the tokenizer's vocabulary when one is given.
    Extra heads, such as a reward model's, are left out; with value_head=True it is a
    model.ValueModel instead, and with reward=True a model.RewardModel, whose heads are loaded when
    the checkpoint has them and freshly initialised when not. overrides change the model's config
    (dropout=0.0, say)."""
    from model import GPT, GPTConfig, RewardModel, ValueModel
    try:
        kind = RewardModel if reward else ValueModel if value_head else GPT
        model = kind(GPTConfig(**{**ckpt["model_args"], **overrides}))
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"the checkpoint's model_args do not describe a GPT ({type(e).__name__}: {e}): "
                        "use a ckpt.pt written by one of the train_*.py scripts") from None
    if tok is not None and model.config.vocab_size != tok.n_vocab:
        raise UserError(f"the checkpoint expects {model.config.vocab_size} tokens but the tokenizer has "
                        f"{tok.n_vocab}: use the tokenizer it was trained with")
    trained_with = ckpt.get("tokenizer_fingerprint")  # absent from checkpoints written before it was kept
    if tok is not None and trained_with and trained_with != tok.fingerprint:
        raise UserError(f"the tokenizer {tok.path} has as many tokens as the checkpoint's but not the same ones: "
                        f"use the tokenizer it was trained with ({ckpt.get('tokenizer')})")
    try:
        missing, _ = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # weights whose shapes disagree with model_args
        first = next((line.strip().rstrip(".") for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise UserError(f"the checkpoint's weights do not fit its model_args ({first}): "
                        "use a ckpt.pt written by one of the train_*.py scripts, unedited") from None
    missing = [k for k in missing if not k.startswith(("head.", "gate."))]
    if missing:
        raise UserError(f"the checkpoint lacks weights such as {missing[0]}: it was not written by this project")
    return model


def require_positive(cfg, *names):
    """Each --name (a count, a size, a rate) must be a positive, finite number: one error line if not."""
    for name in names:
        value = getattr(cfg, name)
        if not 0 < value < math.inf:  # also false for NaN
            raise UserError(f"--{name} must be a positive number, got {value}")


def check_writable(out_dir):
    """Fail before training, not after, when the output directory cannot be written."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({e.strerror}): choose another --out") from None


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

# ----------------------------------------------------------------------------- data files


def numbered_records(path):
    """(line number, record) for each record of a JSON Lines file, so that an error about a record can
    name its line (data.read_jsonl skips blank lines, so a record's index need not be its line)."""
    from data import read_jsonl  # here, not at the top: data imports common
    try:
        records = read_jsonl(path)  # a missing file and a malformed line get its error lines
        with open(path, encoding="utf-8") as f:
            lines = [n for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): convert it, or write it with a "
                        "data/prepare_*.py script") from None
    return list(zip(lines, records))

# ----------------------------------------------------------------------------- prompts and responses


def pack_responses(prompts, responses):
    """Prompt-and-response token lists as one right-padded batch for the post-training stages.

    prompts[i] and responses[i] are lists of token ids (a response as generated: ending with <|end|>,
    or cut short). Returns x (B, T) the inputs, y (B, T) the targets shifted by one (-100 on padding),
    and mask (B, T): 1 where y is a response token, so that (mask * log p(y)).sum(1) is the response's
    log-probability. Padding is on the right, so positions need no shifting; x pads with token 0.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    x = pad_right([s[:-1] for s in seqs], 0)
    y = pad_right([s[1:] for s in seqs], -100)
    mask = torch.zeros(x.shape)
    for i, (seq, p) in enumerate(zip(seqs, prompts)):
        mask[i, len(p) - 1:len(seq) - 1] = 1.0  # y[t] = seq[t+1] is a response token from t = len(prompt) - 1
    return x, y, mask


def pad_right(seqs, value=0):
    """Token lists as one (B, max length) tensor, padded on the right with value."""
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def score_replies(rm, prompts, replies):
    """A model.RewardModel's scores of prompt + reply token lists, in one right-padded batch.
    Returns (scores (B,), each reply token's log-prob (B, T-1), the number of reply tokens (B,))."""
    device = next(rm.parameters()).device
    seqs = [p + r for p, r in zip(prompts, replies)]
    start = torch.tensor([len(p) for p in prompts], device=device)
    end = torch.tensor([len(s) - 1 for s in seqs], device=device)
    scores, logp = rm(pad_right(seqs).to(device), start, end)
    return scores, logp, end - start + 1
