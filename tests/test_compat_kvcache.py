"""salience.compat.flash_attn_with_kvcache against flash-attention's own definition of the call.

The reference below is written from flash-attention's docstring and the reference its tests use
(tests/test_flash_attn.py::test_flash_attn_kvcache): the new keys (rotated at ``cache_seqlens + t``) are written
into the cache at ``cache_seqlens``; sequence b sees the keys ``[cache_leftpad[b], cache_seqlens[b] + seqlen_new)``,
counted from the left pad (``j' = j - leftpad``, ``sk = seqlen - leftpad``); causal / window_size keep
``i + sk - sq - left <= j' <= min(i + sk - sq + right, sk)``; softcap is applied to the scaled scores, then ALiBi
``-slope * |i + sk - sq - j'|``. Each result is held to the relative-error rule against this reference in
float64, and the caches must hold what flash-attention writes into them.
"""

from __future__ import annotations

import math

import pytest
import torch

from salience import compat
from salience.testing import assert_rel_close

B, H, HKV, D = 3, 8, 2, 32


def rotate(x, cos, sin, pos, interleaved):
    """Rotary embedding of x (B, T, H, D) at positions pos (B, T), computed in x's dtype."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos].unsqueeze(2).to(x.dtype), sin[pos].unsqueeze(2).to(x.dtype)
    if interleaved:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        r = torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
    else:
        a, b = x[..., : rd // 2], x[..., rd // 2 : rd]
        r = torch.cat((a * c - b * s, a * s + b * c), -1)
    return torch.cat((r, x[..., rd:]), -1)


def reference(q, kc, vc, k, v, lens, *, idx=None, leftpad=None, causal=False, window=(-1, -1), softcap=0.0,
              slopes=None, rot=None, scale=None):
    """``(out, lse, k_cache_after, v_cache_after)`` in q's dtype; kc, vc (B_cache, S, Hkv, D) contiguous."""
    Bq, L = q.shape[:2]
    kc, vc = kc.clone(), vc.clone()
    kb = kc if idx is None else kc[idx]
    vb = vc if idx is None else vc[idx]
    L_new = 0 if k is None else k.shape[1]
    if rot is not None:
        cos, sin, inter = rot
        banded = causal or tuple(window) != (-1, -1)
        q = rotate(q, cos, sin, lens.view(-1, 1) + (torch.arange(L) if banded else torch.zeros(L, dtype=torch.long)),
                   inter)
        k = rotate(k, cos, sin, lens.view(-1, 1) + torch.arange(L_new), inter)
    for b in range(Bq):
        n = int(lens[b])
        if L_new:
            kb[b, n:n + L_new], vb[b, n:n + L_new] = k[b], v[b]
    if idx is not None and L_new:
        kc[idx], vc[idx] = kb, vb
    S = kb.shape[1]
    total = lens + L_new
    pad = torch.zeros(Bq, dtype=torch.long) if leftpad is None else leftpad
    j = torch.arange(S).view(1, 1, 1, S)
    i = torch.arange(L).view(1, 1, L, 1)
    sk = (total - pad).view(-1, 1, 1, 1)
    col = j - pad.view(-1, 1, 1, 1)
    visible = ((j < total.view(-1, 1, 1, 1)) & (col >= 0)).expand(Bq, 1, L, S).clone()
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        right = right if right >= 0 else S  # (left, -1): unbounded on the right
        visible &= (col <= torch.minimum(i + sk - L + right, sk)) & (col >= i + sk - L - left)
    elif right >= 0:
        visible &= col <= i + sk - L + right
    g = H // HKV
    kk = kb.transpose(1, 2).repeat_interleave(g, 1)
    vv = vb.transpose(1, 2).repeat_interleave(g, 1)
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        sl = slopes.to(s.dtype).view(-1, H, 1, 1) if slopes.dim() == 2 else slopes.to(s.dtype).view(1, H, 1, 1)
        s = s - sl * (i + sk - L - col).abs()
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(visible, torch.exp(s - lse.unsqueeze(-1).clamp(min=-1e30)), torch.zeros((), dtype=s.dtype))
    out = (p @ vv).transpose(1, 2)
    return out, lse, kc, vc


