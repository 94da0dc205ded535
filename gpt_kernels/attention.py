"""Fused attention in Triton, forward and backward (FlashAttention-2), beside its plain-PyTorch reference.

    out = softmax(q k^T / sqrt(D) + causal mask) v          q: (B, H, Tq, D), k and v: (B, H, Tk, D)

The reference materialises the (Tq, Tk) score matrix; the kernels never do. The forward walks over
blocks of keys with an online softmax and keeps only the output, and the log-sum-exp of each query
row; the backward recomputes the probabilities from that log-sum-exp, block by block.

Online softmax, for one query row and scores s_1, s_2, ... arriving one block at a time:
    m   = max of the scores seen so far
    l   = sum of exp(s_j - m) over the scores seen so far
    acc = sum of exp(s_j - m) * v_j
When a block raises the maximum from m to m', every earlier term is exp(s_j - m) and must become
exp(s_j - m'): multiply l and acc by alpha = exp(m - m') and then add the new block. At the end
out = acc / l and lse = m + log(l), so that softmax(s)_j = exp(s_j - lse) later, with no running max.
We work in base 2 (exp2 is the fast instruction): scores are scaled by log2(e)/sqrt(D) and the
saved lse is in log2 units.

The backward, with P the probabilities, dO the incoming gradient and scale = 1/sqrt(D):
    dV = P^T dO     dP = dO V^T     dS = P * (dP - delta), delta = rowsum(dO * O)     dQ = scale dS K
    dK = scale dS^T Q
One kernel computes delta, one owns a block of keys and loops over queries (dK, dV), one owns a
block of queries and loops over keys (dQ): no atomics, each output block is written once.

Causal follows F.scaled_dot_product_attention: query i sees keys j <= i (top-left aligned when
Tq != Tk). Blocks above the diagonal are never visited; only blocks that the diagonal or the end of
the sequence cuts through pay for a mask.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def attention_reference(q, k, v, causal=True):
    """Plain attention: scores, mask, softmax in fp32, weighted sum of the values."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.float()).to(q.dtype)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, lo, hi, T_K, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold keys lo..hi into the running (acc, l, m) of a block of queries; MASK for the cut blocks."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # the padding of D up to a power of two is never read
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T_K
        kT = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N) scores, log2 units
        if MASK:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        # every row sees key 0, which is in the first block visited: m_new is finite, exp2 never NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                H, T_Q, T_K, qk_scale,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # the longest causal rows first, so that the last programs to start are the short ones
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_b passes 2**31 on large tensors
    b, h = bh // H, bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * sq_t + offs_d[None, :], mask=io_mask, other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys below `mid` are visible to every row of this block; mid..hi need a mask
    full_k = (T_K // BLOCK_N) * BLOCK_N
    if CAUSAL:
        mid = tl.minimum(start_m, full_k)
        hi = tl.minimum(start_m + BLOCK_M, T_K)
    else:
        mid = full_k
        hi = T_K
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, 0, mid, T_K, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, mid, hi, T_K, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D)

    tl.store(O + offs_m[:, None] * so_t + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + bh * T_Q + offs_m, m_i + tl.log2(l_i), mask=offs_m < T_Q)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t, H, T_Q,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O): the softmax backward's correction term, once per query row."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sq_t, sdo_t, offs_n, lo, hi, T_Q, qk_scale,
                MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add the contributions of queries lo..hi to dK, dV of one block of keys (all transposed: keys x queries)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T_Q
        q = tl.load(Q + offs_m[:, None] * sq_t + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdo_t + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        # rows past the end get lse = +inf, hence probability 0 and no contribution
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASK:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, sdk_b, sdk_h, sdk_t,
                     H, T_Q, T_K, qk_scale, sm_scale,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    Q += b * sq_b + h * sq_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh * T_Q
    DELTA += bh * T_Q
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < T_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # queries start_n .. start_n+BLOCK_N see part of this block; queries below see all of it
        diag_end = tl.minimum(start_n + BLOCK_N, T_Q)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sq_t, sdo_t, offs_n, start_n, diag_end, T_Q,
                             qk_scale, True, HEAD_DIM, BLOCK_M, BLOCK_D)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sq_t, sdo_t, offs_n, start_n + BLOCK_N, T_Q, T_Q,
                             qk_scale, False, HEAD_DIM, BLOCK_M, BLOCK_D)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sq_t, sdo_t, offs_n, 0, T_Q, T_Q,
                             qk_scale, False, HEAD_DIM, BLOCK_M, BLOCK_D)
    out = b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, lo, hi, T_K, qk_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add the contributions of keys lo..hi to dQ of one block of queries."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T_K
        kT = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        vT = tl.load(V + offs_n[None, :] * sv_t + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, sdq_b, sdq_h, sdq_t,
                   H, T_Q, T_K, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    io_mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=io_mask, other=0.0)
    lse = tl.load(LSE + bh * T_Q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * T_Q + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_k = (T_K // BLOCK_N) * BLOCK_N  # the same split of the keys as the forward
    if CAUSAL:
        mid = tl.minimum(start_m, full_k)
        hi = tl.minimum(start_m + BLOCK_M, T_K)
    else:
        mid = full_k
        hi = T_K
    dq = _dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, 0, mid, T_K, qk_scale,
                   False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, mid, hi, T_K, qk_scale,
                   True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D)
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------- the autograd function

def _config(block_d, dtype, device, capability=None):
    """Each kernel's launch: fwd, dkdv, dq: (BLOCK_M, BLOCK_N, warps, stages); delta: (BLOCK_M, warps).

    capability: the GPU's (major, minor), read from the device when not given. bench/compile_kernels.py
    compiles every choice made here for A100/H100-class GPUs (sm_80, sm_90): each builds without
    spilling a register, within shared memory and on the tensor cores (wgmma on Hopper, whose products
    need 64 rows), except where `spills` says. Each was picked among the blocks tried there, the old
    ones where they did not spill. Not checked: the smaller shared memory of other Ampere and Ada cards
    (sm_86, sm_89: about 99 KB), and speed against other spill-free choices, which needs a GPU.
    """
    if device.type != "cuda":  # the interpreter: small blocks keep the tests fast and cross many block edges
        return dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1), delta=(64, 4))
    hopper = (capability or torch.cuda.get_device_capability(device))[0] >= 9
    if dtype == torch.float32:  # 4-byte tiles: smaller blocks, so that registers and shared memory still fit
        if block_d <= 64:
            return dict(fwd=(64, 32, 4, 2), dkdv=(32, 64, 8, 2) if hopper else (32, 32, 8, 2),
                        dq=(64, 32, 8, 2) if hopper else (32, 32, 8, 2), delta=(32, 4))
        return dict(fwd=(64, 32, 8, 2), dkdv=(32, 32, 8, 2), dq=(64, 32, 8, 2), delta=(32, 4))
    if block_d <= 64:  # Hopper's forward fits 128 x 64 in 4 warps; Ampere's spills there, and at 8 warps too
        return dict(fwd=(128, 64, 4, 3) if hopper else (128, 32, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3),
                    delta=(32, 4))
    return dict(fwd=(64, 64, 8, 3), dkdv=(32, 64, 8, 3), dq=(64, 64, 8, 3) if hopper else (32, 64, 8, 2),
                delta=(32, 4))


