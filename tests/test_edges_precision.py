"""Precision at the edges: bfloat16 against flash-attention's rule, large scores, and rows that see one key.

flash-attention's own tests accept a fast result when its error against a float64 reference is at most twice
that of the *same-dtype PyTorch* computation (``softmax(q k^T * scale) @ v`` in that dtype, where torch's
softmax accumulates in float32). These tests hold every salience path to that rule.
"""

import pytest
import torch

import salience
from salience import masks, reference, scores
from salience.testing import assert_rel_close, rel_error_report

L = 64


def _eager(q, k, v, mask=None, bias=None, scale=None):
    """The PyTorch computation in q's dtype, as flash-attention's tests write it."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~masks.as_mask_mod(mask).to_dense(*s.shape), float("-inf"))
    return torch.softmax(s, -1) @ v


MASKS = {
    "none": None,
    "causal": masks.causal(),
    "window": masks.sliding_window(6),
    "documents": masks.document(torch.arange(L) // 20),
    "prefix_lm": masks.prefix_lm(10),
    "checker": lambda b, h, i, j: ((i // 8 + j // 8) % 2 == 0) | (i == j),
}


def _backends(q, m, **kw):
    seen = {}
    for be in (None, "sdpa", "spans", "blockwise", "reference"):
        try:
            seen.setdefault(salience.plan(q, q, q, mask=m, backend=be, **kw).backend, be)
        except ValueError:
            continue
    return seen


@pytest.mark.parametrize("mname", sorted(MASKS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_meets_flash_attentions_rule_on_every_path(mname, dtype):
    m = MASKS[mname]
    q, k, v = (torch.randn(2, 4, L, 32, dtype=torch.float64) for _ in range(3))
    r64 = reference.attention(q, k, v, mask=m)
    eager = _eager(q.to(dtype), k.to(dtype), v.to(dtype), m)
    backends = _backends(q.to(dtype), m)
    assert "reference" in backends and "blockwise" in backends
    for name, be in backends.items():
        res = salience.attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=m, backend=be, return_lse=True)
        assert res.lse.dtype == torch.float32, (name, res.lse.dtype)
        err, bound = rel_error_report(res.out, eager, r64.out, k=2.0, floor=0.0)
        assert err <= bound, f"{mname} {name}: error {err:.3e} > 2x PyTorch's {dtype} error {bound / 2:.3e}"
        # the lse is not rounded to the input dtype: weights from it sum to 1 within float32 rounding
        assert (res.lse.double() - r64.lse).abs().max() < 2e-2, name
        w = salience.attention_weights(q.float(), k.float(), mask=m, lse=res.lse)
        assert (w.double().sum(-1) - 1).abs().max() < 3e-2, name


@pytest.mark.parametrize("magnitude", [1e3, 4e3])
def test_large_scores_float32_match_eager_precision(magnitude):
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.float64) for _ in range(3))
    table = torch.randn(32, 2, dtype=torch.float64) * magnitude
    mod64, mod32 = scores.relative_bias(table), scores.relative_bias(table.float())
    for m in (None, masks.causal(), masks.sliding_window(8)):
        r64 = reference.attention(q, k, v, mask=m, score_mod=mod64).out
        bias32 = reference.scores(q.float() * 0, k.float(), score_mod=mod32)  # the bias alone, in float32
        eager = _eager(q.float(), k.float(), v.float(), m, bias=bias32)
        r32 = reference.attention(q.float(), k.float(), v.float(), mask=m, score_mod=mod32).out
        assert_rel_close(r32, eager, r64, what="reference float32 vs eager")  # the spec is as exact as eager
        for name, be in _backends(q.float(), m, score_mod=mod32).items():
            out = salience.attention(q.float(), k.float(), v.float(), mask=m, score_mod=mod32, backend=be)
            assert_rel_close(out, eager, r64, what=f"{m} {name}")


def test_reference_softmax_is_max_subtracted():
    s = torch.tensor([[[[4000.0, 4000.5, 3999.0, float("-inf")]]]])
    w, lse = reference.softmax_from_scores(s)
    expect = torch.softmax(s.double(), -1)
    assert (w.double() - expect).abs().max() < 1e-7
    assert abs(float(lse) - float(torch.logsumexp(s.double(), -1))) < 1e-3
    wb, lb = reference.softmax_from_scores(s.bfloat16())
    assert wb.dtype == torch.bfloat16 and lb.dtype == torch.float32


def _grads(q, k, v, g, m, fn):
    t = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    fn(*t, mask=m).backward(g.to(q.dtype))
    return [x.grad for x in t]


def test_rows_that_see_one_key_the_rule_not_the_kernel():
    """A row that sees one key has weight exactly 1, so its dq and that key's dk are exactly 0: the float32
    reference gets 0 through autograd's softmax backward (dP - sum(P dP) with P = 1), the kernels ~1e-6 through
    FlashAttention-2's dS = P (dP - rowsum(dout * out)), whose two dot products round differently. torch's own
    SDPA backward shows the same 1e-6; the rule's floor, relative to the size of the result (0 here), is what
    is wrong. The gradient floor is therefore taken relative to the terms that cancel (|dout| |v| |k| scale)."""
    q, k, v = (torch.randn(1, 2, 128, 32, dtype=torch.float64) for _ in range(3))
    g = torch.randn(1, 2, 128, 32, dtype=torch.float64)
    m = masks.sliding_window(0)
    g64 = _grads(q, k, v, g, m, lambda *a, mask: reference.attention(*a, mask=mask).out)
    g32 = _grads(q.float(), k.float(), v.float(), g, m, lambda *a, mask: reference.attention(*a, mask=mask).out)
    assert float(g32[0].abs().max()) == 0.0 and float(g64[0].abs().max()) < 1e-12
    eye = torch.eye(128, dtype=torch.bool)
    torch_sdpa = _grads(q.float(), k.float(), v.float(), g, m, lambda *a, mask: torch.nn.functional.
                        scaled_dot_product_attention(*a, attn_mask=eye))
    terms = float(g.abs().max() * v.abs().max() * k.abs().max()) * 32 ** -0.5
    for be in (None, "blockwise", "spans", "sdpa"):
        fast = _grads(q.float(), k.float(), v.float(), g, m,
                      lambda *a, mask, be=be: salience.attention(*a, mask=mask, backend=be))
        # the kernels' error is torch SDPA's own error, and both are float32 rounding of the cancelling terms
        assert float(fast[0].abs().max()) <= 4 * max(float(torch_sdpa[0].abs().max()), 1e-7), be
        for a, b32, b64 in zip(fast, g32, g64):
            assert_rel_close(a, b32, b64, magnitude=terms)
