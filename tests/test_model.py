"""The GPT: cached generation equals recomputation, batching equals one-by-one, log-probs, GPT-2 import."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from model import GPT, GPTConfig, RewardModel, rotary_angles, rotate, sample_next

TINY = GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY.__dict__, **overrides})
    # float64 so that argmax never flips on a rounding difference between two equal computations
    return GPT(cfg).double().eval()


def greedy_by_recomputation(model, prompt, n, stop=()):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), prompt=st.lists(st.integers(0, 60), min_size=1, max_size=20),
       n=st.integers(1, 20), rope=st.booleans())
def test_cached_greedy_equals_recomputation(seed, prompt, n, rope):
    model = tiny_model(seed % 5, rope=rope)
    assert model.generate([prompt], n, temperature=0)[0] == greedy_by_recomputation(model, prompt, n)


@settings(max_examples=10)
@given(prompts=st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=16), min_size=2, max_size=4),
       rope=st.booleans())
def test_batch_of_different_lengths_equals_one_by_one(prompts, rope):
    model = tiny_model(1, rope=rope)
    batched = model.generate(prompts, 12, temperature=0)
    alone = [model.generate([p], 12, temperature=0)[0] for p in prompts]
    assert batched == alone


@settings(max_examples=10)
@given(prompts=st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=16), min_size=4, max_size=8),
       stops=st.lists(st.integers(0, 60), min_size=1, max_size=12))
def test_rows_that_stop_early_leave_the_others_unchanged(prompts, stops):
    """Rows that said a stop token are dropped from the batch as it goes: the rest must not notice."""
    model = tiny_model(2, rope=True)
    batched = model.generate(prompts, 16, temperature=0, stop_tokens=stops)
    alone = [model.generate([p], 16, temperature=0, stop_tokens=stops)[0] for p in prompts]
    assert batched == alone


@given(seed=st.integers(0, 100), shift=st.integers(1, 20))
def test_rotary_scores_depend_on_distance_only(seed, shift):
    """q_i . k_j after rotation is the same for positions (i, j) and (i + s, j + s)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    score = lambda i, j: (rotate(q, *rotary_angles(torch.tensor([i]), 16)) * rotate(k, *rotary_angles(torch.tensor([j]), 16))).sum()
    assert score(7, 3).item() == pytest.approx(score(7 + shift, 3 + shift).item(), rel=1e-5, abs=1e-5)
    assert rotate(q, *rotary_angles(torch.tensor([0]), 16)).equal(q)  # position 0 is not turned


def test_a_rotary_model_has_no_position_table_and_round_trips_its_state():
    model = tiny_model(0, rope=True)
    assert "transformer.wpe.weight" not in model.state_dict()
    again = GPT(model.config).double()
    again.load_state_dict(model.state_dict())
    x = torch.randint(0, 61, (2, 9))
    assert torch.equal(again.eval()(x), model(x))


def test_generation_stops_at_stop_token_and_keeps_it():
    model = tiny_model(2)
    free = model.generate([[5, 6, 7]], 20, temperature=0)[0]
    stop = free[3]
    out = model.generate([[5, 6, 7]], 20, temperature=0, stop_tokens=[stop])[0]
    assert out == free[:free.index(stop) + 1] and out[-1] == stop


def test_seeded_sampling_repeats():
    model = tiny_model(3)
    a = model.generate([[1, 2], [3]], 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate([[1, 2], [3]], 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_prompt_longer_than_context_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the context"):
        model.generate([[1] * 40], 20)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 49, dtype=torch.long))


@settings(max_examples=20)
@given(B=st.integers(1, 3), T=st.integers(1, 20), seed=st.integers(0, 1000), ignored=st.floats(0, 1))
def test_token_logprobs_equal_log_softmax_gathered(B, T, seed, ignored):
    model = tiny_model(seed % 3)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (B, T), generator=g)
    targets = torch.randint(0, 61, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignored] = -100
    got = model.token_logprobs(idx, targets)
    logp = F.log_softmax(model(idx).double(), -1)
    want = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    assert got.shape == (B, T)
    torch.testing.assert_close(got.double(), want)


