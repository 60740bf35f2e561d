"""Prebuilt block masks as ``mask=``: salience's :class:`~salience.blocks.BlockMask` and torch's
``torch.nn.attention.flex_attention.BlockMask`` (from ``create_block_mask`` or ``BlockMask.from_kv_blocks``).

A block mask is a table over (query block, key block) pairs plus a mask_mod. Its meaning, as torch's compiled
FlexAttention kernel computes it (``torch/nn/attention/flex_attention.py``):

* blocks listed in ``full_kv_num_blocks``/``full_kv_indices`` are **full**: every key is visible and the
  mask_mod is *not* evaluated there (even where it would say False);
* blocks listed in ``kv_num_blocks``/``kv_indices`` are **partial**: the mask_mod decides per element;
* blocks listed in neither are masked;
* ``BLOCK_SIZE = (Q_BLOCK_SIZE, KV_BLOCK_SIZE)``; ``seq_lengths = (Q_LEN, KV_LEN)`` must equal the inputs'
  lengths (torch raises otherwise and offers ``block_mask._adjust(q_len, kv_len)``, which crops the table to
  the top-left corner; salience raises the same way). The table's batch and head axes are 1 (broadcast) or
  the call's B and query heads H.

So the visible set is ``full | (partial & mask_mod)``. :func:`as_mask` turns a block mask into a
:class:`salience.masks.MaskMod` with that predicate and analytic tile classes read from the table (2-D prefix
sums, no element evaluation), built once per block mask object and cached on it.

Note: torch's *eager* ``flex_attention`` (not compiled) ignores the block table and evaluates the mask_mod
everywhere; where the two differ (full blocks declared where the mask_mod is False, blocks left out where it
is True) salience follows the compiled kernel, the one a block mask describes.

Example:
    >>> import torch, salience
    >>> from salience import masks
    >>> from salience.blocks import BlockMask
    >>> bm = BlockMask.from_mask(masks.causal(), 1, 1, 64, 64, q_block=16, kv_block=16)
    >>> q = torch.randn(1, 2, 64, 8)
    >>> out = salience.attention(q, q, q, mask=bm)
    >>> torch.allclose(out, salience.attention(q, q, q, mask=masks.causal()), atol=1e-5)
    True
"""

from __future__ import annotations

import torch

from . import masks as M
from .blocks import EMPTY, FULL, PARTIAL
from .blocks import BlockMask as SalienceBlockMask

__all__ = ["is_block_mask", "is_torch_block_mask", "as_mask", "resolve"]

_LARGE = 1 << 30  # torch's _LARGE_SPARSE_BLOCK_SIZE: the "no-op" block mask flex_attention makes for None


def is_torch_block_mask(obj) -> bool:
    """True for a ``torch.nn.attention.flex_attention.BlockMask`` (checked without importing that module)."""
    t = type(obj)
    return t.__name__ == "BlockMask" and t.__module__.startswith("torch.") and hasattr(obj, "kv_num_blocks")


def is_block_mask(obj) -> bool:
    """True for salience's or torch's BlockMask."""
    return isinstance(obj, SalienceBlockMask) or is_torch_block_mask(obj)


def resolve(mask):
    """``mask`` itself, or the :class:`MaskMod` of a block mask (see :func:`as_mask`)."""
    return as_mask(mask) if is_block_mask(mask) else mask


