"""Attention sinks (one learned logit per head, a virtual key of value 0) on every path, both directions."""

import pytest
import torch

import salience
from salience import masks, reference, scores
from salience.testing import assert_rel_close

B, H, HKV, L, D = 2, 4, 2, 96, 16


def _eager_sinks(q, k, v, mask, sinks):
    """gpt-oss's eager formula, written out: softmax over [scores, sink], drop the sink column."""
    g = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ ke.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~masks.as_mask_mod(mask).to_dense(*s.shape), float("-inf"))
    col = sinks.view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
    p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    return p @ ve, p


MASKS = {
    "none": None,
    "causal": masks.causal(),
    "window": masks.causal() & masks.sliding_window(16),
    "documents": masks.document(torch.arange(L) // 40),
    "checker": lambda b, h, i, j: ((i // 16 + j // 16) % 2 == 0) & (j <= i),
    "rows_without_keys": masks.padding(q_lengths=torch.tensor([L, 50]), kv_lengths=torch.tensor([L, 0])),
}


@pytest.mark.parametrize("mname", sorted(MASKS))
def test_sinks_every_path_forward_backward(mname):
    m = MASKS[mname]
    q64 = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    k64 = torch.randn(B, HKV, L, D, dtype=torch.float64, requires_grad=True)
    v64 = torch.randn(B, HKV, L, D, dtype=torch.float64, requires_grad=True)
    s64 = torch.randn(H, dtype=torch.float64, requires_grad=True)
    eager, p = _eager_sinks(q64, k64, v64, m, s64)
    ref = reference.attention(q64, k64, v64, mask=m, sinks=s64)
    assert torch.allclose(ref.out, eager, atol=1e-12)
    assert torch.allclose(ref.weights, p, atol=1e-12)
    g = torch.randn_like(eager)
    grads64 = torch.autograd.grad((ref.out * g).sum() + ref.lse.masked_fill(ref.lse.isinf(), 0).sum(),
                                  (q64, k64, v64, s64))
    q32, k32, v32, s32 = (t.detach().float().requires_grad_() for t in (q64, k64, v64, s64))
    r32 = reference.attention(q32, k32, v32, mask=m, sinks=s32)
    grads32 = torch.autograd.grad((r32.out * g.float()).sum() + r32.lse.masked_fill(r32.lse.isinf(), 0).sum(),
                                  (q32, k32, v32, s32))
    tried = set()
    for be in (None, "sdpa", "spans", "blockwise", "reference"):
        try:
            pl = salience.plan(q32, k32, v32, mask=m, backend=be, sinks=s32)
        except ValueError:
            continue
        tried.add(pl.backend)
        assert "sinks" in pl.details
        res = salience.attention(q32, k32, v32, mask=m, backend=be, sinks=s32, return_lse=True)
        assert_rel_close(res.out, r32.out, ref.out, what=f"{mname} {be} out")
        assert_rel_close(res.lse, r32.lse, ref.lse, what=f"{mname} {be} lse")
        gr = torch.autograd.grad((res.out * g.float()).sum() + res.lse.masked_fill(res.lse.isinf(), 0).sum(),
                                 (q32, k32, v32, s32))
        for name, a, b32, b64 in zip("qkvs", gr, grads32, grads64):
            assert_rel_close(a, b32, b64, what=f"{mname} {be} d{name}")
    assert {"blockwise", "reference"} <= tried


def test_sinks_rows_without_keys_and_weights():
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    m = masks.padding(kv_lengths=torch.tensor([0]))
    res = salience.attention(q, q, q, mask=m, sinks=sinks, return_lse=True)
    assert torch.equal(res.out, torch.zeros_like(res.out))
    assert torch.equal(res.lse, sinks.view(1, 2, 1).expand(1, 2, 6))
    w = salience.attention_weights(q, q, mask=masks.causal(), sinks=sinks)
    res = salience.attention(q, q, q, mask=masks.causal(), sinks=sinks, return_lse=True)
    assert torch.allclose(w.sum(-1), 1 - torch.exp(sinks.view(1, 2, 1) - res.lse))
    w2 = salience.attention_weights(q, q, mask=masks.causal(), lse=res.lse)
    assert torch.allclose(w, w2)
    assert torch.allclose(w @ q, res.out)


def test_sinks_with_score_mod_and_per_batch():
    q, k, v = (torch.randn(2, 4, 32, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, 4, dtype=torch.float64)
    mod = scores.alibi(4)
    r = reference.attention(q, k, v, mask=masks.causal(), score_mod=mod, sinks=sinks)
    out = salience.attention(q, k, v, mask=masks.causal(), score_mod=mod, sinks=sinks)
    assert torch.allclose(out, r.out, atol=1e-12)


@pytest.mark.parametrize("bad, err", [(torch.zeros(3), ValueError), (torch.zeros(4, dtype=torch.long), TypeError),
                                      ([0.0] * 4, TypeError), (torch.zeros(3, 4), ValueError)])
def test_sinks_bad_arguments(bad, err):
    q = torch.randn(2, 4, 8, 8)
    with pytest.raises(err, match="sinks"):
        salience.attention(q, q, q, sinks=bad)
    with pytest.raises(err, match="sinks"):
        reference.attention(q, q, q, sinks=bad)
