"""Prompts and responses (lists of token ids) as right-padded batches: what the post-training stages
feed the model, and how a reward model scores replies."""
import torch


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
    """A model.RewardModel's scores of prompt + reply token lists, in one right-padded batch.
    Returns (scores (B,), each reply token's log-prob (B, T-1), the number of reply tokens (B,))."""
    device = next(rm.parameters()).device
    seqs = [p + r for p, r in zip(prompts, replies)]
    start = torch.tensor([len(p) for p in prompts], device=device)
    end = torch.tensor([len(s) - 1 for s in seqs], device=device)
    scores, logp = rm(pad_right(seqs).to(device), start, end)
    return scores, logp, end - start + 1
