"""salience.compat against its peers: torch SDPA, FlexAttention's eager path, a float64 reference of
flash-attention's definition; the new factories behind them (bottom-right and per-sequence windows, ALiBi
with an offset and per-batch slopes); and MultiHeadAttention's torch arguments."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import salience
from salience import compat as C
from salience import masks as M
from salience import scores as Sc

f64 = torch.float64


def _close(a, b, tol=1e-9):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    (out * g).sum().backward()
    return out.detach(), [x.grad for x in xs]


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- torch SDPA


def _sdpa_cases():
    g = torch.Generator().manual_seed(1)
    B, H, L, S = 2, 4, 9, 13
    yield "none", (B, H, L, S), {}
    yield "bool4d", (B, H, L, S), {"attn_mask": torch.rand(B, H, L, S, generator=g) > 0.4}
    yield "bool2d", (B, H, L, S), {"attn_mask": torch.rand(L, S, generator=g) > 0.3}
    yield "bool_fully_masked_row", (B, H, L, S), {"attn_mask": torch.ones(L, S, dtype=torch.bool).index_fill(0, torch.tensor([2]), False)}
    yield "float", (B, H, L, S), {"attn_mask": torch.randn(B, 1, L, S, generator=g, dtype=f64)}
    yield "float_zero_inf", (B, H, L, S), {"attn_mask": torch.zeros(L, S, dtype=f64).masked_fill(torch.rand(L, S, generator=g) > 0.6, float("-inf"))}
    yield "key_padding", (B, H, L, S), {"attn_mask": (torch.arange(S) < torch.tensor([9, 13]).view(2, 1)).view(2, 1, 1, S)}
    yield "causal_LneS", (B, H, L, S), {"is_causal": True}
    yield "causal_LgtS", (B, H, S, L), {"is_causal": True}
    yield "scale", (B, H, L, S), {"scale": 0.3, "attn_mask": torch.rand(L, S, generator=g) > 0.3}
    yield "gqa", (B, H, L, S, 2), {"enable_gqa": True, "is_causal": True}
    yield "3d_inputs", (3, None, L, S), {"attn_mask": torch.rand(3, L, S, generator=g) > 0.3}


@pytest.mark.parametrize("name,shape,kw", list(_sdpa_cases()), ids=[c[0] for c in _sdpa_cases()])
def test_sdpa_matches_torch(name, shape, kw):
    B, H, L, S = shape[:4]
    Hkv = shape[4] if len(shape) > 4 else H
    D = 8
    if H is None:
        q, k, v = _rand(B, L, D, seed=1), _rand(B, S, D, seed=2), _rand(B, S, D + 2, seed=3)
    else:
        q, k, v = _rand(B, H, L, D, seed=1), _rand(B, Hkv, S, D, seed=2), _rand(B, Hkv, S, D + 2, seed=3)
    out, grads = _grads(lambda a, b, c: C.scaled_dot_product_attention(a, b, c, **kw), q, k, v)
    ref, rgrads = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kw), q, k, v)
    _close(out, ref)
    for g, r in zip(grads, rgrads):
        _close(g, r)


def test_sdpa_float_mask_gradient():
    q, k, v = _rand(1, 2, 5, 4, seed=1), _rand(1, 2, 6, 4, seed=2), _rand(1, 2, 6, 4, seed=3)
    bias = _rand(1, 2, 5, 6, seed=4)
    _, (gb,) = _grads(lambda b: C.scaled_dot_product_attention(q, k, v, attn_mask=b), bias)
    _, (rb,) = _grads(lambda b: F.scaled_dot_product_attention(q, k, v, attn_mask=b), bias)
    _close(gb, rb)


def test_sdpa_more_batch_dims():
    q, k, v = _rand(2, 3, 2, 5, 8, seed=1), _rand(2, 3, 2, 7, 8, seed=2), _rand(2, 3, 2, 7, 3, seed=3)
    for m in (torch.rand(3, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.3, _rand(2, 1, 1, 5, 7, seed=4)):
        _close(C.scaled_dot_product_attention(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, attn_mask=m))


def test_sdpa_fast_paths_and_errors():
    q = torch.randn(2, 4, 512, 32)
    assert C.plan(C.scaled_dot_product_attention, q, q, q, is_causal=True).backend == "sdpa"
    assert C.plan(C.scaled_dot_product_attention, q, q, q).backend == "sdpa"
    tri = torch.ones(512, 512, dtype=torch.bool).tril()
    assert C.plan(C.scaled_dot_product_attention, q, q, q, attn_mask=tri).backend == "sdpa"
    kp = (torch.arange(512) < torch.tensor([300, 512]).view(2, 1)).view(2, 1, 1, 512)
    assert C.plan(C.scaled_dot_product_attention, q, q, q, attn_mask=kp).backend != "reference"
    inf_mask = torch.zeros(512, 512).masked_fill(~tri, float("-inf"))
    assert C.plan(C.scaled_dot_product_attention, q, q, q, attn_mask=inf_mask).backend == "sdpa"
    with pytest.raises(ValueError, match="enable_gqa"):
        C.scaled_dot_product_attention(q, q[:, :2], q[:, :2])
    with pytest.raises(ValueError, match="broadcast"):
        C.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 512, 512, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- FlexAttention


def _torch_flex():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    return fa.flex_attention, fa.create_block_mask


def _rel_bias(score, b, h, q_idx, kv_idx):
    return score + 0.1 * (h + 1) * torch.tanh((kv_idx - q_idx).to(score.dtype) / 4)


def _window_mask(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 5)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("which", ["score_mod", "torch_block_mask", "compat_block_mask", "both"])
def test_flex_matches_torch_eager(which, gqa):
    flex, torch_cbm = _torch_flex()
    B, H, L, S, D = 2, 4, 24, 24, 8
    Hkv = 2 if gqa else H
    q, k, v = _rand(B, H, L, D, seed=1), _rand(B, Hkv, S, D, seed=2), _rand(B, Hkv, S, D, seed=3)
    sm = _rel_bias if which in ("score_mod", "both") else None
    tbm = cbm = None
    if which in ("torch_block_mask", "both"):
        tbm = torch_cbm(_window_mask, None, None, L, S, device="cpu")
        cbm = tbm
    elif which == "compat_block_mask":
        tbm = torch_cbm(_window_mask, None, None, L, S, device="cpu")
        cbm = C.create_block_mask(_window_mask, None, None, L, S)
    kw = dict(enable_gqa=gqa, scale=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (out, lse) = C.flex_attention(q, k, v, score_mod=sm, block_mask=cbm, return_lse=True, **kw)
        ref, rlse = flex(q, k, v, score_mod=sm, block_mask=tbm, return_lse=True, **kw)
        _close(out, ref)
        _close(lse.to(f64), rlse.to(f64))
    # torch's flex_attention has no backward on CPU: the gradients are checked against FlexAttention's
    # definition written densely (scaled scores, score_mod, mask_mod, softmax) in float64
    def dense(a, b, c):
        b, c = b.repeat_interleave(H // Hkv, dim=1), c.repeat_interleave(H // Hkv, dim=1)
        s = a @ b.transpose(-1, -2) * kw["scale"]
        idx = [torch.arange(n).view(*[n if d == ax else 1 for d in range(4)]) for ax, n in enumerate(s.shape)]
        if sm is not None:
            s = sm(s, *idx)
        if tbm is not None:
            s = s.masked_fill(~_window_mask(*idx), float("-inf"))
        return torch.softmax(s, -1) @ c

    _close(dense(q, k, v), ref)
    _, grads = _grads(lambda a, b, c: C.flex_attention(a, b, c, score_mod=sm, block_mask=cbm, **kw), q, k, v)
    _, rgrads = _grads(dense, q, k, v)
    for g, r in zip(grads, rgrads):
        _close(g, r)


def test_flex_block_mask_fast_paths_and_errors():
    q = torch.randn(1, 2, 1024, 32)
    bm = C.create_block_mask(M.causal() & M.sliding_window(128), None, None, 1024, 1024)
    assert C.plan(C.flex_attention, q, q, q, block_mask=bm).backend == "spans"
    bm2 = C.create_block_mask(_window_mask, 1, 1, 1024, 1024)
    p2 = C.plan(C.flex_attention, q, q, q, block_mask=bm2)  # a user's window lambda: its structure derived once
    assert p2.backend == "spans" and "derived" in p2.reason, p2
    assert bm2.to_dense().shape == (1, 1, 1024, 1024) and "CompatBlockMask" in repr(bm2)
    with pytest.raises(ValueError, match="Q_LEN"):
        C.flex_attention(q, q, q, block_mask=C.create_block_mask(_window_mask, 1, 1, 512, 1024))
    with pytest.raises(ValueError, match="enable_gqa"):
        C.flex_attention(q, q[:, :1], q[:, :1])


# ---------------------------------------------------------------------------------------------- flash-attention


def flash_reference(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None):
    """flash-attention's definition in float64, (B, L, H, D): scaled scores, softcap, bottom-right window/causal
    mask, ALiBi ``-slope * |i + S - L - j|``, softmax; rows with no visible key give 0. Returns out, lse, probs."""
    B, L, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("blhd,bshd->bhls", q, k) * (1 / math.sqrt(D) if scale is None else scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    off = S - L
    left, right = window_size
    if causal:
        right = 0
    vis = torch.ones(L, S, dtype=torch.bool)
    if left >= 0:
        vis &= j >= i + off - left
    if right >= 0:
        vis &= j <= i + off + right
    if alibi_slopes is not None:
        sl = alibi_slopes.to(f64).reshape(-1, H, 1, 1)
        s = s - sl * (i + off - j).abs().to(f64)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhls,bshd->blhd", p, v), lse, p


_FLASH = [
    dict(),
    dict(causal=True),
    dict(window_size=(3, 2)),
    dict(window_size=(4, -1)),
    dict(window_size=(-1, 1)),
    dict(causal=True, window_size=(3, -1)),
    dict(softcap=2.0, causal=True),
    dict(alibi="head", causal=True),
    dict(alibi="batch"),
    dict(alibi="batch", window_size=(3, 3), softcap=1.5),
    dict(scale=0.2, causal=True),
]


@pytest.mark.parametrize("LS", [(7, 13), (13, 7), (12, 12)], ids=lambda x: f"L{x[0]}S{x[1]}")
@pytest.mark.parametrize("case", _FLASH, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_flash_attn_func_matches_definition(case, LS):
    L, S = LS
    B, H, Hk, D = 2, 4, 2, 8
    q, k, v = _rand(B, L, H, D, seed=1), _rand(B, S, Hk, D, seed=2), _rand(B, S, Hk, D, seed=3)
    kw = {n: x for n, x in case.items() if n not in ("alibi", "scale")}
    slopes = None
    if case.get("alibi") == "head":
        slopes = Sc.alibi_slopes(H)
    elif case.get("alibi") == "batch":
        slopes = torch.rand(B, H, generator=torch.Generator().manual_seed(9)) + 0.1
    out, lse, probs = C.flash_attn_func(q, k, v, softmax_scale=case.get("scale"), alibi_slopes=slopes,
                                        return_attn_probs=True, **kw)
    ref, rlse, rprobs = flash_reference(q, k, v, alibi_slopes=slopes, scale=case.get("scale"), **kw)
    _close(out, ref)
    _close(lse, rlse)
    _close(probs, rprobs)
    _, grads = _grads(lambda a, b, c: C.flash_attn_func(a, b, c, softmax_scale=case.get("scale"),
                                                        alibi_slopes=slopes, **kw), q, k, v)
    _, rgrads = _grads(lambda a, b, c: flash_reference(a, b, c, alibi_slopes=slopes, scale=case.get("scale"),
                                                       **kw)[0], q, k, v)
    for g, r in zip(grads, rgrads):
        _close(g, r)


def _varlen_reference(q, k, v, cq, ck, slopes=None, **kw):
    outs, lses = [], []
    for b in range(len(cq) - 1):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        o, lse, _ = flash_reference(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                                    alibi_slopes=sl, **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("lengths", ["equal", "unequal"])
@pytest.mark.parametrize("case", [dict(), dict(causal=True), dict(window_size=(2, 1)), dict(alibi="head", causal=True),
                                  dict(alibi="batch", softcap=1.0)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_flash_attn_varlen_matches_definition(case, lengths):
    H, Hk, D = 4, 2, 8
    lq = [5, 9, 1, 7]
    lk = lq if lengths == "equal" else [8, 4, 3, 7]
    cq = [0] + torch.tensor(lq).cumsum(0).tolist()
    ck = [0] + torch.tensor(lk).cumsum(0).tolist()
    q, k, v = _rand(cq[-1], H, D, seed=1), _rand(ck[-1], Hk, D, seed=2), _rand(ck[-1], Hk, D, seed=3)
    kw = {n: x for n, x in case.items() if n != "alibi"}
    slopes = None
    if case.get("alibi") == "head":
        slopes = Sc.alibi_slopes(H)
    elif case.get("alibi") == "batch":
        slopes = torch.rand(4, H, generator=torch.Generator().manual_seed(9)) + 0.1
    cuq, cuk = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)

    def run(a, b, c):
        return C.flash_attn_varlen_func(a, b, c, cuq, cuk, max(lq), max(lk), alibi_slopes=slopes, **kw)

    out, grads = _grads(run, q, k, v)
    ref, rgrads = _grads(lambda a, b, c: _varlen_reference(a, b, c, cq, ck, slopes, **kw)[0], q, k, v)
    _close(out, ref)
    for g, r in zip(grads, rgrads):
        _close(g, r)
    o2, lse, probs = C.flash_attn_varlen_func(q, k, v, cuq, cuk, max(lq), max(lk), alibi_slopes=slopes,
                                              return_attn_probs=True, **kw)
    _close(o2, ref)
    _close(lse, _varlen_reference(q, k, v, cq, ck, slopes, **kw)[1])
    assert probs.shape == (4, H, max(lq), max(lk))
    _close(probs.sum(-1)[0, :, :lq[0]], torch.ones(H, lq[0], dtype=f64))  # sequence 0: every row sees a key


def test_flash_fast_paths_and_errors():
    q, k = torch.randn(1, 512, 4, 32), torch.randn(1, 768, 4, 32)
    assert C.plan(C.flash_attn_func, q, q, q, causal=True).backend == "sdpa"
    assert C.plan(C.flash_attn_func, q, k, k, causal=True).backend == "spans"
    assert C.plan(C.flash_attn_func, q, k, k, window_size=(128, 16)).backend == "spans"
    assert C.plan(C.flash_attn_func, q, k, k, causal=True, alibi_slopes=Sc.alibi_slopes(4)).backend == "spans"
    plans = C.plan(C.flash_attn_func, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                   causal=True, alibi_slopes=torch.rand(2, 4))
    assert [p.backend for p in plans] == ["spans", "spans"]
    assert C.plan(C.flash_attn_func, q, k, k, softcap=30.0, causal=True).backend == "blockwise"
    x = torch.randn(1024, 4, 32)
    cu = torch.tensor([0, 300, 700, 1024], dtype=torch.int32)
    assert C.plan(C.flash_attn_varlen_func, x, x, x, cu, cu, 400, 400, causal=True).backend == "spans"
    assert C.plan(C.flash_attn_varlen_func, x, x, x, cu, cu, 400, 400, alibi_slopes=Sc.alibi_slopes(4),
                  window_size=(64, 0)).backend == "spans"
    with pytest.raises(ValueError, match="alibi_slopes"):
        C.flash_attn_func(q, q, q, alibi_slopes=torch.rand(3))
    with pytest.raises(ValueError, match="window_size"):
        C.flash_attn_func(q, q, q, window_size=4)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        C.flash_attn_varlen_func(x, x, x, torch.tensor([0, 700, 300]), cu, 700, 400)
    with pytest.raises(ValueError, match="max_seqlen"):
        C.flash_attn_varlen_func(x, x, x, cu, cu, 100, 400)


# ---------------------------------------------------------------------------------------------- new factories


def test_bottom_right_and_per_sequence_windows():
    L, S = 5, 9
    i, j = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    d = j - i - (S - L)
    got = M.sliding_window(2, 1, align="bottom_right").to_dense(1, 1, L, S)[0, 0]
    assert torch.equal(got, (d >= -2) & (d <= 1))
    assert torch.equal(M.sliding_window(None, 1, align="bottom_right").to_dense(1, 1, L, S)[0, 0], d <= 1)
    assert torch.equal(M.sliding_window(2, None).to_dense(1, 1, L, S)[0, 0], (j - i) >= -2)
    ql, kl = torch.tensor([3, 5]), torch.tensor([9, 4])
    got = M.causal("bottom_right", q_lengths=ql, kv_lengths=kl).to_dense(2, 1, L, S)[:, 0]
    for b in range(2):
        assert torch.equal(got[b], j <= i + kl[b] - ql[b])
    got = M.sliding_window(1, 0, align="bottom_right", q_lengths=ql, kv_lengths=kl).to_dense(2, 1, L, S)[:, 0]
    for b in range(2):
        db = j - i - (kl[b] - ql[b])
        assert torch.equal(got[b], (db >= -1) & (db <= 0))
    # per-sequence & padding through salience.attention equals each sequence on its own
    q, k = _rand(2, 2, L, 4, seed=1), _rand(2, 2, S, 4, seed=2)
    m = M.causal("bottom_right", q_lengths=ql, kv_lengths=kl) & M.padding(ql, kl)
    out = salience.attention(q, k, k, mask=m)
    for b in range(2):
        one = salience.attention(q[b:b + 1, :, :ql[b]], k[b:b + 1, :, :kl[b]], k[b:b + 1, :, :kl[b]],
                                 mask=M.causal("bottom_right"))
        _close(out[b:b + 1, :, :ql[b]], one)
    with pytest.raises(ValueError, match="bottom_right"):
        M.causal(q_lengths=ql, kv_lengths=kl)
    with pytest.raises(ValueError, match="kv_lengths"):
        salience.attention(q[:1], k[:1], k[:1], mask=M.causal("bottom_right", q_lengths=ql, kv_lengths=kl))
    q2 = torch.randn(1, 2, 600, 16)
    k2 = torch.randn(1, 2, 1000, 16)
    assert salience.plan(q2, k2, k2, mask=M.sliding_window(64, 0, align="bottom_right")).backend == "spans"


def test_alibi_offset_and_per_batch_slopes():
    s = torch.zeros(2, 2, 3, 5, dtype=f64)
    b, h, qi, ki = (torch.arange(n).view(*[n if d == a else 1 for d in range(4)]) for a, n in enumerate(s.shape))
    sl = torch.tensor([0.5, 0.25], dtype=f64)
    got = Sc.alibi(sl, offset=2)(s, b, h, qi, ki)
    _close(got, (-sl.view(1, 2, 1, 1) * (qi + 2 - ki).abs()).expand_as(got))
    slb = torch.tensor([[0.5, 0.25], [1.0, 2.0]], dtype=f64)
    got = Sc.alibi(slb)(s, b, h, qi, ki)
    _close(got, -slb.view(2, 2, 1, 1) * (qi - ki).abs())
    assert Sc.alibi(slb[:1].expand(2, 2)).name.startswith("alibi(<2 slopes>")  # equal rows: per-head, fast path
    q = _rand(3, 2, 6, 4)
    with pytest.raises(ValueError, match="batch"):
        salience.attention(q, q, q, score_mod=Sc.alibi(slb))
    with pytest.raises(TypeError, match="offset"):
        Sc.alibi(2, offset=1.5)


# ---------------------------------------------------------------------------------------------- MultiHeadAttention


def _mha_pair(batch_first):
    from salience.layers import MultiHeadAttention

    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=f64)
    return ref, MultiHeadAttention.from_torch(ref)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["bool2d", "bool3d", "float2d", "float3d", "causal", "causal+padding", "none"])
@pytest.mark.parametrize("average", [True, False])
def test_multihead_torch_arguments(kind, batch_first, average):
    ref, mha = _mha_pair(batch_first)
    B, L, E, H = 2, 6, 16, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, L, E, dtype=f64, generator=g)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    kw = {}
    if kind == "bool2d":
        kw["attn_mask"] = torch.rand(L, L, generator=g) > 0.6
        kw["attn_mask"].diagonal().fill_(False)  # every row keeps a key (torch gives NaN for none)
    elif kind == "bool3d":
        kw["attn_mask"] = torch.rand(B * H, L, L, generator=g) > 0.6
        kw["attn_mask"].diagonal(dim1=1, dim2=2).fill_(False)
    elif kind == "float2d":
        kw["attn_mask"] = torch.randn(L, L, dtype=f64, generator=g)
    elif kind == "float3d":
        kw["attn_mask"] = torch.randn(B * H, L, L, dtype=f64, generator=g)
    elif kind.startswith("causal"):
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=f64)
        kw["is_causal"] = True
        if kind == "causal+padding":
            kw["key_padding_mask"] = torch.arange(L).view(1, -1) >= torch.tensor([6, 4]).view(-1, 1)
    want, want_w = ref(x, x, x, need_weights=True, average_attn_weights=average, **kw)
    got, got_w = mha(x, x, x, need_weights=True, average_attn_weights=average, **kw)
    _close(got, want)
    _close(got_w, want_w)
    # gradients of the projections agree as well
    want.sum().backward()
    got.sum().backward()
    _close(mha.q_proj.weight.grad, ref.in_proj_weight.grad[:E])


def test_multihead_is_causal_alone_and_errors():
    ref, mha = _mha_pair(True)
    x = _rand(2, 5, 16)
    tri = torch.ones(5, 5, dtype=torch.bool).triu(1)  # torch: True = NOT allowed
    want, _ = ref(x, x, x, attn_mask=tri, need_weights=False)
    _close(mha(x, is_causal=True).output, want)
    _close(mha(x, mask=M.causal()).output, want)  # salience's own convention: True = visible
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mha(x, attn_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mha(x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
