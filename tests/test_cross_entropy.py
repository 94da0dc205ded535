"""Fused cross-entropy and chunked linear cross-entropy: the Triton kernels equal the plain reference.

Losses and gradients (dlogits; dhidden and dweight) on drawn shapes, odd vocabularies, ignored rows and
all three reductions. Without a GPU the kernels run through Triton's interpreter (tests/conftest.py).
"""
import math

import pytest

pytest.importorskip("triton")  # the kernels and their references live in modules that import it
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import gpt_kernels
from conftest import KERNEL_DEVICES
from gpt_kernels.cross_entropy import cross_entropy_reference

CUDA = torch.cuda.is_available()
DEVICES = KERNEL_DEVICES
# fewer on a GPU, where an example can compile new kernels (see test_attention.py)
SETTINGS = settings(max_examples=12 if CUDA else 30,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
REDUCTIONS = st.sampled_from(["mean", "sum", "none"])


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def assert_close(actual, expected, tol, what):
    """Max error within tol, relative to the largest value; NaN only where the reference has NaN."""
    actual, expected = actual.float(), expected.float()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN in different places"
    actual, expected = actual[~expected.isnan()], expected[~expected.isnan()]
    if expected.numel() == 0:
        return
    err = (actual - expected).abs().max().item()
    bound = tol * (1 + expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} over {bound:.3g}"


def targets_with_ignored(N, V, ignored, gen, device):
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignored] = -100
    return targets.to(device)


def upstream_grad(loss, gen):
    """A random incoming gradient, so that the backward's scaling is checked too."""
    return torch.randn(loss.shape, generator=gen).to(loss.device)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data())
def test_cross_entropy_matches_reference(device, data, monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    N = data.draw(st.integers(1, 24 if device == "cpu" else 300), label="N")
    # 32 is the interpreter's block and 4096 the GPU's: draw around both
    V = data.draw(st.one_of(st.integers(1, 200), st.sampled_from([31, 32, 33, 64, 65, 4095, 4097])), label="V")
    dtype = data.draw(st.sampled_from(dtypes(device)), label="dtype")
    reduction = data.draw(REDUCTIONS, label="reduction")
    layout = data.draw(st.sampled_from(["contiguous", "wide", "transposed"]), label="layout")
    scale = data.draw(st.sampled_from([1.0, 30.0]), label="scale")  # 30: logits far from 0, exp would overflow
    shape = {"contiguous": (N, V), "wide": (N, V + 5), "transposed": (V, N)}[layout]
    logits = (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    if layout == "wide":  # rows of a wider tensor: the row stride is not V
        logits = logits[:, 2:V + 2]
    elif layout == "transposed":  # columns not contiguous
        logits = logits.T
    logits.requires_grad_()
    targets = targets_with_ignored(N, V, data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="ignored"), gen, device)

    gpt_kernels.last_backend.clear()
    loss = gpt_kernels.cross_entropy(logits, targets, reduction=reduction)
    assert gpt_kernels.last_backend["cross_entropy"] == "triton"
    grad = upstream_grad(loss, gen)
    loss.backward(grad)

    ref_logits = logits.detach().float().requires_grad_()
    ref = cross_entropy_reference(ref_logits, targets, reduction=reduction)
    ref.backward(grad)
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    tol = tolerance(dtype)
    if reduction == "mean" and (targets == -100).all():
        assert math.isnan(loss.item())  # as F.cross_entropy
    assert_close(loss, ref, tol, "loss")
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, ref_logits.grad, tol, "dlogits")
    assert (logits.grad[targets == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [50257, 128256])
def test_cross_entropy_large_vocabularies(device, V, monkeypatch):
    """GPT-2's V = 50257 (odd) and Llama 3's 128256: many blocks wide."""
    monkeypatch.setenv("KERNELS", "triton")
    gen = torch.Generator().manual_seed(0)
    N = 3 if device == "cpu" else 64
    logits = (4 * torch.randn(N, V, generator=gen)).to(device).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    targets[1] = V - 1
    loss = gpt_kernels.cross_entropy(logits, targets)
    assert gpt_kernels.last_backend["cross_entropy"] == "triton"
    loss.backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets)
    ref.backward()
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(logits.grad, ref_logits.grad, 1e-5, "dlogits")


