"""The decode kernel's AMX path (bfloat16 q.k on the tile unit, kernels/decode.cpp) against the float64 reference
and against the vdpbf16ps path it replaces, on the shapes that reach it: D a multiple of 32, groups of 16 evenly
spaced keys (contiguous caches, paged blocks of 16 or more; blocks of 8 mix both paths), two row tiles of up to 8
rows in one tile product (and a third alone), unaligned windows and piece boundaries, NaN in keys no row can see.
Skipped where the CPU or the kernel has no AMX (the vdpbf16ps and AVX2 paths are tested in test_decode_kernel.py)."""

from __future__ import annotations

import pytest
import torch
from tests.test_decode_kernel import _case, _check_against_reference, _poisoned

from salience.kernels import decode


def _lib():
    if not decode.available():
        pytest.skip(f"compiled decode kernel unavailable: {decode.status()}")
    return decode.build()


@pytest.fixture
def amx(monkeypatch):
    lib = _lib()
    monkeypatch.delenv("SALIENCE_DECODE_AMX", raising=False)
    if not lib.salience_decode_amx():
        pytest.skip("no AMX-BF16 here (or Linux did not grant the tile state)")
    return lib


CASES = {
    "contiguous D=128 G=4": dict(B=2, H=8, Hkv=2, S=300, D=128, Dv=128, lengths=torch.tensor([300, 77])),
    "paged 16, D=64, G=8, L=2": dict(B=2, H=8, Hkv=1, L=2, S=200, D=64, Dv=48, paged=16,
                                     lengths=torch.tensor([200, 131])),
    "paged 32, window 45, ALiBi": dict(B=3, H=4, Hkv=2, S=260, D=96, Dv=96, paged=32, window=45, slopes="BH",
                                       lengths=torch.tensor([260, 100, 0])),
    "paged 8 (mixed paths), softcap, sinks": dict(B=2, H=6, Hkv=3, L=3, S=150, D=32, Dv=40, paged=8, softcap=5.0,
                                                  sinks=True, lengths=torch.tensor([150, 149])),
    "16 rows per kv head (two row tiles)": dict(B=1, H=16, Hkv=1, S=500, D=64, Dv=64,
                                                lengths=torch.tensor([497])),
    "split into pieces": dict(B=1, H=8, Hkv=2, S=6000, D=128, Dv=128, lengths=torch.tensor([5999])),
    "24 rows: a pair of tiles and one alone, window": dict(B=2, H=8, Hkv=1, L=3, S=400, D=64, Dv=64, window=70,
                                                            lengths=torch.tensor([400, 213])),
    "32 rows per kv head, paged 16, ALiBi": dict(B=2, H=16, Hkv=2, L=4, S=300, D=128, Dv=128, paged=16, slopes="H",
                                                 lengths=torch.tensor([300, 45])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_amx_matches_the_reference(amx, name):
    _check_against_reference(*_case(dtype=torch.bfloat16, seed=40 + list(CASES).index(name), **CASES[name]))


@pytest.mark.parametrize("name", list(CASES))
def test_amx_off_gives_the_same_answers(monkeypatch, amx, name):
    """SALIENCE_DECODE_AMX=0 switches to vdpbf16ps for the same call: both are within the relative-error rule of
    the float64 reference, and within float32 rounding of each other (same exact products, other sum order)."""
    case = _case(dtype=torch.bfloat16, seed=60 + list(CASES).index(name), **CASES[name])
    on = _check_against_reference(*case)
    monkeypatch.setenv("SALIENCE_DECODE_AMX", "0")
    assert amx.salience_decode_amx() == 0
    off = _check_against_reference(*case)
    torch.testing.assert_close(on[1], off[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on[0].float(), off[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("paged", [None, 16])
def test_amx_nan_in_hidden_keys(amx, paged):
    """Keys are read sixteen at a time on the tile unit, visible or not: NaN stored at a key a row cannot see
    (inside a group the row reads) leaves that row bit-for-bit unchanged."""
    q, k, v, lo, hi, bt, kw = _case(B=2, H=8, Hkv=2, L=2, S=128, D=64, Dv=64, dtype=torch.bfloat16, paged=paged,
                                    seed=80, window=37, lengths=torch.tensor([128, 90]))
    clean = decode.forward(q, k, v, lo=lo, hi=hi, scale=0.3, block_table=bt)
    for p in (3, 40, 52, 89, 100):
        k2, v2 = _poisoned(k, v, bt, paged, p)
        out, lse = decode.forward(q, k2, v2, lo=lo, hi=hi, scale=0.3, block_table=bt)
        blind = ~((lo <= p) & (p < hi))
        b, i = blind.nonzero(as_tuple=True)
        assert b.numel() > 0
        assert torch.equal(out[b, :, i], clean[0][b, :, i]) and torch.equal(lse[b, :, i], clean[1][b, :, i])
