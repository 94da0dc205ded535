"""Fused attention: the Triton kernels equal the plain reference, outputs and gradients, on drawn shapes.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py); with one
they run compiled on CUDA tensors, on larger shapes and in bf16 too.
"""
import types

import pytest

pytest.importorskip("triton")  # the kernels and their references live in modules that import it
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import gpt_kernels
from conftest import KERNEL_DEVICES
from gpt_kernels.attention import attention_reference

CUDA = torch.cuda.is_available()
DEVICES = KERNEL_DEVICES
# examples share the monkeypatched KERNELS=triton, which is what we want. On a GPU an example can compile
# new kernels (a new dtype, head size or divisibility: seconds each, and make gpu's time is short); the
# interpreter on a CPU runs the same kernel code through more of them.
SETTINGS = settings(max_examples=12 if CUDA else 30,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def tolerance(dtype, device):
    # fp32 on a GPU goes through TF32 tensor cores in tl.dot, hence the looser bound there
    return {torch.float32: 1e-4 if device == "cpu" else 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]


def make(shape, dtype, device, layout, gen):
    """A (B, H, T, D) tensor in one of several memory layouts, all of them views the kernel must handle."""
    B, H, T, D = shape

    def randn(*size):  # drawn on the CPU generator, then moved: the view below is taken on the device
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)
    if layout == "bhtd":  # contiguous
        return randn(B, H, T, D)
    if layout == "bthd":  # what a model gets from splitting heads: (B, T, H, D) transposed
        return randn(B, T, H, D).transpose(1, 2)
    if layout == "wide":  # a slice of wider rows: T stride is not D
        return randn(B, H, T, D + 8)[..., 3:D + 3]
    return randn(B, H, D, T).transpose(2, 3)  # "dmajor": D is not the unit stride


def assert_close(actual, expected, tol, what):
    err = (actual.float() - expected.float()).abs().max().item()
    bound = tol * (1 + expected.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} over {bound:.3g}"


