"""Structure of arbitrary mask callables, derived once and cached: row intervals or a block map with bits.

A mask_mod that is not one of salience's named factories has no analytic structure. :func:`structure`
evaluates it *once* per (callable, shape, offsets, device), in chunks of query rows (memory bounded by
:data:`EVAL_ELEMENTS`), only over the batch/head extents its result depends on, and derives either

* :class:`Intervals`: every row's visible keys are one contiguous run ``[lo, hi)`` (windows, causal,
  documents, prefix-LM written as lambdas), of shape (1 or B, 1 or H, L): then the span kernels run it
  (``spans.plan_spans`` / ``native.IntervalPlan`` take ``(1 or B, L)`` tables: :meth:`Intervals.spans`);
* :class:`BlockMap`: per (query tile, key tile) of :data:`TILE` x :data:`TILE` elements the class
  empty / partial / full, and the packed bits (one bit per element) of the *partial* tiles only.

:func:`executor` turns a structure into an executor with salience's protocol (``forward(q, k, v) -> (out,
lse)``, ``backward(q, k, v, out, lse, dout, dlse) -> (dq, dk, dv, extra_grads)``, ``grad_tensors``,
``autograd``, ``describe()``): span plans for intervals (the compiled interval kernel with a relative bias),
:class:`BlockMapExecutor` (torch's fused CPU kernel: unbiased calls over the key tiles a group of rows sees
fully, a 0/-inf bias from the cached bits on the rest, empty tiles skipped) for block maps, and the blockwise
:class:`~salience.kernels.blockwise.TileKernel` fed with the cached structure when there is a score_mod.
Executors' plans are kept on the structure, so a cache hit also skips planning.

**The cache and its rule.** The key is the callable *object* (held weakly: a new lambda gets a new entry, a
dead one frees its entry; a combination such as ``causal() & fn``, re-bound by every call, keys on the value
of its typed structure with ``fn`` held weakly) plus the sizes (B and H only when the mask depends on b / h),
the offsets and the device; at most :data:`CACHE_SIZE` entries (least recently used evicted). Reusing one
callable in every layer hits the cache. A callable that reads a tensor which later changes would see a stale structure; salience
checks what it cheaply can: tensors and scalars in the callable's closure, defaults, referenced globals and
attributes (recursively a few levels) are fingerprinted by identity and version counter, so an in-place
change (``lengths[0] = 5``) or a rebound closure variable re-derives. Changes it cannot see (``t.data``
writes, state behind other objects) are not detected: pass ``cache=False`` (or call :func:`clear_cache`).

Example:
    >>> import torch
    >>> from salience.kernels import derive
    >>> st = derive.structure(lambda b, h, q, kv: (q >= kv) & (q - kv <= 2), 1, 1, 6, 6, "cpu")
    >>> st.lo[0, 0].tolist(), st.hi[0, 0].tolist()
    ([0, 0, 0, 1, 2, 3], [1, 2, 3, 4, 5, 6])
    >>> bm = derive.structure(lambda b, h, q, kv: (q + kv) % 2 == 0, 1, 1, 128, 128, "cpu")
    >>> type(bm).__name__, bm.counts()
    ('BlockMap', {'empty': 0, 'partial': 4, 'full': 0})
"""

from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..blocks import EMPTY, FULL, PARTIAL
from ..reference import _acc_dtype
from . import fused

__all__ = ["Intervals", "BlockMap", "BlockMapExecutor", "structure", "executor", "cache_info", "clear_cache",
           "set_cache_size", "TILE", "CACHE_SIZE", "EVAL_ELEMENTS"]

#: tile edge of block maps (elements); kernels tile in multiples of it
TILE = 64
#: structures kept in the cache (least recently used evicted)
CACHE_SIZE = 64
#: mask elements evaluated at once while deriving (bounds the memory of a derivation)
EVAL_ELEMENTS = 1 << 22
#: query rows per fused call of the block-map executor (a multiple of TILE)
ROW_BLOCK = 256
#: runs of full key tiles at least this long get their own unbiased fused call; shorter ones join a biased call
MIN_FULL_RUN = 4
#: gaps of empty key tiles at least this long split a biased call in two
MIN_GAP = 4
#: 0/-inf biases of partial regions kept between calls, per executor plan (bytes); larger ones are rebuilt per call
BIAS_CACHE_BYTES = 32 << 20

# ------------------------------------------------------------------------------------------ structures


