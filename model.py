"""The GPT that every stage trains: GPT-2's architecture, written out in one file.

Pre-LayerNorm blocks, a GELU MLP, tied input and output embeddings, optional biases, and positions
either rotary (every TinyWorld model: `GPTConfig.rope`) or learned (GPT-2's own): with learned ones
the same shapes and names as GPT-2, so `GPT.from_gpt2` can load its weights. Attention and
cross-entropy go through `gpt_kernels`, which picks our Triton kernels on a GPU and PyTorch elsewhere.

    model = GPT(GPTConfig(vocab_size=1458))
    loss = model(idx, targets)                    # mean next-token loss
    logp = model.token_logprobs(idx, targets)     # (B, T) log p(target), what post-training uses
    outs = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=20, temperature=0)  # greedy, batched
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt_kernels
from optim import AdamW, Muon, Optimizers


@dataclass
class GPTConfig:
    vocab_size: int = 1458   # BPE tokens (256 bytes + merges) + special tokens: TinyWorld's tokenizer
    block_size: int = 128    # the longest context the model can read
    n_layer: int = 4         # transformer blocks
    n_head: int = 4          # attention heads per block
    n_embd: int = 128        # width of the residual stream
    dropout: float = 0.0     # on embeddings, attention output and MLP output (not inside attention)
    bias: bool = True        # biases in Linear and LayerNorm, as in GPT-2
    rope: bool = False       # rotary positions in attention instead of GPT-2's learned position table


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, cache=None, layer=0, rotary=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D): each head attends on its own slice of the channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # keys and values of every token so far
        if mask is None:
            y = gpt_kernels.attention(q, k, v, causal=True)
        else:
            # generation: padding and a cache make the mask more than "causal", so it is explicit
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.c_proj(y))


def rotary_angles(pos, head_dim, base=10000.0):
    """cos and sin of position * frequency, for each position (any leading shape) and each pair of
    channels, shaped (..., 1, T, D/2) to broadcast over the heads of q and k (B, H, T, D)."""
    freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angle = pos.float()[..., None] * freq  # (..., T, D/2)
    return angle.cos().unsqueeze(-3), angle.sin().unsqueeze(-3)


def rotate(x, cos, sin):
    """Rotary positions (RoFormer): turn each pair of channels (x1, x2) of q or k by position * frequency.
    A query-key product then depends on the two tokens' distance, not where they are, so attending to
    "the name two tokens back" is one pattern for every position rather than one per position."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # bf16 turned in fp32
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU is the tanh approximation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: normalise, transform, add back. The residual stream itself is never normalised."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None, layer=0, rotary=None):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, rotary)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated so appending is a copy."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0  # tokens stored; advanced by GPT.hidden once every layer has appended

    def append(self, layer, k, v):
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            **({} if cfg.rope else {"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)}),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: reading a token and writing it share a vector
        self.apply(self._init_weights)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * n_layer): each block
        # adds two of them, and the sum should not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters; by default without the position table (the token table is the tied lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and not self.config.rope else n

    def hidden(self, idx, pos=None, mask=None, cache=None):
        """The final hidden states (B, T, C), after ln_f. The reward model reads its score from these."""
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.config.block_size})")
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device)
        rotary = None
        if self.config.rope:
            x = self.transformer.drop(self.transformer.wte(idx))
            rotary = rotary_angles(pos, self.config.n_embd // self.config.n_head)
        else:
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i, rotary)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits (B, T, V); or, given targets (B, T) with -100 where nothing is predicted, the loss:
        the mean over predicted tokens, or with reduction="none" each token's -log p, shape (B, T).
        (Under DDP, losses must come through forward, the call that synchronises gradients.)"""
        logits = self.lm_head(self.hidden(idx))
        if targets is None:
            return logits
        loss = gpt_kernels.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def token_logprobs(self, idx, targets):
        """log p(targets[b, t] | idx[b, :t+1]) for every position, shape (B, T); 0 where targets is -100."""
        return -self(idx, targets, reduction="none")

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), optimizer="adamw"):
        """AdamW with weight decay on matrices only: biases and LayerNorm gains are not decayed. With
        optimizer="muon", the blocks' weight matrices take Muon's step instead and the rest AdamW's."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = [p for n, p in named if optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
        params = [p for _, p in named if all(p is not q for q in hidden)]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        adamw = AdamW(groups, lr=lr, betas=betas)
        return Optimizers(Muon(hidden, lr, weight_decay), adamw) if hidden else adamw

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's scores."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_tokens=(), generator=None):
        """Continue each prompt (a list of token ids); returns the new tokens of each, stop token included.

        Prompts of different lengths share one batch: they are left-padded, and the mask and the
        positions make each row see exactly what it would see alone. Rows that have said a stop token
        leave the batch, a quarter of it at a time, so that the rows still writing stop paying for
        them. temperature=0 is greedy.
        """
        device = self.transformer.wte.weight.device
        B, L = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if L + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) is longer than "
                             f"the context ({self.config.block_size}): shorten the prompt or max_new_tokens")
        pad = torch.tensor([L - len(p) for p in prompts], device=device)
        idx = torch.tensor([[0] * (L - len(p)) + list(p) for p in prompts], device=device)
        total = L + max_new_tokens
        # valid[b, j]: position j of row b holds a real token (not left padding)
        valid = torch.arange(total, device=device)[None, :] >= pad[:, None]
        cache = KVCache(self.config, B, total, device, self.transformer.wte.weight.dtype)
        # the attention mask as an additive bias, built once: the prompt sees itself causally (a padding
        # position sees itself, so no row is all -inf); each new token sees every real position so far
        dtype = cache.k.dtype
        blocked = torch.zeros(B, 1, 1, total, device=device, dtype=dtype)
        blocked = blocked.masked_fill(~valid[:, None, None], float("-inf"))
        seen = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None] & valid[:, None, :L]
        seen |= torch.eye(L, dtype=torch.bool, device=device)[None]
        prefill = torch.zeros(B, 1, L, L, device=device, dtype=dtype).masked_fill(~seen[:, None], float("-inf"))
        stop = torch.tensor(list(stop_tokens), device=device, dtype=torch.long)
        tokens = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)  # the prompts still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=device)  # those of them that have said a stop token
        x = idx
        for step in range(max_new_tokens):
            start = cache.len
            mask = prefill if step == 0 else blocked[..., :start + 1]
            q_pos = torch.arange(start, start + x.size(1), device=device)
            pos = (q_pos[None, :] - pad[:, None]).clamp(min=0)  # each row counts positions from its first real token
            h = self.hidden(x, pos=pos, mask=mask, cache=cache)
            nxt = sample_next(self.lm_head(h[:, -1]).float(), temperature, top_k, top_p, generator)
            tokens[rows, step] = nxt
            done |= torch.isin(nxt, stop)
            going = int((~done).sum())
            if going == 0:
                break
            if going <= 0.75 * len(rows):
                # a quarter of the batch has stopped: drop those rows, so that the rest stop carrying them
                keep = (~done).nonzero().squeeze(1)
                rows, nxt, pad, blocked, done = rows[keep], nxt[keep], pad[keep], blocked[keep], done[keep]
                cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
            x = nxt[:, None]
        results = []
        for row in tokens.tolist():  # up to and with the first stop token; -1: never generated
            end = next((i + (t >= 0) for i, t in enumerate(row) if t < 0 or t in stop_tokens), len(row))
            results.append(row[:end])
        return results

    @classmethod
    def from_gpt2(cls, state_dict, n_head=None):
        """A GPT from a Hugging Face GPT-2 state dict, e.g. GPT2LMHeadModel.from_pretrained("gpt2").state_dict().

        The config comes from the shapes, and n_head from the model's config.json (GPT-2's own heads
        are 64 wide, the default). GPT-2 stores its Linear layers as Conv1D, whose weights are the
        transpose of nn.Linear's. Keys may lack the "transformer." prefix, as the hub's files do.
        """
        sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
              for k, v in state_dict.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        V, C = sd["transformer.wte.weight"].shape
        n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
        cfg = GPTConfig(vocab_size=V, block_size=sd["transformer.wpe.weight"].shape[0],
                        n_layer=n_layer, n_head=n_head or C // 64, n_embd=C, bias=True)
        model = cls(cfg)
        ours = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for k, v in sd.items():
            if k == "lm_head.weight":
                continue  # tied to wte
            if k not in ours:
                raise KeyError(f"unexpected key in GPT-2 state dict: {k}")
            v = v.t() if k.endswith(conv1d) else v
            if v.shape != ours[k].shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(ours[k].shape)}")
            ours[k].copy_(v)
        missing = set(ours) - set(sd) - {"lm_head.weight"}
        if missing:
            raise KeyError(f"the GPT-2 state dict lacks {min(missing)}")
        return model


