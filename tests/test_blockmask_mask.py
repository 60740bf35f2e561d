"""Prebuilt block masks as mask=: torch's FlexAttention BlockMask and salience's BlockMask, against
torch's flex_attention (eager, float64) and the float64 reference, including block tables whose full blocks
disagree with their mask_mod (the compiled kernel's semantics: full | (partial & mask_mod))."""

import warnings

import pytest
import torch

import salience
from salience import _blockmask, compat, masks, reference
from salience.blocks import BlockMask as SalienceBlockMask
from salience.testing import assert_rel_close

fa = pytest.importorskip("torch.nn.attention.flex_attention")
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def causal(b, h, q, kv):
    return q >= kv


def window_or_sink(b, h, q, kv):
    return ((q - kv).abs() <= 20) | (kv < 4)


def per_head(b, h, q, kv):
    return (kv <= q + 8 * h) & (kv % (b + 2) != 0)


def _qkv(B, H, Hkv, L, S, D=8, dtype=torch.float64):
    return (torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype),
            torch.randn(B, Hkv, S, D, dtype=dtype))


def _flex(q, k, v, bm):
    """Eager flex_attention with the block mask's compiled-kernel semantics spelled out as its mask_mod: eager
    flex evaluates the mask_mod everywhere and ignores the block table, so the table goes into the predicate."""
    dense = bm.to_dense()  # (Bm, Hm, nq, nk) blocks listed (partial or full)
    full = torch.zeros_like(dense, dtype=torch.bool)
    if bm.full_kv_num_blocks is not None:
        full = fa.BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
                                           seq_lengths=bm.seq_lengths).to_dense().bool()
    partial = dense.bool() & ~full
    qb, kb = bm.BLOCK_SIZE
    inner = bm.mask_mod

    def spelled(b, h, q, kv):
        bi = b if full.shape[0] > 1 else b * 0
        hi = h if full.shape[1] > 1 else h * 0
        return full[bi, hi, q // qb, kv // kb] | (partial[bi, hi, q // qb, kv // kb] & inner(b, h, q, kv))

    spelled_bm = fa.create_block_mask(spelled, None, None, *bm.seq_lengths, device="cpu", BLOCK_SIZE=bm.BLOCK_SIZE)
    return fa.flex_attention(q, k, v, block_mask=spelled_bm, enable_gqa=q.shape[1] != k.shape[1], return_lse=True)


@pytest.mark.parametrize("mm, BH", [(causal, (None, None)), (window_or_sink, (None, None)), (per_head, (2, 4))])
@pytest.mark.parametrize("LS", [(256, 256), (200, 136)])
def test_torch_block_mask_matches_flex(mm, BH, LS):
    L, S = LS
    q, k, v = _qkv(2, 4, 2, L, S)
    bm = fa.create_block_mask(mm, BH[0], BH[1], L, S, device="cpu", BLOCK_SIZE=64)
    out, lse = fa.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    r = salience.attention(q, k, v, mask=bm, return_lse=True)
    assert torch.allclose(r.out, out, atol=1e-12)
    fin = torch.isfinite(lse)
    assert torch.equal(fin, torch.isfinite(r.lse)) and torch.allclose(r.lse[fin], lse[fin], atol=1e-12)
    c = compat.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    assert torch.allclose(c, out, atol=1e-12)


def _disagreeing(L, S, block=32):
    """Full blocks declared where the causal mask_mod is False (the upper block triangle) and the diagonal
    blocks partial; the blocks left of the diagonal in row block 1 are left out (masked though causal says True)."""
    nq, nk = -(-L // block), -(-S // block)
    full = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
    partial = torch.zeros_like(full)
    for i in range(nq):
        for j in range(nk):
            if j > i:
                full[0, 0, i, j] = True
            elif j == i:
                partial[0, 0, i, j] = True
            elif i != 1:
                full[0, 0, i, j] = (i + j) % 3 != 0
                partial[0, 0, i, j] = (i + j) % 3 == 0
    pn, pi = fa._dense_to_ordered(partial)
    fn, fi = fa._dense_to_ordered(full)
    return fa.BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=block, mask_mod=causal, seq_lengths=(L, S))


def test_full_blocks_that_disagree_with_mask_mod():
    L = S = 160
    q, k, v = _qkv(1, 2, 2, L, S)
    bm = _disagreeing(L, S)
    out, lse = _flex(q, k, v, bm)
    r = salience.attention(q, k, v, mask=bm, return_lse=True)
    assert torch.allclose(r.out, out, atol=1e-12)
    # the eager flex_attention (mask_mod only) differs: the table matters
    eager = fa.flex_attention(q, k, v, block_mask=bm)
    assert (eager - r.out).abs().max() > 1e-3
    # and against the float64 reference with the spelled-out predicate, forward and backward
    m = _blockmask.as_mask(bm)
    vis = m.to_dense(1, 2, L, S)
    assert bool(vis[0, 0, 0, 40]) and not bool(vis[0, 0, 40, 10])  # full above, left-out block in row block 1
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out2 = salience.attention(*leaves, mask=bm)
    g = torch.autograd.grad(out2.pow(2).sum(), leaves)
    leaves_r = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves_r, mask=vis).out
    gr = torch.autograd.grad(ref.pow(2).sum(), leaves_r)
    assert_rel_close(out2, ref, ref)
    for a, b in zip(g, gr):
        assert_rel_close(a, b, b)


