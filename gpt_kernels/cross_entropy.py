"""Fused cross-entropy in Triton, and cross-entropy of a linear layer computed in chunks of tokens.

    loss_i = logsumexp(logits_i) - logits_i[target_i]          logits: (N, V), targets: (N,)
    dloss_i / dlogits_i = softmax(logits_i) - onehot(target_i)

Forward: one program per row reads the row once, in blocks of the vocabulary, keeping a running max m
and a running sum s of exp(x - m) (when a block raises the max to m', s becomes s * exp(m - m') +
the block's terms); logsumexp = m + log(s). It writes the row's loss and its logsumexp, nothing
vocabulary-sized. Backward: a second kernel reads the row again and writes
dlogits = (exp(x - lse) - onehot) * grad_row. We do not compute the gradient during the forward
because the forward does not know grad_row yet, and because storing dlogits from the forward would
hold a second (N, V) tensor alive across the whole backward; re-reading the logits costs one more
pass over memory and saves that.

All math is in float32 whatever the logits' dtype; dlogits come back in the logits' dtype. Rows whose
target is ignore_index give zero loss and zero gradient; a target outside 0..V-1 gives a NaN loss
(checking it on the host would cost a GPU sync per step). Reductions: "mean" over the rows that are
not ignored (NaN when every row is, as F.cross_entropy), "sum", "none" (float32 per-row losses).
"""
import torch
import triton
import triton.language as tl


