"""Edges of the kernels: strided inputs on every path, and keys a row cannot see never change that row.

Each case is checked against the float64 reference (forward and backward) on every backend that can take it
(forced with ``backend=``), so a path that reads strides wrongly or lets a hidden NaN through fails here.
"""

import pytest
import torch

import salience
from salience import masks, reference, scores
from salience.kernels import fused, guard
from salience.testing import assert_rel_close

B, H, HKV, L, D = 2, 4, 2, 160, 16


def _mask_cases():
    return {
        "none": None,
        "causal": masks.causal(),
        "window": masks.causal() & masks.sliding_window(24),
        "documents": masks.document(torch.arange(L) // 50),
        "key_padding": masks.padding(kv_lengths=torch.tensor([L, 100])),
        "checker": lambda b, h, i, j: ((i // 32 + j // 32) % 2 == 0) & (j <= i),
    }


def _strided(kind, shape, dtype):
    B_, H_, L_, D_ = shape
    if kind == "step2":  # x[..., ::2]
        return torch.randn(B_, H_, L_, 2 * D_, dtype=dtype)[..., ::2]
    if kind == "transposed":  # stored (B, H, D, L), passed transposed
        return torch.randn(B_, H_, D_, L_, dtype=dtype).transpose(-1, -2)
    if kind == "heads_last":  # einops "(d h)" split: the head axis is the fastest
        return torch.randn(B_, L_, D_, H_, dtype=dtype).permute(0, 3, 1, 2)
    if kind == "expanded":  # batch broadcast with stride 0
        return torch.randn(1, H_, L_, D_, dtype=dtype).expand(B_, H_, L_, D_)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["step2", "transposed", "heads_last", "expanded"])
@pytest.mark.parametrize("mname", ["none", "causal", "window", "documents", "key_padding", "checker"])
def test_strided_inputs_every_path(kind, mname):
    m = _mask_cases()[mname]
    q = _strided(kind, (B, H, L, D), torch.float32).requires_grad_()
    k = _strided(kind, (B, HKV, L, D), torch.float32).requires_grad_()
    v = _strided(kind, (B, HKV, L, D), torch.float32).requires_grad_()
    assert not (q.is_contiguous() and k.is_contiguous())
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r64 = reference.attention(q64, k64, v64, mask=m).out
    g = torch.randn_like(r64)
    r64.backward(g)
    q32, k32, v32 = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    r32 = reference.attention(q32, k32, v32, mask=m).out
    r32.backward(g.float())
    tried = set()
    for be in (None, "sdpa", "spans", "blockwise", "reference"):
        try:
            pl = salience.plan(q, k, v, mask=m, backend=be)
        except ValueError:
            continue
        tried.add(pl.backend)
        for t in (q, k, v):
            t.grad = None
        out = salience.attention(q, k, v, mask=m, backend=be)
        assert_rel_close(out, r32, r64, what=f"{kind} {mname} {pl.backend} out")
        out.backward(g.float())
        for name, t, t32, t64 in (("dq", q, q32, q64), ("dk", k, k32, k64), ("dv", v, v32, v64)):
            assert_rel_close(t.grad, t32.grad, t64.grad, what=f"{kind} {mname} {pl.backend} {name}")
    assert {"blockwise", "reference"} <= tried


def test_fused_kernel_guards_its_preconditions():
    q = torch.randn(1, 2, 64, 32)[..., ::2]
    k = torch.randn(1, 2, 16, 64).transpose(-1, -2)
    v = torch.randn(1, 2, 64, 16)
    out, lse = fused.forward(q, k, v, scale=0.25)
    ref = reference.attention(q.double(), k.double(), v.double(), scale=0.25)
    assert (out.double() - ref.out).abs().max() < 1e-5
    assert (lse.double() - ref.lse).abs().max() < 1e-5
    with pytest.raises(TypeError, match="one dtype"):
        fused.forward(q, k.double(), v, scale=0.25)
    with pytest.raises(ValueError, match="does not broadcast"):
        fused.forward(q, k, v, scale=0.25, bias=torch.zeros(3, 64, 64))


def _poison(t, where, value):
    t = t.detach().clone()
    for b, j in where:
        t[b, :, j] = value
    return t


HIDDEN = {  # mask, keys (batch, index) that some rows cannot see
    "key_padding": (masks.padding(kv_lengths=torch.tensor([L, 100])), [(1, 120), (1, 159)]),
    "window": (masks.causal() & masks.sliding_window(24), [(0, 40)]),
    "causal": (masks.causal(), [(0, L - 1), (1, 70)]),
    "documents": (masks.document(torch.arange(L) // 50), [(0, 60)]),
    "checker": (lambda b, h, i, j: ((i // 32 + j // 32) % 2 == 0) & (j <= i), [(0, 70)]),
    "prefix_lm": (masks.prefix_lm(20), [(1, 100)]),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mname", sorted(HIDDEN))
@pytest.mark.parametrize("where", ["k", "v", "both"])
def test_hidden_nonfinite_keys_never_change_a_row(mname, value, where):
    m, bad = HIDDEN[mname]
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(B, HKV, L, D, dtype=torch.float64)
    v = torch.randn(B, HKV, L, D, dtype=torch.float64)
    kb = _poison(k, bad, value) if where in ("k", "both") else k
    vb = _poison(v, bad, value) if where in ("v", "both") else v
    dense = masks.as_mask_mod(m).to_dense(B, H, L, L)
    sees = torch.zeros(B, H, L, dtype=torch.bool)
    for b, j in bad:
        sees[b] |= dense[b, :, :, j]
    clean = reference.attention(q, k, v, mask=m).out
    g = torch.randn(B, H, L, D, dtype=torch.float64)
    for be in (None, "sdpa", "spans", "blockwise", "reference"):
        try:
            salience.plan(q, kb, vb, mask=m, backend=be)
        except ValueError:
            continue
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, kb, vb))
        out = salience.attention(qq, kk, vv, mask=m, backend=be)
        ok = ~sees
        # rows that cannot see a bad key: exactly the clean answer; rows that do: not finite, as in eager
        assert torch.allclose(out[ok], clean[ok], atol=1e-10), (mname, be)
        assert (~torch.isfinite(out[sees])).any(-1).all(), (mname, be)  # each such row, as in eager
        out.backward(g * ok.unsqueeze(-1))  # only rows that see no bad key send a gradient
        qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
        reference.attention(qc, kc, vc, mask=m).out.backward(g * ok.unsqueeze(-1))
        # a row that sees a NaN has NaN gradients in eager attention too (NaN * 0); every other row's are clean
        assert torch.allclose(qq.grad[ok], qc.grad[ok], atol=1e-9), (mname, be, "dq", (qq.grad - qc.grad).abs().amax(-1).nonzero()[:4], (qq.grad - qc.grad)[ok].abs().max())
        if not sees.any():  # no row sees a bad key: every gradient equals the clean one, at finite entries
            fin_k, fin_v = torch.isfinite(kb), torch.isfinite(vb)
            assert torch.allclose(kk.grad[fin_k], kc.grad[fin_k], atol=1e-9), (mname, be, "dk")
            assert torch.allclose(vv.grad[fin_v], vc.grad[fin_v], atol=1e-9), (mname, be, "dv")


def test_rows_seeing_a_nonfinite_key_match_eager():
    m = masks.causal() & masks.sliding_window(8)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    v[0, 1, 10, 3] = float("inf")
    out = salience.attention(q, k, v, mask=m)
    ref = reference.attention(q, k, v, mask=m).out
    same = (out == ref) | (out.isnan() & ref.isnan())
    assert same[:, :, 10:19].all()
    assert torch.isinf(out[0, 1, 10:19, 3]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :10]).all()


def test_finite_inputs_take_no_guarded_work(monkeypatch):
    calls, real = [], guard.bad_keys
    monkeypatch.setattr(guard, "bad_keys", lambda k, v: calls.append(1) or real(k, v))
    q = torch.randn(1, 2, 64, 8)
    salience.attention(q, q, q, mask=masks.causal() & masks.sliding_window(8), score_mod=scores.softcap(5.0))
    assert calls == []
