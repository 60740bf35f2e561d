"""Float bias tensors: kernels.bias's executor and salience.attention(bias=) against the float64 reference and
torch SDPA's float attn_mask, forward and backward (dq, dk, dv, dbias), with -inf rows/tiles, masks and GQA."""

import pytest
import torch
import torch.nn.functional as F

import salience
from salience import masks, reference, scores
from salience.kernels import bias as kb
from salience.kernels import dispatch
from salience.testing import assert_rel_close

NEG = float("-inf")
SMALL = kb.BiasConfig(rows=16, kv_tile=16, grad_rows=8)


def _qkv(B, H, Hkv, L, S, D, dtype=torch.float64):
    return (torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype),
            torch.randn(B, Hkv, S, D, dtype=dtype))


def _causal_bias(shape, L, S, dtype=torch.float64):
    """A random bias of ``shape`` with -inf structure: above the diagonal, an all -inf row 5 and an -inf tile
    (or padded keys for a key bias, row 5 for a row bias)."""
    if shape == "band":  # query i sees keys i-12 .. i+3: per row-block windows, no causal structure
        i = torch.arange(L).view(-1, 1)
        j = torch.arange(S).view(1, -1)
        return torch.randn(1, 4, L, S, dtype=dtype).masked_fill((j < i - 12) | (j > i + 3), NEG)
    b = torch.randn(shape, dtype=dtype)
    Lb, Sb = shape[-2], shape[-1]
    hide = torch.zeros(Lb, Sb, dtype=torch.bool)
    if Lb > 1 and Sb > 1:
        hide = torch.ones(L, S, dtype=torch.bool).triu(1)
        hide[5] = True
        hide[40:56, 0:16] = True
    elif Sb > 1:  # a key bias: the last keys padded
        hide[:, 40:] = True
    else:  # a row bias: row 5 sees nothing
        hide[5] = True
    return b.masked_fill(hide, NEG)


def _run_executor(q, k, v, bias, mask=None, scale=0.3, config=SMALL):
    ex, det = kb.executor(q, k, v, bias, mask=mask, scale=scale, need_grad=True, config=config)
    plan = dispatch.Plan("bias", "test", det, ex)
    return dispatch.run(plan, q, k, v), det


