"""The optimizers, written out: AdamW, the update every stage makes, and Muon, pre-training's for the
weight matrices inside the blocks (below, with its reasons).

For each parameter p with gradient g, at step t (Loshchilov and Hutter's decoupled weight decay):

    m = b1 * m + (1 - b1) * g              running mean of the gradient
    v = b2 * v + (1 - b2) * g * g          running mean of its square
    p = p * (1 - lr * weight_decay)        decay the weight itself, not through the gradient
    p = p - lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)   bias-corrected step

It equals torch.optim.AdamW step for step (tests/test_optim.py). It is ours because it is short and
worth reading, and because torch.optim's first use imports TorchDynamo, two seconds of start-up per
process on a small CPU: every script, and every one of the many the tests run.
"""
import math

import torch


def clear_grads(groups, set_to_none=True):
    """Every parameter's gradient dropped (None: the next backward allocates afresh) or zeroed."""
    for group in groups:
        for p in group["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class AdamW:
    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-8):
        """groups: [{"params": [...], "weight_decay": wd}, ...], as torch.optim takes them. Each group's
        "lr" is read at every step, so a schedule sets it between steps."""
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, **g,
                              "params": list(g["params"])} for g in groups]
        self.t = 0
        self.m = [[torch.zeros_like(p) for p in g["params"]] for g in self.param_groups]
        self.v = [[torch.zeros_like(p) for p in g["params"]] for g in self.param_groups]

    @torch.no_grad()
    def step(self):
        self.t += 1  # one clock for all parameters: every trainable one has a gradient at every step here
        for group, m_all, v_all in zip(self.param_groups, self.m, self.v):
            have = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if not have:
                continue
            params = [group["params"][i] for i in have]
            grads = [p.grad for p in params]
            m, v = [m_all[i] for i in have], [v_all[i] for i in have]
            (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            # _foreach ops update the whole list in a few kernels instead of one Python loop step per tensor
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** self.t))
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1 ** self.t))

    def zero_grad(self, set_to_none=True):
        clear_grads(self.param_groups, set_to_none)

    def state_dict(self):
        """Tensors, numbers and strings only: a checkpoint holding it loads with weights_only=True."""
        return {"t": self.t, "m": self.m, "v": self.v,
                "hyper": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state):
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        if not isinstance(state, dict) or "m" not in state or [[tuple(x.shape) for x in g] for g in state["m"]] != shapes:
            raise ValueError("the optimizer state does not fit this model's parameters (another model, or a "
                             "checkpoint from an older version): start without --resume")
        self.t = state["t"]
        for mine, theirs in ((self.m, state["m"]), (self.v, state["v"])):
            for dst_group, src_group in zip(mine, theirs):
                for dst, src in zip(dst_group, src_group):
                    dst.copy_(src)
        for group, hyper in zip(self.param_groups, state["hyper"]):
            group.update(hyper)


# ----------------------------------------------------------------------------- Muon

def orthogonalize(g, steps=5):
    """The matrix nearest g with every singular value about 1 (U V^T of g = U S V^T), approximated by
    Newton-Schulz iterations that use only matrix products, so it is fast on any device. g: a matrix,
    or a stack of matrices (..., rows, cols), each orthogonalised alone.

    Each iteration maps x -> a x + b (x x^T) x + c (x x^T)^2 x, which acts on every singular value s of x
    alone: s -> a s + b s^3 + c s^5. After scaling x to a Frobenius norm of 1 (every s <= 1), five of
    these push each s into roughly [0.7, 1.2]. The coefficients (3.4445, -4.7750, 2.0315) are the
    modded-nanogpt speedrun's: a steep slope at 0 so that small singular values grow fast, at the
    price of not converging exactly to 1, which the optimizer does not need. Works on the wide side
    (x x^T is the smaller square); a tall g is transposed first and back after.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon:
    """Muon (momentum, orthogonalised) for the hidden weight matrices: the update of every matrix p
    with gradient g at each step is

        m = beta * m + g                        momentum
        u = g + beta * m                        Nesterov's look-ahead
        p = p * (1 - lr * weight_decay)         decoupled decay, as AdamW's
        p = p - lr * 0.2 * sqrt(max(rows, cols)) * orthogonalize(u)

    Why: a gradient's few largest directions dominate it, and Adam's per-entry scaling keeps them
    dominant; orthogonalising sets every singular value to about 1, so each step moves the matrix as
    much along its rare directions as along its common ones. 0.2 * sqrt(max(rows, cols)) gives the
    update the root-mean-square size of AdamW's, about 0.2 (Moonlight's scaling), so one learning rate
    and schedule serves both optimizers. Only for 2-D weights inside the blocks: embeddings, the head,
    biases and norms stay with AdamW (GPT.configure_optimizer builds the pair, an Optimizers).
    """

    def __init__(self, params, lr, weight_decay=0.0, beta=0.95):
        params = list(params)
        if any(p.dim() != 2 for p in params):
            raise ValueError("Muon updates matrices only (2-D parameters)")
        self.param_groups = [{"params": params, "lr": lr, "weight_decay": weight_decay, "beta": beta}]
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, wd, beta = group["lr"], group["weight_decay"], group["beta"]
        have = [(p, m) for p, m in zip(group["params"], self.m) if p.grad is not None]
        for shape in dict.fromkeys(p.shape for p, _ in have):  # matrices of one shape orthogonalised as one stack
            params, momenta = zip(*[(p, m) for p, m in have if p.shape == shape])
            grads = [p.grad for p in params]
            torch._foreach_mul_(momenta, beta)
            torch._foreach_add_(momenta, grads)
            updates = orthogonalize(torch.stack(torch._foreach_add(grads, momenta, alpha=beta)))
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, list(updates.unbind()), alpha=-lr * 0.2 * math.sqrt(max(shape)))

    def zero_grad(self, set_to_none=True):
        clear_grads(self.param_groups, set_to_none)

    def state_dict(self):
        return {"muon": self.m, "hyper": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state):
        shapes = [tuple(p.shape) for p in self.param_groups[0]["params"]]
        if not isinstance(state, dict) or "muon" not in state or [tuple(m.shape) for m in state["muon"]] != shapes:
            raise ValueError("the optimizer state does not fit this model's parameters (another model or "
                             "optimizer, or a checkpoint from an older version): start without --resume")
        for dst, src in zip(self.m, state["muon"]):
            dst.copy_(src)
        self.param_groups[0].update(state["hyper"][0])


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, cleared, saved and restored as one; its
    param_groups are all of theirs, so a schedule sets every learning rate at once."""

    def __init__(self, *parts):
        self.parts = parts
        self.param_groups = [g for part in parts for g in part.param_groups]

    def step(self):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none=True):
        for part in self.parts:
            part.zero_grad(set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or len(state.get("parts", ())) != len(self.parts):
            raise ValueError("the optimizer state is not this run's optimizer (another --optimizer, or a checkpoint "
                             "from an older version): start without --resume, or with the --optimizer it used")
        for part, s in zip(self.parts, state["parts"]):
            part.load_state_dict(s)
