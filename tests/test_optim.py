"""optim.AdamW: step for step the update torch.optim.AdamW makes, and a state that resumes exactly."""
import io

import pytest
import torch
from hypothesis import given, settings, strategies as st

from optim import AdamW


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
