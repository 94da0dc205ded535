"""The device, DDP and checkpoints: what every script that holds a model shares. The command line and
the user's mistakes are in cli.py; a training run's skeleton (the loop, the log) in run.py."""
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from cli import UserError

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
    """Leave the process group, every rank together: a rank that left while another still had a
    collective to call (rank 0 evaluates and saves alone after training) would leave it waiting or
    failing, so each waits here for all. The process then ends through cli.leave, which says why it
    skips Python's shutdown."""
    if dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
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
    state = ckpt["model"]
    if ckpt.get("lora"):  # a LoRA run's: its updates folded into the weights, a plain GPT's
        from gpt_lora import merged_state_dict
        state = merged_state_dict(state, ckpt["lora"]["alpha"] / ckpt["lora"]["rank"])
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # weights whose shapes disagree with model_args
        first = next((line.strip().rstrip(".") for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise UserError(f"the checkpoint's weights do not fit its model_args ({first}): "
                        "use a ckpt.pt written by one of the train_*.py scripts, unedited") from None
    missing = [k for k in missing if not k.startswith(("head.", "gate."))]
    if reward:
        model.head_only = bool(ckpt.get("head_only", False))  # a reward model that scores by its head alone
        model.first_slack = float(ckpt.get("first_slack", 0.0))
    if missing:
        raise UserError(f"the checkpoint lacks weights such as {missing[0]}: it was not written by this project")
    return model


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # resumed on fewer GPUs
