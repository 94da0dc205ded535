"""optim.AdamW: step for step the update torch.optim.AdamW makes, and a state that resumes exactly; optim.Muon:
its orthogonalisation against an SVD, its step against a plain reference, a toy fit, and Muon with AdamW resumed."""
import io
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import optim
from optim import AdamW, Muon, Optimizers


def params_like(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


SHAPES = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=4)


@settings(max_examples=40)
@given(shapes=SHAPES, seed=st.integers(0, 10_000), lrs=st.lists(st.floats(1e-4, 0.1), min_size=1, max_size=6),
       wd=st.sampled_from([0.0, 0.1]), b1=st.floats(0.5, 0.95), b2=st.floats(0.9, 0.999))
def test_adamw_equals_torch_adamw(shapes, seed, lrs, wd, b1, b2):
    ours, theirs = params_like(shapes, seed), params_like(shapes, seed)
    # two groups as configure_optimizer makes them: decayed matrices and the rest
    split = len(shapes) // 2
    groups = lambda ps: [{"params": ps[:split], "weight_decay": wd}, {"params": ps[split:], "weight_decay": 0.0}]  # noqa: E731
    opt = AdamW(groups(ours), lr=lrs[0], betas=(b1, b2))
    ref = torch.optim.AdamW(groups(theirs), lr=lrs[0], betas=(b1, b2), foreach=False)
    for step, lr in enumerate(lrs):  # a schedule: the lr changes between steps, through param_groups
        for o in (opt, ref):
            for group in o.param_groups:
                group["lr"] = lr
        set_grads(ours, seed + step), set_grads(theirs, seed + step)
        opt.step(), ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ours)


def test_a_saved_state_resumes_exactly():
    shapes = [(3, 4), (4,)]
    a, b = params_like(shapes, 0), params_like(shapes, 0)
    opt_a = AdamW([{"params": a, "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.95))
    opt_b = AdamW([{"params": b, "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.95))
    for step in range(3):
        set_grads(a, step), set_grads(b, step)
        opt_a.step(), opt_b.step()
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)  # as a checkpoint holds it, loaded as checkpoints are: weights_only
    buf.seek(0)
    resumed = AdamW([{"params": b, "weight_decay": 0.0}], lr=0.5)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.param_groups[0]["weight_decay"] == 0.1 and resumed.t == 3
    for step in range(3, 6):
        set_grads(a, step), set_grads(b, step)
        opt_a.step(), resumed.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_a_state_for_other_parameters_is_refused():
    opt = AdamW([{"params": params_like([(3, 4)], 0)}], lr=0.01)
    other = AdamW([{"params": params_like([(4, 3)], 0)}], lr=0.01)
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict({"state": {}, "param_groups": []})  # torch.optim's own format, from an older checkpoint


# ----------------------------------------------------------------------------- Muon

def polar(g):
    """U V^T of g = U S V^T, in float64: what orthogonalize approximates."""
    u, _, vt = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vt


@settings(max_examples=60)
@given(rows=st.integers(1, 48), cols=st.integers(1, 48), scale=st.floats(1e-4, 1e4), seed=st.integers(0, 10_000),
       spread=st.floats(1.0, 30.0))
def test_orthogonalize_keeps_the_singular_vectors_and_sets_the_values_near_one(rows, cols, scale, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    s = scale * torch.logspace(0, -math.log10(spread), k, dtype=torch.float64)  # largest / smallest = spread
    g = (u * s) @ v.T
    o = optim.orthogonalize(g.float()).double()
    inside = u.T @ o @ v  # in g's singular basis: diagonal when o has g's singular vectors
    values = inside.diagonal()
    assert torch.allclose(inside, torch.diag(values), atol=2e-4)
    assert values.min() > 0.6 and values.max() < 1.25  # the iteration's band, for every value within spread 30
    assert torch.linalg.matrix_norm(o - polar(g), ord=2) < 0.4
    assert o.shape == g.shape and o.dtype == torch.float64


def muon_reference(params, grads_per_step, lrs, weight_decay, beta):
    """Muon written plainly, with the exact polar factor in place of Newton-Schulz."""
    params = [p.detach().clone().double() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for p, m, g in zip(params, momenta, grads):
            m.copy_(beta * m + g)
            u = g + beta * m
            p.copy_(p * (1 - lr * weight_decay) - lr * 0.2 * max(p.shape) ** 0.5 * polar(u))
    return params


@settings(max_examples=30)
@given(shapes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=3),
       seed=st.integers(0, 10_000), lrs=st.lists(st.floats(1e-4, 0.05), min_size=1, max_size=5),
       weight_decay=st.sampled_from([0.0, 0.1]), beta=st.floats(0.5, 0.99))
def test_muon_step_equals_the_reference(shapes, seed, lrs, weight_decay, beta):
    params = params_like(shapes, seed)
    params64 = [p.detach().double().requires_grad_() for p in params]
    opt = Muon(params64, lr=lrs[0], weight_decay=weight_decay, beta=beta)
    grads_per_step = []
    for step, lr in enumerate(lrs):
        gen = torch.Generator().manual_seed(seed + step)
        grads_per_step.append([torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params64])
        for p, g in zip(params64, grads_per_step[-1]):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        with mock.patch.object(optim, "orthogonalize", lambda g: polar(g).to(g.dtype)):  # the algebra, exactly
            opt.step()
    for ours, ref in zip(params64, muon_reference(params, grads_per_step, lrs, weight_decay, beta)):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-9, atol=1e-9)


def test_muon_fits_a_least_squares_problem():
    """A toy problem: find W with W x = y for a known W*. Every step has the same size whatever the
    gradient's, so the learning rate decays to land on the answer, as in training."""
    gen = torch.Generator().manual_seed(0)
    target, x = torch.randn(16, 32, generator=gen), torch.randn(32, 256, generator=gen)
    w = torch.zeros(16, 32, requires_grad=True)
    opt = Muon([w], lr=0.02)
    losses = []
    for step in range(300):
        loss = ((w @ x - target @ x) ** 2).mean()
        loss.backward()
        opt.param_groups[0]["lr"] = 0.1 * (1 - step / 300)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 1e-4 * losses[0]


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices only"):
        Muon(params_like([(3,)], 0), lr=0.01)


def test_muon_and_adamw_together_resume_exactly():
    shapes = [(4, 6), (6,)]

    def pair(ps):
        return Optimizers(Muon(ps[:1], lr=0.02, weight_decay=0.1), AdamW([{"params": ps[1:]}], lr=0.01))
    a, b = params_like(shapes, 1), params_like(shapes, 1)
    opt_a, opt_b = pair(a), pair(b)
    for step in range(3):
        set_grads(a, step), set_grads(b, step)
        opt_a.step(), opt_b.step()
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    resumed = pair(b)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(3, 6):
        set_grads(a, step), set_grads(b, step)
        opt_a.step(), resumed.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="another --optimizer"):
        resumed.load_state_dict(AdamW([{"params": b}], lr=0.01).state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        AdamW([{"params": b}], lr=0.01).load_state_dict(opt_a.state_dict())
