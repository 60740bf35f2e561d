"""Efficient attention: exact definitions, error against softmax attention as the budget grows, cost in length."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import salience
from salience import masks as M
from salience import scores as Sc
from salience.layers import (
    LinearAttention,
    LinformerAttention,
    LocalAttention,
    MultiHeadAttention,
    NystromAttention,
    PerformerAttention,
)
from salience.layers.measure import smooth
from salience.testing import assert_rel_close

f64 = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def linear_definition(q, k, v, causal=False, lengths=None):
    """sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) over visible j, as a dense (L, S) product."""
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    if causal:
        a = a.tril()
    if lengths is not None:
        a = a * (torch.arange(k.shape[2]).view(1, -1) < torch.tensor(lengths).view(-1, 1)).view(-1, 1, 1, k.shape[2])
    return (a @ v) / a.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_against_its_definition(causal):
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=f64) for _ in range(3))
    lengths = None if causal else [37, 20]
    mask = M.causal() if causal else None
    lin = LinearAttention(chunk_size=8)
    fast = lin(q.float(), k.float(), v.float(), mask=mask, kv_lengths=lengths)
    r64 = linear_definition(q, k, v, causal, lengths)
    r32 = linear_definition(q.float(), k.float(), v.float(), causal, lengths)
    assert_rel_close(fast, r32, r64)
    w = lin.weights(q, k, mask=mask, kv_lengths=lengths)
    assert torch.allclose(w @ v, r64, atol=1e-12)


def test_linear_attention_gqa_gradcheck_and_empty_rows():
    q = torch.randn(1, 4, 7, 3, dtype=f64, requires_grad=True)
    k = torch.randn(1, 2, 7, 3, dtype=f64, requires_grad=True)
    v = torch.randn(1, 2, 7, 3, dtype=f64, requires_grad=True)
    lin = LinearAttention(chunk_size=3)
    assert torch.autograd.gradcheck(lambda a, b, c: lin(a, b, c, mask=M.causal()), (q, k, v), fast_mode=True)
    out = lin(q, k, v, kv_lengths=[0])
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------------------------- performer


def test_performer_error_falls_with_features():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16, dtype=f64) for _ in range(3))
    q, k = 0.25 * q, 0.25 * k
    exact = salience.attention(q, k, v)
    errs = []
    for m in (16, 64, 256, 1024):
        errs.append(sum(rel_err(PerformerAttention(16, m, seed=s).double()(q, k, v), exact) for s in range(4)) / 4)
    for a, b in zip(errs, errs[1:]):
        assert b < 0.75 * a, errs  # ~1/sqrt(m): each 4x budget about halves the error
    assert errs[-1] < 0.03


def test_performer_causal_form_and_weights():
    q, k, v = (0.3 * torch.randn(2, 2, 45, 8, dtype=f64) for _ in range(3))
    perf = PerformerAttention(8, 32, seed=1, chunk_size=8).double()
    out = perf(q, k, v, mask=M.causal())
    w = perf.weights(q, k, mask=M.causal())
    assert torch.allclose(out, w @ v, atol=1e-12)  # chunked prefix sums == the dense masked form
    assert torch.all(w.triu(1) == 0) and torch.allclose(w.sum(-1), torch.ones(2, 2, 45, dtype=f64))
    exact = salience.attention(q, k, v, mask=M.causal())
    e_small = rel_err(PerformerAttention(8, 16, seed=2).double()(q, k, v, mask=M.causal()), exact)
    e_big = rel_err(PerformerAttention(8, 2048, seed=2).double()(q, k, v, mask=M.causal()), exact)
    assert e_big < e_small / 3


def test_performer_padding_redraw_and_state():
    perf = PerformerAttention(8, 16, seed=0, redraw_interval=2).double()
    q, k, v = (torch.randn(2, 1, 6, 8, dtype=f64) for _ in range(3))
    a = perf(q, k, v, kv_lengths=[6, 3])
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:], v2[1, :, 3:] = 50.0, -9.0
    assert torch.allclose(a, perf(q, k2, v2, kv_lengths=[6, 3]), atol=1e-12)  # padding never leaks
    before = perf.projection.clone()
    perf.eval()
    for _ in range(3):
        perf(q, k, v)
    assert torch.equal(before, perf.projection)  # no redraw at inference
    perf.train()
    for _ in range(3):
        perf(q, k, v)
    assert not torch.equal(before, perf.projection)
    g = orthogonal = perf.projection @ perf.projection.T
    assert orthogonal.shape == (16, 16) and torch.isfinite(g).all()
    fresh = PerformerAttention(8, 16, seed=5).double()
    fresh.load_state_dict(perf.state_dict())
    assert torch.equal(fresh.projection, perf.projection)


# ----------------------------------------------------------------------------------------------- nystrom


def test_nystrom_error_falls_with_landmarks_and_is_exact_at_full_budget():
    q, k = smooth(1, 2, 256, 16, seed=1), smooth(1, 2, 256, 16, seed=2)
    v = torch.randn(1, 2, 256, 16, dtype=f64)
    exact = salience.attention(q, k, v)
    errs = {m: rel_err(NystromAttention(m)(q, k, v), exact) for m in (4, 8, 16, 64)}
    assert errs[8] < errs[4] / 2 and errs[16] < errs[8] / 2 and errs[64] <= errs[16] * 1.01, errs
    assert rel_err(NystromAttention(256)(q, k, v), exact) < 1e-12


def test_nystrom_iterative_pseudo_inverse_converges():
    a = torch.softmax(torch.randn(3, 16, 16, dtype=f64), -1) + torch.eye(16, dtype=f64)  # well conditioned
    want = torch.linalg.pinv(a)
    assert torch.allclose(NystromAttention(4, pinv_iterations=0).pinv(a), want, atol=1e-12)
    errs = [(NystromAttention(4, pinv_iterations=n).pinv(a) - want).abs().max().item() for n in (1, 2, 4, 8)]
    assert errs[-1] < 1e-10 and errs[0] > errs[1] > errs[2], errs


def test_nystrom_padding_and_weights():
    nys = NystromAttention(4)
    q, k, v = (torch.randn(2, 2, 12, 4, dtype=f64) for _ in range(3))
    a = nys(q, k, v, kv_lengths=[12, 7])
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 7:], v2[1, :, 7:] = 9.0, 9.0
    assert torch.allclose(a, nys(q, k2, v2, kv_lengths=[12, 7]), atol=1e-12)
    w = nys.weights(q, k, kv_lengths=[12, 7])
    assert torch.allclose(w @ v, a, atol=1e-10)
    assert w[1, :, :, 7:].abs().max() == 0


# --------------------------------------------------------------------------------------------- linformer


def test_linformer_error_falls_with_projected_length_and_is_exact_at_full_length():
    q, k = smooth(1, 2, 256, 16, seed=3), smooth(1, 2, 256, 16, seed=4)
    v = torch.randn(1, 2, 256, 16, dtype=f64)
    exact = salience.attention(q, k, v)
    errs = [rel_err(LinformerAttention(256, kk).double()(q, k, v), exact) for kk in (8, 32, 128)]
    assert errs[1] < errs[0] / 2 and errs[2] < errs[1] / 2, errs
    assert rel_err(LinformerAttention(256, 256).double()(q, k, v), exact) < 1e-12
    lin = LinformerAttention(256, 32, share_kv=True).double()
    assert torch.allclose(lin.weights(q, k) @ v, lin(q, k, v), atol=1e-12)


def test_linformer_trains_its_projections():
    lin = LinformerAttention(16, 4)
    q, k, v = (torch.randn(1, 1, 16, 4) for _ in range(3))
    lin(q, k, v).sum().backward()
    assert lin.E.grad.abs().sum() > 0 and lin.F.grad.abs().sum() > 0 and lin.bias.grad is not None


# ------------------------------------------------------------------------------------------------- local


@pytest.mark.parametrize("left, right", [(5, 0), (3, 4), (0, 0), (40, 2)])
def test_local_attention_is_exact(left, right):
    q = torch.randn(2, 4, 33, 8, dtype=f64)
    k, v = torch.randn(2, 2, 33, 8, dtype=f64), torch.randn(2, 2, 33, 6, dtype=f64)
    mod = Sc.alibi(4)
    mask = M.sliding_window(left, right) & M.padding(kv_lengths=[33, 20])
    loc = LocalAttention(left, right)
    fast = loc(q.float(), k.float(), v.float(), score_mod=mod, kv_lengths=[33, 20])
    r64 = salience.reference.attention(q, k, v, mask=mask, score_mod=mod).out
    r32 = salience.reference.attention(q.float(), k.float(), v.float(), mask=mask, score_mod=mod).out
    assert_rel_close(fast, r32, r64)


def test_local_attention_extra_mask_causal_and_gradients():
    q, k, v = (torch.randn(1, 2, 20, 4) for _ in range(3))
    loc = LocalAttention(6, 6)
    doc = M.document([0] * 9 + [1] * 11)
    out = loc(q, k, v, mask=doc)
    assert torch.allclose(out, salience.attention(q, k, v, mask=M.sliding_window(6, 6) & doc), atol=1e-5)
    out_c = loc(q, k, v, mask=M.causal())
    assert torch.allclose(out_c, salience.attention(q, k, v, mask=M.sliding_window(6, 0)), atol=1e-5)
    grads = []
    for fn in (lambda a, b, c: loc(a, b, c), lambda a, b, c: salience.reference.attention(
            a, b, c, mask=M.sliding_window(6, 6)).out):
        xs = [t.double().clone().requires_grad_() for t in (q, k, v)]
        fn(*xs).pow(2).sum().backward()
        grads.append([t.grad for t in xs])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


# --------------------------------------------------------------------------------------------------- cost


def _flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_cost_grows_linearly_in_length_for_the_efficient_layers():
    """Matmul FLOPs (counted, not timed) at L and 2L: x2 for every efficient layer, x4 for exact attention."""
    D = 16
    layers = {
        "linear": lambda q, k, v: LinearAttention()(q, k, v),
        "linear causal": lambda q, k, v: LinearAttention()(q, k, v, mask=M.causal()),
        "performer": lambda q, k, v: PerformerAttention(D, 64)(q, k, v),
        "performer causal": lambda q, k, v: PerformerAttention(D, 64)(q, k, v, mask=M.causal()),
        "nystrom": lambda q, k, v: NystromAttention(32)(q, k, v),
        "linformer": lambda q, k, v: LinformerAttention(2048, 32)(q, k, v),
        "local": lambda q, k, v: LocalAttention(64)(q, k, v),
    }
    inputs = {L: tuple(torch.randn(1, 1, L, D) for _ in range(3)) for L in (512, 1024)}
    for name, fn in layers.items():
        ratio = _flops(lambda f=fn: f(*inputs[1024])) / _flops(lambda f=fn: f(*inputs[512]))
        assert 1.5 <= ratio <= 2.1, (name, ratio)
    dense = M.sliding_window(10**6, 10**6)  # forces the dense path (no fused shortcut)
    ratio = _flops(lambda: salience.attention(*inputs[1024], mask=dense)) / _flops(
        lambda: salience.attention(*inputs[512], mask=dense))
    assert ratio > 3.5


# ------------------------------------------------------------------------------------------------- errors


def test_core_errors():
    q = k = v = torch.randn(1, 2, 8, 4)
    cases = [
        (lambda: LinearAttention(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (lambda: LinearAttention(feature_map=3), TypeError, "feature_map must be callable"),
        (lambda: LinearAttention()(q, k, v, scale=0.5), ValueError, "no softmax scale"),
        (lambda: LinearAttention()(q, k, v, mask=M.sliding_window(2)), ValueError, "supports mask=None"),
        (lambda: LinearAttention()(q, k[:, :, :5], v[:, :, :5], mask=M.causal()), ValueError, "L == S"),
        (lambda: LinearAttention()(q, k, v, score_mod=Sc.alibi(2)), ValueError, "cannot apply"),
        (lambda: LinearAttention()(q, k, v, kv_lengths=[9]), ValueError, "kv_lengths must lie in"),
        (lambda: LinearAttention()(q, k, v, kv_lengths=[1, 2]), ValueError, "B=1 integer lengths"),
        (lambda: LinearAttention()(q[0], k, v), ValueError, "4 dimensions"),
        (lambda: PerformerAttention(4, 0), ValueError, "num_features must be >= 1"),
        (lambda: PerformerAttention(4, orthogonal=1), TypeError, "orthogonal must be a bool"),
        (lambda: PerformerAttention(8)(q, k, v), ValueError, "head_dim=8"),
        (lambda: NystromAttention(0), ValueError, "num_landmarks must be >= 1"),
        (lambda: NystromAttention(2)(q, k, v, mask=M.causal()), ValueError, "no causal or masked form"),
        (lambda: NystromAttention(2)(q, k, v, mask=M.sliding_window(2)), ValueError, "takes no mask"),
        (lambda: LinformerAttention(8, 9), ValueError, "exceeds seq_len"),
        (lambda: LinformerAttention(4, 2)(q, k, v), ValueError, "exceeds seq_len=4"),
        (lambda: LinformerAttention(8, 2)(q, k, v, mask=M.causal()), ValueError, "no causal or masked form"),
        (lambda: LocalAttention(-1), ValueError, "left must be >= 0"),
        (lambda: LocalAttention(2, right=1.5), TypeError, "right must be an int"),
        (lambda: MultiHeadAttention(8, 2, core=LinearAttention())(torch.randn(1, 3, 8), key_lengths=[4]), ValueError,
         "key_lengths must lie in"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