def test_loss_is_mean_next_token_cross_entropy():
    model = tiny_model()
    idx = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    targets[0, :4] = -100
    logits = model(idx)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(idx, targets).double(), want)
    loss = model(idx, targets)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def to_gpt2_layout(model):
    """Our weights written as a Hugging Face GPT-2 state dict: Conv1D weights transposed, attention buffers."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t().clone() if k.endswith(conv1d) else v.clone()) for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def test_from_gpt2_round_trip_gives_the_same_logits():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=128)  # 64-wide heads, as GPT-2
    ours = GPT(cfg).eval()
    loaded = GPT.from_gpt2(to_gpt2_layout(ours)).eval()
    assert loaded.config == cfg
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(loaded(idx), ours(idx))


def test_from_gpt2_refuses_a_wrong_shape():
    torch.manual_seed(0)
    sd = to_gpt2_layout(GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=128)))
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"].t()  # not transposed
    with pytest.raises(ValueError, match="c_fc.weight"):
        GPT.from_gpt2(sd)


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 10), p=st.floats(0.05, 0.99))
def test_sampling_stays_inside_top_k_and_top_p(seed, k, p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 10, generator=g) * 3
    tok = sample_next(logits, 1.0, top_k=k, generator=g)
    assert all(t in torch.topk(logits[i], k).indices for i, t in enumerate(tok))
    tok = sample_next(logits, 1.0, top_p=p, generator=g)
    for i, t in enumerate(tok.tolist()):
        probs, order = logits[i].softmax(-1).sort(descending=True)
        rank = order.tolist().index(t)
        assert probs[:rank].sum() < p  # the mass of the tokens ranked above it had not yet reached p
    assert torch.equal(sample_next(logits, 0), logits.argmax(-1))


def test_samples_follow_the_softmax():
    """20,000 draws from fixed logits, one token of them impossible (top_k), against the softmax's
    probabilities: a chi-square test at a fixed seed, which a sampler off by a token's share fails."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20_000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, top_k=5, generator=g), minlength=6).double()
    assert counts[5] == 0
    expected = logits[0, :5].softmax(-1).double() * 20_000
    chi2 = ((counts[:5] - expected) ** 2 / expected).sum()
    assert chi2 < 18.5  # the 0.1% tail of chi-square with 4 degrees of freedom


def rows_of(seqs):
    x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x


@settings(max_examples=10)
@given(seed=st.integers(0, 1000),
       lengths=st.lists(st.tuples(st.integers(1, 10), st.integers(1, 10)), min_size=1, max_size=4))
def test_reward_score_is_the_head_plus_the_gated_surprise_beyond_the_expected(seed, lengths):
    torch.manual_seed(seed)
    rm = RewardModel(TINY).double().eval()
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 61, (p + r,), generator=g).tolist() for p, r in lengths]
    start, end = torch.tensor([p for p, _ in lengths]), torch.tensor([p + r - 1 for p, r in lengths])
    torch.nn.init.normal_(rm.gate.weight, std=0.5)
    rm.first_slack = slack = float(seed % 3)  # nats forgiven at each reply's first token
    got, logp = rm(rows_of(seqs), start, end)
    for i, s in enumerate(seqs):  # one row alone, token by token
        h = rm.hidden(torch.tensor([s]))[0]
        want = rm.head(h[-1]).squeeze()
        for t in range(start[i], len(s)):
            p = F.softmax(rm.lm_head(h[t - 1]), -1)
            lp, entropy = p[s[t]].log(), -(p * p.log()).sum()
            want = want + F.softplus(rm.gate(h[t]).squeeze()) * min(0.0, lp + entropy + (slack if t == start[i] else 0))
            assert logp[i, t - 1].item() == pytest.approx(lp.item(), rel=1e-5)  # scores are float32
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
        assert (logp[i, :start[i] - 1] == 0).all() and (logp[i, len(s) - 1:] == 0).all()
    # the gate is never negative and the charge never positive: a reply only loses score for surprising tokens
    rm.head.weight.data.zero_(), rm.head.bias.data.zero_()
    assert (rm(rows_of(seqs), start, end)[0] <= 0).all()


def test_reward_charges_a_wrong_token_where_the_trunk_is_sure_and_not_a_choice_where_it_is_not():
    torch.manual_seed(0)
    rm = RewardModel(TINY).double().eval()
    rm.head.weight.data.zero_(), rm.head.bias.data.zero_()
    rm.lm_head = torch.nn.Linear(TINY.n_embd, TINY.vocab_size, bias=False).double()  # untied from the embeddings
    x = torch.tensor([[1, 2, 3]])
    h = rm.hidden(x)[0, 1]  # where the reply's one token, x[0, 2], is predicted
    for confident in (False, True):  # a flat next-token distribution, then one sure of token 7
        with torch.no_grad():
            rm.lm_head.weight.zero_()
            if confident:
                rm.lm_head.weight[7] = 20 * h / h.norm() ** 2  # logit 20 for token 7, 0 for the rest
        score = rm(x, torch.tensor([2]), torch.tensor([2]))[0].item()
        if confident:  # token 3 where the trunk is sure of 7: charged about gate * 20
            assert score < -0.1 * 19
        else:  # every token equally likely: log p = -H exactly, nothing charged
            assert score == pytest.approx(0.0, abs=1e-9)
