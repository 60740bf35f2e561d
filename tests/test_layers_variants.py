"""Sparsemax / 1.5-entmax (exact, with gradients), hard, sigmoid and differential attention against definitions."""

import math

import pytest
import torch

import salience
from salience import masks as M
from salience import scores as Sc
from salience.layers import (
    DifferentialAttention,
    Entmax15Attention,
    HardAttention,
    RotaryEmbedding,
    SigmoidAttention,
    SparsemaxAttention,
    differential_lambda_init,
    entmax15,
    sparsemax,
)
from salience.layers import variants as V
from salience.testing import assert_rel_close

f64 = torch.float64


def bisect_threshold(z, mass, iters=200):
    """tau with sum(mass(z - tau)) == 1 for one row (mass increasing in its argument), by bisection."""
    finite = z[torch.isfinite(z)]
    lo, hi = finite.max().item() - 10.0, finite.max().item()
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mass(finite - mid).sum().item() > 1:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sparsemax_by_bisection(z):
    tau = bisect_threshold(z, lambda d: d.clamp(min=0))
    return torch.where(torch.isfinite(z), (z - tau).clamp(min=0), torch.zeros_like(z))


def entmax_by_bisection(z):
    tau = bisect_threshold(z / 2, lambda d: d.clamp(min=0) ** 2)
    return torch.where(torch.isfinite(z), (z / 2 - tau).clamp(min=0) ** 2, torch.zeros_like(z))


@pytest.mark.parametrize("fn, slow", [(sparsemax, sparsemax_by_bisection), (entmax15, entmax_by_bisection)])
def test_normalisers_equal_their_definition(fn, slow):
    z = torch.randn(6, 9, dtype=f64) * torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0, 100.0], dtype=f64).view(-1, 1)
    z[2, [1, 4]] = float("-inf")
    p = fn(z)
    for r in range(6):
        assert torch.allclose(p[r], slow(z[r]), atol=1e-10)
    assert torch.allclose(p.sum(-1), torch.ones(6, dtype=f64))
    assert (p == 0).any() and (p >= 0).all()
    assert torch.all(p[2, [1, 4]] == 0)
    # shift invariance, dim argument, all -inf rows
    assert torch.allclose(fn(z + 1000.0), p, atol=1e-9)
    assert torch.allclose(fn(z.T, dim=0), p.T)
    empty = fn(torch.full((2, 4), float("-inf"), dtype=f64))
    assert torch.all(empty == 0)


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_normaliser_gradients(fn):
    z = torch.randn(3, 7, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (z,))
    zm = torch.randn(2, 5, dtype=f64)
    zm[0, 3] = float("-inf")
    zm[1] = float("-inf")
    zm.requires_grad_()
    (fn(zm) * torch.randn(2, 5, dtype=f64)).sum().backward()
    assert torch.isfinite(zm.grad).all() and zm.grad[0, 3] == 0 and torch.all(zm.grad[1] == 0)


def test_entmax_is_between_softmax_and_sparsemax():
    z = torch.randn(200, 12, dtype=f64) * 2
    nnz = lambda p: (p > 0).sum().item()  # noqa: E731
    assert nnz(sparsemax(z)) < nnz(entmax15(z)) < nnz(torch.softmax(z, -1))


def manual(q, k, v, norm, mask=None, score_mod=None):
    s = salience.reference.scores(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), mask=mask, score_mod=score_mod)
    w = norm(s)
    return w @ v.repeat_interleave(q.shape[1] // v.shape[1], 1), w


@pytest.mark.parametrize("layer, norm", [
    (SparsemaxAttention(), sparsemax),
    (Entmax15Attention(), entmax15),
    (SigmoidAttention(), lambda s: torch.sigmoid(s - math.log(s.shape[-1]))),
])
def test_score_variants_against_definition_relative_error_rule(layer, norm, monkeypatch):
    monkeypatch.setattr(V, "CHUNK", 5)  # several query chunks
    q = torch.randn(2, 4, 13, 8, dtype=f64) * 2
    k, v = torch.randn(2, 2, 11, 8, dtype=f64) * 2, torch.randn(2, 2, 11, 3, dtype=f64)
    mask = M.causal(align="bottom_right") & M.padding(kv_lengths=[11, 7])
    mod = Sc.alibi(4)
    fast = layer(q.float(), k.float(), v.float(), mask=mask, score_mod=mod)
    r64, w64 = manual(q, k, v, norm, mask, mod)
    r32, w32 = manual(q.float(), k.float(), v.float(), norm, mask, mod)
    assert_rel_close(fast, r32, r64)
    assert_rel_close(layer.weights(q.float(), k.float(), mask=mask, score_mod=mod), w32, w64)


def test_sparse_attention_masked_rows_and_gradients():
    q = torch.randn(1, 2, 5, 4, dtype=f64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=f64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=f64, requires_grad=True)
    hide = M.MaskMod(lambda b, h, qi, kv: (qi != 1) & (kv <= qi), "hide_row_1_causal")
    for layer in (SparsemaxAttention(), Entmax15Attention(), SigmoidAttention()):
        out = layer(q, k, v, mask=hide)
        assert torch.all(out[:, :, 1] == 0)
        assert torch.autograd.gradcheck(lambda a, b, c, m=layer: m(a, b, c, mask=hide), (q, k, v), fast_mode=True)


def test_sigmoid_bias_default_and_fixed():
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 8, 4)
    assert torch.allclose(SigmoidAttention().weights(q, k), torch.full((1, 1, 2, 8), 1 / 9))
    assert torch.allclose(SigmoidAttention(bias=0.0).weights(q, k), torch.full((1, 1, 2, 8), 0.5))