def cross_entropy_reference(logits, targets, ignore_index=-100, reduction="mean"):
    """Plain cross-entropy: log-softmax in fp32, the target's log-probability, ignored rows zeroed."""
    x = logits.float()
    m = x.max(dim=-1, keepdim=True).values
    lse = (m + (x - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    valid = targets != ignore_index
    target_logit = x.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, lse - target_logit, 0.0)
    return _reduce(loss, valid, reduction)


def _reduce(loss, valid, reduction):
    _check_reduction(reduction)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()  # mean; 0 / 0 = NaN when every row is ignored, as F.cross_entropy


def _check_reduction(reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: use mean, sum or none")


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _ce_forward_kernel(LOGITS, TARGETS, LOSS, LSE, stride_row, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row passes 2**31 once N * V does
    LOGITS += row * stride_row
    m = -float("inf")  # running max of the row
    s = 0.0  # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(LOGITS + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))  # finite from the first block on: column 0 is in it
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    target_logit = tl.load(LOGITS + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - target_logit, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_backward_kernel(LOGITS, DLOGITS, TARGETS, LSE, GRAD, stride_row, stride_drow, stride_grad, V, ignore_index,
                        BLOCK_V: tl.constexpr):
    """dlogits = (softmax - onehot) * grad_row. DLOGITS may be LOGITS: each element is read before it is written."""
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride_row
    DLOGITS += row * stride_drow
    target = tl.load(TARGETS + row)
    grad = tl.load(GRAD + row * stride_grad).to(tl.float32)
    grad = tl.where(target != ignore_index, grad, 0.0)  # where, not a product: grad may be inf (mean of 0 rows)
    lse = tl.load(LSE + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(LOGITS + cols, mask=cols < V, other=-float("inf")).to(tl.float32)  # exp: 0 past V
        d = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * grad
        tl.store(DLOGITS + cols, d.to(DLOGITS.dtype.element_ty), mask=cols < V)


def _launch_config(V, device_type):
    """Block of the vocabulary and warps, for rows of V logits on a device type (bench/compile_kernels.py
    compiles every choice made here for Ampere and Hopper)."""
    if device_type != "cuda":  # the interpreter: small blocks so that tests cross block edges,
        return dict(BLOCK_V=32 if V <= 1024 else 2048, num_warps=4)  # and fewer steps for a big V
    block = min(4096, triton.next_power_of_2(V))
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def _rows_loss_lse(logits, targets, ignore_index):
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    _ce_forward_kernel[(N,)](logits, targets, loss, lse, logits.stride(0), V, ignore_index,
                             **_launch_config(V, logits.device.type))
    return loss, lse


def _rows_dlogits(logits, targets, lse, grad_rows, ignore_index, out):
    N, V = logits.shape
    _ce_backward_kernel[(N,)](logits, out, targets, lse, grad_rows, logits.stride(0), out.stride(0),
                              grad_rows.stride(0), V, ignore_index, **_launch_config(V, logits.device.type))
    return out


class _FusedCrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) in float32. The reduction is plain torch outside, so autograd hands the
    backward one gradient per row (a stride-0 view for mean and sum) and one kernel serves all three."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse = _rows_loss_lse(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _rows_dlogits(logits, targets, lse, grad_loss, ctx.ignore_index, out=dlogits)
        return dlogits, None, None


def _check(logits, targets, reduction):
    _check_reduction(reduction)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross-entropy wants logits (N, V) and targets (N,); "
                         f"got {tuple(logits.shape)}, {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError(f"targets must be class indices (integers), got {targets.dtype}")


def fused_cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy through the Triton kernels: logits (N, V), targets (N,)."""
    _check(logits, targets, reduction)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss = _FusedCrossEntropy.apply(logits, targets.contiguous(), ignore_index)
    return _reduce(loss, targets != ignore_index, reduction)


# ----------------------------------------------------------------------------- linear + cross-entropy, in chunks

def _chunk_loss_and_grad(logits, targets, ignore_index, grad_rows, backend):
    """Per-row losses of a chunk of logits and, with grad_rows, its dlogits (None without). The Triton
    path writes dlogits over the logits, in place: the chunk's logits are not needed after."""
    if backend == "triton":
        loss, lse = _rows_loss_lse(logits, targets, ignore_index)
        if grad_rows is None:
            return loss, None
        return loss, _rows_dlogits(logits, targets, lse, grad_rows, ignore_index, out=logits)
    logp = torch.log_softmax(logits.float(), dim=-1)  # the same math in plain torch
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(-1)
    loss = torch.where(valid, -logp.gather(-1, safe).squeeze(-1), 0.0)
    if grad_rows is None:
        return loss, None
    d = logp.exp_().scatter_add_(-1, safe, torch.full(safe.shape, -1.0, device=logp.device))  # softmax - onehot
    return loss, d.mul_(torch.where(valid, grad_rows, 0.0).unsqueeze(-1)).to(logits.dtype)


def _linear_ce_pass(hidden, weight, targets, ignore_index, chunk_size, backend, dtype, grad_rows=None):
    """One pass over chunks of tokens: per-row losses, and with grad_rows (N,) the gradients of
    sum(grad_rows * loss) with respect to hidden and weight. Only a (chunk, V) block of logits exists."""
    N = hidden.shape[0]
    w = weight.to(dtype)
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if grad_rows is not None:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        h = hidden[rows].to(dtype)
        logits = h @ w.T  # (chunk, V)
        g = None if grad_rows is None else grad_rows[rows]
        loss[rows], dlogits = _chunk_loss_and_grad(logits, targets[rows], ignore_index, g, backend)
        if grad_rows is not None:
            grad_hidden[rows] = dlogits @ w
            if grad_weight.dtype == dtype:
                grad_weight.addmm_(dlogits.T, h)
            else:  # low precision: each chunk's product, accumulated in float32
                grad_weight += dlogits.T @ h
    if grad_rows is None:
        return loss, None, None
    return loss, grad_hidden, grad_weight.to(weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean and sum: the gradients are computed during the forward, for a unit incoming gradient, and
    the backward only scales them. none: the forward computes the losses alone; the backward, which
    knows each row's incoming gradient, does a second pass over the chunks (one more matmul)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, backend):
        # the matmuls run in autocast's dtype when autocast is on, else in the inputs' dtype; autocast
        # itself is off inside so that forward and backward make the same choice
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
        args = (targets, ignore_index, chunk_size, backend, dtype)
        ctx.reduction, ctx.args = reduction, args
        valid = targets != ignore_index
        with torch.autocast(device, enabled=False):
            if reduction == "none":
                loss, _, _ = _linear_ce_pass(hidden, weight, *args)
                ctx.save_for_backward(hidden, weight)
                return loss
            if reduction == "mean":
                grad_rows = (1.0 / valid.sum()).expand(hidden.shape[0])  # inf with no valid row; masked in the kernel
            else:
                grad_rows = torch.ones((), device=hidden.device).expand(hidden.shape[0])
            loss, grad_hidden, grad_weight = _linear_ce_pass(hidden, weight, *args, grad_rows=grad_rows)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return _reduce(loss, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight = ctx.saved_tensors
            with torch.autocast(hidden.device.type, enabled=False):
                _, grad_hidden, grad_weight = _linear_ce_pass(hidden, weight, *ctx.args, grad_rows=grad_out)
            return grad_hidden, grad_weight, None, None, None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None, None, None


def chunked_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", chunk_size=4096,
                                 backend="triton"):
    """cross_entropy(hidden @ weight.T, targets) without the (N, V) logits: hidden (..., C), weight (V, C),
    targets (...). backend "triton" runs the fused kernels on each chunk, "torch" the same math in torch."""
    _check_reduction(reduction)
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend={backend!r}: use triton or torch")
    C = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != C or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy wants hidden (..., C), weight (V, C), targets (...); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    loss = _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, C), weight, targets.reshape(-1).contiguous(),
                                            ignore_index, reduction, chunk_size, backend)
    return loss.view(targets.shape) if reduction == "none" else loss