def spills(dtype, head_dim, capability):
    """Whether every block tried spills registers here (bench/compile_kernels.py): fp32 inputs with head
    dims above 64 on Hopper (its wgmma wants 64-row blocks, which do not fit then). The dispatch
    (gpt_kernels.attention) gives these to PyTorch's attention."""
    return dtype == torch.float32 and head_dim > 64 and capability[0] >= 9


def _inner_contiguous(t):
    # the kernels assume unit stride along D (vectorised loads) and take the other three strides;
    # a (B, T, H, D) tensor transposed to (B, H, T, D) already qualifies and is not copied
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
        B, H, T_Q, D = q.shape
        T_K = k.shape[2]
        block_d = max(16, triton.next_power_of_2(D))
        cfg = _config(block_d, q.dtype, q.device)
        block_m, block_n, warps, stages = cfg["fwd"]
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B * H, T_Q), dtype=torch.float32, device=q.device)
        sm_scale = 1.0 / math.sqrt(D)
        _fwd_kernel[(triton.cdiv(T_Q, block_m), B * H)](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, T_Q, T_K, sm_scale * LOG2E, CAUSAL=causal, HEAD_DIM=D,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.block_d, ctx.cfg = causal, block_d, cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _inner_contiguous(do)
        B, H, T_Q, D = q.shape
        T_K = k.shape[2]
        cfg, block_d = ctx.cfg, ctx.block_d
        sm_scale = 1.0 / math.sqrt(D)
        launch = dict(CAUSAL=ctx.causal, HEAD_DIM=D, BLOCK_D=block_d)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # dk's layout: the kernel shares strides
        delta = torch.empty_like(lse)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

        block_m, warps = cfg["delta"]
        _bwd_delta_kernel[(triton.cdiv(T_Q, block_m), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T_Q, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=warps)
        block_m, block_n, warps, stages = cfg["dkdv"]
        _bwd_dkdv_kernel[(triton.cdiv(T_K, block_n), B * H)](
            q, k, v, do, dk, dv, lse, delta, *strides, *dk.stride()[:3], H, T_Q, T_K, sm_scale * LOG2E, sm_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **launch)
        block_m, block_n, warps, stages = cfg["dq"]
        _bwd_dq_kernel[(triton.cdiv(T_Q, block_m), B * H)](
            q, k, v, do, dq, lse, delta, *strides, *dq.stride()[:3], H, T_Q, T_K, sm_scale * LOG2E, sm_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **launch)
        return dq, dk, dv, None


def flash_attention(q, k, v, causal=True):
    """Attention through the Triton kernels: q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention wants q (B, H, Tq, D) and k, v (B, H, Tk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[3]
    if not 16 <= D <= 128:
        raise ValueError(f"the Triton attention supports head dims 16 to 128, not {D}: "
                         "change n_embd / n_head, or run with KERNELS=torch")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention wants q, k, v of one dtype among fp32, fp16, bf16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"batch x heads = {q.shape[0] * q.shape[1]} is over the grid's limit of 65535: "
                         "split the batch")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("attention needs at least one query and one key")
    return _FlashAttention.apply(q, k, v, causal)