def test_hard_attention_argmax_at_inference_and_straight_through_in_training():
    q, k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 3)
    mask = M.padding(kv_lengths=[7, 3])
    hard = HardAttention(temperature=0.5).eval()
    soft_w = salience.attention_weights(q, k, mask=mask)
    idx = soft_w.argmax(-1)
    want = torch.gather(v, 2, idx.unsqueeze(-1).expand(-1, -1, -1, 3).reshape(2, 2, -1, 3))
    assert torch.allclose(hard(q, k, v, mask=mask), want)
    hard.train()
    qq = q.clone().requires_grad_()
    w = hard.weights(qq, k, mask=mask, generator=torch.Generator().manual_seed(7))
    assert torch.all(w.detach().sum(-1) == 1) and torch.all((w.detach() == 0) | (w.detach() == 1))
    assert torch.all(w.detach()[1, :, :, 3:] == 0)  # padded keys never chosen
    c = torch.randn_like(w)
    (w * c).sum().backward()
    # the same Gumbel noise, relaxed: its gradient is the straight-through gradient
    q2 = q.clone().requires_grad_()
    s = salience.reference.scores(q2, k, mask=mask)
    u = torch.rand(s.shape, generator=torch.Generator().manual_seed(7), dtype=s.dtype)
    g = -torch.log(-torch.log(u.clamp(min=torch.finfo(s.dtype).tiny, max=1 - torch.finfo(s.dtype).eps)))
    y_soft = torch.softmax((s + g) / 0.5, -1)
    assert torch.equal(w.detach(), torch.nn.functional.one_hot((s + g).argmax(-1), 7).float())
    (y_soft * c).sum().backward()
    assert torch.allclose(qq.grad, q2.grad, atol=1e-6)


def test_hard_attention_fully_masked_rows():
    hard = HardAttention()
    q = k = v = torch.randn(1, 1, 3, 2, requires_grad=True)
    out = hard(q, k, v, kv_lengths=[0])
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def diff_reference(layer, x, mask, dtype):
    lay = __import__("copy").deepcopy(layer).to(dtype)
    q1, q2, k1, k2, v = lay.heads(x.to(dtype))
    a1 = salience.reference.attention(q1, k1, v, mask=mask)
    a2 = salience.reference.attention(q2, k2, v, mask=mask)
    lam = lay.lam()
    heads = lay.norm(a1.out - lam * a2.out) * (1 - lay.lambda_init)
    B, H, L, _ = heads.shape
    return lay.out_proj(heads.transpose(1, 2).reshape(B, L, -1)), a1.weights - lam * a2.weights


def test_differential_attention_against_reference():
    layer = DifferentialAttention(32, 2, layer_index=4, mask=M.causal(), positional=RotaryEmbedding(8))
    x = torch.randn(2, 7, 32)
    out = layer(x, key_lengths=[7, 5], need_weights=True)
    mask = M.causal() & M.padding(kv_lengths=[7, 5])
    r64, w64 = diff_reference(layer, x, mask, f64)
    r32, w32 = diff_reference(layer, x, mask, torch.float32)
    assert_rel_close(out.output, r32, r64, what="output")
    assert_rel_close(out.weights, w32, w64, what="weights")
    assert math.isclose(layer.lambda_init, 0.8 - 0.6 * math.exp(-0.9))
    out.output.sum().backward()
    assert layer.lambda_q1.grad.abs().sum() > 0 and layer.lambda_k2.grad.abs().sum() > 0


def test_differential_attention_gradcheck():
    layer = DifferentialAttention(8, 1, layer_index=2).double()
    x = torch.randn(1, 3, 8, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t).output, (x,), fast_mode=True)


@pytest.mark.parametrize(
    "fn, exc, match",
    [
        (lambda: sparsemax(torch.tensor([1, 2])), TypeError, "floating-point"),
        (lambda: entmax15(torch.randn(3), dim=2), ValueError, "out of range"),
        (lambda: SigmoidAttention(bias=float("nan")), ValueError, "bias must be a finite"),
        (lambda: HardAttention(temperature=0), ValueError, "temperature must be a positive"),
        (lambda: SparsemaxAttention()(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError,
         "4 dimensions"),
        (lambda: DifferentialAttention(30, 4), ValueError, "divisible by 2 \\* num_heads"),
        (lambda: DifferentialAttention(32, 2, layer_index=0), ValueError, "layer_index must be >= 1"),
        (lambda: DifferentialAttention(32, 2, positional=RotaryEmbedding(4)), ValueError, "needs 8"),
        (lambda: DifferentialAttention(32, 2, positional=Sc.alibi(2)), TypeError, "RotaryEmbedding"),
        (lambda: DifferentialAttention(32, 2)(torch.randn(2, 3, 16)), ValueError, "\\(B, L, 32\\)"),
        (lambda: DifferentialAttention(32, 2)(torch.randn(2, 3, 32), key_lengths=[3, 3],
                                              key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)), ValueError,
         "not both"),
        (lambda: differential_lambda_init(1.5), TypeError, "layer_index must be an int"),
    ],
)
def test_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