def _grads(res_out, res_lse, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(res_out.shape, generator=g, dtype=torch.float64).to(res_out.dtype)
    dl = torch.randn(res_lse.shape, generator=g, dtype=torch.float64)
    fin = torch.isfinite(res_lse)
    loss = (res_out * do).sum() + (torch.where(fin, res_lse, 0) * dl.to(res_lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


SHAPES = [(2, 4, 64, 48), (1, 4, 64, 48), (64, 48), (2, 1, 1, 48), (1, 4, 64, 1), (4, 1, 48), "band"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", [None, "window"])
def test_executor_matches_reference_fwd_bwd(shape, mask):
    B, H, Hkv, L, S, D = 2, 4, 2, 64, 48, 8
    m = masks.sliding_window(20) if mask else None
    for dtype in (torch.float32, torch.float64):
        q64, k64, v64 = _qkv(B, H, Hkv, L, S, D)
        b64 = _causal_bias(shape, L, S)
        leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64, b64)]
        ref = reference.attention(*leaves64[:3], bias=leaves64[3], mask=m, scale=0.3)
        g64 = _grads(ref.out, ref.lse, leaves64)
        leaves_t = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        ref_t = reference.attention(*leaves_t[:3], bias=leaves_t[3], mask=m, scale=0.3)
        gt = _grads(ref_t.out, ref_t.lse, leaves_t)
        fast = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        res, det = _run_executor(*fast[:3], fast[3], mask=m.bind(L, S) if m else None)
        gf = _grads(res.out, res.lse, fast)
        assert_rel_close(res.out, ref_t.out, ref.out, what=f"out {shape} {dtype}")
        assert torch.equal(torch.isneginf(res.lse), torch.isneginf(ref.lse))
        assert_rel_close(res.lse, ref_t.lse, ref.lse, what="lse")
        for name, a, b, c in zip(("dq", "dk", "dv", "dbias"), gf, gt, g64):
            assert_rel_close(a, b, c, what=f"{name} {shape} {dtype}", magnitude=10.0)


def test_structure_is_found_and_skipped():
    L = S = 256
    q, k, v = _qkv(1, 2, 2, L, S, 16, torch.float32)
    causal = torch.full((L, S), NEG).triu(1)
    ex, det = kb.executor(q, k, v, causal, scale=0.25, need_grad=False, config=kb.BiasConfig(rows=32))
    assert det["blocks"] == 1 and det["is_causal"] and det["skipped"] == pytest.approx(1 - (L + 1) / (2 * L), abs=1e-4)
    assert len(ex.tile_blocks) == 8  # the dbias tiles still use the windows
    band = causal + torch.full((L, S), NEG).tril(-33)  # query i sees keys i-32 .. i
    ex, det = kb.executor(q, k, v, band, scale=0.25, need_grad=False, config=kb.BiasConfig(rows=32))
    assert det["blocks"] == 8 and not det["is_causal"] and det["skipped"] > 0.7
    # windows: every key outside a block's window is -inf for every row of the block
    for blk in ex.blocks:
        rows = band[blk.r0:blk.r1]
        assert bool(torch.isneginf(rows[:, :blk.lo]).all()) and bool(torch.isneginf(rows[:, blk.hi:]).all())
    dense = torch.randn(L, S)
    _, det2 = kb.executor(q, k, v, dense, scale=0.25, need_grad=False)
    assert det2["blocks"] == 1 and det2["skipped"] == 0


def test_all_neg_inf_rows_zero_and_no_nan():
    q, k, v = _qkv(1, 2, 1, 32, 32, 8, torch.float32)
    bias = torch.randn(1, 2, 32, 32)
    bias[:, :, 3] = NEG
    bias[:, 1, 10:20] = NEG
    for b in (bias, bias.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), NEG)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
        res, _ = _run_executor(*leaves[:3], leaves[3], scale=0.3, config=kb.DEFAULT)
        assert not torch.isnan(res.out).any()
        assert res.out[:, :, 3].abs().max() == 0 and res.out[:, 1, 10:20].abs().max() == 0
        assert torch.isneginf(res.lse[:, :, 3]).all() and torch.isneginf(res.lse[:, 1, 10:20]).all()
        grads = _grads(res.out, res.lse, leaves)
        assert all(not torch.isnan(g).any() for g in grads)
        assert grads[0][:, :, 3].abs().max() == 0 and grads[3][:, :, 3].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("structured", [False, True])
def test_matches_torch_sdpa_attn_mask(dtype, structured):
    B, H, L, S, D = 2, 4, 96, 96, 16
    q, k, v = (t.to(dtype) for t in _qkv(B, H, H, L, S, D))
    bias = torch.randn(B, H, L, S)
    if structured:
        bias = bias.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), NEG)
    bias = bias.to(dtype)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    peer = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    res, _ = _run_executor(q, k, v, bias, scale=D ** -0.5, config=kb.BiasConfig(rows=32))
    assert_rel_close(res.out, peer, ref, what=f"vs SDPA {dtype}")


def test_bias_grad_vs_gradcheck():
    q, k, v = _qkv(1, 2, 1, 12, 10, 4)
    bias = _causal_bias((1, 2, 12, 10), 12, 10)
    bias[:, :, 5] = 0.3  # row 5 visible again (gradcheck needs finite outputs' derivatives)
    cfg = kb.BiasConfig(rows=4, kv_tile=4, grad_rows=2)

    def f(q_, k_, v_, b_):
        ex, det = kb.executor(q_, k_, v_, b_, mask=None, scale=0.5, need_grad=True, config=cfg)
        return dispatch.run(dispatch.Plan("bias", "t", det, ex), q_, k_, v_).out

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    # finite differences through -inf entries are undefined: perturb only the finite ones (mask the -inf ones out)
    assert torch.autograd.gradcheck(lambda a, b_, c, d: f(a, b_, c, torch.where(torch.isneginf(bias), bias, d)),
                                    leaves, eps=1e-6, atol=1e-7)


