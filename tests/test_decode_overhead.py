"""What the per-call overhead work changed in the decode path (no timings here: benchmarks/decode_overhead.py):
the per-thread ctypes argument struct (never shared between threads, nothing left over from a previous call), the
kernel's split threshold read from KernelConfig, and attention_with_kvcache's cheaper checks, intervals and appends
(still every error, still the reference's answer after many calls with changing shapes)."""

import threading

import pytest
import torch

import salience
from salience import kvcache, masks
from salience.kernels import config, decode
from salience.testing import assert_rel_close

needs_kernel = pytest.mark.skipif(not decode.available(), reason=f"decode kernel: {decode.status()}")


def _visible(lo, hi, H, S):
    """The bool mask (B, H, L, S) of the row intervals [lo, hi)."""
    j = torch.arange(S).view(1, 1, 1, S)
    return ((j >= lo[:, None, :, None]) & (j < hi[:, None, :, None])).expand(-1, H, -1, -1)


def _problem(gen, B, H, Hkv, L, S, dtype, paged, extras):
    q = torch.randn(B, H, L, 32, generator=gen).to(dtype)
    k64, v64 = torch.randn(B, Hkv, S, 32, generator=gen), torch.randn(B, Hkv, S, 32, generator=gen)
    hi = torch.randint(1, S + 1, (B, L), generator=gen)
    lo = (hi - torch.randint(1, S + 1, (B, L), generator=gen)).clamp(min=0)
    kw = {}
    if extras:
        kw = {"slopes": torch.rand(H, generator=gen), "q_pos": hi - 1, "softcap": 5.0,
              "sinks": torch.randn(H, generator=gen)}
    k, v, bt = k64.to(dtype), v64.to(dtype), None
    if paged:  # the same keys through a shuffled pool of blocks of 8
        nb = S // 8
        perm = torch.randperm(B * nb, generator=gen).view(B, nb)
        pool_k = torch.empty(B * nb, Hkv, 8, 32, dtype=dtype)
        pool_v = torch.empty_like(pool_k)
        pool_k[perm.reshape(-1)] = k.view(B, Hkv, nb, 8, 32).transpose(1, 2).reshape(B * nb, Hkv, 8, 32)
        pool_v[perm.reshape(-1)] = v.view(B, Hkv, nb, 8, 32).transpose(1, 2).reshape(B * nb, Hkv, 8, 32)
        k, v, bt = pool_k, pool_v, perm
    return q, (k, v, bt), (k64, v64), lo, hi, kw


def _reference(q, k64, v64, lo, hi, kw, dtype):
    """The float64 reference and the same-dtype reference of decode.forward's definition (dense bool mask)."""
    from salience import scores

    H, S = q.shape[1], k64.shape[2]
    mask = _visible(lo, hi, H, S)
    mods = []
    if kw:
        mods.append(scores.softcap(kw["softcap"]))
        mods.append(scores.ScoreMod(lambda s, b, h, i, j: s - kw["slopes"][h] * (kw["q_pos"][b, i] - j).abs(),
                                    "alibi at q_pos"))
    mod = scores.compose(*mods) if mods else None
    sinks = kw.get("sinks")
    out = []
    for t in (torch.float64, dtype):
        r = salience.reference.attention(q.to(t), k64.to(t), v64.to(t), mask=mask, score_mod=mod, scale=32 ** -0.5,
                                         sinks=None if sinks is None else sinks.to(t))
        out.append(r)
    return out


@needs_kernel
def test_many_calls_with_changing_shapes_equal_the_reference():
    """One thread, one reused argument struct: calls alternate shapes, dtypes, paged/contiguous and the optional
    operands (slopes, sinks, softcap, block table), so a field left from the call before would show."""
    gen = torch.Generator().manual_seed(0)
    plans = [(2, 8, 2, 1, 64, torch.float32, False, True), (1, 4, 4, 3, 40, torch.bfloat16, True, False),
             (3, 8, 1, 2, 96, torch.float16, False, False), (2, 6, 3, 1, 48, torch.float32, True, True),
             (1, 8, 2, 1, 64, torch.float32, False, False), (4, 2, 1, 4, 32, torch.bfloat16, True, True)]
    for round_ in range(3):
        for B, H, Hkv, L, S, dtype, paged, extras in plans:
            q, (k, v, bt), (k64, v64), lo, hi, kw = _problem(gen, B, H, Hkv, L, S, dtype, paged, extras)
            out, lse = decode.forward(q, k, v, lo=lo, hi=hi, scale=32 ** -0.5, block_table=bt, **kw)
            r64, rt = _reference(q, k64, v64, lo, hi, kw, dtype)
            what = f"round {round_}: B={B} H={H} Hkv={Hkv} L={L} S={S} {dtype} paged={paged} extras={extras}"
            assert_rel_close(out, rt.out, r64.out, what=what)
            assert_rel_close(lse, rt.lse, r64.lse, what=what + " lse")


