"""salience.kernels.decode: a few query rows against a contiguous or paged KV cache, on both of its paths (the
compiled kernel and the torch fallback), against the float64 reference with the relative-error rule.

The reference sees the logical cache (the paged pool gathered through the block table), a boolean mask
``lo <= p < hi`` per row, and a score_mod that applies softcap to the scaled score and then the ALiBi bias
``- slope * |q_pos - p|``; sinks go to the reference's softmax.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from salience import reference
from salience.kernels import config as kconfig
from salience.kernels import decode
from salience.testing import assert_rel_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    """Run a test on the compiled kernel (skipped where it cannot be built) and on the torch fallback."""
    if request.param == "compiled":
        if not decode.available():
            pytest.skip(f"compiled decode kernel unavailable: {decode.status()}")
    else:
        monkeypatch.setattr(decode, "FORCE_TORCH", True)
    return request.param


def _logical(cache, block_table, capacity):
    """(B, Hkv, capacity, D) view of a cache: the pool gathered through the block table."""
    if block_table is None:
        return cache
    pool = cache[block_table.long().clamp(0, cache.shape[0] - 1)]  # (B, MB, Hkv, bs, D)
    B, MB, Hkv, bs, D = pool.shape
    return pool.permute(0, 2, 1, 3, 4).reshape(B, Hkv, MB * bs, D)[:, :, :capacity]


def _reference(q, k, v, lo, hi, scale, dtype, block_table=None, slopes=None, q_pos=None, softcap=None, sinks=None):
    cap = lo.new_tensor(0).item() + (k.shape[2] if block_table is None else block_table.shape[1] * k.shape[2])
    K, V = _logical(k, block_table, cap).to(dtype), _logical(v, block_table, cap).to(dtype)
    pos = torch.arange(cap)
    mask = ((pos >= lo[..., None]) & (pos < hi[..., None])).unsqueeze(1)  # (B, 1, L, S)
    B, H = q.shape[:2]
    sl = None if slopes is None else slopes.reshape(-1, H).expand(B, H).to(dtype)

    def mod(s, b, h, qi, kv):
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if sl is not None:
            s = s - sl[b, h] * (q_pos[b, qi] - kv).abs().to(s.dtype)
        return s

    r = reference.attention(q.to(dtype), K, V, mask=mask, score_mod=mod, scale=scale,
                            sinks=None if sinks is None else sinks.to(dtype))
    return r.out, r.lse


def _intervals(lengths: torch.Tensor, L: int, window: int | None):
    """Bottom-right causal rows over per-sequence cache lengths (the last row sees the whole cache), optionally
    limited to the last ``window`` keys."""
    i = torch.arange(L).view(1, L)
    hi = (lengths.view(-1, 1) - (L - 1) + i).clamp(min=0)
    lo = torch.zeros_like(hi) if window is None else (hi - window).clamp(min=0)
    return lo, hi


def _paged(k, v, block_size, gen, pad=3):
    """Scatter contiguous (B, Hkv, S, D) caches into a shuffled pool with spare blocks; a random block table."""
    B, Hkv, S, D = k.shape
    MB = -(-S // block_size)
    nb = B * MB + pad
    perm = torch.randperm(nb, generator=gen)[: B * MB].view(B, MB)
    pk = torch.randn(nb, Hkv, block_size, D, generator=gen).to(k.dtype)
    pv = torch.randn(nb, Hkv, block_size, v.shape[3], generator=gen).to(v.dtype)
    for b in range(B):
        for j in range(MB):
            n = min(block_size, S - j * block_size)
            pk[perm[b, j], :, :n] = k[b, :, j * block_size: j * block_size + n]
            pv[perm[b, j], :, :n] = v[b, :, j * block_size: j * block_size + n]
    return pk, pv, perm.to(torch.int32)


def _case(B=3, H=4, Hkv=2, L=1, S=53, D=40, Dv=24, dtype=torch.float32, seed=0, window=None, paged=None,
          slopes=None, softcap=None, sinks=False, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Dv, generator=gen, dtype=torch.float64)
    if lengths is None:
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        lengths[0] = S
        if B > 2:
            lengths[-1] = 0 if L == 1 else 1
    lo, hi = _intervals(lengths, L, window)
    kw = {}
    if slopes == "H":
        kw["slopes"] = torch.rand(H, generator=gen, dtype=torch.float64) * 0.5
    elif slopes == "BH":
        kw["slopes"] = torch.rand(B, H, generator=gen, dtype=torch.float64) * 0.5
    if slopes is not None:
        kw["q_pos"] = hi - 1 + torch.randint(0, 3, (B, L), generator=gen)  # any logical position
    if softcap is not None:
        kw["softcap"] = softcap
    if sinks:
        kw["sinks"] = torch.randn(H, generator=gen, dtype=torch.float64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    bt = None
    if paged is not None:
        k, v, bt = _paged(k, v, paged, gen)
    return q, k, v, lo, hi, bt, kw


def _check_against_reference(q, k, v, lo, hi, bt, kw, scale=0.3):
    dtype = q.dtype
    kw_t = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    out, lse = decode.forward(q, k, v, lo=lo, hi=hi, scale=scale, block_table=bt, **kw_t)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and lse.shape == q.shape[:3]
    o64, l64 = _reference(q.double(), k.double(), v.double(), lo, hi, scale, torch.float64, bt, **kw)
    ot, lt = _reference(q, k, v, lo, hi, scale, dtype, bt, **kw_t)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_rel_close(out, ot, o64, what="out")
    assert_rel_close(lse, lt.float(), l64, what="lse")
    return out, lse


# ------------------------------------------------------------------------------------------- against the spec

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [None, 8, 5], ids=["contiguous", "paged8", "paged5"])
@pytest.mark.parametrize("L", [1, 3])
def test_causal_lengths(path, dtype, paged, L):
    for heads, seed in (((4, 2), 0), ((4, 1), 1), ((4, 4), 2)):
        _check_against_reference(*_case(H=heads[0], Hkv=heads[1], L=L, dtype=dtype, paged=paged, seed=seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [None, 16], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("mods", [{"window": 7}, {"slopes": "H"}, {"slopes": "BH"}, {"softcap": 2.0}, {"sinks": True},
                                  {"window": 11, "slopes": "H", "softcap": 1.5, "sinks": True}],
                         ids=["window", "alibi_H", "alibi_BH", "softcap", "sinks", "all"])
def test_masks_and_mods(path, dtype, paged, mods):
    for L, seed in ((1, 3), (3, 4)):
        _check_against_reference(*_case(L=L, dtype=dtype, paged=paged, seed=seed, **mods))


@pytest.mark.parametrize("paged", [None, 4])
def test_every_length(path, paged):
    """Lengths 0..S, one per sequence, with L=1 and L=3 and a grouped 8/2 head layout."""
    S = 24
    for L in (1, 3):
        lengths = torch.arange(0, S + 1)
        _check_against_reference(*_case(B=S + 1, H=8, Hkv=2, L=L, S=S, D=16, Dv=16, paged=paged, seed=5 + L,
                                        lengths=lengths, sinks=L == 3))


def test_long_cache_split(path):
    """A cache long enough that the kernel splits the key axis across threads (flash-decoding)."""
    for dtype in DTYPES:
        _check_against_reference(*_case(B=1, H=8, Hkv=2, S=5000, D=64, Dv=64, dtype=dtype, seed=9,
                                        lengths=torch.tensor([4999])))
        _check_against_reference(*_case(B=2, H=8, Hkv=1, L=3, S=3000, D=64, Dv=64, dtype=dtype, seed=10, paged=16,
                                        lengths=torch.tensor([2000, 3000]), window=1500, slopes="H"))


def test_many_rows(path):
    """Speculative decoding's longest blocks: L=16 rows with 8 or 64 query heads per kv head (16 row tiles; past
    the compiled kernel's 512 rows per kv head the torch path runs)."""
    for H, Hkv, seed in ((16, 2, 30), (64, 1, 31)):
        _check_against_reference(*_case(B=2, H=H, Hkv=Hkv, L=16, S=90, D=16, Dv=16, paged=8, seed=seed,
                                        lengths=torch.tensor([90, 40]), window=30, slopes="H", sinks=True))


