"""Prompts and responses (lists of token ids) as right-padded batches: what the post-training stages
feed the model, and how a reward model scores replies."""
import torch

# A batch of replies drawn at random pads every row to its longest, and a few long replies make most
# of it padding. Rows sorted by length and cut into a few groups, each padded only to its own longest,
# compute the same thing for a fraction of the work.
GROUPS = 4


def length_groups(lengths, groups=GROUPS):
    """Row indices sorted by length and cut into at most `groups` runs of near-equal size: padded one
    run at a time, short rows no longer pay for the longest one."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = -(-len(order) // max(1, groups))  # ceil
    return [order[i:i + size] for i in range(0, len(order), size)]


def by_length(lengths, fn, groups=GROUPS):
    """fn(rows) for each length group of row indices, a tensor with one entry per row; the entries put
    back in the rows' order. Under DDP these are several forwards before one backward, which is fine."""
    parts, order = [], []
    for rows in length_groups(lengths, groups):
        parts.append(fn(rows))
        order += rows
    return torch.cat(parts)[torch.tensor(order, device=parts[0].device).argsort()]


def pack_responses(prompts, responses):
    """Prompt-and-response token lists as one right-padded batch for the post-training stages.

    prompts[i] and responses[i] are lists of token ids (a response as generated: ending with <|end|>,
    or cut short). Returns x (B, T) the inputs, y (B, T) the targets shifted by one (-100 on padding),
    and mask (B, T): 1 where y is a response token, so that (mask * log p(y)).sum(1) is the response's
    log-probability. Padding is on the right, so positions need no shifting; x pads with token 0.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    x = pad_right([s[:-1] for s in seqs], 0)
    y = pad_right([s[1:] for s in seqs], -100)
    mask = torch.zeros(x.shape)
    for i, (seq, p) in enumerate(zip(seqs, prompts)):
        mask[i, len(p) - 1:len(seq) - 1] = 1.0  # y[t] = seq[t+1] is a response token from t = len(prompt) - 1
    return x, y, mask


def pad_right(seqs, value=0):
    """Token lists as one (B, max length) tensor, padded on the right with value."""
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def score_replies(rm, prompts, replies):
    """A model.RewardModel's scores of prompt + reply token lists, padded a length group at a time.
    Returns (scores (B,), the sum of each reply's token log-probs (B,), the number of reply tokens (B,))."""
    device = next(rm.parameters()).device
    seqs = [p + r for p, r in zip(prompts, replies)]

    def score(rows):
        start = torch.tensor([len(prompts[i]) for i in rows], device=device)
        end = torch.tensor([len(seqs[i]) - 1 for i in rows], device=device)
        r, logp = rm(pad_right([seqs[i] for i in rows]).to(device), start, end)
        return torch.stack([r, logp.sum(1)], 1)

    both = by_length([len(s) for s in seqs], score)
    return both[:, 0], both[:, 1], torch.tensor([len(r) for r in replies], device=device)