@needs_kernel
def test_argument_structs_are_per_thread():
    """Each thread fills its own struct (the same one on every call of that thread), and threads decoding
    different problems at once all get their own answers."""
    mine = decode._args()
    assert decode._args() is mine
    seen, errors = {}, []

    def worker(i):
        try:
            gen = torch.Generator().manual_seed(100 + i)
            seen[i] = id(decode._args())
            shapes = [(1 + i % 3, 8, 2, 1 + i % 2, 64 + 8 * i), (2, 4, 1, 1, 40)]
            for n in range(12):
                B, H, Hkv, L, S = shapes[n % 2]
                q, (k, v, bt), (k64, v64), lo, hi, kw = _problem(gen, B, H, Hkv, L, S, torch.float32, n % 3 == 0,
                                                                  n % 2 == 0)
                out, _ = decode.forward(q, k, v, lo=lo, hi=hi, scale=32 ** -0.5, block_table=bt, **kw)
                r64, rt = _reference(q, k64, v64, lo, hi, kw, torch.float32)
                assert_rel_close(out, rt.out, r64.out, what=f"thread {i} call {n}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(set(seen.values()) | {id(mine)}) == 5, "threads shared an argument struct"


@needs_kernel
def test_min_split_comes_from_the_kernel_config():
    """config.use(...decode_min_split=...) reaches the kernel, and every split gives the reference's answer."""
    gen = torch.Generator().manual_seed(3)
    q, (k, v, _), (k64, v64), lo, hi, _ = _problem(gen, 1, 8, 2, 1, 4096, torch.float32, False, False)
    r64, rt = _reference(q, k64, v64, lo, hi, {}, torch.float32)
    assert config.DEFAULT.decode_min_split == 256
    for split in (32, 256, 1 << 20):
        with config.use(config.DEFAULT.replace(decode_min_split=split)):
            out, _ = decode.forward(q, k, v, lo=lo, hi=hi, scale=32 ** -0.5)
        assert decode._TLS.args.min_split == split
        assert_rel_close(out, rt.out, r64.out, what=f"min_split={split}")
    assert not hasattr(decode, "MIN_SPLIT")


@pytest.mark.parametrize("B", [2, 10], ids=["few_writes", "indexed_writes"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_appends_over_many_steps(B, paged):
    """Both append paths (slicing for a few writes, advanced indexing for many) put every token where the cache
    reads it back, step after step with different per-sequence lengths; each step equals the reference."""
    torch.manual_seed(B)
    Hkv, D, cap, bs = 2, 8, 40, 4
    if paged:
        nb = cap // bs
        bt = torch.randperm(B * nb + 3)[: B * nb].view(B, nb)
        kc = torch.full((B * nb + 3, Hkv, bs, D), float("nan"))
    else:
        bt, kc = None, torch.full((B, Hkv, cap, D), float("nan"))
    vc = kc.clone()
    lens = torch.randint(0, 10, (B,))
    hist_k = [[] for _ in range(B)]
    hist_v = [[] for _ in range(B)]
    have = [0] * B  # tokens in each history
    mask = masks.causal(align="bottom_right")
    for step in range(6):
        L_new = 1 + step % 3
        q = torch.randn(B, 4, L_new, D)
        k, v = torch.randn(B, Hkv, L_new, D), torch.randn(B, Hkv, L_new, D)
        # sequences that start with an empty history: their earlier slots are whatever the cache held; write them
        for b in range(B):
            n = int(lens[b]) - have[b]
            if n > 0:
                pre_k, pre_v = torch.randn(1, Hkv, n, D), torch.randn(1, Hkv, n, D)
                kvcache.append_checked(kc if paged else kc[b:b + 1], vc if paged else vc[b:b + 1], pre_k, pre_v,
                                       torch.tensor([have[b]]), None if bt is None else bt[b:b + 1])
                hist_k[b].append(pre_k)
                hist_v[b].append(pre_v)
                have[b] += n
        res = salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt, mask=mask,
                                              return_lse=True)
        for b in range(B):
            hist_k[b].append(k[b:b + 1])
            hist_v[b].append(v[b:b + 1])
            have[b] += L_new
            kb, vb = torch.cat(hist_k[b], 2), torch.cat(hist_v[b], 2)
            S = int(lens[b]) + L_new
            assert torch.equal(kvcache.gather(kc, b, S, bt), kb) and torch.equal(kvcache.gather(vc, b, S, bt), vb)
            r64 = salience.reference.attention(q[b:b + 1].double(), kb.double(), vb.double(), mask=mask)
            rt = salience.reference.attention(q[b:b + 1], kb, vb, mask=mask)
            assert_rel_close(res.out[b:b + 1], rt.out, r64.out, what=f"step {step}, sequence {b}")
        lens = lens + L_new


def test_checks_still_raise():
    """Every check the faster code paths might have skipped."""
    q, kc = torch.randn(1, 4, 1, 8), torch.zeros(1, 2, 16, 8)
    k = v = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match=">= 0"):
        salience.attention_with_kvcache(q, kc, kc.clone(), k, v, cache_seqlens=torch.tensor([-1]))
    with pytest.raises(ValueError, match="S_max = 16"):
        salience.attention_with_kvcache(q, kc, kc.clone(), k, v, cache_seqlens=16)
    with pytest.raises(TypeError, match="integers"):
        salience.attention_with_kvcache(q, kc, kc.clone(), k, v, cache_seqlens=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one length per sequence"):
        salience.attention_with_kvcache(q, kc, kc.clone(), k, v, cache_seqlens=torch.tensor([1, 2]))
    # one sequence whose block table names one block twice: its new keys would share a slot
    pool = torch.zeros(3, 2, 4, 8)
    k5, v5 = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="same cache slot"):
        salience.attention_with_kvcache(q, pool, pool.clone(), k5, v5, cache_seqlens=3,
                                        block_table=torch.tensor([[0, 0, 1]]))
    with pytest.raises(ValueError, match="outside the pool"):
        salience.attention_with_kvcache(q, pool, pool.clone(), k, v, cache_seqlens=5,
                                        block_table=torch.tensor([[0, 7, 1]]))
    # lengths given as a 0-dim tensor or a list still work, and equal the int form
    a = salience.attention_with_kvcache(q, kc, kc, cache_seqlens=torch.tensor(5))
    b = salience.attention_with_kvcache(q, kc, kc, cache_seqlens=[5])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
