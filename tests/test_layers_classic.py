"""Bahdanau, Luong (global and local-p), attention pooling and hierarchical attention against direct formulas."""

import pytest
import torch

from salience.layers import (
    AdditiveAttention,
    AttentionPooling,
    HierarchicalAttention,
    LuongAttention,
    LuongLocalAttention,
)

f64 = torch.float64


def masked_softmax(e, valid):
    e = e.masked_fill(~valid, float("-inf"))
    any_ = valid.any(-1, keepdim=True)
    w = torch.softmax(torch.where(any_, e, torch.zeros_like(e)), -1)
    return torch.where(any_, w, torch.zeros_like(w))


def valid_of(lengths, S):
    return torch.arange(S).view(1, -1) < torch.tensor(lengths).view(-1, 1)


def test_additive_against_formula_single_step_and_many_steps():
    attn = AdditiveAttention(5, 4, hidden_dim=6).double()
    keys, vals = torch.randn(3, 7, 4, dtype=f64), torch.randn(3, 7, 2, dtype=f64)
    lengths = [7, 3, 0]
    valid = valid_of(lengths, 7)
    sc = attn.score
    for query in (torch.randn(3, 5, dtype=f64), torch.randn(3, 4, 5, dtype=f64)):
        q = query if query.dim() == 3 else query.unsqueeze(1)
        e = sc.v(torch.tanh(sc.w_q(q).unsqueeze(2) + sc.w_k(keys).unsqueeze(1))).squeeze(-1)  # (B, T, S)
        w = masked_softmax(e, valid.unsqueeze(1))
        ctx = w @ vals
        out = attn(query, keys, vals, source_lengths=lengths)
        if query.dim() == 2:
            w, ctx = w.squeeze(1), ctx.squeeze(1)
        assert torch.allclose(out.weights, w, atol=1e-12)
        assert torch.allclose(out.context, ctx, atol=1e-12)
        assert torch.all(out.context[2] == 0)  # empty source: context 0, no NaN
    # precomputed key projection gives the same result
    pk = attn.prepare(keys)
    h = torch.randn(3, 5, dtype=f64)
    a = attn(h, keys, vals, source_mask=valid)
    b = attn(h, keys, vals, source_mask=valid, projected_keys=pk)
    assert torch.allclose(a.context, b.context, atol=1e-12)


def test_additive_inside_a_gru_decoder_loop_trains():
    torch.manual_seed(1)
    attn = AdditiveAttention(8, 6)
    cell = torch.nn.GRUCell(6 + 3, 8)
    enc = torch.randn(2, 5, 6)
    h = torch.zeros(2, 8)
    y = torch.randn(2, 4, 3)
    pk = attn.prepare(enc)
    loss = 0.0
    for t in range(4):
        context, weights = attn(h, enc, source_lengths=[5, 2], projected_keys=pk)
        h = cell(torch.cat((context, y[:, t]), -1), h)
        loss = loss + h.pow(2).mean()
        assert torch.all(weights[1, 2:] == 0)
    loss.backward()
    assert attn.score.v.weight.grad.abs().sum() > 0 and attn.score.w_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["dot", "general", "concat"])
def test_luong_against_formula(method):
    attn = LuongAttention(4, 4, method=method).double()
    h, enc = torch.randn(2, 3, 4, dtype=f64), torch.randn(2, 6, 4, dtype=f64)
    valid = valid_of([6, 4], 6)
    if method == "dot":
        e = h @ enc.transpose(1, 2)
    elif method == "general":
        e = h @ attn.score.weight @ enc.transpose(1, 2)
    else:
        sc = attn.score
        e = sc.v(torch.tanh(sc.w_q(h).unsqueeze(2) + sc.w_k(enc).unsqueeze(1))).squeeze(-1)
    w = masked_softmax(e, valid.unsqueeze(1))
    ctx = w @ enc
    out = attn(h, enc, source_mask=valid)
    assert torch.allclose(out.weights, w, atol=1e-12)
    assert torch.allclose(out.context, ctx, atol=1e-12)
    assert torch.allclose(out.attentional, torch.tanh(attn.combine(torch.cat((ctx, h), -1))), atol=1e-12)


def test_luong_local_p_against_formula_and_trains_the_centre():
    attn = LuongLocalAttention(4, 4, method="dot", window=2).double()
    h, enc = torch.randn(2, 4, dtype=f64), torch.randn(2, 9, 4, dtype=f64)
    lengths = [9, 5]
    out = attn(h, enc, source_lengths=lengths)
    for b in range(2):
        n = lengths[b]
        p = (n - 1) * torch.sigmoid(attn.v_p(torch.tanh(attn.w_p(h[b])))).item()
        assert abs(out.centres[b].item() - p) < 1e-12
        inside = [s for s in range(n) if abs(s - p) <= 2]
        e = torch.stack([h[b] @ enc[b, s] for s in inside])
        a = torch.softmax(e, 0)
        want = torch.zeros(9, dtype=f64)
        for j, s in enumerate(inside):
            want[s] = a[j] * torch.exp(torch.tensor(-((s - p) ** 2) / (2 * 1.0**2), dtype=f64))
        assert torch.allclose(out.weights[b], want, atol=1e-12)
    out.context.sum().backward()
    assert attn.w_p.weight.grad.abs().sum() > 0  # the Gaussian makes p_t trainable
    fixed = attn(h, enc, source_lengths=lengths, centres=torch.tensor([3.0, 1.0], dtype=f64))
    assert fixed.weights[0, 6:].abs().sum() == 0 and fixed.weights[0, 3] > 0