def test_empty_rows(path):
    q, k, v, lo, hi, bt, kw = _case(B=2, L=3, lengths=torch.tensor([0, 0]))
    out, lse = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3)
    assert bool((hi <= lo).all())
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    sinks = torch.randn(q.shape[1])
    out, lse = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks.view(1, -1, 1).expand_as(lse))


def _poisoned(k, v, bt, block_size, p):
    """Copies of the caches with NaN at logical key p of every sequence (through the block table when paged)."""
    k2, v2 = k.clone(), v.clone()
    if bt is None:
        k2[:, :, p], v2[:, :, p] = float("nan"), float("nan")
    else:
        k2[bt[:, p // block_size].long(), :, p % block_size] = float("nan")
        v2[bt[:, p // block_size].long(), :, p % block_size] = float("nan")
    return k2, v2


@pytest.mark.parametrize("paged", [None, 8])
def test_nan_outside_the_interval(path, paged):
    """NaN stored at keys a row cannot see leaves that row bit-for-bit unchanged."""
    q, k, v, lo, hi, bt, kw = _case(L=3, S=40, paged=paged, seed=11, window=9, slopes="H", sinks=True)
    clean = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3, block_table=bt, **kw)
    for p in (0, 5, 17, 31, 39):
        k2, v2 = _poisoned(k, v, bt, paged, p)
        if bt is not None:
            unused = sorted(set(range(k.shape[0])) - set(bt.flatten().tolist()))
            k2[unused], v2[unused] = float("nan"), float("nan")
        out, lse = decode.forward(q, k2, v2, lo=lo, hi=hi, scale=0.3, block_table=bt, **kw)
        blind = ~((lo <= p) & (p < hi))  # (B, L): rows that cannot see key p
        b, i = blind.nonzero(as_tuple=True)
        assert b.numel() > 0
        assert torch.equal(out[b, :, i], clean[0][b, :, i]) and torch.equal(lse[b, :, i], clean[1][b, :, i])


def test_block_table_padding_is_not_read(path):
    """Entries of logical blocks past every row's interval may hold anything (-1, out of range)."""
    q, k, v, lo, hi, bt, kw = _case(B=2, S=40, paged=8, lengths=torch.tensor([9, 17]), seed=12)
    want = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3, block_table=bt)
    bt2 = bt.clone()
    bt2[0, 2:] = -1
    bt2[1, 3:] = 10_000
    got = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3, block_table=bt2.long())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_strided_inputs(path):
    """Non-contiguous q and caches (a transposed layout, a slice of a larger cache) give the same result."""
    q, k, v, lo, hi, bt, kw = _case(B=2, H=4, Hkv=2, L=3, S=30, D=16, Dv=16, seed=13)
    want = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    big_k = torch.zeros(2, 2, 50, 16)
    big_k[:, :, :30] = k
    ks = big_k[:, :, :30]
    vs = v.transpose(2, 3).contiguous().transpose(2, 3)
    got = decode.forward(qs, ks, vs, lo=lo, hi=hi, scale=0.3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_float64_runs_the_torch_path():
    q, k, v, lo, hi, bt, kw = _case(dtype=torch.float64, L=3, paged=8, slopes="BH", sinks=True, seed=14)
    out, lse = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3, block_table=bt, **kw)
    o64, l64 = _reference(q, k, v, lo, hi, 0.3, torch.float64, bt, **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, o64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, l64, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ other instruction sets

@pytest.mark.parametrize("isa, flags, lanes", [("avx2", ["-mno-avx512f"], 8), ("scalar", ["-mno-avx"], 1)])
def test_other_instruction_sets(monkeypatch, isa, flags, lanes):
    """The AVX2 (AMD EPYC) and scalar builds, compiled here by turning the wider instructions off, give the
    same answers; the cache key includes the flags, so they never replace the native build."""
    if not decode.available():
        pytest.skip(f"compiled decode kernel unavailable: {decode.status()}")
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    lib = decode.build(flags)
    assert lib.salience_decode_lanes() == lanes
    monkeypatch.setattr(decode, "_STATE", {"lib": lib, "why": "compiled"})
    for dtype in DTYPES:
        _check_against_reference(*_case(L=3, dtype=dtype, paged=5, seed=20, window=13, slopes="BH", sinks=True))
        _check_against_reference(*_case(B=2, H=8, Hkv=1, D=37, Dv=19, dtype=dtype, seed=21, softcap=3.0))
        _check_against_reference(*_case(B=1, H=8, Hkv=2, S=3000, D=64, Dv=64, dtype=dtype, seed=22,
                                        lengths=torch.tensor([2999])))


# ----------------------------------------------------------------------------------------------- the fallback

def test_salience_native_off_uses_torch():
    """SALIENCE_NATIVE=0 in a fresh process: the compiled kernel is not built, the torch path gives the result."""
    code = (
        "import torch\n"
        "from salience.kernels import decode\n"
        "assert not decode.available(), decode.status()\n"
        "print(decode.status())\n"
        "q = torch.randn(1, 4, 1, 8); k = torch.randn(1, 2, 6, 8)\n"
        "out, lse = decode.forward(q, k, k, lo=torch.tensor([[0]]), hi=torch.tensor([[1]]), scale=0.5)\n"
        "assert torch.allclose(out[0, :, 0], k[0, [0, 0, 1, 1], 0])\n"
    )
    env = dict(os.environ, SALIENCE_NATIVE="0")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "SALIENCE_NATIVE=0" in run.stdout


# -------------------------------------------------------------------------------------------- bad arguments

def _args(**over):
    q, k, v, lo, hi, bt, kw = _case(B=2, L=1, S=16, D=8, Dv=8, paged=4, lengths=torch.tensor([5, 16]))
    a = dict(q=q, k=k, v=v, lo=lo, hi=hi, scale=0.3, block_table=bt)
    a.update(over)
    return a


def _call(a):
    q, k, v = a.pop("q"), a.pop("k"), a.pop("v")
    return decode.forward(q, k, v, **a)


@pytest.mark.parametrize("bad, match", [
    (lambda a: {"k": a["k"].half()}, "dtype"),
    (lambda a: {"q": a["q"].half()}, "dtype"),
    (lambda a: {"hi": a["hi"] + 1}, r"outside \[0, 16\]"),
    (lambda a: {"lo": a["lo"] - 1}, "outside"),
    (lambda a: {"lo": a["lo"].float()}, "integer"),
    (lambda a: {"hi": a["hi"][:, :0]}, r"\(B, L\)"),
    (lambda a: {"block_table": a["block_table"].clone().fill_(99)}, "not a block of the pool"),
    (lambda a: {"block_table": a["block_table"].float()}, "int32 or int64"),
    (lambda a: {"block_table": a["block_table"][:1]}, "block_table"),
    (lambda a: {"k": a["k"][:, :1].expand(-1, 3, -1, -1), "v": a["v"][:, :1].expand(-1, 3, -1, -1)}, "multiple"),
    (lambda a: {"v": a["v"][:, :, :2]}, "k and v"),
    (lambda a: {"k": a["k"][..., :4]}, "head dim"),
    (lambda a: {"slopes": torch.ones(4)}, "q_pos"),
    (lambda a: {"slopes": torch.ones(3), "q_pos": a["hi"]}, "slopes"),
    (lambda a: {"slopes": torch.ones(4), "q_pos": a["hi"].float()}, "q_pos"),
    (lambda a: {"sinks": torch.ones(3)}, "sinks"),
    (lambda a: {"softcap": -1.0}, "softcap"),
    (lambda a: {"scale": float("nan")}, "scale"),
    (lambda a: {"q": a["q"][0]}, "q"),
    (lambda a: {"q": a["q"].clone().requires_grad_()}, "forward only"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments(path, bad, match):
    a = _args()
    a.update(bad(a))
    with pytest.raises((ValueError, TypeError), match=match):
        _call(a)


def test_contiguous_cache_batch_must_match(path):
    q, k, v, lo, hi, bt, kw = _case(B=2, S=16, D=8, Dv=8)
    with pytest.raises(ValueError, match="B=2"):
        decode.forward(q, k[:1], v[:1], lo=lo, hi=hi, scale=0.3)


def _heads_inside_keys(t: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S, D) as a view of flash-attention's (B, S, Hkv, D) storage: a key's heads lie side by side, so
    the kernel reads all kv heads of a work item together."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,L", [((4, 2), 1), ((8, 1), 3), ((16, 4), 2), ((64, 8), 9)],
                         ids=["gqa", "mqa", "gqa16", "tiles_limit_heads"])
@pytest.mark.parametrize("extras", [{}, {"window": 37, "slopes": "H", "softcap": 4.0, "sinks": True}],
                         ids=["causal", "window_alibi_softcap_sinks"])
def test_heads_inside_each_key(path, dtype, heads, L, extras):
    """Caches stored with the kv heads inside each key (flash-attention's order, passed transposed) equal the
    float64 reference, with the key axis split into pieces (S=1500 over per-sequence lengths) and, for 64 query
    heads over 8 kv heads with 9 rows, fewer kv heads per item than the cache has (64 row tiles at most)."""
    H, Hkv = heads
    q, k, v, lo, hi, bt, kw = _case(B=3, H=H, Hkv=Hkv, L=L, S=1500, D=32, Dv=32, dtype=dtype, seed=21, **extras)
    ki, vi = _heads_inside_keys(k), _heads_inside_keys(v)
    assert Hkv == 1 or ki.stride(1) < ki.stride(2)
    with kconfig.use(kconfig.current().replace(decode_min_split=64)):
        out, lse = _check_against_reference(q, ki, vi, lo, hi, bt, kw)
        want = decode.forward(q, k.contiguous(), v.contiguous(), lo=lo, hi=hi, scale=0.3,
                              **{n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                                 for n, t in kw.items()})
    assert_rel_close(out, want[0], _reference(q.double(), k.double(), v.double(), lo, hi, 0.3, torch.float64, None,
                                              **kw)[0], what="against the (B, Hkv, S, D) layout")


def test_heads_inside_each_key_keep_hidden_nan_out(path):
    """NaN at keys a row cannot see, in a heads-inside-keys cache, leaves that row bit-for-bit unchanged."""
    q, k, v, lo, hi, bt, kw = _case(L=3, S=300, seed=22, window=40, slopes="H", sinks=True)
    ki, vi = _heads_inside_keys(k), _heads_inside_keys(v)
    clean = decode.forward(q, ki, vi, lo=lo, hi=hi, scale=0.3, **kw)
    for p in (0, 150, 259, 299):
        k2, v2 = _heads_inside_keys(k.clone()), _heads_inside_keys(v.clone())
        k2[:, :, p], v2[:, :, p] = float("nan"), float("inf")
        out, lse = decode.forward(q, k2, v2, lo=lo, hi=hi, scale=0.3, **kw)
        blind = ~((lo <= p) & (p < hi))
        b, i = blind.nonzero(as_tuple=True)
        assert b.numel() > 0
        assert torch.equal(out[b, :, i], clean[0][b, :, i]) and torch.equal(lse[b, :, i], clean[1][b, :, i])
