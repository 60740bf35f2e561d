"""salience.attention_with_kvcache: the float64 reference and salience.attention on each sequence's gathered keys,
contiguous and paged caches, every mask and mod the decode kernel takes, the fallback, in-place appends,
multi-step decoding and the errors."""

import pytest
import torch

import salience
from salience import kvcache, masks, scores
from salience.testing import assert_rel_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cache(B, Hkv, cap, D, dtype, paged, block_size=4, fill=float("nan")):
    """A cache whose every slot holds ``fill`` (NaN: a slot that is read by mistake poisons the result), and for a
    paged pool a random block table over a shuffled pool with spare blocks."""
    if not paged:
        kc = torch.full((B, Hkv, cap, D), fill, dtype=dtype)
        return kc, kc.clone(), None
    nb = -(-cap // block_size)
    pool = B * nb + 3
    perm = torch.randperm(pool)[: B * nb].view(B, nb)
    kc = torch.full((pool, Hkv, block_size, D), fill, dtype=dtype)
    return kc, kc.clone(), perm.to(torch.int32)


def _fill(kc, vc, bt, lens, Hkv, D, dtype):
    """Write random keys/values at positions 0..lens[b]-1 of each sequence (through the API's own append)."""
    B = lens.numel()
    m = int(lens.max())
    k64, v64 = torch.randn(B, Hkv, m, D, dtype=torch.float64), torch.randn(B, Hkv, m, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n:
            one = (torch.tensor([b]), k64[b : b + 1, :, :n].to(dtype), v64[b : b + 1, :, :n].to(dtype))
            _write(kc, vc, bt, one, n)
    return k64, v64


def _write(kc, vc, bt, one, n):
    (b,), k, v = one
    b = int(b)
    if bt is None:
        kc[b, :, :n], vc[b, :, :n] = k[0], v[0]
        return
    bs = kc.shape[2]
    for j in range(n):
        kc[int(bt[b, j // bs]), :, j % bs], vc[int(bt[b, j // bs]), :, j % bs] = k[0, :, j], v[0, :, j]


def _per_sequence_mask(mask, b):
    """The mask a one-row recompute of sequence b takes (padding lengths picked for that row)."""
    kind = getattr(mask, "kind", None)
    if kind is not None and kind[0] == "padding":
        return masks.padding(kv_lengths=[int(kind[2][b])])
    return mask


def _check_against_references(q, kc, vc, bt, total, mask, mod, sinks, res):
    """Every sequence against the float64 reference and against salience.attention on its gathered keys."""
    B = q.shape[0]
    for b in range(B):
        S = int(total[b])
        kb, vb = kvcache.gather(kc, b, S, bt), kvcache.gather(vc, b, S, bt)
        qb = q[b : b + 1]
        sk = None if sinks is None else (sinks if sinks.dim() == 1 else sinks[b : b + 1])
        mb = _per_sequence_mask(mask, b)
        r64 = salience.reference.attention(qb.double(), kb.double(), vb.double(), mask=mb, score_mod=mod,
                                           sinks=None if sk is None else sk.double())
        rt = salience.reference.attention(qb, kb, vb, mask=mb, score_mod=mod, sinks=sk)
        full = salience.attention(qb, kb, vb, mask=mb, score_mod=mod, return_lse=True, sinks=sk)
        assert_rel_close(res.out[b : b + 1], rt.out, r64.out, what=f"out of sequence {b} (S={S})")
        assert_rel_close(res.lse[b : b + 1], rt.lse, r64.lse, what=f"lse of sequence {b} (S={S})")
        assert_rel_close(full.out, rt.out, r64.out, what=f"salience.attention recompute of sequence {b}")
        if q.dtype == torch.float64:
            torch.testing.assert_close(res.out[b : b + 1], full.out, rtol=1e-10, atol=1e-12)


CASES = {
    "none": (None, None, False),
    "causal": (masks.causal(align="bottom_right"), None, False),
    "window": (masks.sliding_window(5, align="bottom_right"), None, False),
    "alibi": (masks.causal(align="bottom_right"), scores.alibi(8, offset=64), False),
    "softcap": (masks.causal(align="bottom_right"), scores.softcap(3.0), False),
    "softcap_alibi_temp": (masks.sliding_window(9, align="bottom_right"),
                           scores.compose(scores.temperature(2.0), scores.softcap(3.0), scores.alibi(8, offset=64)),
                           False),
    "sinks": (masks.causal(align="bottom_right"), None, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_equals_references(case, paged, dtype):
    mask, mod, with_sinks = CASES[case]
    B, H, Hkv, D, cap, L = 4, 8, 2, 16, 64, 2
    kc, vc, bt = _cache(B, Hkv, cap, D, dtype, paged)
    lens = torch.tensor([0, 1, 17, 61])
    _fill(kc, vc, bt, lens, Hkv, D, dtype)
    q = torch.randn(B, H, L, D, dtype=torch.float64).to(dtype)
    k, v = torch.randn(B, Hkv, L, D).to(dtype), torch.randn(B, Hkv, L, D).to(dtype)
    sinks = (torch.randn(B, H) if paged else torch.randn(H)) if with_sinks else None  # per sequence or per head
    pl = kvcache.plan(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt, mask=mask, score_mod=mod, sinks=sinks)
    assert pl.path == "decode", pl
    res = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt, mask=mask,
                                          score_mod=mod, sinks=sinks, return_lse=True)
    assert res.out.dtype == dtype and res.out.shape == (B, H, L, D)
    assert res.lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check_against_references(q, kc, vc, bt, lens + L, mask, mod, sinks, res)


@pytest.mark.parametrize("Hkv", [1, 6], ids=["MQA", "MHA"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_every_length_one_to_S(Hkv, paged):
    """One batch holds sequences of every length 1..S (the new key included), MQA and MHA."""
    S, H, D = 24, 6, 8
    lens = torch.arange(S)  # cached before the append: 0..S-1, so S_b = 1..S
    kc, vc, bt = _cache(S, Hkv, S, D, torch.float32, paged, block_size=5)
    _fill(kc, vc, bt, lens, Hkv, D, torch.float32)
    q, k, v = torch.randn(S, H, 1, D), torch.randn(S, Hkv, 1, D), torch.randn(S, Hkv, 1, D)
    mask = masks.causal(align="bottom_right")
    res = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt, mask=mask,
                                          return_lse=True)
    _check_against_references(q, kc, vc, bt, lens + 1, mask, None, None, res)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_append_in_place(paged):
    """The new keys land at each sequence's own positions; every other slot keeps its bytes."""
    B, Hkv, D, cap, L = 3, 2, 8, 20, 3
    kc, vc, bt = _cache(B, Hkv, cap, D, torch.float32, paged, fill=0.0)
    kc.normal_(), vc.normal_()
    k0, v0 = kc.clone(), vc.clone()
    lens = torch.tensor([0, 7, 17])
    q, k, v = torch.randn(B, 4, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt)
    written = torch.zeros(kc.shape[0], kc.shape[2], dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            p = int(lens[b]) + i
            blk, slot = (b, p) if bt is None else (int(bt[b, p // kc.shape[2]]), p % kc.shape[2])
            assert torch.equal(kc[blk, :, slot], k[b, :, i]) and torch.equal(vc[blk, :, slot], v[b, :, i])
            written[blk, slot] = True
    keep = ~written
    assert torch.equal(kc.permute(0, 2, 1, 3)[keep], k0.permute(0, 2, 1, 3)[keep])
    assert torch.equal(vc.permute(0, 2, 1, 3)[keep], v0.permute(0, 2, 1, 3)[keep])


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decoding_loop_equals_one_causal_pass(paged):
    """Prefill (a block of queries), then single steps and a 3-token speculative step, sequences of different
    prompt lengths: the outputs equal one causal pass over each whole sequence."""
    B, H, Hkv, D, cap = 2, 4, 2, 16, 48
    prompts, steps = [5, 11], [1, 1, 3, 1]
    total = [p + sum(steps) for p in prompts]
    kc, vc, bt = _cache(B, Hkv, cap, D, torch.float64, paged, block_size=8)
    qs = [torch.randn(1, H, n, D, dtype=torch.float64) for n in total]
    ks = [torch.randn(1, Hkv, n, D, dtype=torch.float64) for n in total]
    vs = [torch.randn(1, Hkv, n, D, dtype=torch.float64) for n in total]
    full = [salience.attention(qs[b], ks[b], vs[b], mask=masks.causal()) for b in range(B)]
    mask = masks.causal(align="bottom_right")
    for b in range(B):  # prefill each sequence alone (different lengths), through the paged/contiguous append
        sub_bt = None if bt is None else bt[b : b + 1]
        sub_kc, sub_vc = (kc[b : b + 1], vc[b : b + 1]) if bt is None else (kc, vc)
        p = prompts[b]
        out = salience.attention_with_kvcache(qs[b][:, :, :p], sub_kc, sub_vc, ks[b][:, :, :p], vs[b][:, :, :p],
                                              cache_seqlens=0, block_table=sub_bt, mask=mask)
        torch.testing.assert_close(out, full[b][:, :, :p])
    pos = list(prompts)
    for n in steps:  # batched steps: each sequence at its own length
        q = torch.cat([qs[b][:, :, pos[b] : pos[b] + n] for b in range(B)])
        k = torch.cat([ks[b][:, :, pos[b] : pos[b] + n] for b in range(B)])
        v = torch.cat([vs[b][:, :, pos[b] : pos[b] + n] for b in range(B)])
        out = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor(pos), block_table=bt,
                                              mask=mask)
        for b in range(B):
            torch.testing.assert_close(out[b : b + 1], full[b][:, :, pos[b] : pos[b] + n])
            pos[b] += n


def test_alibi_offset_gives_flash_bottom_right():
    """With a causal mask, alibi(offset >= cache_seqlens) gives flash-attention's bottom-right ALiBi output."""
    B, H, D, cap = 2, 4, 8, 32
    kc, vc, bt = _cache(B, H, cap, D, torch.float64, False)
    lens = torch.tensor([3, 20])
    _fill(kc, vc, bt, lens, H, D, torch.float64)
    q, k, v = (torch.randn(B, H if i == 0 else H, 2, D, dtype=torch.float64) for i in range(3))
    sl = scores.alibi_slopes(H).double()
    out = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, mask=masks.causal(align="bottom_right"),
                                          score_mod=scores.alibi(sl, offset=cap))
    for b in range(B):
        S = int(lens[b]) + 2
        want = salience.compat.flash_attn_func(q[b : b + 1].transpose(1, 2), kc[b : b + 1, :, :S].transpose(1, 2),
                                               vc[b : b + 1, :, :S].transpose(1, 2), causal=True, alibi_slopes=sl)
        torch.testing.assert_close(out[b : b + 1], want.transpose(1, 2))


def test_fallback_masks_and_mods_are_exact():
    """A callable mask, per-batch padding lengths, per-batch ALiBi slopes and a tensor mask take the exact
    fallback (each sequence's keys gathered) and still equal the references; plan() says so."""
    B, H, Hkv, D, cap, L = 3, 4, 2, 8, 30, 2
    kc, vc, bt = _cache(B, Hkv, cap, D, torch.float32, True)
    lens = torch.tensor([2, 9, 25])
    _fill(kc, vc, bt, lens, Hkv, D, torch.float32)
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    per_b = torch.rand(B, H)
    even = lambda b, h, qi, kv: (kv % 2 == 0) | (kv == qi)  # noqa: E731
    tmask = torch.rand(B, 1, L, cap) > 0.3
    for mask, mod, path in ((even, None, "fallback"), (None, scores.alibi(per_b), "fallback"),
                            (tmask, None, "fallback"), (masks.padding(kv_lengths=[1, 4, 27]), None, "decode")):
        kc2, vc2 = kc.clone(), vc.clone()
        pl = kvcache.plan(q, kc2, vc2, k, v, cache_seqlens=lens, block_table=bt, mask=mask, score_mod=mod)
        assert pl.path == path, pl
        res = salience.attention_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens, block_table=bt, mask=mask,
                                              score_mod=mod, return_lse=True)
        for b in range(B):
            S = int(lens[b]) + L
            kb, vb = kvcache.gather(kc2, b, S, bt), kvcache.gather(vc2, b, S, bt)
            mb = _per_sequence_mask(mask, b) if not isinstance(mask, torch.Tensor) else tmask[b : b + 1, ..., :S]
            mod_b = None if mod is None else scores.alibi(per_b[b])
            r64 = salience.reference.attention(q[b : b + 1].double(), kb.double(), vb.double(), mask=mb,
                                               score_mod=mod_b)
            rt = salience.reference.attention(q[b : b + 1], kb, vb, mask=mb, score_mod=mod_b)
            assert_rel_close(res.out[b : b + 1], rt.out, r64.out, what=f"{pl.reason}: sequence {b}")


def test_grad_takes_the_fallback_with_its_backward():
    B, H, D, cap = 2, 2, 8, 16
    kc, vc, bt = _cache(B, H, cap, D, torch.float64, False, fill=0.0)
    kc.normal_(), vc.normal_()
    lens = torch.tensor([4, 11])
    q = torch.randn(B, H, 1, D, dtype=torch.float64, requires_grad=True)
    mask = masks.causal(align="bottom_right")
    pl = kvcache.plan(q, kc, vc, cache_seqlens=lens, mask=mask)
    assert pl.path == "fallback" and "forward only" in pl.reason
    assert "forward only" in pl.details["backward"]
    k = torch.randn(B, H, 1, D, dtype=torch.float64, requires_grad=True)
    salience.attention_with_kvcache(q, kc, vc, k, k.detach(), cache_seqlens=lens, mask=mask).square().sum().backward()
    for b in range(B):
        n = int(lens[b])
        qb, kb = q.detach()[b : b + 1].clone().requires_grad_(), k.detach()[b : b + 1].clone().requires_grad_()
        salience.reference.attention(qb, torch.cat((kc[b : b + 1, :, :n], kb), 2), vc[b : b + 1, :, : n + 1],
                                     mask=mask).out.square().sum().backward()
        torch.testing.assert_close(q.grad[b : b + 1], qb.grad)
        torch.testing.assert_close(k.grad[b : b + 1], kb.grad)


def test_rows_without_keys_give_zeros():
    B, H, D, cap = 2, 2, 8, 16
    kc, vc, bt = _cache(B, H, cap, D, torch.float32, True)
    lens = torch.tensor([0, 6])
    _fill(kc, vc, bt, lens, H, D, torch.float32)
    q = torch.randn(B, H, 1, D)
    res = salience.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, return_lse=True)
    assert torch.equal(res.out[0], torch.zeros_like(res.out[0])) and bool((res.lse[0] == float("-inf")).all())
    assert bool(torch.isfinite(res.out[1]).all())
    sinks = torch.tensor([0.5, -1.0])
    res = salience.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, return_lse=True, sinks=sinks)
    assert torch.equal(res.out[0], torch.zeros_like(res.out[0]))
    torch.testing.assert_close(res.lse[0, :, 0], sinks)


def _args(paged=False, dtype=torch.float32):
    kc, vc, bt = _cache(2, 2, 16, 8, dtype, paged, fill=0.0)
    return dict(q=torch.randn(2, 4, 1, 8, dtype=dtype), k_cache=kc, v_cache=vc, k=torch.randn(2, 2, 1, 8, dtype=dtype),
                v=torch.randn(2, 2, 1, 8, dtype=dtype), cache_seqlens=torch.tensor([3, 5]), block_table=bt)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(cache_seqlens=torch.tensor([3, 16])), ValueError, "S_max = 16"),
    (lambda a: a.update(cache_seqlens=torch.tensor([3, -1])), ValueError, ">= 0"),
    (lambda a: a.update(cache_seqlens=torch.tensor([3])), ValueError, "one length per sequence"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache has dtype torch.float16"),
    (lambda a: a.update(k=a["k"].double()), TypeError, "k has dtype torch.float64"),
    (lambda a: a.update(q=torch.randn(2, 3, 1, 8)), ValueError, "multiple of Hkv"),
    (lambda a: a.update(q=torch.randn(2, 4, 8)), ValueError, "q must be a 4-D tensor"),
    (lambda a: a.update(q=torch.randn(2, 4, 1, 6)), ValueError, "head dim 8 but q has D=6"),
    (lambda a: a.update(v=None), ValueError, "k was given without v"),
    (lambda a: a.update(k=torch.randn(2, 1, 1, 8)), ValueError, "must be (B, Hkv, L_new, D)"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "one row per sequence"),
    (lambda a: a.update(mask=torch.ones(2, 1, 1, 4, dtype=torch.bool)), ValueError, "at least the longest"),
])
def test_bad_contiguous_inputs(change, error, words):
    a = _args()
    change(a)
    with pytest.raises(error, match=pytest.importorskip("re").escape(words)):
        salience.attention_with_kvcache(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("k"), a.pop("v"), **a)


def _bad_table(a, value):
    a["block_table"] = a["block_table"].clone()
    a["block_table"][1, 1] = value


@pytest.mark.parametrize("change, words", [
    (lambda a: _bad_table(a, 99), "block_table[1, 1] = 99 is outside the pool"),
    (lambda a: _bad_table(a, -1), "block_table[1, 1] = -1 is outside the pool"),
    (lambda a: a.update(cache_seqlens=torch.tensor([3, 16])), "max_blocks * block_size = 4 * 4 = 16"),
    (lambda a: a.update(block_table=a["block_table"].float()), "int32/int64 tensor (B, max_blocks)"),
    (lambda a: a.update(block_table=a["block_table"][:1]), "int32/int64 tensor (B, max_blocks)"),
    (lambda a: (a["block_table"].__setitem__((1, 1), int(a["block_table"][0, 0])),
                a.update(cache_seqlens=torch.tensor([3, 7]))), "same cache slot"),  # both write slot 3 of one block
])
def test_bad_paged_inputs(change, words):
    a = _args(paged=True)
    a["cache_seqlens"] = torch.tensor([3, 4])
    change(a)
    with pytest.raises(ValueError, match=pytest.importorskip("re").escape(words)):
        salience.attention_with_kvcache(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("k"), a.pop("v"), **a)


def test_unused_table_entries_are_not_checked():
    """Entries past a sequence's last block (vLLM pads tables with -1 or stale ids) are never read."""
    a = _args(paged=True)
    a["block_table"] = a["block_table"].clone()
    a["block_table"][:, 3] = -1  # logical keys 12..15: beyond both sequences
    out = salience.attention_with_kvcache(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("k"), a.pop("v"), **a)
    assert bool(torch.isfinite(out).all())


def test_plan_reports_the_path():
    a = _args(paged=True)
    pl = kvcache.plan(a["q"], a["k_cache"], a["v_cache"], cache_seqlens=a["cache_seqlens"],
                      block_table=a["block_table"], mask=masks.sliding_window(2, align="bottom_right"))
    assert pl.path == "decode" and "paged" in pl.details["cache"] and pl.details["keys_read"] == 3 + 3
    pl = kvcache.plan(a["q"], a["k_cache"], a["v_cache"], cache_seqlens=a["cache_seqlens"],
                      block_table=a["block_table"], score_mod=lambda s, b, h, qi, kv: s * 2)
    assert pl.path == "fallback" and "score_mod" in pl.reason
    assert "forward only" in str(pl)


# --------------------------------------------------------------------------- MultiHeadAttention's KVCache


def test_layer_cache_is_a_growing_buffer_written_in_place():
    from salience.layers import KVCache, MultiHeadAttention

    layer = MultiHeadAttention(32, 4, 2, mask=masks.causal()).double().eval()
    x = torch.randn(2, 150, 32, dtype=torch.float64)
    full = layer(x).output
    cache, outs, caps = KVCache(), [], set()
    with torch.no_grad():
        outs.append(layer(x[:, :70], cache=cache).output)
        for i in range(70, 150):
            outs.append(layer(x[:, i : i + 1], cache=cache).output)
            caps.add(cache.capacity)
            assert cache.k.data_ptr() == cache.buffers[0].data_ptr()  # a view of the buffer, no copy
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert sorted(caps) == [140, 280]  # 70 after the prompt, doubled when full, not grown per step
    fixed = KVCache(max_length=8)
    with torch.no_grad():
        layer(x[:, :8], cache=fixed)
        assert fixed.capacity == 8
        with pytest.raises(ValueError, match="max_length=8"):
            layer(x[:, 8:9], cache=fixed)
    fixed.reset()
    with torch.no_grad():  # a new batch size after reset() gets a new buffer
        torch.testing.assert_close(layer(x[:1, :3], cache=fixed).output, layer(x[:1, :3]).output)


def test_layer_cache_keeps_gradients_when_training_through_chunks():
    from salience.layers import ALiBi, KVCache, MultiHeadAttention

    layer = MultiHeadAttention(16, 4, 2, mask=masks.causal(), positional=ALiBi(4)).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    layer(x).output.square().sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    cache = KVCache()
    torch.cat([layer(x[:, a:b], cache=cache).output for a, b in ((0, 4), (4, 5), (5, 9))], 1).square().sum().backward()
    for p, g in zip(layer.parameters(), want):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------ Hugging Face generation


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
def test_hf_generation_steps_have_key_intervals(cache_impl, monkeypatch):
    """Each generation step (one query against DynamicCache keys, or against the whole StaticCache buffer with a
    mask) reaches salience.attention with a contiguous cache and a mask that reads as one key interval per row
    (per-sequence lengths included, left padding too), and salience.plan on those tensors picks the decode kernel.
    Tokens equal sdpa's."""
    transformers = pytest.importorskip("transformers")
    import salience.integrations.hf as shf
    from salience.structure import row_intervals

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1100)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 1030))  # past the decode rule's 1024 keys
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    kw = {"cache_implementation": "static"} if cache_impl == "static" else {}
    with torch.no_grad():
        want = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, **kw)
    shf.enable(model)
    steps = []
    real = shf.attention

    def spy(q, k, v, **kwargs):
        if q.shape[2] == 1:
            pl = salience.plan(q, k, v, mask=kwargs.get("mask"), score_mod=kwargs.get("score_mod"),
                               scale=kwargs.get("scale"))
            steps.append((pl, k, kwargs.get("mask")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(shf, "attention", spy)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, **kw)
    assert torch.equal(got, want)
    assert len(steps) == 3
    for pl, k, mask in steps:
        assert pl.backend == "decode", pl
        assert k.is_contiguous()
        S = k.shape[2]
        spans = row_intervals(mask, 2, 1, S)
        assert spans is not None, mask
        lo, hi = spans
        assert lo.expand(2, 1).tolist()[1][0] == 4  # the left-padded row starts at its first real key


# ------------------------------------------------------------------------------------------ salience bench


def test_bench_decoding_rows():
    from salience import bench

    names = {c.name for c in bench.GRID}
    assert {"decode_causal_f32", "decode_causal_bf16", "decode_window_bf16"} <= names
    assert {c.name for c in bench.QUICK_GRID if c.mode == "decode"} == {"decode_causal_f32", "decode_window_bf16"}
    cfg = bench.Config("d", "window", N=300, H=4, D=16, dtype="bf16", mode="decode", window=40, repeats=1,
                       peers=("sdpa", "reference"), extra={"Hkv": 2})
    assert bench.useful_flops(cfg) == 4 * 16 * 4 * 41  # one query row, 41 visible keys
    res = bench._worker_time(cfg, flex=False)
    assert "path='decode'" in res["plan"] and "keys_read=41" in res["plan"]
    for name in ("salience", "sdpa", "reference"):
        e = res["impls"][name]
        assert e["median_ms"] > 0 and e["max_err"] < 2e-2, (name, e)


def test_strided_cache_is_read_in_place():
    """A cache stored (B, S_max, Hkv, D) (flash-attention's order) and passed as a transposed view: appended and
    read through its strides, equal to the contiguous cache."""
    B, H, Hkv, D, cap = 2, 4, 2, 16, 40
    store_k, store_v = torch.randn(B, cap, Hkv, D), torch.randn(B, cap, Hkv, D)
    kc, vc = store_k.transpose(1, 2), store_v.transpose(1, 2)
    dense_k, dense_v = kc.contiguous(), vc.contiguous()
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    lens, mask = torch.tensor([5, 30]), masks.causal(align="bottom_right")
    got = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, mask=mask)
    want = salience.attention_with_kvcache(q, dense_k, dense_v, k, v, cache_seqlens=lens, mask=mask)
    torch.testing.assert_close(got, want)
    assert torch.equal(store_k[1, 30], k[1, :, 0])  # written into the caller's storage


