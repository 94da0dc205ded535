"""LoRA, written out: fine-tuning a low-rank update beside frozen weights, for every stage after pre-training.

    add_lora(model, rank=8, alpha=16, targets="attn,mlp")   # only the updates (and any heads) train
    with adapters_off(model): ...                            # the model as the checkpoint it came from
    ref = AdaptersOff(model)                                 # the same, as a reference network: no second copy
    merged_state_dict(ckpt["model"], alpha / rank)           # a plain GPT's weights, the updates folded in

run.py adds the adapters when a stage's --lora_rank is set; common.gpt_from_checkpoint folds them in
when a checkpoint that has them is read as a plain model.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """A linear layer with a trainable low-rank update beside its frozen weight (LoRA, Hu et al. 2021):

        y = W x + b + (alpha / r) B A x,    A: (r, in), B: (out, r), r much smaller than in and out

    Fine-tuning then trains r (in + out) numbers per layer instead of in x out. B starts at zero, so
    the update B A is zero and the model at step 0 is exactly the checkpoint it came from; A starts
    random (B's first gradient is x A's product with the upstream gradient: with A zero too, neither
    would ever move). alpha / r scales the update so that changing the rank does not change how far
    one step moves the output: the learning rate tuned at one rank holds at another. With
    adapters_on False the layer is its base exactly; `merged` folds the update into W."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank
        self.adapters_on = True

    def forward(self, x):
        y = super().forward(x)
        if not self.adapters_on:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def merged(self):
        """W + (alpha / r) B A: the weight of a plain nn.Linear that computes what this layer does."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A).to(self.weight.dtype)


LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}


def add_lora(model, rank, alpha, targets="attn,mlp"):
    """Put a LoRALinear in place of each chosen linear layer of every block (targets: attn, mlp, or
    both), and freeze everything else but the heads a value or reward model has: only the adapters
    and those heads train. Returns the model."""
    names = [n for t in targets.split(",") for n in LORA_TARGETS[t.strip()]]
    for block in model.transformer.h:
        for name in names:
            parent, child = name.split(".")
            setattr(getattr(block, parent), child, LoRALinear(getattr(getattr(block, parent), child), rank, alpha))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(("head.", "gate.")))
    return model


def merged_state_dict(state_dict, scale):
    """A state dict with adapters (the keys ..lora_A, ..lora_B) as a plain GPT's: each update folded
    into its weight, W + scale B A, and the adapter keys gone."""
    out = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for key in [k for k in state_dict if k.endswith(".lora_A")]:
        stem = key[:-len(".lora_A")]
        out[stem + ".weight"] = state_dict[stem + ".weight"] + scale * (state_dict[stem + ".lora_B"] @ state_dict[key]).to(
            state_dict[stem + ".weight"].dtype)
    return out


class adapters_off:
    """with adapters_off(model): the model computes as its base, the checkpoint LoRA started from. DPO's
    reference and PPO's and GRPO's KL reference are the policy itself under this: one copy of the weights."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]

    def __enter__(self):
        for m in self.layers:
            m.adapters_on = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.adapters_on = True


class AdaptersOff(nn.Module):
    """A LoRA model seen as its base: calling it runs the model with its adapters off, in eval mode. The
    reference a LoRA run needs (DPO's, PPO's and GRPO's KL) without a second copy of the weights; the
    model is not a submodule of it, so nothing done to the reference (eval(), say) reaches the model."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, *args, **kwargs):
        was = self.model.training
        self.model.eval()
        try:
            with adapters_off(self.model):
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was)