@dataclass
class Intervals:
    """Row i of batch b, head h sees keys ``lo[b, h, i] <= j < hi[b, h, i]`` (local indices).

    Attributes:
        lo, hi: int64 (Bm, Hm, L) with Bm in (1, B) and Hm in (1, H); rows that see no key have lo == hi == 0.
        S: number of keys.
        plans: executor plans built from this structure (span plans, block-map groups), reused by later calls.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    S: int
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def L(self) -> int:
        return self.lo.shape[-1]

    def spans(self):
        """``(lo, hi)`` of shape (1 or B, L), the format of ``spans.plan_spans`` and ``native.IntervalPlan``;
        None when the intervals depend on the head (then one plan per head runs, see :func:`executor`)."""
        if self.lo.shape[1] != 1:
            return None
        return self.lo[:, 0].contiguous(), self.hi[:, 0].contiguous()

    def classes_at(self, tq: int, tk: int) -> torch.Tensor:
        """int8 (Bm, Hm, nq, nk) tile classes (EMPTY / PARTIAL / FULL) for tiles of tq x tk (a tile may be
        called partial when it is empty: that costs work, never correctness)."""
        L, S = self.L, self.S
        nq, nk = -(-L // tq), -(-S // tk)
        pad = nq * tq - L
        ne = self.hi > self.lo
        shp = (*ne.shape[:2], nq, tq)

        def per_tile(x, fill_empty, fill_pad, reduce):
            x = torch.nn.functional.pad(torch.where(ne, x, fill_empty), (0, pad), value=fill_pad)
            return reduce(x.view(shp), -1).unsqueeze(-1)

        lo_min = per_tile(self.lo, S, S, torch.amin)  # over nonempty rows
        hi_max = per_tile(self.hi, 0, 0, torch.amax)
        lo_max = per_tile(self.lo, S + 1, 0, torch.amax)  # an empty row makes the tile not full
        hi_min = per_tile(self.hi, -1, S + 1, torch.amin)
        ks = torch.arange(nk).view(1, 1, 1, -1) * tk
        ke = torch.clamp(ks + tk, max=S)
        any_ = (lo_min < ke) & (hi_max > ks)
        all_ = (lo_max <= ks) & (hi_min >= ke)
        return torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)

    def visible(self, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        """bool (Bm, Hm, r1 - r0, k1 - k0): True where row r sees key j."""
        kv = torch.arange(k0, k1).view(1, 1, 1, -1)
        return (kv >= self.lo[..., r0:r1, None]) & (kv < self.hi[..., r0:r1, None])

    def hidden(self, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        """bool (Bm, Hm, r1 - r0, k1 - k0): True where the mask hides the key (the TileKernel's input)."""
        return ~self.visible(r0, r1, k0, k1)

    def to_dense(self) -> torch.Tensor:
        """bool (Bm, Hm, L, S): the mask."""
        return self.visible(0, self.L, 0, self.S)


@dataclass
class BlockMap:
    """Tile classes of a mask and the bits of its partial tiles (local indices).

    Attributes:
        classes: int8 (Bm, Hm, nq, nk), EMPTY=0 / PARTIAL=1 / FULL=2, tiles of ``tile`` x ``tile`` elements.
        index: int32 (Bm, Hm, nq, nk): the row of ``bits`` of a partial tile, -1 for the others.
        bits: uint8 (n_partial, tile, tile // 8): bit ``c % 8`` of byte ``c // 8`` of row r is the visibility
            of (tile row r, tile key c); the ragged last tiles are padded with 0.
        L, S, tile: sizes.
        plans: executor plans built from this structure, reused by later calls.
    """

    classes: torch.Tensor
    index: torch.Tensor
    bits: torch.Tensor
    L: int
    S: int
    tile: int
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    def counts(self) -> dict:
        """Number of empty, partial and full tiles (summed over the batch/head extents it has)."""
        c = self.classes
        return {"empty": int((c == EMPTY).sum()), "partial": int((c == PARTIAL).sum()), "full": int((c == FULL).sum())}

    def classes_at(self, tq: int, tk: int) -> torch.Tensor:
        """int8 (Bm, Hm, nq, nk) classes for tiles of tq x tk (multiples of :attr:`tile`)."""
        t = self.tile
        if tq % t or tk % t:
            raise ValueError(f"BlockMap.classes_at: tile sizes must be multiples of {t}; got {tq} x {tk}.")
        fq, fk = tq // t, tk // t
        c = self.classes
        Bm, Hm, nq, nk = c.shape
        pq, pk = -nq % fq, -nk % fk
        full = torch.nn.functional.pad(c == FULL, (0, pk, 0, pq), value=True)
        ne = torch.nn.functional.pad(c != EMPTY, (0, pk, 0, pq), value=False)
        full = full.view(Bm, Hm, (nq + pq) // fq, fq, (nk + pk) // fk, fk).all(5).all(3)
        ne = ne.view(Bm, Hm, (nq + pq) // fq, fq, (nk + pk) // fk, fk).any(5).any(3)
        return torch.where(full, FULL, torch.where(ne, PARTIAL, EMPTY)).to(torch.int8)

    def _tiles(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """bool (Bm, Hm, (i1-i0) * tile, (j1-j0) * tile): the visibility of tiles [i0, i1) x [j0, j1)."""
        t = self.tile
        c = self.classes[:, :, i0:i1, j0:j1]
        Bm, Hm, m, n = c.shape
        vis = (c == FULL).view(Bm, Hm, m, 1, n, 1).expand(Bm, Hm, m, t, n, t).permute(0, 1, 2, 4, 3, 5).contiguous()
        part = c == PARTIAL
        if bool(part.any()):
            idx = self.index[:, :, i0:i1, j0:j1][part].long()
            vis[part] = _unpack(self.bits.index_select(0, idx), t)
        return vis.permute(0, 1, 2, 4, 3, 5).reshape(Bm, Hm, m * t, n * t)

    def bias(self, r0: int, r1: int, k0: int, k1: int, dtype):
        """``(bias, empty)`` for rows r0:r1 and keys k0:k1 (r0, k0 multiples of the tile): the additive 0/-inf
        bias (Bm, Hm, rows, keys) written once from the tile classes and the partial tiles' bits, and the rows
        that see no key there (Bm, Hm, rows)."""
        t = self.tile
        i0, j0 = r0 // t, k0 // t
        bias, empty = self.tile_bias(torch.arange(i0, -(-r1 // t)), torch.arange(j0, -(-k1 // t)), dtype)
        return bias[:, :, r0 - i0 * t:r1 - i0 * t, :k1 - k0], empty[:, :, r0 - i0 * t:r1 - i0 * t]

    def tile_bias(self, ti: torch.Tensor, tj: torch.Tensor, dtype):
        """``(bias, empty)`` over the rows of query tiles ``ti`` and the keys of key tiles ``tj`` (int64 index
        tensors), each tile padded to the full tile size (padded keys hidden): bias (Bm, Hm, m * t, n * t),
        empty (Bm, Hm, m * t)."""
        t = self.tile
        c = self.classes[:, :, ti][:, :, :, tj]
        Bm, Hm, m, n = c.shape
        inf = torch.tensor(float("-inf"), dtype=dtype)
        tile_val = torch.where(c == FULL, torch.zeros((), dtype=dtype), inf)
        out = torch.empty(Bm, Hm, m, t, n, t, dtype=dtype)
        out.copy_(tile_val.view(Bm, Hm, m, 1, n, 1).expand(Bm, Hm, m, t, n, t))
        sees = (c == FULL).any(-1, keepdim=True).expand(Bm, Hm, m, t).clone()
        part = c == PARTIAL
        if bool(part.any()):
            vis = _unpack(self.bits.index_select(0, self.index[:, :, ti][:, :, :, tj][part].long()), t)
            kmax = self.S - tj[torch.nonzero(part)[:, 3]] * t  # a ragged last key tile: its padding is hidden
            vis &= torch.arange(t).view(1, 1, t) < kmax.view(-1, 1, 1)
            out.permute(0, 1, 2, 4, 3, 5)[part] = torch.where(vis, torch.zeros((), dtype=dtype), inf)
            rows = torch.zeros(Bm, Hm, m, n, t, dtype=torch.bool)
            rows[part] = vis.any(-1)
            sees |= rows.any(3)
        return out.view(Bm, Hm, m * t, n * t), ~sees.reshape(Bm, Hm, m * t)

    def visible(self, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        """bool (Bm, Hm, r1 - r0, k1 - k0): True where row r sees key j (any row/key range)."""
        t = self.tile
        i0, j0 = r0 // t, k0 // t
        vis = self._tiles(i0, -(-r1 // t), j0, -(-k1 // t))
        return vis[:, :, r0 - i0 * t:r1 - i0 * t, k0 - j0 * t:k1 - j0 * t]

    def hidden(self, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        """bool (Bm, Hm, r1 - r0, k1 - k0): True where the mask hides the key (the TileKernel's input)."""
        return ~self.visible(r0, r1, k0, k1)

    def to_dense(self) -> torch.Tensor:
        """bool (Bm, Hm, L, S): the mask."""
        return self.visible(0, self.L, 0, self.S)


def _pack(tiles: torch.Tensor) -> torch.Tensor:
    """bool (n, t, t) -> uint8 (n, t, t // 8), little bit order along keys."""
    return torch.from_numpy(np.packbits(tiles.cpu().numpy(), axis=-1, bitorder="little"))


def _unpack(bits: torch.Tensor, t: int) -> torch.Tensor:
    """uint8 (n, t, t // 8) -> bool (n, t, t)."""
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, bitorder="little").view(np.bool_))


def _row_tile_counts(vis: torch.Tensor, nk: int, t: int) -> torch.Tensor:
    """int64 (Bm, Hm, rows, nk): visible keys per row and key tile of a contiguous bool (Bm, Hm, rows, nk * t).

    Eight bools are read as one int64 whose bytes are 0 or 1: summing the t // 8 words of a tile adds the
    bytes lane by lane (at most t // 8 per lane, no carry), and one multiply gathers the lanes into the top byte."""
    Bm, Hm, n = vis.shape[:3]
    words = vis.view(torch.int64).view(Bm, Hm, n, nk, t // 8).sum(-1)
    return (words * 0x0101010101010101) >> 56


# ------------------------------------------------------------------------------------------ derivation


def _bound(mask, L, S, device, q_offset, kv_offset, Lg, Sg):
    from ..masks import as_mask_mod, shift

    m = as_mask_mod(mask)
    if q_offset == 0 and kv_offset == 0 and (Lg, Sg) == (L, S):
        return m.bind(L, S, device)
    return shift(m, q_offset, kv_offset, Lg, Sg).bind(L, S, device)


def _eval(m, bidx, hidx, r0, r1, S, device) -> torch.Tensor:
    from ..masks import check_mask_output

    q = torch.arange(r0, r1, device=device).view(1, 1, -1, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, -1)
    out = m(bidx, hidx, q, kv)
    out = check_mask_output(out, m, (bidx.shape[0], hidx.shape[1], r1 - r0, S))
    return out


def _extents(m, B, H, L, S, device):
    """(Bm, Hm): 1 where the mask's result does not depend on b / h (read from its shape on a small grid)."""
    from ..masks import check_mask_output

    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    q = torch.arange(min(L, 2), device=device).view(1, 1, -1, 1)
    kv = torch.arange(min(S, 3), device=device).view(1, 1, 1, -1)
    raw = m(b, h, q, kv)
    check_mask_output(raw, m, (B, H, q.shape[2], kv.shape[3]))
    raw = torch.as_tensor(raw)
    shp = (1,) * (4 - raw.dim()) + tuple(raw.shape)
    return (B if shp[0] > 1 else 1), (H if shp[1] > 1 else 1)


class _Acc:
    """Accumulates, chunk by chunk of rows, the row intervals (while they hold) and the tile classes + bits."""

    def __init__(self, Bm, Hm, L, S, t):
        self.Bm, self.Hm, self.L, self.S, self.t = Bm, Hm, L, S, t
        self.lo, self.hi = [], []
        self.contiguous = True
        self.classes, self.index, self.bits = [], [], []
        self.n_bits = 0

    def add(self, vis: torch.Tensor) -> None:
        """vis: bool (Bm, Hm, rows, S), contiguous, for the next rows (chunks start at multiples of the tile)."""
        t, S = self.t, self.S
        Bm, Hm, n = vis.shape[:3]
        pr, pk = -n % t, -S % t
        if pr or pk:
            vis = torch.nn.functional.pad(vis, (0, pk, 0, pr))
        nq, nk = (n + pr) // t, (S + pk) // t
        rc = _row_tile_counts(vis, nk, t)  # (Bm, Hm, rows, nk): visible keys of each row in each key tile
        if self.contiguous:
            self._intervals(vis[:, :, :n].view(Bm, Hm, n, nk, t), rc[:, :, :n])
        cnt = rc.view(Bm, Hm, nq, t, nk).sum(3)
        rows = torch.clamp(n - torch.arange(nq, device=vis.device) * t, max=t).view(-1, 1)
        keys = torch.clamp(S - torch.arange(nk, device=vis.device) * t, max=t).view(1, -1)
        cls = torch.where(cnt == rows * keys, FULL, torch.where(cnt > 0, PARTIAL, EMPTY)).to(torch.int8)
        part = cls == PARTIAL
        idx = torch.full(cls.shape, -1, dtype=torch.int32, device=vis.device)
        npart = int(part.sum())
        if npart:
            idx[part] = torch.arange(self.n_bits, self.n_bits + npart, dtype=torch.int32, device=vis.device)
            tiles = vis.view(Bm, Hm, nq, t, nk, t).permute(0, 1, 2, 4, 3, 5)[part]
            self.bits.append(_pack(tiles))
            self.n_bits += npart
        self.classes.append(cls)
        self.index.append(idx)

    def _intervals(self, tiles: torch.Tensor, rc: torch.Tensor) -> None:
        """Row intervals from the per-tile row counts; only the first and last visible tile of a row are read."""
        t = self.t
        nk = rc.shape[-1]
        hit = (rc > 0).view(torch.uint8)
        first = hit.argmax(-1)
        last = nk - 1 - hit.flip(-1).argmax(-1)
        ft = tiles.gather(3, first[..., None, None].expand(*first.shape, 1, t)).squeeze(3)
        lt = tiles.gather(3, last[..., None, None].expand(*last.shape, 1, t)).squeeze(3)
        lo = first * t + ft.view(torch.uint8).argmax(-1)
        hi = last * t + t - lt.view(torch.uint8).flip(-1).argmax(-1)
        cnt = rc.sum(-1)
        ne = cnt > 0
        if bool((ne & (hi - lo != cnt)).any()):
            self.contiguous = False
            self.lo, self.hi = [], []
            return
        zero = torch.zeros((), dtype=torch.long, device=rc.device)
        self.lo.append(torch.where(ne, lo, zero))
        self.hi.append(torch.where(ne, torch.clamp(hi, max=self.S), zero))

    def result(self):
        if self.contiguous:
            return Intervals(torch.cat(self.lo, -1).cpu(), torch.cat(self.hi, -1).cpu(), self.S)
        t = self.t
        bits = torch.cat(self.bits) if self.bits else torch.zeros(0, t, t // 8, dtype=torch.uint8)
        return BlockMap(torch.cat(self.classes, 2).cpu(), torch.cat(self.index, 2).cpu(), bits.cpu(), self.L,
                        self.S, t)


def _derive(mask, B, H, L, S, device, q_offset, kv_offset, Lg, Sg, tile, budget=None):
    m = _bound(mask, L, S, device, q_offset, kv_offset, Lg, Sg)
    Bm, Hm = _extents(m, B, H, L, S, device)
    bidx = torch.arange(Bm, device=device).view(-1, 1, 1, 1)
    hidx = torch.arange(Hm, device=device).view(1, -1, 1, 1)
    budget = EVAL_ELEMENTS if budget is None else budget
    rows = max(tile, (budget // max(1, Bm * Hm * S)) // tile * tile)
    acc = _Acc(Bm, Hm, L, S, tile)
    with torch.no_grad():
        for r0 in range(0, L, rows):
            r1 = min(L, r0 + rows)
            if Bm * Hm * (r1 - r0) * S <= budget:
                vis = _eval(m, bidx, hidx, r0, r1, S, device).expand(Bm, Hm, r1 - r0, S).contiguous()
            else:  # one tile of rows is already too large: evaluate one (batch, head) at a time into it
                vis = torch.empty(Bm, Hm, r1 - r0, S, dtype=torch.bool, device=device)
                for b in range(Bm):
                    for h in range(Hm):
                        part = _eval(m, bidx[b:b + 1], hidx[:, h:h + 1], r0, r1, S, device)
                        vis[b, h] = part.expand(1, 1, r1 - r0, S)[0, 0]
            acc.add(vis)
    return acc.result(), (Bm > 1, Hm > 1)


# ------------------------------------------------------------------------------------------ the cache

_CACHE: OrderedDict = OrderedDict()  # (token, shape key) -> (structure, fingerprint)
_DEPS: dict = {}  # token -> (depends on b, depends on h)
_REFS: dict = {}  # token -> weakref to the key object (its callback frees the token's entries)
_STATS = {"hits": 0, "misses": 0, "stale": 0, "evictions": 0, "uncacheable": 0}


def _key_object(mask):
    """The object that identifies a mask for the cache: the user's callable behind salience's wrappers."""
    from .._callables import FlexCallable
    from ..masks import MaskMod

    s = getattr(mask, "structure", None)  # salience.structure.Callable(fn): the user's own object
    if isinstance(mask, MaskMod) and type(s).__name__ == "Callable" and getattr(s, "fn", None) is not None:
        mask = s.fn
    elif isinstance(mask, MaskMod) and isinstance(mask.fn, FlexCallable) and mask._binder is None:
        mask = mask.fn
    if isinstance(mask, FlexCallable):
        mask = mask.fn
    return mask


def _signature(s, fns: list):
    """A hashable value for a mask structure with user callables inside (callables by identity, collected in
    ``fns``), or None when it holds values that are not plain scalars (tensors): such masks key on their object."""
    from dataclasses import fields, is_dataclass

    if type(s).__name__ == "Callable":
        fns.append(s.fn)
        return ("Callable", id(s.fn))
    if not is_dataclass(s):
        return None
    vals = []
    for f in fields(s):
        x = getattr(s, f.name)
        if isinstance(x, tuple):
            x = tuple(_signature(y, fns) if is_dataclass(y) else y for y in x)
            if any(y is None for y in x) or not all(isinstance(y, (tuple, int, float, str, bool)) for y in x):
                return None
        elif is_dataclass(x):
            x = _signature(x, fns)
            if x is None:
                return None
        elif not isinstance(x, (int, float, str, bool, type(None))):
            return None
        vals.append(x)
    return (type(s).__name__, tuple(vals))


def _key(mask):
    """``(token, referents, fingerprinted)`` for the cache. A user callable (behind salience's wrappers) is keyed
    by its object; a bound method by (its object, its function); a combination of named masks and callables
    (``causal() & fn``, re-bound by every call) by the value of its typed structure, holding its callables
    weakly; anything else by its object."""
    from ..masks import MaskMod

    obj = _key_object(mask)
    if isinstance(obj, MaskMod) and _has_callable(getattr(obj, "structure", None)):
        fns: list = []
        sig = _signature(obj.structure, fns)
        if sig is not None and fns:
            return ("sig", sig), fns, fns
    if isinstance(obj, types.MethodType):
        return (id(obj.__self__), id(obj.__func__)), [obj.__self__], obj
    return (id(obj), 0), [obj], obj


def _drop(token) -> None:
    for key in [k for k in _CACHE if k[0] == token]:
        del _CACHE[key]
    _DEPS.pop(token, None)
    _REFS.pop(token, None)


def _fingerprint(obj, depth: int = 0, seen=None) -> tuple:
    """Identity and version of the tensors (and values of the scalars) a callable reads, a few levels deep."""
    seen = set() if seen is None else seen
    if depth > 4 or id(obj) in seen:
        return ()
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return ((id(obj), obj._version, tuple(obj.shape)),)
    if isinstance(obj, (int, float, bool, str, type(None))):
        return (obj,)
    if isinstance(obj, (list, tuple)):
        return tuple(x for o in obj[:32] for x in _fingerprint(o, depth + 1, seen))
    if isinstance(obj, dict):
        return tuple(x for o in list(obj.values())[:32] for x in _fingerprint(o, depth + 1, seen))
    out = []
    fn = obj.__func__ if isinstance(obj, types.MethodType) else obj
    if isinstance(obj, types.MethodType):
        out.extend(_fingerprint(obj.__self__, depth + 1, seen))
    if isinstance(fn, types.FunctionType):
        for c in fn.__closure__ or ():
            try:
                out.extend(_fingerprint(c.cell_contents, depth + 1, seen))
            except ValueError:  # an empty cell
                out.append(None)
        out.extend(_fingerprint(fn.__defaults__ or (), depth + 1, seen))
        g = fn.__globals__
        out.extend(x for n in fn.__code__.co_names if n in g and not isinstance(g[n], (types.ModuleType, type))
                   for x in _fingerprint(g[n], depth + 1, seen))
    elif not isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType)):
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            out.extend(_fingerprint(d, depth + 1, seen))
    return tuple(out)


def cache_info() -> dict:
    """Counters and size of the structure cache: hits, misses, stale (re-derived after a fingerprint change),
    evictions, uncacheable (callables that cannot be weakly referenced), size, maxsize."""
    return {**_STATS, "size": len(_CACHE), "maxsize": CACHE_SIZE}


def set_cache_size(n: int) -> int:
    """Bound the cache to ``n`` structures (evicting the least recently used beyond it); returns the old bound."""
    global CACHE_SIZE
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0; got {n!r}.")
    old, CACHE_SIZE = CACHE_SIZE, n
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
        _STATS["evictions"] += 1
    return old


def clear_cache() -> None:
    """Forget every cached structure and reset the counters."""
    _CACHE.clear()
    _DEPS.clear()
    _REFS.clear()
    for k in _STATS:
        _STATS[k] = 0


def _shape_key(token, B, H, L, S, device, q_offset, kv_offset, Lg, Sg, tile):
    deps = _DEPS.get(token)
    if deps is None:
        return None
    return (B if deps[0] else None, H if deps[1] else None, L, S, q_offset, kv_offset, Lg, Sg, str(device), tile)


def _remember(token, referents, deps, skey_args, value) -> None:
    if token not in _REFS:
        _REFS[token] = [weakref.ref(r, lambda _r, tok=token: _drop(tok)) for r in referents]
    _DEPS[token] = deps
    skey = _shape_key(token, *skey_args)
    _CACHE[(token, skey)] = value
    _CACHE.move_to_end((token, skey))
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
        _STATS["evictions"] += 1


def _check_sizes(**sizes) -> None:
    for name, val in sizes.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if "offset" in name else 1):
            raise ValueError(f"{name} must be an int >= {0 if 'offset' in name else 1}; got {val!r}.")
    if sizes["tile"] % 8:
        raise ValueError(f"tile must be a positive multiple of 8; got {sizes['tile']!r}.")


def structure(mask_mod, B: int, H: int, L: int, S: int, device=None, *, q_offset: int = 0, kv_offset: int = 0,
              q_len: int | None = None, kv_len: int | None = None, tile: int = TILE, cache: bool = True,
              eval_elements: int | None = None):
    """The structure of a mask for a (B, H, L, S) problem: :class:`Intervals` or :class:`BlockMap`.

    Args:
        mask_mod: a callable ``(b, h, q_idx, kv_idx) -> bool`` (evaluated with FlexAttention's semantics, see
            :mod:`salience._callables`), a :class:`~salience.masks.MaskMod` or a bool tensor. Pass the object
            the user gave (not a per-call bound copy): it is the cache key.
        B, H, L, S: batch, query heads, local query and key lengths; device: where to evaluate.
        q_offset, kv_offset, q_len, kv_len: where the local block sits in the global problem (the mask is
            evaluated at global indices ``q_offset + i``, ``kv_offset + j``; lengths default to offset + size).
        tile: block-map tile edge (a multiple of 8).
        cache: False derives afresh and stores nothing (for callables whose captured state changes unseen).

    The mask is evaluated in chunks of at most ``eval_elements`` (default :data:`EVAL_ELEMENTS`) elements (at least one tile of rows for
    one batch row and head), so the callable's temporaries stay bounded; the derivation keeps one chunk of
    bools, the (Bm, Hm, L) intervals or the tile classes and the bits of partial tiles.

    Returns:
        :class:`Intervals` with lo/hi (1 or B, 1 or H, L) when every row's visible keys are contiguous, else a
        :class:`BlockMap`. Both are in local indices, on the CPU.

    Example:
        >>> st = structure(lambda b, h, q, kv: kv <= q, 2, 4, 5, 5)
        >>> st.lo.shape, st.hi[0, 0].tolist()
        (torch.Size([1, 1, 5]), [1, 2, 3, 4, 5])
    """
    _check_sizes(B=B, H=H, L=L, S=S, q_offset=q_offset, kv_offset=kv_offset, tile=tile)
    dev = torch.device("cpu") if device is None else torch.device(device)
    Lg = q_offset + L if q_len is None else q_len
    Sg = kv_offset + S if kv_len is None else kv_len
    args = (B, H, L, S, dev, q_offset, kv_offset, Lg, Sg, tile)
    if not cache:
        return _derive(mask_mod, B, H, L, S, dev, q_offset, kv_offset, Lg, Sg, tile, eval_elements)[0]
    token, referents, fpo = _key(mask_mod)
    try:
        for r in referents:
            weakref.ref(r)
    except TypeError:
        _STATS["uncacheable"] += 1
        return _derive(mask_mod, B, H, L, S, dev, q_offset, kv_offset, Lg, Sg, tile, eval_elements)[0]
    fp = _fingerprint(fpo)
    skey = _shape_key(token, *args)
    hit = _CACHE.get((token, skey)) if skey is not None else None
    refs = _REFS.get(token)
    if hit is not None and refs is not None and all(r() is x for r, x in zip(refs, referents)):
        if hit[1] == fp:
            _CACHE.move_to_end((token, skey))
            _STATS["hits"] += 1
            return hit[0]
        _STATS["stale"] += 1
        _drop(token)
    else:
        _STATS["misses"] += 1
    st, deps = _derive(mask_mod, B, H, L, S, dev, q_offset, kv_offset, Lg, Sg, tile, eval_elements)
    fp = _fingerprint(fpo)  # after the evaluation (a callable may touch its own state)
    _remember(token, referents, deps, args, (st, fp))
    return st


# ------------------------------------------------------------------------------------------ executors


class _Call:
    """One fused call: the rows of its group against ``keys`` (a slice of k, an int64 index of keys, or
    ``("chain", c, n)``: the first n keys of chain c's gathered keys), with a 0/-inf bias or none. ``tiles``
    (row tiles, key tiles) rebuild the bias when it is not cached."""

    def __init__(self, keys, biased: bool, tiles=None, crop=None):
        self.keys, self.biased, self.tiles, self.crop = keys, biased, tiles, crop
        self.bias = self.empty = None

    def n_keys(self) -> int:
        k = self.keys
        return k[2] if isinstance(k, tuple) else (k.stop - k.start if isinstance(k, slice) else k.numel())

    def make_bias(self, st, dtype):
        """(bias, empty) of a biased call: over tiles for a block map, over the row/key ranges otherwise."""
        if isinstance(self.tiles[0], torch.Tensor):  # (query tiles, key tiles) of a block map
            bias, empty = st.tile_bias(self.tiles[0], self.tiles[1], dtype)
            if self.crop is not None:  # ragged last query or key tile
                rows, cols = self.crop
                bias, empty = bias[:, :, rows][:, :, :, cols], empty[:, :, rows]
            return bias, empty
        r0, r1, k0, k1 = self.tiles
        vis = st.visible(r0, r1, k0, k1)
        return torch.zeros(vis.shape, dtype=dtype).masked_fill_(~vis, float("-inf")), ~vis.any(-1)


def _tile_keys(tiles: list, t: int, S: int):
    """The keys of key tiles ``tiles`` (clipped to S): a slice when they are consecutive, else an int64 index."""
    if not tiles:
        return slice(0, 0)
    if tiles == list(range(tiles[0], tiles[-1] + 1)):
        return slice(tiles[0] * t, min(S, (tiles[-1] + 1) * t))
    return torch.cat([torch.arange(j * t, min(S, (j + 1) * t)) for j in tiles])


def _valid(tiles: list, t: int, n: int):
    """Positions of the real rows/keys in the padded tile layout of ``tiles`` (None when no tile is ragged)."""
    if all((j + 1) * t <= n for j in tiles):
        return None
    return torch.cat([torch.arange(i * t, i * t + min(t, n - j * t)) for i, j in enumerate(tiles)])


def _chains(F: torch.Tensor) -> list:
    """Query tiles grouped into chains whose full key tiles are nested (each one's set contains the previous
    one's), in order of growth: then every member's full tiles are a prefix of one key order per chain."""
    order = sorted(range(F.shape[0]), key=lambda i: (int(F[i].sum()), i))
    chains, lasts = [], []
    for i in order:
        fit = None
        if lasts:
            last = torch.stack(lasts)
            ok = ~(last & ~F[i]).any(1)
            if bool(ok.any()):
                fit = int(ok.nonzero()[0])
        if fit is None:
            chains.append([i])
            lasts.append(F[i])
        else:
            chains[fit].append(i)
            lasts[fit] = F[i]
    return chains


def _chain_plan(st, L, S, per, bdt):
    """Groups ``(rows, calls)`` and the chains' key orders for a block map (see :class:`BlockMapExecutor`)."""
    t = st.tile
    c = st.classes
    F = (c == FULL).flatten(0, 1).all(0)
    NE = (c != EMPTY).flatten(0, 1).any(0)
    groups, orders, computed, cached = [], [], 0, 0
    for members in _chains(F):
        order, seen = [], torch.zeros(F.shape[1], dtype=torch.bool)
        for i in members:  # key tiles in the order they become full along the chain
            new = (F[i] & ~seen).nonzero().flatten().tolist()
            order.extend(new)
            seen |= F[i]
        starts = range(0, len(members), per)
        used = max(int(F[members[g0]].sum()) for g0 in starts)  # gather only the keys some prefix call reads
        orders.append(_tile_keys(order[:used], t, S))
        for g0 in starts:
            mem = sorted(members[g0:g0 + per])
            p0 = int(F[members[g0]].sum())  # tiles full for every member: a prefix of the chain's key order
            rows = _tile_keys(mem, t, L)
            calls = []
            if p0:
                n = sum(min(t, S - j * t) for j in order[:p0])
                calls.append(_Call(("chain", len(orders) - 1, n), False))
            pre = torch.zeros(F.shape[1], dtype=torch.bool)
            pre[order[:p0]] = True
            rest = (NE[mem].any(0) & ~pre).nonzero().flatten().tolist()
            if rest:
                call = _Call(_tile_keys(rest, t, S), True, (torch.tensor(mem), torch.tensor(rest)))
                rv, kv = _valid(mem, t, L), _valid(rest, t, S)
                if rv is not None or kv is not None:
                    call.crop = (slice(None) if rv is None else rv, slice(None) if kv is None else kv)
                calls.append(call)
            nrows = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
            for call in calls:
                computed += nrows * call.n_keys()
                size = nrows * call.n_keys() * c.shape[0] * c.shape[1] * torch.finfo(bdt).bits // 8
                if call.biased and cached + size <= BIAS_CACHE_BYTES:
                    call.bias, call.empty = call.make_bias(st, bdt)
                    cached += size
            groups.append((rows, calls))
    return groups, orders, computed


def _row_block_plan(st, L, S, t, rb, bdt):
    """Groups ``(rows, calls)`` of consecutive rows (any structure with ``classes_at`` and ``visible``)."""
    c = st.classes_at(t, t)
    per = rb // t
    groups, computed, cached = [], 0, 0
    for i0 in range(0, c.shape[2], per):
        ct = c[:, :, i0:i0 + per]
        colfull = (ct == FULL).flatten(0, 2).all(0).tolist()
        colne = (ct != EMPTY).flatten(0, 2).any(0).tolist()
        r0, r1 = i0 * t, min(L, (i0 + per) * t)
        calls = []
        for biased, j0, j1 in _column_groups(colfull, colne):
            k0, k1 = j0 * t, min(S, j1 * t)
            call = _Call(slice(k0, k1), biased, (r0, r1, k0, k1))
            size = (r1 - r0) * (k1 - k0) * ct.shape[0] * ct.shape[1] * torch.finfo(bdt).bits // 8
            if biased and cached + size <= BIAS_CACHE_BYTES:
                call.bias, call.empty = call.make_bias(st, bdt)
                cached += size
            calls.append(call)
            computed += (r1 - r0) * (k1 - k0)
        groups.append((slice(r0, r1), calls))
    return groups, [], computed


def _column_groups(colfull: list, colne: list) -> list:
    """``(biased, j0, j1)`` key-tile runs of one row block: long runs of full tiles alone and unbiased, the other
    non-empty tiles in biased runs (joined over gaps of empty tiles shorter than :data:`MIN_GAP`)."""
    nk = len(colne)
    kind = ["F" if f else ("P" if n else "E") for f, n in zip(colfull, colne)]
    j = 0
    while j < nk:  # full runs too short for their own call count as partial (they join a biased call)
        if kind[j] == "F":
            j1 = j
            while j1 < nk and kind[j1] == "F":
                j1 += 1
            if j1 - j < MIN_FULL_RUN:
                kind[j:j1] = ["P"] * (j1 - j)
            j = j1
        else:
            j += 1
    groups: list = []
    j = 0
    while j < nk:
        if kind[j] == "E":
            j += 1
            continue
        j1 = j
        while j1 < nk and kind[j1] == kind[j]:
            j1 += 1
        g = (kind[j] == "P", j, j1)
        prev = groups[-1] if groups else None
        if g[0] and prev is not None and prev[0] and j - prev[2] < MIN_GAP:
            groups[-1] = (True, prev[1], j1)
        else:
            groups.append(g)
        j = j1
    return groups


class BlockMapExecutor:
    """Attention under a derived structure (:class:`BlockMap` or :class:`Intervals`) with torch's fused CPU kernel.

    For a :class:`BlockMap`, the query tiles are grouped into *chains* whose full key tiles are nested (a causal
    staircase is one chain; a checkerboard two, one per parity; each document one); a chain's key tiles are
    gathered once per call in the order they become full, so every member's full tiles are a *prefix* of them.
    Groups of :data:`ROW_BLOCK` rows of a chain run one unbiased fused call over the prefix all of them see
    fully (no mask work), and one biased call over the rest of their non-empty tiles, with a 0/-inf bias written
    from the tile classes and the cached bits (kept between calls up to :data:`BIAS_CACHE_BYTES`); empty tiles
    are never computed. Other structures run blocks of consecutive rows with runs of full tiles unbiased (at
    least :data:`MIN_FULL_RUN` tiles) and the rest biased. Results merge through their logsumexps. The backward
    recomputes each call from the final output and logsumexp (fused backward): memory O(L * D) plus one call.

    Args:
        st: the structure; B, H, L, S: the problem; scale: the factor on q k^T; dtype: of q, k, v.

    ``forward(q, k, v) -> (out, lse)``; ``backward(q, k, v, out, lse, dout, dlse) -> (dq, dk, dv, [])``.
    """

    grad_tensors = ()
    autograd = False

    def __init__(self, st, B: int, H: int, L: int, S: int, *, scale: float, dtype, row_block: int | None = None):
        t = st.tile if isinstance(st, BlockMap) else TILE
        rb = row_block or max(t, min(ROW_BLOCK, -(-L // t) * t) // t * t)
        self.scale, self.st = float(scale), st
        self.bdt = fused.bias_dtype(dtype, exact_mask=True)
        key = ("blockmap", rb, dtype)
        if key not in st.plans:
            plan = _chain_plan(st, L, S, rb // t, self.bdt) if isinstance(st, BlockMap) else None
            if plan is None or len(plan[0]) > 1.5 * -(-L // rb) + 1:  # chains too short: blocks of consecutive rows
                plan = _row_block_plan(st, L, S, t, rb, self.bdt)
            st.plans[key] = plan
        self.groups, self.orders, computed = st.plans[key]
        self.skipped = 1.0 - computed / max(1, L * S)

    @staticmethod
    def _take(x, idx):
        return x[:, :, idx] if isinstance(idx, slice) else x.index_select(2, idx)

    def _keys(self, call, k, v, chain: list):
        """Keys and values of a call; a chain's keys are gathered once for its groups (``chain`` holds the
        current one: memory O(S * D))."""
        if isinstance(call.keys, tuple):
            c = call.keys[1]
            if not chain or chain[0] != c:
                o = self.orders[c]
                chain[:] = [c, self._take(k, o), self._take(v, o)]
            return chain[1][:, :, :call.keys[2]], chain[2][:, :, :call.keys[2]]
        return self._take(k, call.keys), self._take(v, call.keys)

    def _key_index(self, call):
        if not isinstance(call.keys, tuple):
            return call.keys
        o, n = self.orders[call.keys[1]], call.keys[2]
        return slice(o.start, o.start + n) if isinstance(o, slice) else o[:n]

    def _bias(self, call):
        if call.bias is not None or not call.biased:
            return call.bias, call.empty
        return call.make_bias(self.st, self.bdt)

    def forward(self, q, k, v):
        """``(out, lse)``: out (B, H, L, Dv) in q's dtype, lse (B, H, L) float32 (float64 for float64)."""
        from .merge import merge

        B, H, L, _ = q.shape
        out = q.new_zeros(B, H, L, v.shape[-1])
        lse = torch.full((B, H, L), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
        chains: list = []
        for rows, calls in self.groups:
            qg, res = self._take(q, rows), None
            for call in calls:
                kc, vc = self._keys(call, k, v, chains)
                bias, empty = self._bias(call)
                o, lt = fused.forward(qg, kc, vc, scale=self.scale, bias=bias)
                if empty is not None and bool(empty.any()):
                    lt = lt.masked_fill(empty, float("-inf"))
                    o = o.masked_fill(empty.unsqueeze(-1), 0)
                res = (o, lt) if res is None else tuple(merge(res[0], res[1], o, lt))
            if res is None:
                continue
            if isinstance(rows, slice):
                out[:, :, rows], lse[:, :, rows] = res[0], res[1]
            else:
                out.index_copy_(2, rows, res[0].to(out.dtype))
                lse.index_copy_(2, rows, res[1].to(lse.dtype))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, dlse=None):
        """``(dq, dk, dv, [])`` recomputed from the final ``out`` and ``lse`` of :meth:`forward`."""
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        chains: list = []
        for rows, calls in self.groups:
            qg, og, lg, dog = (self._take(x, rows) for x in (q, out, lse.unsqueeze(-1), dout))
            dlg = None if dlse is None else self._take(dlse.unsqueeze(-1), rows).squeeze(-1)
            for call in calls:
                kc, vc = self._keys(call, k, v, chains)
                g = fused.backward(dog, qg, kc, vc, og, lg.squeeze(-1), scale=self.scale, bias=self._bias(call)[0],
                                   dlse=dlg)
                _add(dq, rows, g[0])
                idx = self._key_index(call)
                _add(dk, idx, g[1])
                _add(dv, idx, g[2])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), []

    def describe(self):
        """(forward, backward) in words, for ``salience.plan``."""
        what = (f"torch's fused kernel on a derived block map ({len(self.orders)} chains of nested full tiles: "
                "full prefixes unbiased, the rest with a 0/-inf bias from the cached bits)" if self.orders else
                "torch's fused kernel on derived row intervals (blocks of rows, partial tiles biased)")
        return what, "torch's fused backward per call, recomputed from the logsumexp"

    def summary(self) -> dict:
        calls = [c for _, cs in self.groups for c in cs]
        return {"fused_calls": len(calls), "biased_calls": sum(c.biased for c in calls), "chains": len(self.orders)}


def _add(acc: torch.Tensor, idx, g: torch.Tensor) -> None:
    if isinstance(idx, slice):
        acc[:, :, idx] += g
    else:
        acc.index_add_(2, idx, g.to(acc.dtype))


class _Spans:
    """A span plan (``spans.plan_spans``) as an executor; per head when the intervals depend on the head."""

    grad_tensors = ()
    autograd = False

    def __init__(self, st: Intervals, B, H, L, S, *, scale, dtype, device):
        try:
            from .span_plan import plan_spans
        except ImportError:  # before kernels/spans.py was split
            from .spans import plan_spans

        self.scale = float(scale)
        key = ("spans", B, dtype)
        if key not in st.plans:
            heads = [(st.lo[:, h].contiguous(), st.hi[:, h].contiguous()) for h in range(st.lo.shape[1])]
            st.plans[key] = [plan_spans(lo, hi, B, L, S, dtype=dtype, device=device) for lo, hi in heads]
        self.plans = st.plans[key]
        self.skipped = 1.0 - sum(p.computed for p in self.plans) / len(self.plans) / max(1, B * L * S)

    @property
    def efficiency(self) -> float:
        return min(p.efficiency for p in self.plans)

    def _heads(self, q, k):
        H, Hkv = q.shape[1], k.shape[1]
        if len(self.plans) == 1:
            return [(self.plans[0], slice(0, H), slice(0, Hkv))]
        g = H // Hkv
        return [(p, slice(h, h + 1), slice(h // g, h // g + 1)) for h, p in enumerate(self.plans)]

    def forward(self, q, k, v):
        outs, lses = [], []
        for p, hs, ks in self._heads(q, k):
            o, lt = p.forward(q[:, hs], k[:, ks], v[:, ks], self.scale)
            outs.append(o)
            lses.append(lt)
        return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 1), torch.cat(lses, 1))

    def backward(self, q, k, v, out, lse, dout, dlse=None):
        if len(self.plans) == 1:
            return (*self.plans[0].backward(q, k, v, out, lse, dout, dlse, self.scale), [])
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k, dtype=_acc_dtype(k.dtype)), torch.zeros_like(v, dtype=_acc_dtype(v.dtype))
        for p, hs, ks in self._heads(q, k):
            g = p.backward(q[:, hs], k[:, ks], v[:, ks], out[:, hs], lse[:, hs], dout[:, hs],
                           None if dlse is None else dlse[:, hs], self.scale)
            dq[:, hs] = g[0]
            dk[:, ks] += g[1]
            dv[:, ks] += g[2]
        return dq, dk.to(k.dtype), dv.to(v.dtype), []

    def describe(self):
        """(forward, backward) in words, for ``salience.plan``."""
        heads = "" if len(self.plans) == 1 else f" (one plan per head: {len(self.plans)})"
        back = "the compiled interval backward" if _native_ok() else "torch's fused backward per call"
        return "torch's fused kernel over each row run's derived key interval" + heads, back

    def summary(self) -> dict:
        return {"span_plans": len(self.plans), **self.plans[0].summary()}


class _Tiles:
    """The blockwise TileKernel fed with the derived structure (score_mods, or devices without the fused kernel)."""

    autograd = False

    def __init__(self, kernel):
        self.kernel = kernel
        self.grad_tensors = tuple(kernel.grad_tensors)
        self.skipped = kernel.skipped_fraction()

    def forward(self, q, k, v):
        return self.kernel.forward(q, k, v)

    def backward(self, q, k, v, out, lse, dout, dlse=None):
        return self.kernel.backward(q, k, v, out, lse, dout, dlse)

    def describe(self):
        """(forward, backward) in words, for ``salience.plan``."""
        return ("online softmax over non-empty tiles, partial tiles masked from the derived structure (no mask "
                "evaluation)", "recomputed tiles from the logsumexp")

    def summary(self) -> dict:
        return {"tiles": self.kernel.block_mask.counts(), "q_tile": self.kernel.q_tile}


def _native_ok() -> bool:
    from . import native

    return native.status() == "compiled"


#: the span plans are used when they compute at least this share of useful elements (else the block-map executor)
MIN_SPAN_EFFICIENCY = 0.2


def _has_callable(s) -> bool:
    """True when a mask structure (salience.structure) has an opaque user callable somewhere in it."""
    name = type(s).__name__
    if name == "Callable":
        return True
    if name in ("And", "Or"):
        return any(_has_callable(x) for x in s.parts)
    if name == "Not":
        return _has_callable(s.part)
    if name == "Shifted":
        return _has_callable(s.inner)
    return False


def _is_named(mask) -> bool:
    """True for masks with an analytic structure (salience's factories and their combinations)."""
    from ..masks import MaskMod

    if not isinstance(mask, MaskMod):
        return False
    s = getattr(mask, "structure", None)
    if s is not None:
        return not _has_callable(s)
    return mask._tiles is not None


def _pick(st, mask_mod, q, dims, scale, score_mod, relative_bias, grad_tensors, offsets):
    """The executor for a structure: span plans or the block-map executor (fused kernel, no score_mod), the
    compiled interval kernel (head-independent intervals with a relative bias), else the TileKernel on the
    structure."""
    from . import native
    from .blockwise import TileKernel

    B, H, L, S = dims
    q_offset, kv_offset, q_len, kv_len = offsets
    if score_mod is not None and relative_bias is not None:
        raise ValueError("executor takes a score_mod or a relative_bias, not both.")
    if relative_bias is not None and isinstance(st, Intervals) and st.lo.shape[1] == 1 and native.available(q):
        lo, hi = st.spans()
        plan = native.IntervalPlan(lo, hi, relative_bias, B, H, L, S, q_offset=q_offset, kv_offset=kv_offset,
                                   dtype=q.dtype, device=q.device)
        return _Interval(plan, scale, L, S, B)
    if score_mod is None and relative_bias is None and fused.available(q):
        if isinstance(st, Intervals):
            ex = _Spans(st, B, H, L, S, scale=scale, dtype=q.dtype, device=q.device)
            if ex.efficiency >= MIN_SPAN_EFFICIENCY:
                return ex
        return BlockMapExecutor(st, B, H, L, S, scale=scale, dtype=q.dtype)
    t = st.tile if isinstance(st, BlockMap) else TILE
    tile = max(t, 128 // t * t)
    extra = dict(relative_bias=relative_bias, bias_dtype=_acc_dtype(q.dtype)) if relative_bias is not None else {}
    kern = TileKernel(B, H, L, S, mask=mask_mod, score_mod=score_mod, scale=scale, q_offset=q_offset,
                      kv_offset=kv_offset, q_len=q_len, kv_len=kv_len, device=q.device, grad_tensors=grad_tensors,
                      q_tile=tile, kv_tile=tile, block_map=st, **extra)
    return _Tiles(kern)


class _Interval:
    """The compiled interval kernel (``native.IntervalPlan``) on derived head-independent intervals with an
    additive relative bias, both directions."""

    grad_tensors = ()
    autograd = False

    def __init__(self, plan, scale, L, S, B):
        self.plan, self.scale = plan, float(scale)
        self.skipped = 1.0 - plan.computed / max(1, B * L * S)

    def describe(self):
        return "the compiled interval kernel on derived row intervals with a relative bias", (
            "the compiled interval backward")

    def forward(self, q, k, v):
        return self.plan.forward(q, k, v, self.scale)

    def backward(self, q, k, v, out, lse, dout, dlse=None):
        return (*self.plan.backward(q, k, v, out, lse, dout, dlse, self.scale), [])

    def summary(self) -> dict:
        return self.plan.summary()


def executor(mask_mod, q, k, v, *, scale: float, score_mod=None, need_grad: bool = False, grad_tensors=(),
             q_offset: int = 0, kv_offset: int = 0, q_len: int | None = None, kv_len: int | None = None,
             relative_bias=None, cache: bool = True):
    """An executor for a mask without analytic structure: ``(executor, details)``, or None when the mask has one.

    Args:
        mask_mod: a user callable or a MaskMod built from one (the object the user passed: the cache key);
            named masks (salience's factories) return None: the dispatcher's named rules serve them.
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv) (for sizes, dtype and device).
        scale: the factor on q k^T (a temperature already folded in).
        score_mod: None, or a score_mod (then the blockwise TileKernel runs it on the derived structure).
        need_grad: whether a backward will follow (recorded in the details; every executor has one).
        grad_tensors: tensors the score_mod closes over that require grad (their gradients come back as
            ``extra`` from ``backward``).
        q_offset, kv_offset, q_len, kv_len: the block's place in a larger problem; cache: see :func:`structure`.
        relative_bias: None, or ``fn(d) -> (H or 1, n)``: an additive bias at offsets ``d = kv_idx - q_idx``
            (ALiBi, T5 buckets; the dispatcher's ``bias_fn``), instead of a score_mod: the compiled interval
            kernel runs it on head-independent intervals, the TileKernel (Toeplitz views) otherwise.

    Returns:
        ``(executor, details)``: ``executor.forward(q, k, v) -> (out, lse)``, ``executor.backward(q, k, v, out,
        lse, dout, dlse) -> (dq, dk, dv, extra)``; details: the structure found, the executor, the share skipped.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 256, 16)
        >>> ex, det = executor(lambda b, h, qi, kv: (qi >= kv) & (qi - kv <= 32), q, q, q, scale=0.25)
        >>> det["structure"], ex.forward(q, q, q)[0].shape
        ('intervals', torch.Size([1, 2, 256, 16]))
    """
    if mask_mod is None or _is_named(mask_mod):
        return None
    B, H, L, _ = q.shape
    S = k.shape[2]
    st = structure(mask_mod, B, H, L, S, q.device, q_offset=q_offset, kv_offset=kv_offset, q_len=q_len,
                   kv_len=kv_len, cache=cache)
    kind = "intervals" if isinstance(st, Intervals) else "block map"
    ex = _pick(st, mask_mod, q, (B, H, L, S), scale, score_mod, relative_bias, grad_tensors,
               (q_offset, kv_offset, q_len, kv_len))
    details = {"structure": kind, "executor": type(ex).__name__.lstrip("_"), "need_grad": bool(need_grad),
               "skipped": round(ex.skipped, 4),
               **ex.summary()}
    return ex, details