@pytest.mark.parametrize("mask", [masks.causal(), masks.causal(align="bottom_right"), masks.sliding_window(3),
                                  masks.sliding_window(3, 2, align="bottom_right"),
                                  masks.sliding_window(None, 1, align="bottom_right"), masks.sliding_window(2, None),
                                  masks.sliding_window(0, 0, align="bottom_right")], ids=repr)
def test_band_intervals_for_all_sequences_at_once_equal_row_intervals_per_sequence(mask):
    """The intervals of band masks for all sequences at once equal structure.row_intervals per sequence."""
    from salience.structure import row_intervals

    lens = torch.tensor([0, 1, 4, 6, 8, 19] * 8)  # 48 sequences: with L=7 past the per-row integer loop's 256 rows
    for L in (1, 3, 7):
        kc = torch.zeros(lens.numel(), 1, 40, 4)
        g = kvcache._check(torch.zeros(lens.numel(), 2, L, 4), kc, kc, torch.zeros(lens.numel(), 1, 1, 4),
                           torch.zeros(lens.numel(), 1, 1, 4), lens, None)
        lo, hi = kvcache._intervals(mask, g)
        for b, S in enumerate(g.total.tolist()):
            want = row_intervals(mask, 1, L, S)
            assert torch.equal(lo[b], want[0][0]) and torch.equal(hi[b], want[1][0]), (L, S)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_prefill_blocks_take_attention_kernels(paged):
    """More than MAX_DECODE_ROWS queries (a prefill through the cache) run salience.attention on the cached keys:
    plan() says so, and the result equals one causal pass (equal lengths: one batched call)."""
    B, H, Hkv, D, L = 2, 4, 2, 16, kvcache.MAX_DECODE_ROWS + 8
    kc, vc, bt = _cache(B, Hkv, 64, D, torch.float64, paged)
    q, k, v = (torch.randn(B, n, L, D, dtype=torch.float64) for n in (H, Hkv, Hkv))
    mask = masks.causal(align="bottom_right")
    pl = kvcache.plan(q, kc, vc, k, v, cache_seqlens=0, block_table=bt, mask=mask)
    assert pl.path == "fallback" and "prefill" in pl.reason
    out = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=0, block_table=bt, mask=mask)
    torch.testing.assert_close(out, salience.attention(q, k, v, mask=masks.causal()))