def _dense(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    """(..., nq, ncols) bool from a (num_blocks (..., nq), indices (..., nq, k)) pair: the first num entries."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1).long()
    cols = torch.where(valid, idx.long(), ncols)
    out = torch.zeros(*num.shape, ncols + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, cols, True)
    return out[..., :ncols]


def _torch_tables(bm):
    """(classes (Bm, Hm, nq, nk) int8, q_block, kv_block, L, S, inner mask_mod or None) of a torch BlockMask."""
    mm = getattr(bm, "mask_mod", None)
    if getattr(mm, "__name__", "") == "_sliced_mask_mod_error":
        raise ValueError("mask: this torch BlockMask was sliced (block_mask[b, h]) and has no mask_mod; build the "
                         "block mask for the batch and heads you call with, or index the inputs instead.")
    qb, kb = (int(x) for x in bm.BLOCK_SIZE)
    L, S = (int(x) for x in bm.seq_lengths)
    num, idx = bm.kv_num_blocks.cpu(), bm.kv_indices.cpu()
    ncols = max(idx.shape[-1], -(-S // kb) if kb < _LARGE else 1)
    fnum, fidx = bm.full_kv_num_blocks, bm.full_kv_indices
    for n, i in ((num, idx), (fnum, fidx)):
        if i is not None and n is not None and i.numel():
            valid = torch.arange(i.shape[-1]) < n.cpu().unsqueeze(-1).long()
            if bool(valid.any()):
                ncols = max(ncols, int(i.cpu().long()[valid].max()) + 1)
    partial = _dense(num, idx, ncols)
    full = _dense(fnum.cpu(), fidx.cpu(), ncols) if fnum is not None else torch.zeros_like(partial)
    classes = torch.where(full, FULL, torch.where(partial, PARTIAL, EMPTY)).to(torch.int8)
    inner = None if mm is None or getattr(mm, "__name__", "") == "noop_mask" else M.as_mask_mod(mm, "mask_mod")
    return classes, qb, kb, L, S, inner


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """2-D inclusive-exclusive prefix sums over the last two axes, padded with a leading zero row and column."""
    p = x.long().cumsum(-1).cumsum(-2)
    return torch.nn.functional.pad(p, (1, 0, 1, 0))


def _build(classes, qb, kb, L, S, inner, name, check_lengths: bool) -> M.MaskMod:
    """The MaskMod ``full | (partial & inner)`` over the table ``classes`` (Bm, Hm, nq, nk)."""
    Bm, Hm, nq, nk = classes.shape
    table = torch.nn.functional.pad(classes, (0, 1, 0, 1), value=EMPTY)  # out-of-table blocks are masked
    listed, fulls = _prefix(table != EMPTY), _prefix(table == FULL)
    per_device: dict = {}

    def on(dev):
        key = str(dev)
        if key not in per_device:
            per_device[key] = table.to(dev)
        return per_device[key]

    def fn(b, h, qi, ki):
        t = on(ki.device)
        c = t[b * 0 if Bm == 1 else b, h * 0 if Hm == 1 else h, (qi // qb).clamp(max=nq), (ki // kb).clamp(max=nk)]
        if inner is None:
            return c != EMPTY
        return (c == FULL) | ((c == PARTIAL) & M.check_mask_output(inner(b, h, qi, ki), inner, tuple(c.shape)))

    def tiles(ctx):
        qa, qz = (ctx.q_start // qb).clamp(max=nq), ((ctx.q_end - 1) // qb).clamp(max=nq) + 1
        ka, kz = (ctx.k_start // kb).clamp(max=nk), ((ctx.k_end - 1) // kb).clamp(max=nk) + 1

        def box(p):
            p = p.to(ctx.device)
            return p[..., qz, kz] - p[..., qa, kz] - p[..., qz, ka] + p[..., qa, ka]

        return box(listed) > 0, box(fulls) == (qz - qa) * (kz - ka)

    mask = M.MaskMod(fn, name, tiles=tiles)

    def check(B, H, Lc, Sc):
        if check_lengths and (Lc, Sc) != (L, S):
            raise ValueError(f"mask: the block mask was made for Q_LEN={L}, KV_LEN={S} but the inputs have L={Lc}, "
                             f"S={Sc}; build it for these lengths (create_block_mask(..., Q_LEN={Lc}, KV_LEN={Sc})), or "
                             "crop a torch BlockMask with block_mask._adjust(L, S) if its top-left corner is meant.")
        for n, want, axis in ((Bm, B, "batch"), (Hm, H, "head")):
            if n not in (1, want):
                raise ValueError(f"mask: the block mask has {n} entries on its {axis} axis; the call has {want} "
                                 f"(query heads for the head axis): make it with {axis} size 1 or {want}.")
        if inner is not None:
            inner.check(B, H, Lc, Sc)

    mask._check = check
    return mask


def _convert(bm) -> M.MaskMod:
    if isinstance(bm, SalienceBlockMask):
        return _build(bm.classes.cpu(), bm.q_block, bm.kv_block, bm.L, bm.S, bm.mask,
                      f"block_mask({bm.mask.name}, {bm.q_block}x{bm.kv_block})", True)
    classes, qb, kb, L, S, inner = _torch_tables(bm)
    name = getattr(inner, "name", "noop_mask")
    large = qb >= _LARGE and kb >= _LARGE
    nq, nk = -(-L // qb), -(-S // kb)
    covers = classes.shape[-2] >= nq and classes.shape[-1] >= nk
    if inner is None and covers and bool((classes[..., :nq, :nk] != EMPTY).all()):
        full = M.full()  # every key visible: the dense paths (the lengths are still checked)
        full._check = _build(classes, qb, kb, L, S, None, "", not large)._check
        return full
    return _build(classes, qb, kb, L, S, inner, f"torch_block_mask({name}, {L}x{S}, blocks {qb}x{kb})", not large)


def _key(bm):
    if isinstance(bm, SalienceBlockMask):
        return (id(bm.classes), bm.classes._version, id(bm.mask), bm.L, bm.S, bm.q_block, bm.kv_block)
    ts = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    return (tuple((id(t), t._version) if t is not None else None for t in ts), tuple(bm.seq_lengths),
            tuple(bm.BLOCK_SIZE), id(bm.mask_mod))


def as_mask(bm) -> M.MaskMod:
    """The :class:`salience.masks.MaskMod` of a block mask: ``full block | (partial block & mask_mod)``, blocks
    not listed masked, with analytic tile classes; cached on the block mask object (rebuilt when its tables,
    lengths, block size or mask_mod change).

    Example:
        >>> from salience import masks
        >>> from salience.blocks import BlockMask
        >>> bm = BlockMask.from_mask(masks.causal(), 1, 1, 8, 8, q_block=4, kv_block=4)
        >>> m = as_mask(bm)
        >>> m.to_dense(1, 1, 8, 8)[0, 0].int().sum().item(), as_mask(bm) is m
        (36, True)
    """
    if not is_block_mask(bm):
        raise TypeError(f"as_mask takes a salience or torch BlockMask; got {type(bm).__name__}.")
    key = _key(bm)
    cached = getattr(bm, "_salience_mask", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    m = _convert(bm)
    try:
        bm._salience_mask = (key, m)
    except AttributeError:  # pragma: no cover - an object that takes no attributes: rebuilt per call
        pass
    return m
