"""BlockMask: analytic tile classes agree with evaluation; never call a partial tile full or empty."""

import pytest
import torch

from salience import masks as M
from salience.blocks import EMPTY, FULL, PARTIAL, BlockMask, _evaluate_classes

IDS = torch.tensor([0] * 10 + [1] * 23 + [2] * 7 + [3] * 10)  # 50 tokens, 4 documents

MASKS = [
    M.causal(), M.causal(align="bottom_right"), M.sliding_window(7), M.sliding_window(3, 9),
    M.padding(q_lengths=[50, 21], kv_lengths=[13, 50]), M.document(IDS), M.prefix_lm(11),
    M.global_tokens([0, 17, 33]), M.dilated(3), M.dilated(8), M.block_diagonal(6),
    M.random_blocks(0.4, block=5, seed=2), M.full(), M.dense(torch.rand(2, 1, 50, 50) > 0.8),
    M.causal() & M.document(IDS), M.sliding_window(4) | M.global_tokens([3]), ~M.sliding_window(2, 2),
    M.document(torch.tensor([3, 1, 2, 1, 0] * 10)),  # unsorted ids: classification may be conservative
]
EXACT = {i for i in range(len(MASKS))} - {len(MASKS) - 1, 15}


@pytest.mark.parametrize("tq,tk", [(8, 8), (16, 4), (7, 13), (64, 64)])
@pytest.mark.parametrize("i", range(len(MASKS)), ids=lambda i: repr(MASKS[i]))
def test_analytic_agrees_with_evaluation(i, tq, tk):
    m = MASKS[i]
    bm = BlockMask.from_mask(m, 2, 3, 50, 50, q_block=tq, kv_block=tk)
    assert bm.analytic
    truth = _evaluate_classes(m.bind(50, 50), 2, 3, 50, 50, tq, tk, None)
    got = bm.classes.expand_as(truth)
    # never wrong in the dangerous direction
    assert not bool(((got == FULL) & (truth != FULL)).any()), "a tile called full is not"
    assert not bool(((got == EMPTY) & (truth != EMPTY)).any()), "a tile called empty is not"
    if i in EXACT:
        assert torch.equal(got, truth)


def test_rectangular_and_callable_fallback():
    def diag(b, h, q, kv):
        return (q - kv).abs() < 2

    bm = BlockMask.from_mask(diag, 1, 1, 40, 24, q_block=8, kv_block=8)
    assert not bm.analytic
    dense = M.as_mask_mod(diag).to_dense(1, 1, 40, 24)[0, 0]
    for i in range(5):
        for j in range(3):
            tile = dense[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
            want = FULL if tile.all() else (EMPTY if not tile.any() else PARTIAL)
            assert int(bm.classes[0, 0, i, j]) == want


def test_no_dense_evaluation_for_named_masks(monkeypatch):
    """Analytic classification never calls the predicate (so no L x S work)."""
    m = M.causal() & M.sliding_window(256)
    calls = []
    orig = m.fn
    m.fn = lambda *a: calls.append(1) or orig(*a)
    bm = BlockMask.from_mask(m, 1, 8, 65536, 65536, q_block=128, kv_block=128)
    assert not calls
    assert bm.classes.shape == (1, 1, 512, 512)
    assert bm.skipped_fraction() > 0.99


def test_ascii_and_counts():
    bm = BlockMask.from_mask(M.causal(), 1, 1, 8, 8, q_block=2, kv_block=2)
    assert bm.ascii() == "+...\n#+..\n##+.\n###+"
    assert bm.counts() == {"empty": 6, "partial": 4, "full": 6}
    assert "37.5% skipped" in str(bm)
    big = BlockMask.from_mask(M.sliding_window(64), 1, 1, 65536, 65536, q_block=64, kv_block=64)
    art = big.ascii(max_size=32)
    assert len(art.splitlines()) == 32 and all(len(r) == 32 for r in art.splitlines())


def test_spans_and_contiguity():
    bm = BlockMask.from_mask(M.sliding_window(10), 1, 1, 64, 64, q_block=16, kv_block=16)
    lo, hi = bm.kv_spans()
    assert lo[0, 0].tolist() == [0, 0, 1, 2] and hi[0, 0].tolist() == [1, 2, 3, 4]
    assert bm.is_contiguous()
    assert not BlockMask.from_mask(M.dilated(40), 1, 1, 64, 64, q_block=8, kv_block=8).is_contiguous()


def test_blockmask_errors():
    with pytest.raises(ValueError, match="q_block"):
        BlockMask.from_mask(M.causal(), 1, 1, 8, 8, q_block=0)
    with pytest.raises(TypeError, match="mask must be"):
        BlockMask.from_mask(5, 1, 1, 8, 8)