def test_gqa_bias_per_query_head():
    q, k, v = _qkv(1, 8, 2, 40, 40, 8, torch.float32)
    bias = torch.randn(1, 8, 40, 40).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), NEG)
    res, _ = _run_executor(q, k, v, bias, scale=0.3)
    ref64 = reference.attention(q.double(), k.double(), v.double(), bias=bias.double(), scale=0.3).out
    ref32 = reference.attention(q, k, v, bias=bias, scale=0.3).out
    assert_rel_close(res.out, ref32, ref64)


def test_nan_at_hidden_key_does_not_change_rows():
    q, k, v = _qkv(1, 2, 2, 32, 32, 8, torch.float32)
    bias = torch.randn(32, 32).masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), NEG)
    v2 = v.clone()
    v2[:, :, 20] = float("nan")  # only rows >= 20 see key 20
    clean, _ = _run_executor(q, k, v, bias)
    res, _ = _run_executor(q, k, v2, bias)
    assert torch.equal(res.out[:, :, :20], clean.out[:, :, :20])
    assert torch.isnan(res.out[:, :, 20:]).all(-1).all()


def test_public_attention_bias_and_weights_agree():
    B, H, L, S, D = 2, 4, 40, 40, 8
    q, k, v = _qkv(B, H, 2, L, S, D, torch.float32)
    bias = torch.randn(1, H, L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), NEG)
    r = salience.attention(q, k, v, bias=bias, return_lse=True)
    ref = reference.attention(q.double(), k.double(), v.double(), bias=bias.double())
    assert_rel_close(r.out, reference.attention(q, k, v, bias=bias).out, ref.out)
    w = salience.attention_weights(q, k, bias=bias, heads=[1, 3], rows=[0, 7, 39])
    w_lse = salience.attention_weights(q, k, bias=bias, heads=[1, 3], rows=[0, 7, 39], lse=r.lse)
    want = ref.weights[:, [1, 3]][:, :, [0, 7, 39]]
    assert torch.allclose(w.double(), want, atol=1e-5) and torch.allclose(w_lse.double(), want, atol=1e-5)
    pl = salience.plan(q, k, v, bias=bias)
    assert pl.backend in dispatch.BACKENDS


def test_public_bias_with_score_mod_order():
    """score_mod first, then + bias, then the mask: -inf in the bias hides a key even under softcap."""
    q, k, v = _qkv(1, 2, 2, 24, 24, 8)
    bias = torch.randn(24, 24, dtype=torch.float64).masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), NEG)
    sm = scores.softcap(2.0)
    out = salience.attention(q, k, v, bias=bias, score_mod=sm, mask=masks.sliding_window(6))
    s = sm(q @ k.transpose(-1, -2) / 8 ** 0.5, None, None, None, None) + bias
    s = s.masked_fill(~masks.sliding_window(6).to_dense(1, 1, 24, 24), NEG)
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-12)


def test_compat_sdpa_float_mask_uses_bias_and_grads():
    from salience import compat

    q, k, v = _qkv(2, 2, 2, 16, 16, 8)
    am = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    out = compat.scaled_dot_product_attention(q, k, v, attn_mask=am)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
    assert torch.allclose(out, ref, atol=1e-12)
    g1, = torch.autograd.grad(out.sum(), am)
    g2, = torch.autograd.grad(ref.sum(), am)
    assert torch.allclose(g1, g2, atol=1e-12)


@pytest.mark.parametrize("bad, err, words", [
    (torch.ones(2, 3, 16, 16), ValueError, "H axis has size 3"),
    (torch.ones(3, 4, 16, 16), ValueError, "B axis has size 3"),
    (torch.ones(16, 15), ValueError, "S axis has size 15"),
    (torch.ones(1, 1, 1, 16, 16), ValueError, "5 axes"),
    (torch.ones(16, 16, dtype=torch.bool), TypeError, "use mask="),
    (torch.ones(16, 16, dtype=torch.int64), TypeError, "floating-point"),
    ([[0.0]], TypeError, "got list"),
])
def test_bad_bias_raises(bad, err, words):
    q = torch.randn(2, 4, 16, 8)
    with pytest.raises(err, match=words):
        salience.attention(q, q[:, :2], q[:, :2], bias=bad)
    with pytest.raises(err, match=words):
        salience.plan(q, q[:, :2], q[:, :2], bias=bad)