def test_classic_gradcheck():
    add = AdditiveAttention(3, 2, hidden_dim=4).double()
    lu = LuongAttention(3, 2, method="general").double()
    loc = LuongLocalAttention(3, 2, method="general", window=2).double()
    q = torch.randn(2, 3, dtype=f64, requires_grad=True)
    k = torch.randn(2, 5, 2, dtype=f64, requires_grad=True)
    for layer in (add, lu, loc):
        assert torch.autograd.gradcheck(lambda a, b, m=layer: m(a, b, source_lengths=[5, 3]).context, (q, k))


def test_attention_pooling_against_formula():
    pool = AttentionPooling(5, attn_dim=3).double()
    h = torch.randn(3, 6, 5, dtype=f64)
    out = pool(h, lengths=[6, 2, 0])
    e = torch.tanh(pool.proj(h)) @ pool.context
    w = masked_softmax(e, valid_of([6, 2, 0], 6))
    assert torch.allclose(out.weights, w, atol=1e-12)
    assert torch.allclose(out.context, (w.unsqueeze(1) @ h).squeeze(1), atol=1e-12)


def test_hierarchical_attention_padding_never_leaks_and_matches_per_sentence_runs():
    torch.manual_seed(3)
    han = HierarchicalAttention(6, word_hidden=4, sentence_hidden=3).double()
    x = torch.randn(2, 3, 5, 6, dtype=f64)
    wl = torch.tensor([[5, 2, 3], [4, 1, 0]])
    sl = torch.tensor([3, 2])
    out = han(x, wl, sl)
    # change every padded word and the padded sentence: nothing moves
    x2 = x.clone()
    for b in range(2):
        for s in range(3):
            x2[b, s, wl[b, s]:] = 100.0
    x2[1, 2] = -50.0
    out2 = han(x2, wl, sl)
    assert torch.allclose(out.document, out2.document, atol=1e-12)
    assert torch.all(out.word_weights[0, 1, 2:] == 0) and torch.all(out.sentence_weights[1, 2:] == 0)
    assert torch.allclose(out.word_weights[0].sum(-1), torch.ones(3, dtype=f64))
    # sentence 1 of document 0 run alone, unpadded, through the word GRU and pooling
    h, _ = han.word_gru(x[0, 1, :2].unsqueeze(0))
    alone = han.word_pool(h)
    assert torch.allclose(alone.weights[0], out.word_weights[0, 1, :2], atol=1e-12)


@pytest.mark.parametrize(
    "fn, exc, match",
    [
        (lambda: AdditiveAttention(0), ValueError, "query_dim must be >= 1"),
        (lambda: LuongAttention(4, 3, method="dot"), ValueError, "query_dim == key_dim"),
        (lambda: LuongAttention(4, method="bilinear"), ValueError, "method must be one of"),
        (lambda: LuongLocalAttention(4, window=0), ValueError, "window must be >= 1"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 3), torch.randn(2, 5, 4)), ValueError, "query must have shape"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(3, 5, 4)), ValueError, "keys must have shape"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4).double()), TypeError, "dtype"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), torch.randn(2, 4, 4)), ValueError,
         "values have 4"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), source_lengths=[5, 6]), ValueError,
         "source_lengths must lie in"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), source_mask=torch.ones(2, 5)),
         TypeError, "True = real token"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), source_mask=torch.ones(2, 4).bool()),
         ValueError, "source_mask must have shape"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), source_lengths=[5, 5],
                                      source_mask=torch.ones(2, 5).bool()), ValueError, "not both"),
        (lambda: AdditiveAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), projected_keys=torch.randn(2, 4, 4)),
         ValueError, "projected_keys cover 4"),
        (lambda: LuongLocalAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), centres=torch.zeros(3)), ValueError,
         "centres must have shape"),
        (lambda: AttentionPooling(4)(torch.randn(2, 4)), ValueError, "h must be a float tensor"),
        (lambda: HierarchicalAttention(4)(torch.randn(2, 3, 5, 4), torch.ones(2, 2, dtype=torch.long),
                                          torch.tensor([3, 3])), ValueError, "word_lengths must be integers"),
        (lambda: HierarchicalAttention(4)(torch.randn(2, 3, 5, 4), torch.full((2, 3), 6), torch.tensor([3, 3])),
         ValueError, "must lie in"),
    ],
)
def test_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
