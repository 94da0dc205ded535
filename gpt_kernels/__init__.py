"""Our fused kernels and the dispatch between them and plain PyTorch.

    attention(q, k, v, causal=True)                      q, k, v: (B, H, T, D) -> (B, H, T, D)
    cross_entropy(logits, targets, ignore_index, reduction)          logits: (N, V), targets: (N,)
    linear_cross_entropy(hidden, weight, targets, ignore_index, reduction)  hidden: (N, C), weight: (V, C)

The Triton kernel runs when the tensors are on CUDA and Triton imports (for attention: except where
its kernels would spill registers on that GPU, `attention.spills`); otherwise PyTorch's own fused
ops run (for linear_cross_entropy: the same chunked loop in plain torch, or whole logits where Triton
is not imported: it does not install, or a plain CPU run skips it, below). KERNELS=torch|triton|auto
overrides the choice (triton on CPU tensors needs TRITON_INTERPRET=1, which is how the tests run the
kernels on a machine without a GPU).

Where they run: attention in every forward pass of the model (model.py); cross_entropy in every loss
over logits (the model's forward with targets, train_pretrain.pretrain_loss). linear_cross_entropy
is the same loss without the (N, V) logits ever existing at once, for a large vocabulary on a GPU
where they would not fit; the stages call the model for logits (DDP synchronises gradients through
its forward), so it is benchmarked (bench/) and tested, not yet wired into a stage.
"""
import os

import torch
import torch.nn.functional as F

# A plain CPU run (no GPU, no Triton interpreter, no KERNELS choice) only ever takes the PyTorch path:
# it skips importing Triton, which would cost every process a quarter of a second.
HAS_TRITON = False
if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ or "KERNELS" in os.environ:
    try:
        import triton  # noqa: F401
        HAS_TRITON = True
    except ImportError:
        pass

if HAS_TRITON:
    # Imported before the functions below are defined: importing a submodule sets the package attribute
    # of its name, and `gpt_kernels.attention` must end up the function, not the module gpt_kernels/attention.py.
    from . import attention as _attention, cross_entropy as _cross_entropy

# which backend ran last, per op: the tests read it to prove the Triton code, not a fallback, ran
last_backend = {}


def use_triton(*tensors):
    mode = os.environ.get("KERNELS", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"KERNELS={mode!r}: use torch, triton or auto")
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError("KERNELS=triton but triton does not import: pip install triton (Linux only)")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def attention(q, k, v, causal=True):
    if use_triton(q, k, v) and not _would_spill(q):
        last_backend["attention"] = "triton"
        return _attention.flash_attention(q, k, v, causal)
    last_backend["attention"] = "torch"
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _would_spill(q):
    """Left to PyTorch by the dispatch (KERNELS=auto): where our attention kernels spill registers on this GPU."""
    return (q.is_cuda and os.environ.get("KERNELS", "auto") == "auto"
            and _attention.spills(q.dtype, q.shape[-1], torch.cuda.get_device_capability(q.device)))


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    if use_triton(logits, targets):
        last_backend["cross_entropy"] = "triton"
        return _cross_entropy.fused_cross_entropy(logits, targets, ignore_index, reduction)
    last_backend["cross_entropy"] = "torch"
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", chunk_size=4096):
    backend = "triton" if use_triton(hidden, weight, targets) else "torch"
    last_backend["linear_cross_entropy"] = backend
    if not HAS_TRITON:  # the chunked loop lives beside the Triton kernels; without Triton, whole logits
        loss = F.cross_entropy((hidden @ weight.T).flatten(0, -2).float(), targets.flatten(),
                               ignore_index=ignore_index, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss
    return _cross_entropy.chunked_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                                       backend)