def data(dtype, S=96, Bc=B, L=1, L_new=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, kc, vc = r(B, L, H, D), r(Bc, S, HKV, D), r(Bc, S, HKV, D)
    k, v = (r(B, L_new, HKV, D), r(B, L_new, HKV, D)) if L_new else (None, None)
    return q, kc, vc, k, v


def rot_tables(S, rd=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(S, rd // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    return torch.cos(ang), torch.sin(ang)


def check(dtype, q, kc, vc, k, v, lens, call_kw=None, ref_kw=None, paged_bs=None):
    """Run compat on copies in ``dtype`` (contiguous, or paged with blocks of ``paged_bs`` in shuffled order) and
    compare out, lse and the caches with the reference in dtype and in float64."""
    call_kw, ref_kw = dict(call_kw or {}), dict(ref_kw or {})
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    want = reference(*(cast(t) for t in (q, kc, vc, k, v)), lens, **ref_kw)
    want64 = reference(q, kc, vc, k, v, lens, **ref_kw)
    if "rot" in call_kw:
        call_kw["rotary_cos"], call_kw["rotary_sin"], call_kw["rotary_interleaved"] = call_kw.pop("rot")
        call_kw["rotary_cos"], call_kw["rotary_sin"] = cast(call_kw["rotary_cos"]), cast(call_kw["rotary_sin"])
    kcd, vcd = cast(kc), cast(vc)
    if paged_bs is None:
        out, lse = compat.flash_attn_with_kvcache(cast(q), kcd, vcd, cast(k), cast(v), cache_seqlens=lens,
                                                  return_softmax_lse=True, **call_kw)
        got_k, got_v = kcd, vcd
    else:
        S = kc.shape[1]
        nb = S // paged_bs
        perm = torch.randperm(B * nb, generator=torch.Generator().manual_seed(3))
        table = perm.view(B, nb).to(torch.int32)
        pool_k = torch.empty(B * nb, paged_bs, HKV, D, dtype=dtype)
        pool_v = torch.empty_like(pool_k)
        pool_k[table.long()] = kcd.view(B, nb, paged_bs, HKV, D)
        pool_v[table.long()] = vcd.view(B, nb, paged_bs, HKV, D)
        out, lse = compat.flash_attn_with_kvcache(cast(q), pool_k, pool_v, cast(k), cast(v), cache_seqlens=lens,
                                                  block_table=table, return_softmax_lse=True, **call_kw)
        got_k = pool_k[table.long()].reshape(B, S, HKV, D)
        got_v = pool_v[table.long()].reshape(B, S, HKV, D)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, q.shape[1])
    assert_rel_close(out, want[0], want64[0], what="out")
    fin = torch.isfinite(want64[1])
    assert torch.equal(torch.isfinite(lse), fin)
    assert_rel_close(lse[fin].float(), want[1][fin].float(), want64[1][fin], what="lse")
    assert torch.equal(got_k, want[2]) and torch.equal(got_v, want[3]), "the caches differ from what flash writes"


LENS = torch.tensor([5, 40, 71])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("case", ["causal", "window", "window_two_sided", "none", "softcap_alibi",
                                  "alibi_per_batch", "alibi_noncausal"])
def test_masks_and_mods(case, L, dtype):
    kw = {"causal": dict(causal=True), "window": dict(causal=True, window_size=(9, -1)),
          "window_two_sided": dict(window_size=(6, 2)), "none": {},
          "softcap_alibi": dict(causal=True, softcap=2.0, alibi_slopes=torch.linspace(0.05, 0.4, H)),
          "alibi_per_batch": dict(causal=True, alibi_slopes=torch.rand(B, H, generator=torch.Generator().manual_seed(4))),
          "alibi_noncausal": dict(alibi_slopes=torch.linspace(0.05, 0.4, H))}[case]
    ref = {("window" if key == "window_size" else "slopes" if key == "alibi_slopes" else key): val
           for key, val in kw.items()}
    q, kc, vc, k, v = data(dtype, L=L, L_new=L)
    check(dtype, q, kc, vc, k, v, LENS, kw, ref)


@pytest.mark.parametrize("paged_bs", [None, 16])
def test_no_new_keys_and_the_default_length(paged_bs):
    q, kc, vc, _, _ = data(torch.float32, L_new=0)
    check(torch.float32, q, kc, vc, None, None, LENS, dict(causal=True), dict(causal=True), paged_bs=paged_bs)
    out = compat.flash_attn_with_kvcache(q.float(), kc.float(), vc.float())  # cache_seqlens None: every key
    want = reference(q, kc, vc, None, None, torch.full((B,), kc.shape[1]))[0]
    assert_rel_close(out, want.float(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_paged(causal, dtype):
    q, kc, vc, k, v = data(dtype, L=2, L_new=2)
    kw = dict(causal=causal, softcap=3.0 if causal else 0.0)
    check(dtype, q, kc, vc, k, v, LENS, kw, kw, paged_bs=16)


def test_cache_batch_idx():
    q, kc, vc, k, v = data(torch.float32, Bc=5, L=2, L_new=2)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    check(torch.float32, q, kc, vc, k, v, LENS, dict(causal=True, cache_batch_idx=idx),
          dict(causal=True, idx=idx.long()))


@pytest.mark.parametrize("extra", [{}, {"window_size": (7, -1), "alibi": True}])
def test_cache_leftpad(extra):
    q, kc, vc, k, v = data(torch.float32, Bc=5, L=2, L_new=2)
    pad = torch.tensor([3, 0, 50], dtype=torch.int32)
    idx = torch.tensor([1, 3, 0], dtype=torch.int32)
    kw = dict(causal=True, cache_leftpad=pad, cache_batch_idx=idx)
    ref = dict(causal=True, leftpad=pad.long(), idx=idx.long())
    if extra:
        kw.update(window_size=extra["window_size"], alibi_slopes=torch.linspace(0.1, 0.8, H))
        ref.update(window=extra["window_size"], slopes=torch.linspace(0.1, 0.8, H))
    check(torch.float32, q, kc, vc, k, v, LENS, kw, ref)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary(causal, interleaved):
    q, kc, vc, k, v = data(torch.float32, L=2, L_new=2)
    cos, sin = rot_tables(kc.shape[1])
    check(torch.float32, q, kc, vc, k, v, LENS, dict(causal=causal, rot=(cos, sin, interleaved)),
          dict(causal=causal, rot=(cos, sin, interleaved)))


def test_int_cache_seqlens_and_scale():
    q, kc, vc, k, v = data(torch.float32, L=1, L_new=1)
    lens = torch.full((B,), 33)
    want = reference(q.float(), kc.float(), vc.float(), k.float(), v.float(), lens, causal=True, scale=0.3)
    want64 = reference(q, kc, vc, k, v, lens, causal=True, scale=0.3)
    kcf, vcf = kc.float(), vc.float()
    out = compat.flash_attn_with_kvcache(q.float(), kcf, vcf, k.float(), v.float(), cache_seqlens=33, causal=True,
                                         softmax_scale=0.3, num_splits=4)
    assert_rel_close(out, want[0], want64[0])
    assert torch.equal(kcf, want[2])


def test_errors_say_what_was_seen():
    q, kc, vc, k, v = (t.float() for t in data(torch.float32))
    cos, sin = (t.float() for t in rot_tables(kc.shape[1]))
    with pytest.raises(ValueError, match="only with new k and v"):
        compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=LENS, rotary_cos=cos, rotary_sin=sin)
    with pytest.raises(ValueError, match="covers 4 positions"):
        compat.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=LENS, rotary_cos=cos[:4], rotary_sin=sin[:4])
    with pytest.raises(ValueError, match="need cache_seqlens"):
        compat.flash_attn_with_kvcache(q, kc, vc, k, v)
    with pytest.raises(ValueError, match="4-D tensor"):
        compat.flash_attn_with_kvcache(q[0], kc, vc, cache_seqlens=LENS)
    with pytest.raises(ValueError, match="cache_seqlens must be an integer tensor"):
        compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="cache_leftpad\\[0\\] = 9"):
        compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=LENS, cache_leftpad=torch.tensor([9, 0, 0]))
    with pytest.raises(NotImplementedError, match="block_table"):
        compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=LENS, cache_leftpad=torch.tensor([1, 0, 0]),
                                       block_table=torch.zeros(B, 1, dtype=torch.int32))
    with pytest.raises(ValueError):  # appending past the cache: attention_with_kvcache's own error
        compat.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([5, 40, kc.shape[1]]))


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_in_one_call_when_the_sequences_have_one_length(monkeypatch, causal):
    """Equal lengths and per-head slopes: one attention_with_kvcache call, ALiBi's offset S - seqlen_q."""
    import salience.kvcache as kv

    calls = []
    real = kv.attention_with_kvcache
    monkeypatch.setattr(kv, "attention_with_kvcache", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, kc, vc, k, v = data(torch.float32, L=2, L_new=2)
    slopes = torch.linspace(0.05, 0.4, H)
    check(torch.float32, q, kc, vc, k, v, torch.full((B,), 33), dict(causal=causal, alibi_slopes=slopes),
          dict(causal=causal, slopes=slopes))
    assert calls == [1]


def test_compat_plan_names_the_decode_path():
    q, kc, vc, k, v = (t.float() for t in data(torch.float32, L=1, L_new=1))
    p = compat.plan(compat.flash_attn_with_kvcache, q, kc, vc, k, v, cache_seqlens=LENS, causal=True)
    assert p.path == "decode", p
    pads = compat.plan(compat.flash_attn_with_kvcache, q, kc, vc, cache_seqlens=LENS, causal=True,
                       cache_leftpad=torch.tensor([1, 2, 3]))
    assert [x.path for x in pads] == ["decode"] * B