class ValueModel(GPT):
    """A GPT with a scalar head on its final hidden states: one number per position.

    The reward model reads it at the last token of prompt+response (its score); PPO's critic reads it
    at every response token (the value of the text so far). The language-model head stays in the
    weights, unused, so a GPT checkpoint loads into it and it loads back into a GPT.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        # small at the start: the first scores are near zero, so the first gradients come from the
        # preference signal, not from whatever a random head happens to like
        nn.init.normal_(self.head.weight, mean=0.0, std=0.1 / math.sqrt(cfg.n_embd))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx):
        """(B, T) scalars, float32: the head at every position."""
        return self.head(self.hidden(idx)).squeeze(-1).float()


class RewardModel(ValueModel):
    """The reward model: a ValueModel whose score also weighs how surprised the trunk is by each reply token.

    score = head(h at the last token) + sum over reply tokens t of gate(h_t) * min(0, log p(token t) + H_t + s_t),
    gate = softplus(a linear map) >= 0, H_t = the entropy of the trunk's distribution for token t, and
    s_t = first_slack at the reply's first token, 0 after it.
    The head reads the manner of the whole reply; the gate, read at each token once it is written,
    learns which tokens carry a checkable claim (the town after "Lucy lives in", not the rude word
    before it) and charges the reply for how much more that token surprises the trunk than the trunk
    expected to be surprised (-log p beyond H). A language model that knows Lucy's town is sure of
    it, so a wrong one costs nearly its whole -log p, and the score can check facts that no training
    pair mentioned: comparing a stated fact with a recalled one is what a head on the last token
    alone did not learn from the pairs. Where the trunk is unsure (the first word of a reply: "Sure!", "Lucy" or just
    "Millbrook"?), a token that is one of several fine choices costs nothing. Charging the plain
    -log p of every token made each reply pay for its length and for every choice of wording, and
    the head learned to pay it back by liking long replies, rude ones too. The charge is never
    positive, so padding a reply with likely tokens earns nothing; H is read as a threshold, not
    trained. The gate starts small (softplus(-2) = 0.13): large enough to learn from the first
    pairs, small enough that the head first learns the manner rather than paying for every word.
    The slack: a reply's first token picks its manner as much as its content ("Sure!", "Lucy" or a bare
    "Millbrook."?), and a trunk that has seen few bare answers is surprised by every one of them, right or
    wrong; charged in full, that surprise varied from character to character and decided a curt reply
    against a rude one more often than the head did. first_slack nats of it are forgiven there (train_rm.py
    --first_slack; 0 in checkpoints written before it was kept).
    (Its forward is the score, so that DDP sees it; the critic PPO starts from it is a plain ValueModel.)
    With head_only set (train_rm.py --head_only), the score is the head alone: the field's usual reward
    model, the weaker one that `make hacking` shows a policy gaming.
    """
    head_only = False
    first_slack = 0.0

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gate = nn.Linear(cfg.n_embd, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)

    def forward(self, idx, start, end):
        """Scores (B,) float32 of right-padded prompt+reply rows idx (B, T): each reply runs from start[b]
        to end[b] inclusive (end: the last real token). Also returns the log-prob of each reply token,
        (B, T-1) aligned with idx[:, 1:] and 0 outside the replies: a language-modelling loss's input."""
        h = self.hidden(idx)
        rows = torch.arange(idx.size(0), device=idx.device)
        head = self.head(h[rows, end]).squeeze(-1).float()
        logprobs = F.log_softmax(self.lm_head(h[:, :-1]).float(), -1)
        logp = logprobs.gather(-1, idx[:, 1:, None]).squeeze(-1)
        expected = -(logprobs.exp() * logprobs).sum(-1).detach()  # H_t: the surprise the trunk expects
        t = torch.arange(idx.size(1) - 1, device=idx.device)[None]
        in_reply = (t >= start[:, None] - 1) & (t < end[:, None])  # position t predicts token t + 1
        logp = logp * in_reply
        if self.head_only:
            return head, logp
        slack = self.first_slack * (t == start[:, None] - 1)
        charge = (logp + expected + slack).clamp(max=0) * in_reply  # only surprise beyond the expected costs
        return head + (F.softplus(self.gate(h[:, 1:]).squeeze(-1).float()) * charge).sum(1), logp


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else softmax sampling, optionally
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep a token while the mass before it is < top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse-CDF sampling: one uniform per row, found in the running sum of the probabilities.
    # (torch.multinomial draws an exponential per vocabulary entry: 30x slower here at V = 1458.)
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    # side="right": a token of probability 0 adds nothing to the sum, so no u can land on it
    return torch.searchsorted(cdf, u, side="right").squeeze(-1).clamp(max=cdf.size(-1) - 1)