def test_float32_and_grads_against_reference():
    L, S = 192, 192
    q64, k64, v64 = _qkv(1, 4, 2, L, S)
    bm = fa.create_block_mask(window_or_sink, None, None, L, S, device="cpu", BLOCK_SIZE=32)
    m = _blockmask.as_mask(bm)
    ref64 = reference.attention(q64, k64, v64, mask=m).out
    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    out = salience.attention(q, k, v, mask=bm)
    ref32 = reference.attention(q.detach(), k.detach(), v.detach(), mask=m).out
    assert_rel_close(out, ref32, ref64)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_salience_block_mask_and_cache():
    L, S = 150, 150
    q, k, v = _qkv(2, 2, 2, L, S)
    sbm = SalienceBlockMask.from_mask(masks.causal() & masks.sliding_window(40), 1, 1, L, S, q_block=32,
                                      kv_block=32)
    r = salience.attention(q, k, v, mask=sbm)
    want = salience.attention(q, k, v, mask=masks.causal() & masks.sliding_window(40))
    assert torch.allclose(r, want, atol=1e-12)
    m1 = _blockmask.as_mask(sbm)
    assert _blockmask.as_mask(sbm) is m1  # built once per object
    tbm = fa.create_block_mask(causal, None, None, L, S, device="cpu", BLOCK_SIZE=64)
    t1 = _blockmask.as_mask(tbm)
    assert _blockmask.as_mask(tbm) is t1
    assert _blockmask.as_mask(fa.create_block_mask(causal, None, None, L, S, device="cpu", BLOCK_SIZE=64)) is not t1


def test_analytic_tiles_are_sound():
    """The tile classes read from the table never call an element visible-free when it is visible, nor full
    when it is not, for kernel tiles that do not line up with the table's blocks."""
    L, S = 200, 136
    bm = _disagreeing(L, S, block=24)
    m = _blockmask.as_mask(bm)
    dense = m.to_dense(1, 1, L, S)[0, 0]
    cls = SalienceBlockMask.from_mask(m, 1, 1, L, S, q_block=40, kv_block=16)
    assert cls.analytic
    for i in range(cls.classes.shape[2]):
        for j in range(cls.classes.shape[3]):
            tile = dense[i * 40:(i + 1) * 40, j * 16:(j + 1) * 16]
            c = int(cls.classes[0, 0, i, j])
            assert (c != 0) or not bool(tile.any())
            assert (c != 2) or bool(tile.all())


def test_noop_and_lengths():
    q, k, v = _qkv(1, 2, 2, 64, 64)
    noop = fa.create_block_mask(fa.noop_mask, None, None, 64, 64, device="cpu")
    assert salience.plan(q, k, v, mask=noop).backend == salience.plan(q, k, v).backend
    bm = fa.create_block_mask(causal, None, None, 128, 128, device="cpu")
    with pytest.raises(ValueError, match="_adjust"):
        salience.attention(q, k, v, mask=bm)
    with pytest.raises(ValueError, match="batch axis"):
        salience.attention(*_qkv(3, 2, 2, 64, 64), mask=fa.create_block_mask(causal, 2, None, 64, 64, device="cpu"))
    adj = bm._adjust(64, 64)
    assert torch.allclose(salience.attention(q, k, v, mask=adj), fa.flex_attention(q, k, v, block_mask=adj),
                          atol=1e-12)


@pytest.mark.slow
def test_disagreeing_block_mask_matches_compiled_flex():
    """The compiled FlexAttention kernel (the semantics a block table describes; ~40 s to compile on 2 cores)."""
    L = S = 256
    q, k, v = _qkv(1, 2, 2, L, S, D=16, dtype=torch.float32)
    bm = _disagreeing(L, S, block=128)
    out = torch.compile(fa.flex_attention)(q, k, v, block_mask=bm)
    r = salience.attention(q, k, v, mask=bm)
    assert torch.allclose(r, out, atol=1e-5)
    assert (fa.flex_attention(q, k, v, block_mask=bm) - out).abs().max() > 1e-2  # eager ignores the table