def check_against_reference(shapes, causal, dtype, device, layouts, seed):
    """Run gpt_kernels.attention and the reference on the same inputs; compare output and dq, dk, dv."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (make(s, dtype, device, lay, gen) for s, lay in zip(shapes, layouts))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    gpt_kernels.last_backend.clear()
    out = gpt_kernels.attention(q, k, v, causal=causal)
    assert gpt_kernels.last_backend["attention"] == "triton"
    out.backward(do)
    # the reference sees the same (rounded) values, in fp32
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q32, k32, v32, causal=causal)
    ref.backward(do.float())
    tol = tolerance(dtype, device)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, tol, "out")
    for name, got, want in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, tol, name)


LAYOUTS = st.sampled_from(["bhtd", "bthd", "wide", "dmajor"])


def lengths(max_t):
    """Any length, with half the draws on a multiple of 16 or one off it: where blocks begin and end."""
    edges = st.builds(lambda n, d: min(max(1, 16 * n + d), max_t),
                      st.integers(1, max_t // 16), st.sampled_from([-1, 0, 1]))
    return st.one_of(st.integers(1, max_t), edges)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(data=st.data())
def test_attention_matches_reference(device, data, monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    max_t = 40 if device == "cpu" else 300
    head_dims = [16, 24, 32, 64] + ([80, 128] if device == "cuda" else [])
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    T = data.draw(lengths(max_t), label="T")
    D = data.draw(st.sampled_from(head_dims), label="D")
    shape = (B, H, T, D)
    check_against_reference([shape] * 4, data.draw(st.booleans(), label="causal"),
                            data.draw(st.sampled_from(dtypes(device)), label="dtype"), device,
                            [data.draw(LAYOUTS) for _ in range(4)], data.draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("device", DEVICES)
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_attention_queries_and_keys_of_different_lengths(device, data, monkeypatch):
    """Decoding against a cache: Tq != Tk (causal is top-left aligned, as in F.scaled_dot_product_attention)."""
    monkeypatch.setenv("KERNELS", "triton")
    max_t = 40 if device == "cpu" else 300
    T_Q, T_K = data.draw(lengths(max_t), label="Tq"), data.draw(lengths(max_t), label="Tk")
    D = data.draw(st.sampled_from([16, 32]), label="D")
    shapes = [(1, 2, T_Q, D), (1, 2, T_K, D), (1, 2, T_K, D), (1, 2, T_Q, D)]
    check_against_reference(shapes, data.draw(st.booleans(), label="causal"), torch.float32, device,
                            ["bhtd"] * 4, data.draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("device", DEVICES)
def test_attention_head_dim_128(device, monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    T = 20 if device == "cpu" else 500
    check_against_reference([(1, 1, T, 128)] * 4, True, torch.float32, device, ["bthd"] * 4, seed=0)


def test_reference_equals_torch_sdpa():
    """The reference itself is right: it agrees with PyTorch, causal and not, Tq != Tk too."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 16, generator=gen)
    k, v = torch.randn(2, 3, 9, 16, generator=gen), torch.randn(2, 3, 9, 16, generator=gen)
    for causal in (True, False):
        torch.testing.assert_close(attention_reference(q, k, v, causal),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("D", [8, 15, 129, 256])
def test_attention_refuses_unsupported_head_dims(D, monkeypatch):
    monkeypatch.setenv("KERNELS", "triton")
    q = torch.randn(1, 1, 4, D, device="cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="head dims 16 to 128"):
        gpt_kernels.attention(q, q, q)


def test_attention_torch_backend(monkeypatch):
    """KERNELS=torch runs PyTorch's own attention, and it matches the reference too."""
    monkeypatch.setenv("KERNELS", "torch")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 13, 32, generator=gen) for _ in range(3))
    gpt_kernels.last_backend.clear()
    out = gpt_kernels.attention(q, k, v, causal=True)
    assert gpt_kernels.last_backend["attention"] == "torch"
    assert_close(out, attention_reference(q, k, v, causal=True), 1e-5, "out")


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_long_sequences(D, dtype, monkeypatch):
    """T = 8192, the longest `make gpu` benchmarks, with GPT-2's and Llama's head dims, in both half types."""
    monkeypatch.setenv("KERNELS", "triton")
    check_against_reference([(1, 2, 8192, D)] * 4, True, dtype, "cuda", ["bthd"] * 4, seed=D)


@pytest.mark.skipif(not CUDA, reason="needs a GPU (about 40 GB)")
def test_attention_int64_offsets(monkeypatch):
    """B*H*T*D over 2**31 elements: the last head lies past what int32 offsets can reach."""
    monkeypatch.setenv("KERNELS", "triton")
    B, H, T, D = 1, 65535, 257, 128  # 2.16e9 elements per tensor
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = gpt_kernels.attention(q, k, v, causal=True)
    assert gpt_kernels.last_backend["attention"] == "triton"
    out.backward(do)
    last = slice(H - 2, H)  # check the two last heads, the ones an int32 offset would wrap around on
    q32, k32, v32 = (t.detach()[:, last].float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q32, k32, v32, causal=True)
    ref.backward(do[:, last].float())
    assert_close(out[:, last], ref, 4e-2, "out")
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert_close(got[:, last], want, 4e-2, "grad")


def test_the_dispatch_leaves_to_pytorch_only_what_would_spill(monkeypatch):
    """fp32 attention above head dim 64 on Hopper spills registers at every block tried
    (bench/compile_kernels.py), so KERNELS=auto gives it to PyTorch; nothing else, and KERNELS=triton still
    runs it. A stand-in for a CUDA tensor: only its device, dtype and shape are read."""
    def spills(dtype, head_dim, capability, mode="auto"):
        monkeypatch.setenv("KERNELS", mode)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        q = types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(2, 4, 16, head_dim), device="cuda:0")
        return gpt_kernels._would_spill(q)
    assert spills(torch.float32, 128, (9, 0))
    assert not spills(torch.float32, 128, (9, 0), mode="triton")
    assert not any([spills(torch.float32, 64, (9, 0)), spills(torch.bfloat16, 128, (9, 0)),
                    spills(torch.float32, 128, (8, 0)), spills(torch.float16, 128, (10, 0))])