def test_bad_bias_device_raises():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="bias.to"):
        salience.attention(q, q, q, bias=torch.zeros(8, 8, device="meta"))


def test_window_cache_reused_and_invalidated():
    q, k, v = _qkv(1, 2, 2, 64, 64, 8, torch.float32)
    bias = torch.zeros(64, 64).masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), NEG)
    b4 = kb.check_bias(bias, 1, 2, 64, 64, "cpu")
    w1 = kb.key_windows(bias, b4, 64, 64, 16)
    assert kb.key_windows(bias, b4, 64, 64, 16) is w1
    bias.fill_(0.0)  # in place: a new version, the windows are recomputed (no -inf left)
    assert kb.key_windows(bias, kb.check_bias(bias, 1, 2, 64, 64, "cpu"), 64, 64, 16) is None


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias_grad", [False, True])
def test_bfloat16_inputs_with_any_bias_dtype(bias_dtype, bias_grad):
    q64, k64, v64 = _qkv(2, 4, 4, 80, 80, 16)
    b64 = torch.randn(1, 4, 80, 80, dtype=torch.float64).masked_fill(torch.ones(80, 80, dtype=torch.bool).triu(1), NEG)
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64, b64)]
    r64 = reference.attention(*leaves64[:3], bias=leaves64[3])
    g64 = torch.autograd.grad(r64.out.pow(2).sum(), leaves64[:3] + leaves64[3:] * bias_grad)

    def make():
        return [t.detach().bfloat16().requires_grad_() for t in (q64, k64, v64)] + [
            b64.detach().to(bias_dtype).requires_grad_(bias_grad)]

    lt, lf = make(), make()
    rt = reference.attention(*lt[:3], bias=lt[3])
    gt = torch.autograd.grad(rt.out.float().pow(2).sum(), lt[:3] + lt[3:] * bias_grad)
    res, _ = _run_executor(*lf[:3], lf[3], scale=0.25, config=kb.DEFAULT)
    gf = torch.autograd.grad(res.out.float().pow(2).sum(), lf[:3] + lf[3:] * bias_grad)
    assert res.out.dtype == torch.bfloat16
    assert_rel_close(res.out, rt.out, r64.out, what="out")
    for name, a, b, c in zip("qkvb", gf, gt, g64):
        assert a.dtype == b.dtype
        assert_rel_close(a, b, c, what=f"d{name}")


@pytest.mark.parametrize("mask", [masks.causal(), masks.causal(align="bottom_right")])
def test_causal_mask_with_bias_runs_is_causal(mask):
    L = S = 96
    q64, k64, v64 = _qkv(1, 4, 2, L, S, 8)
    b64 = torch.randn(1, 4, L, S, dtype=torch.float64)
    b64[:, :, 7] = NEG
    ex, det = kb.executor(q64, k64, v64, b64, mask=mask.bind(L, S), scale=0.3, need_grad=False, config=SMALL)
    assert det["is_causal"] and det["blocks"] == 1
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64, b64)]
    ref = reference.attention(*leaves64[:3], bias=leaves64[3], mask=mask, scale=0.3)
    g64 = _grads(ref.out, ref.lse, leaves64)
    lt = [t.detach().float().requires_grad_() for t in leaves64]
    ref_t = reference.attention(*lt[:3], bias=lt[3], mask=mask, scale=0.3)
    gt = _grads(ref_t.out, ref_t.lse, lt)
    lf = [t.detach().float().requires_grad_() for t in leaves64]
    res, _ = _run_executor(*lf[:3], lf[3], mask=mask.bind(L, S))
    gf = _grads(res.out, res.lse, lf)
    assert_rel_close(res.out, ref_t.out, ref.out)
    for name, a, b, c in zip(("dq", "dk", "dv", "dbias"), gf, gt, g64):
        assert_rel_close(a, b, c, what=name, magnitude=10.0)
