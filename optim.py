"""AdamW, written out: the update that every stage's optimizer step makes.

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
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

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