@pytest.mark.skipif(not CUDA, reason="needs a GPU (about 20 GB)")
def test_cross_entropy_int64_offsets(monkeypatch):
    """N * V over 2**31 logits: the last rows lie past what an int32 offset can reach."""
    monkeypatch.setenv("KERNELS", "triton")
    N, V = 16800, 128256  # 2.15e9 logits
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    loss = gpt_kernels.cross_entropy(logits, targets, reduction="none")
    assert gpt_kernels.last_backend["cross_entropy"] == "triton"
    loss.sum().backward()
    last = slice(N - 4, N)
    ref_logits = logits.detach()[last].float().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets[last], reduction="none")
    ref.sum().backward()
    assert_close(loss[last], ref, 1e-2, "loss")
    assert_close(logits.grad[last], ref_logits.grad, 1e-2, "dlogits")


def test_reference_equals_torch_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 13, generator=gen)
    targets = targets_with_ignored(9, 13, 0.3, gen, "cpu")
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(cross_entropy_reference(logits, targets, reduction=reduction),
                                   F.cross_entropy(logits, targets, reduction=reduction))


def test_cross_entropy_target_out_of_range_is_nan(monkeypatch):
    """A target past the vocabulary reads no memory out of bounds and poisons the loss instead."""
    monkeypatch.setenv("KERNELS", "triton")
    logits = torch.randn(3, 10, device="cuda" if CUDA else "cpu")
    targets = torch.tensor([1, 10, 2], device=logits.device)
    loss = gpt_kernels.cross_entropy(logits, targets, reduction="none")
    assert not loss[0].isnan() and loss[1].isnan() and not loss[2].isnan()


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data())
def test_linear_cross_entropy_matches_reference(device, data, monkeypatch):
    """Chunks of tokens (chunk_size drawn small, so that there are several), both backends."""
    backend = data.draw(st.sampled_from(["triton", "torch"]), label="backend")
    monkeypatch.setenv("KERNELS", backend)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 12 if device == "cpu" else 200), label="T")
    C = data.draw(st.sampled_from([8, 16, 24]), label="C")
    V = data.draw(st.one_of(st.integers(1, 100), st.sampled_from([31, 33, 65])), label="V")
    chunk_size = data.draw(st.integers(1, B * T + 3), label="chunk_size")
    reduction = data.draw(REDUCTIONS, label="reduction")
    dtype = data.draw(st.sampled_from([torch.float32] + ([torch.bfloat16] if device == "cuda" else [])), label="dtype")
    hidden = torch.randn(B, T, C, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, C, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    targets = targets_with_ignored(B * T, V, data.draw(st.sampled_from([0.0, 0.3])), gen, device).view(B, T)

    gpt_kernels.last_backend.clear()
    loss = gpt_kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size)
    assert gpt_kernels.last_backend["linear_cross_entropy"] == backend
    grad = upstream_grad(loss, gen)
    loss.backward(grad)

    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = cross_entropy_reference((h32 @ w32.T).view(B * T, V), targets.view(-1), reduction=reduction)
    ref = ref.view(B, T) if reduction == "none" else ref
    ref.backward(grad)
    assert loss.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close(loss, ref, tol, "loss")
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert_close(hidden.grad, h32.grad, tol, "dhidden")
    assert_close(weight.grad, w32.grad, tol, "dweight")


def test_cross_entropy_torch_backend(monkeypatch):
    """KERNELS=torch runs F.cross_entropy, and the reference agrees with it."""
    monkeypatch.setenv("KERNELS", "torch")
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(11, 37, generator=gen, requires_grad=True)
    targets = targets_with_ignored(11, 37, 0.3, gen, "cpu")
    gpt_kernels.last_backend.clear()
    loss = gpt_kernels.cross_entropy(logits, targets)
    assert gpt_kernels.last_backend["cross_entropy"] == "torch"
    assert_close(loss, cross_entropy_reference(logits, targets), 1e-6, "loss")


def test_cross_entropy_refuses_bad_arguments(monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    logits, targets = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        gpt_kernels.cross_entropy(logits, targets, reduction="max")
    with pytest.raises(ValueError, match="logits \\(N, V\\)"):
        gpt_kernels.cross_entropy(logits.view(2, 2, 10), targets.view(2, 2))
    with pytest.raises(ValueError, match="reduction"):
        gpt_kernels.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), targets, reduction="max")
