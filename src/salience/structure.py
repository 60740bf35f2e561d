"""Structure as data: what a mask or a score_mod *is*, as typed values that kernels read instead of names.

Every mask factory in :mod:`salience.masks` and every score_mod factory in :mod:`salience.scores` sets a
``.structure`` in its constructor, and ``&``, ``|``, ``~``, :func:`salience.masks.shift` and
:func:`salience.scores.compose` compute the structure of their result. A user callable gets
:class:`Callable` (the user's own function object, so that derived facts can be cached per callable).

Mask structures (``visible`` = the query row ``q`` may see key ``kv``):

* :class:`Full` - every key; :class:`Band` ``(lo, hi, align)`` - ``lo <= kv - q <= hi`` in the alignment's
  coordinates (``align="bottom_right"`` measures ``kv - q - (S - L)``), bounds may be ``-inf``/``inf``:
  causal masks, sliding windows and :func:`salience.masks.band` are Bands;
* :class:`PerSequence` - a band aligned to each batch row's own lengths;
* :class:`Padding`, :class:`Documents`, :class:`PrefixLM`, :class:`BlockDiagonal`, :class:`GlobalTokens`,
  :class:`Dilated`, :class:`RandomBlocks`, :class:`Dense`, :class:`Shifted`, :class:`Callable`;
* combinators :class:`And`, :class:`Or`, :class:`Not`.

Combinations simplify where the result is closed (:func:`and_`, :func:`or_`, :func:`not_`): Band & Band
(same alignment) is their intersection, Band | Band the union when they overlap or touch, Padding & Padding
the shorter lengths, Full & X is X, Full | X is Full, nested And/Or flatten, ``~~x`` is x and the complement
of a one-sided Band is a Band; anything else stays a generic node.

Score_mod structures: :class:`Temperature`, :class:`Alibi`, :class:`RelativeBias`, :class:`Softcap`,
:class:`Compose` and :class:`Callable`.

The queries at the end (:func:`row_intervals`, :func:`relative_band`, :func:`key_padding`,
:func:`is_top_left_causal`, :func:`is_full`, :func:`is_relative`, :func:`independent_pieces`, :func:`document_segments`,
:func:`linear_form`, :func:`softcap_of`) read only structure. They accept a mask/score_mod object (its
``.structure`` is read), a structure, or None (no mask / no score_mod).

Example:
    >>> from salience import masks, structure as st
    >>> (masks.causal() & masks.sliding_window(4)).structure
    Band(lo=-4, hi=0, align='top_left')
    >>> st.relative_band(masks.causal() & masks.sliding_window(4))
    (-4, 0)
    >>> lo, hi = st.row_intervals(masks.sliding_window(2), 1, 5, 5)
    >>> lo.tolist(), hi.tolist()
    ([[0, 0, 0, 1, 2]], [[1, 2, 3, 4, 5]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = [
    "MaskStructure",
    "ModStructure",
    "Full",
    "Band",
    "PerSequence",
    "Padding",
    "Documents",
    "PrefixLM",
    "BlockDiagonal",
    "GlobalTokens",
    "Dilated",
    "RandomBlocks",
    "Dense",
    "Shifted",
    "Callable",
    "And",
    "Or",
    "Not",
    "Temperature",
    "Alibi",
    "RelativeBias",
    "Softcap",
    "Compose",
    "and_",
    "or_",
    "not_",
    "shifted",
    "compose",
    "of_mask",
    "of_mod",
    "resolve",
    "to_dense",
    "row_intervals",
    "relative_band",
    "is_full",
    "is_top_left_causal",
    "is_relative",
    "key_padding",
    "document_segments",
    "independent_pieces",
    "linear_form",
    "softcap_of",
]

INF = math.inf
ALIGNS = ("top_left", "bottom_right")


# ------------------------------------------------------------------------------------------- the base


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if callable(a) or callable(b):
        return a is b
    return a == b


def _hashable(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype))
    if isinstance(x, tuple):
        return tuple(_hashable(y) for y in x)
    if callable(x):
        return ("callable", id(x))
    return x


def _short(x) -> str:
    if isinstance(x, torch.Tensor):
        if x.numel() <= 8:
            return f"tensor({x.tolist()})"
        return f"<tensor {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}>"
    if callable(x) and not isinstance(x, _Node):
        return getattr(x, "__name__", type(x).__name__)
    return repr(x)


class _Node:
    """Shared behaviour: structural equality (tensors compared by value), a hash consistent with it (tensors
    hash by shape and dtype, callables by identity) and a short repr."""

    def __eq__(self, other) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + tuple(_hashable(getattr(self, f.name)) for f in fields(self)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in fields(self))
        return f"{type(self).__name__}({inner})"


class MaskStructure(_Node):
    """Base of mask structures; ``&``, ``|`` and ``~`` build simplified combinations."""

    def __and__(self, other: MaskStructure) -> MaskStructure:
        return and_(self, other)

    def __or__(self, other: MaskStructure) -> MaskStructure:
        return or_(self, other)

    def __invert__(self) -> MaskStructure:
        return not_(self)


class ModStructure(_Node):
    """Base of score_mod structures; ``a >> b`` composes (a first)."""

    def __rshift__(self, other: ModStructure) -> ModStructure:
        return compose(self, other)


_frozen = dataclass(frozen=True, eq=False, repr=False)


def _check_bound(x, argname: str, sign: int):
    """A band bound: an int, or -inf (lo) / inf (hi)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"Band {argname} must be an int or {'-' if sign < 0 else ''}inf; got {type(x).__name__} {x!r}.")
    if isinstance(x, float):
        if x == sign * INF:
            return x
        if math.isfinite(x) and x == int(x):
            return int(x)
        raise ValueError(f"Band {argname} must be an int or {'-' if sign < 0 else ''}inf; got {x!r}.")
    return x


# ------------------------------------------------------------------------------------- mask structures


@_frozen
class Full(MaskStructure):
    """Every query sees every key."""


@_frozen
class Band(MaskStructure):
    """Visible iff ``lo <= kv - q <= hi`` (``align="top_left"``) or ``lo <= kv - q - (S - L) <= hi``
    (``align="bottom_right"``, resolved with the call's lengths by :func:`resolve`). ``lo`` may be ``-inf``
    and ``hi`` ``inf``; ``lo > hi`` is the empty band. Causal is ``Band(-inf, 0)``; ``sliding_window(w)`` is
    ``Band(-w, 0)``."""

    lo: int | float = -INF
    hi: int | float = INF
    align: str = "top_left"

    def __post_init__(self):
        object.__setattr__(self, "lo", _check_bound(self.lo, "lo", -1))
        object.__setattr__(self, "hi", _check_bound(self.hi, "hi", 1))
        if self.align not in ALIGNS:
            raise ValueError(f"Band align must be one of {ALIGNS}; got {self.align!r}.")

    @property
    def bounds(self) -> tuple:
        """``(lo, hi)`` with None for an unbounded side (the form of ``relative_band``)."""
        return (None if self.lo == -INF else self.lo, None if self.hi == INF else self.hi)

    def at(self, L: int, S: int) -> Band:
        """The top-left band for query length L and key length S."""
        if self.align == "top_left":
            return self
        return Band(self.lo + (S - L), self.hi + (S - L), "top_left")


@_frozen
class PerSequence(MaskStructure):
    """Visible iff ``lo <= kv - q - (kv_lengths[b] - q_lengths[b]) <= hi``: a band aligned to each batch row's
    own lengths (right-padded batches, bottom-right convention). ``q_lengths``/``kv_lengths``: int64 (B,)."""

    lo: int | float
    hi: int | float
    q_lengths: torch.Tensor
    kv_lengths: torch.Tensor


@_frozen
class Padding(MaskStructure):
    """Right padding: visible iff ``q < q_lengths[b]`` and ``kv < kv_lengths[b]``; a None side is unpadded.
    Lengths are int64 (B,)."""

    q_lengths: torch.Tensor | None
    kv_lengths: torch.Tensor | None


@_frozen
class Documents(MaskStructure):
    """Visible iff ``q_ids[.., q] == kv_ids[.., kv]``; ids int64 of shape (L,) / (S,) or (B, L) / (B, S)."""

    q_ids: torch.Tensor
    kv_ids: torch.Tensor


@_frozen
class PrefixLM(MaskStructure):
    """Visible iff ``kv < n or kv <= q``."""

    n: int


@_frozen
class BlockDiagonal(MaskStructure):
    """Visible iff ``q // size == kv // size``."""

    size: int


@_frozen
class GlobalTokens(MaskStructure):
    """Visible iff q or kv is one of ``indices`` (sorted unique int64 (n,))."""

    indices: torch.Tensor


@_frozen
class Dilated(MaskStructure):
    """Visible iff ``(q - kv) % stride == 0``."""

    stride: int


@_frozen
class RandomBlocks(MaskStructure):
    """Each ``block x block`` cell visible when a seeded hash of (q // block, kv // block) is below ``density``
    (see :func:`salience.masks.random_blocks`)."""

    density: float
    block: int
    seed: int


@_frozen
class Dense(MaskStructure):
    """An explicit bool mask of shape (B|1, H|1, L|1, S|1), True = visible."""

    mask: torch.Tensor


@_frozen
class Shifted(MaskStructure):
    """``inner`` evaluated at ``(q + q_offset, kv + kv_offset)``: one block of a larger problem, whose lengths
    are ``q_total``/``kv_total`` (None: the offset plus the block's length)."""

    inner: MaskStructure
    q_offset: int
    kv_offset: int
    q_total: int | None = None
    kv_total: int | None = None


@_frozen
class Callable(MaskStructure, ModStructure):
    """Opaque: a user mask_mod or score_mod (``fn`` is the user's own object, a stable cache key)."""

    fn: object


@_frozen
class And(MaskStructure):
    """Visible iff every part is (build with :func:`and_`, which flattens and simplifies)."""

    parts: tuple


@_frozen
class Or(MaskStructure):
    """Visible iff some part is (build with :func:`or_`)."""

    parts: tuple


@_frozen
class Not(MaskStructure):
    """Visible iff ``part`` is not (build with :func:`not_`)."""

    part: MaskStructure


# -------------------------------------------------------------------------------- score_mod structures


@_frozen
class Temperature(ModStructure):
    """``score / t``."""

    t: float


@_frozen
class Softcap(ModStructure):
    """``cap * tanh(score / cap)``."""

    cap: float


@_frozen
class Alibi(ModStructure):
    """``score - slopes[h] * |q + offset - kv|``; ``slopes`` float (H,), or (B, H) for per-batch slopes
    (``score - slopes[b, h] * ...``)."""

    slopes: torch.Tensor
    offset: int = 0

    @property
    def per_head(self) -> bool:
        """True when the bias depends only on (h, kv - q) (slopes of shape (H,))."""
        return self.slopes.dim() == 1

    def values(self, d: torch.Tensor, dtype=None) -> torch.Tensor:
        """The bias ``(H, n)`` at offsets ``d = kv - q`` (per-head slopes only), in ``dtype`` (default: the slopes')."""
        if not self.per_head:
            raise ValueError("Alibi.values needs per-head slopes (H,); these are per batch row (B, H).")
        dt = self.slopes.dtype if dtype is None else dtype
        sl = self.slopes.to(device=d.device, dtype=dt)
        return -sl.view(-1, 1) * (self.offset - d).abs().to(dt).view(1, -1)


@_frozen
class RelativeBias(ModStructure):
    """``score + table[bucket(kv - q), h]`` with T5's buckets (:func:`salience.scores.t5_bucket`);
    ``table`` float (num_buckets, H), may require grad."""

    table: torch.Tensor
    num_buckets: int
    max_distance: int
    bidirectional: bool

    per_head = True

    def values(self, d: torch.Tensor, dtype=None) -> torch.Tensor:
        """The bias ``(H, n)`` at offsets ``d = kv - q``, in ``dtype`` (default: the table's); differentiable."""
        from ._positions import t5_bucket

        bucket = t5_bucket(d, self.num_buckets, self.max_distance, self.bidirectional)
        out = self.table.to(d.device)[bucket].transpose(0, 1)
        return out if dtype is None else out.to(dtype)


@_frozen
class Compose(ModStructure):
    """Apply ``parts`` left to right (build with :func:`compose`, which flattens)."""

    parts: tuple


# ------------------------------------------------------------------------------------------ combining


def _is_full(s) -> bool:
    return isinstance(s, Full) or (isinstance(s, Band) and s.lo == -INF and s.hi == INF)


def _merge_paddings(a: Padding, b: Padding) -> Padding | None:
    def pick(x, y):
        if x is None or y is None:
            return y if x is None else x
        if x.shape != y.shape or x.device != y.device:
            raise _NoMerge
        return torch.minimum(x, y)

    try:
        return Padding(pick(a.q_lengths, b.q_lengths), pick(a.kv_lengths, b.kv_lengths))
    except _NoMerge:
        return None


class _NoMerge(Exception):
    pass


def _touch(a: Band, b: Band) -> bool:
    """Integer intervals [a.lo, a.hi] and [b.lo, b.hi] overlap or are adjacent (both non-empty)."""
    if a.lo > a.hi or b.lo > b.hi:
        return False
    return max(a.lo, b.lo) <= min(a.hi, b.hi) + 1


def and_(*parts: MaskStructure) -> MaskStructure:
    """The structure of ``a & b & ...``: flattened, Full dropped, Bands of one alignment intersected,
    Paddings merged (shorter lengths); one part left -> that part; none -> Full."""
    flat: list = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, And) else (p,))
    out: list = []
    for p in flat:
        if _is_full(p):
            continue
        for i, q in enumerate(out):
            if isinstance(p, Band) and isinstance(q, Band) and p.align == q.align:
                out[i] = Band(max(p.lo, q.lo), min(p.hi, q.hi), p.align)
                break
            if isinstance(p, Padding) and isinstance(q, Padding):
                merged = _merge_paddings(q, p)
                if merged is not None:
                    out[i] = merged
                    break
        else:
            out.append(p)
    if not out:
        return Full()
    return out[0] if len(out) == 1 else And(tuple(out))


def or_(*parts: MaskStructure) -> MaskStructure:
    """The structure of ``a | b | ...``: flattened; any Full -> Full; Bands of one alignment that overlap
    or touch become one Band."""
    flat: list = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, Or) else (p,))
    if any(_is_full(p) for p in flat):
        return Full()
    out: list = []
    for p in flat:
        out.append(p)
        changed = True
        while changed:  # merge the last part into any band it touches, until nothing changes
            changed = False
            last = out[-1]
            for i, q in enumerate(out[:-1]):
                if isinstance(last, Band) and isinstance(q, Band) and q.align == last.align and _touch(q, last):
                    del out[-1]
                    out[i] = Band(min(q.lo, last.lo), max(q.hi, last.hi), q.align)
                    out.append(out.pop(i))
                    changed = True
                    break
    out = [Full() if _is_full(p) else p for p in out]
    if any(isinstance(p, Full) for p in out):
        return Full()
    return out[0] if len(out) == 1 else Or(tuple(out))


def not_(part: MaskStructure) -> MaskStructure:
    """The structure of ``~a``: ``~~a`` is a; the complement of a one-sided Band is a Band."""
    if isinstance(part, Not):
        return part.part
    if isinstance(part, Band):
        if part.lo == -INF and part.hi != INF:
            return Band(part.hi + 1, INF, part.align)
        if part.hi == INF and part.lo != -INF:
            return Band(-INF, part.lo - 1, part.align)
    return Not(part)


def shifted(inner: MaskStructure, q_offset: int, kv_offset: int, q_total: int | None = None,
            kv_total: int | None = None) -> MaskStructure:
    """The structure of :func:`salience.masks.shift`: a top-left Band stays a Band (moved by
    ``q_offset - kv_offset``), Full stays Full, And/Or/Not distribute; otherwise :class:`Shifted`."""
    if q_offset == 0 and kv_offset == 0 and q_total is None and kv_total is None:
        return inner
    if _is_full(inner):
        return Full()
    if isinstance(inner, Band) and inner.align == "top_left":
        d = q_offset - kv_offset
        return Band(inner.lo + d, inner.hi + d)
    args = (q_offset, kv_offset, q_total, kv_total)
    if isinstance(inner, And):
        return and_(*(shifted(p, *args) for p in inner.parts))
    if isinstance(inner, Or):
        return or_(*(shifted(p, *args) for p in inner.parts))
    if isinstance(inner, Not):
        return not_(shifted(inner.part, *args))
    return Shifted(inner, q_offset, kv_offset, q_total, kv_total)


def compose(*parts: ModStructure) -> ModStructure:
    """The structure of ``scores.compose(a, b, ...)``: nested compositions flattened; one part -> itself."""
    flat: list = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, Compose) else (p,))
    if not flat:
        raise ValueError("compose() needs at least one score_mod structure.")
    return flat[0] if len(flat) == 1 else Compose(tuple(flat))


def of_mask(mask) -> MaskStructure:
    """The structure of a mask: None -> Full(), a structure -> itself, an object with ``.structure`` -> that,
    another callable -> Callable(mask)."""
    if mask is None:
        return Full()
    if isinstance(mask, MaskStructure):
        return mask
    s = getattr(mask, "structure", None)
    if isinstance(s, MaskStructure):
        return s
    if callable(mask):
        return Callable(mask)
    raise TypeError(f"not a mask: {type(mask).__name__}.")


def of_mod(mod) -> ModStructure | None:
    """The structure of a score_mod: None -> None, a structure -> itself, ``.structure`` -> that,
    another callable -> Callable(mod)."""
    if mod is None:
        return None
    if isinstance(mod, ModStructure):
        return mod
    s = getattr(mod, "structure", None)
    if isinstance(s, ModStructure):
        return s
    if callable(mod):
        return Callable(mod)
    raise TypeError(f"not a score_mod: {type(mod).__name__}.")


def resolve(mask, L: int, S: int) -> MaskStructure:
    """The structure for global query length L and key length S: bottom-right Bands become top-left Bands
    (and combinations re-simplify); Shifted parts are resolved with their own totals."""
    s = of_mask(mask)
    if isinstance(s, Band):
        return s.at(L, S)
    if isinstance(s, And):
        return and_(*(resolve(p, L, S) for p in s.parts))
    if isinstance(s, Or):
        return or_(*(resolve(p, L, S) for p in s.parts))
    if isinstance(s, Not):
        return not_(resolve(s.part, L, S))
    if isinstance(s, Shifted):
        Lt, St = _totals(s, L, S)
        return shifted(resolve(s.inner, Lt, St), s.q_offset, s.kv_offset)
    return s


def _totals(s: Shifted, L: int, S: int):
    return (s.q_offset + L if s.q_total is None else s.q_total, s.kv_offset + S if s.kv_total is None else s.kv_total)


# ------------------------------------------------------------------------------------------ evaluation


def _pick(t: torch.Tensor, idx, dim: int):
    """Index ``t`` along ``dim`` with idx, or with 0 when that axis has size 1 (broadcast)."""
    return idx if t.shape[dim] > 1 else 0 * idx


def _eval(s: MaskStructure, b, h, q, kv, L: int, S: int):
    """The predicate of ``s`` on broadcastable index tensors, for global lengths L, S."""
    if isinstance(s, Full):
        return (q >= 0) & (kv >= 0)
    if isinstance(s, Band):
        r = s.at(L, S)
        d = kv - q
        return (d >= r.lo if r.lo != -INF else d == d) & (d <= r.hi if r.hi != INF else d == d)
    if isinstance(s, PerSequence):
        d = kv - q - (s.kv_lengths - s.q_lengths).to(q.device)[b]
        return (d >= s.lo if s.lo != -INF else d == d) & (d <= s.hi if s.hi != INF else d == d)
    if isinstance(s, Padding):
        vis = (q >= 0) & (kv >= 0)
        if s.q_lengths is not None:
            vis = vis & (q < s.q_lengths.to(q.device)[b])
        if s.kv_lengths is not None:
            vis = vis & (kv < s.kv_lengths.to(q.device)[b])
        return vis
    if isinstance(s, Documents):
        q2 = s.q_ids.to(q.device).view(-1, s.q_ids.shape[-1])
        k2 = s.kv_ids.to(q.device).view(-1, s.kv_ids.shape[-1])
        return q2[_pick(q2, b, 0), q] == k2[_pick(k2, b, 0), kv]
    if isinstance(s, PrefixLM):
        return (kv < s.n) | (kv <= q)
    if isinstance(s, BlockDiagonal):
        return torch.div(q, s.size, rounding_mode="floor") == torch.div(kv, s.size, rounding_mode="floor")
    if isinstance(s, GlobalTokens):
        g = s.indices.to(q.device)
        return (q.unsqueeze(-1) == g).any(-1) | (kv.unsqueeze(-1) == g).any(-1)
    if isinstance(s, Dilated):
        return torch.remainder(q - kv, s.stride) == 0
    if isinstance(s, RandomBlocks):
        from ._positions import hash_uniform as _hash_uniform

        qb = torch.div(q, s.block, rounding_mode="floor")
        kb = torch.div(kv, s.block, rounding_mode="floor")
        return (_hash_uniform(qb, kb, s.seed) < s.density) & (b == b) & (h == h)
    if isinstance(s, Dense):
        md = s.mask.to(q.device)
        return md[_pick(md, b, 0), _pick(md, h, 1), _pick(md, q, 2), _pick(md, kv, 3)]
    if isinstance(s, Shifted):
        Lt, St = _totals(s, L, S)
        return _eval(s.inner, b, h, q + s.q_offset, kv + s.kv_offset, Lt, St)
    if isinstance(s, Callable):
        from ._callables import wrap

        out = wrap(s.fn, "mask")(b, h, q, kv)
        return torch.as_tensor(out, device=q.device)
    if isinstance(s, And):
        out = _eval(s.parts[0], b, h, q, kv, L, S)
        for p in s.parts[1:]:
            out = out & _eval(p, b, h, q, kv, L, S)
        return out
    if isinstance(s, Or):
        out = _eval(s.parts[0], b, h, q, kv, L, S)
        for p in s.parts[1:]:
            out = out | _eval(p, b, h, q, kv, L, S)
        return out
    if isinstance(s, Not):
        return ~_eval(s.part, b, h, q, kv, L, S)
    raise TypeError(f"unknown mask structure {type(s).__name__}.")


def to_dense(mask, B: int, H: int, L: int, S: int, device=None) -> torch.Tensor:
    """Evaluate a structure (or a mask's structure) on every (b, h, q, kv): bool (B, H, L, S).

    Read from the structure alone, so it checks that a structure says what its mask does.

    Example:
        >>> to_dense(Band(-1, 0), 1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    s = of_mask(mask)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    b, h = ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1)
    q, kv = ar(L).view(1, 1, L, 1), ar(S).view(1, 1, 1, S)
    return _eval(s, b, h, q, kv, L, S).expand(B, H, L, S)


# ------------------------------------------------------------------------------------- queries: masks


def _union(spans, k0: int, k1: int):
    """Per-row union of intervals (each clipped to the local key window [k0, k1)) when it is one interval in
    every row, else None. Order-independent."""
    n = max(lo.shape[0] for lo, _ in spans)
    los = torch.stack([lo.clamp(k0, k1).expand(n, -1) for lo, _ in spans])  # (P, n, R)
    his = torch.stack([hi.clamp(k0, k1).expand(n, -1) for _, hi in spans])
    empty = his <= los
    big = k1 + 1
    los_s = torch.where(empty, torch.full_like(los, big), los)
    his_s = torch.where(empty, torch.full_like(his, k0 - 1), his)
    order = los_s.argsort(0)
    los_o, his_o = los_s.gather(0, order), his_s.gather(0, order)
    reach = his_o.cummax(0).values
    gap = (los_o[1:] > reach[:-1]) & (los_o[1:] < big)
    if bool(gap.any()):
        return None
    lo, hi = los_s.amin(0), his_s.amax(0)
    none = hi <= lo
    return torch.where(none, torch.zeros_like(lo), lo), torch.where(none, torch.zeros_like(hi), hi)


def _documents_spans(s: Documents, rows, device):
    qd, kd = s.q_ids.to(device), s.kv_ids.to(device)
    k2 = kd if kd.dim() == 2 else kd.unsqueeze(0)
    if k2.shape[-1] > 1 and bool((k2[:, 1:] < k2[:, :-1]).any()):
        return None  # keys of one document are not contiguous
    q2 = qd if qd.dim() == 2 else qd.unsqueeze(0)
    if rows.numel() and q2.shape[-1] <= int(rows.max()):
        return None
    qv = q2[:, rows]
    n = max(k2.shape[0], qv.shape[0])
    k2, qv = k2.expand(n, -1).contiguous(), qv.expand(n, -1).contiguous()
    return torch.searchsorted(k2, qv, right=False), torch.searchsorted(k2, qv, right=True)


def _spans(s: MaskStructure, rows, Lg: int, Sg: int, win, device):
    """(lo, hi) of shape (1 or B, len(rows)) in global key coordinates (unclipped), or None."""
    zeros = torch.zeros(1, rows.numel(), dtype=torch.long, device=device)
    if _is_full(s):
        return zeros, zeros + Sg
    if isinstance(s, Band):
        r = s.at(Lg, Sg)
        lo = zeros if r.lo == -INF else (rows + r.lo).view(1, -1)
        hi = zeros + Sg if r.hi == INF else (rows + r.hi + 1).view(1, -1)
        return lo, hi
    if isinstance(s, PerSequence):
        off = (s.kv_lengths - s.q_lengths).to(device).view(-1, 1)
        base = rows.view(1, -1) + off
        lo = torch.zeros_like(base) if s.lo == -INF else base + s.lo
        hi = torch.zeros_like(base) + Sg if s.hi == INF else base + s.hi + 1
        return lo, hi
    if isinstance(s, PrefixLM):
        return zeros, torch.clamp(rows + 1, min=s.n).view(1, -1)
    if isinstance(s, BlockDiagonal):
        lo = (torch.div(rows, s.size, rounding_mode="floor") * s.size).view(1, -1)
        return lo, lo + s.size
    if isinstance(s, Padding):
        n = rows.numel()
        hi = (zeros + Sg) if s.kv_lengths is None else s.kv_lengths.to(device).view(-1, 1).expand(-1, n)
        if s.q_lengths is not None:
            real = rows.view(1, -1) < s.q_lengths.to(device).view(-1, 1)
            hi = torch.where(real, hi, torch.zeros((), dtype=torch.long, device=device))
        return torch.zeros_like(hi), hi
    if isinstance(s, Documents):
        return _documents_spans(s, rows, device)
    if isinstance(s, Shifted):
        Lt, St = (s.q_offset + Lg if s.q_total is None else s.q_total,
                  s.kv_offset + Sg if s.kv_total is None else s.kv_total)
        got = _spans(s.inner, rows + s.q_offset, Lt, St, (win[0] + s.kv_offset, win[1] + s.kv_offset), device)
        return None if got is None else (got[0] - s.kv_offset, got[1] - s.kv_offset)
    if isinstance(s, And):
        got = [_spans(p, rows, Lg, Sg, win, device) for p in s.parts]
        if any(g is None for g in got):
            return None
        lo, hi = got[0]
        for a, z in got[1:]:
            lo, hi = torch.maximum(lo, a), torch.minimum(hi, z)
        return lo, hi
    if isinstance(s, Or):
        got = [_spans(p, rows, Lg, Sg, win, device) for p in s.parts]
        if any(g is None for g in got):
            return None
        return _union(got, *win)
    return None


def row_intervals(mask, B: int, L: int, S: int, *, q_offset: int = 0, kv_offset: int = 0, q_len: int | None = None,
                  kv_len: int | None = None, device=None):
    """Visible key interval ``[lo, hi)`` of every query row, or None when the mask is not an interval mask.

    Read from the structure only. ``mask`` is a mask (bound or
    not: bottom-right bands are resolved with the global lengths), a structure or None; ``B, L, S`` the
    batch and local lengths; ``q_offset``/``kv_offset`` the global index of the first local query/key;
    ``q_len``/``kv_len`` the global lengths (default offset + local length).

    Returns:
        ``(lo, hi)`` int64 CPU tensors of shape (1 or B, L) in local key coordinates, clipped to [0, S];
        rows with no visible key have ``lo == hi == 0``.

    Interval masks: Full, Band, PerSequence, PrefixLM, BlockDiagonal, Padding, Documents whose kv ids are
    sorted, Shifted of any of these, And of any of these, and Or of them when every row's union is one
    interval.

    Example:
        >>> lo, hi = row_intervals(Band(-1, 0), 1, 4, 4)
        >>> lo.tolist(), hi.tolist()
        ([[0, 0, 1, 2]], [[1, 2, 3, 4]])
    """
    s = of_mask(mask)
    Lg = q_offset + L if q_len is None else q_len
    Sg = kv_offset + S if kv_len is None else kv_len
    dev = torch.device("cpu") if device is None else device
    rows = torch.arange(q_offset, q_offset + L, device=dev)
    got = _spans(s, rows, Lg, Sg, (kv_offset, kv_offset + S), dev)
    if got is None:
        return None
    lo = torch.clamp(got[0] - kv_offset, 0, S)
    hi = torch.clamp(got[1] - kv_offset, 0, S)
    nonempty = hi > lo
    lo = torch.where(nonempty, lo, torch.zeros_like(lo))
    hi = torch.where(nonempty, hi, torch.zeros_like(hi))
    return lo.cpu(), hi.cpu()


def relative_band(mask):
    """``(lo, hi)`` with visible iff ``lo <= kv - q <= hi`` (None = unbounded) when the mask is a top-left
    Band (causal, sliding windows, their intersections, unions that touch, shifts), ``(None, None)`` for no
    mask or Full, else None (a bottom-right band needs :func:`resolve` with the lengths first).

    Example:
        >>> relative_band(Band(-8, 0)), relative_band(None), relative_band(Dilated(2))
        ((-8, 0), (None, None), None)
    """
    s = of_mask(mask)
    if _is_full(s):
        return (None, None)
    if isinstance(s, Band) and s.align == "top_left":
        return s.bounds
    return None


def is_full(mask) -> bool:
    """True when every query sees every key (no mask, Full, or an unbounded Band)."""
    return _is_full(of_mask(mask))


def is_top_left_causal(mask) -> bool:
    """True when the mask is exactly top-left causal: ``Band(-inf, 0, "top_left")``."""
    s = of_mask(mask)
    return isinstance(s, Band) and s.align == "top_left" and s.lo == -INF and s.hi == 0


def is_relative(mask) -> bool:
    """True when visibility depends only on ``kv - q`` for one call's lengths (Full, Band, Dilated, and
    combinations or shifts of them): a kernel may then cache a tile's mask per tile offset."""
    s = of_mask(mask)
    if isinstance(s, (Full, Band, Dilated)):
        return True
    if isinstance(s, (And, Or)):
        return all(is_relative(p) for p in s.parts)
    if isinstance(s, Not):
        return is_relative(s.part)
    if isinstance(s, Shifted):
        return is_relative(s.inner)
    return False


def key_padding(mask, B: int, S: int):
    """``(keep (B, S) bool, causal: bool)`` when the mask is ``Padding(None, kv_lengths)``, alone or ``&``
    top-left causal, with every batch row keeping at least one key; else None (as the compact key mask that
    torch's fused kernel takes)."""
    s = of_mask(mask)
    causal = False
    if isinstance(s, And):
        others = [p for p in s.parts if not is_top_left_causal(p)]
        if len(others) != 1 or len(s.parts) != 2:
            return None
        s, causal = others[0], True
    if not (isinstance(s, Padding) and s.q_lengths is None and s.kv_lengths is not None):
        return None
    kl = s.kv_lengths
    if kl.numel() != B or bool((kl <= 0).any()):
        return None
    return torch.arange(S, device=kl.device).view(1, S) < kl.view(B, 1), causal


def document_segments(mask, L: int, S: int):
    """The documents' row ranges ``[(start, end), ...]`` when the mask is Documents with the same 1-d ids for
    queries and keys and one contiguous run per document (packed sequences); else None."""
    s = of_mask(mask)
    if not isinstance(s, Documents) or L != S or L == 0:
        return None
    qd, kd = s.q_ids, s.kv_ids
    if qd.dim() != 1 or kd.dim() != 1 or qd.shape[0] != L or not _same(qd, kd):
        return None
    cut = (torch.nonzero(qd[1:] != qd[:-1]).view(-1) + 1).tolist()
    edges = [0] + cut + [L]
    if len(edges) - 1 != int(torch.unique(qd).numel()):  # an id in two runs: not block-diagonal
        return None
    return list(zip(edges[:-1], edges[1:]))


def independent_pieces(mask, B: int, L: int, S: int):
    """``(pieces, band)`` when the mask cuts the problem into independent rectangles: packed Documents or
    Padding, optionally ``&`` a relative band; ``pieces = [(b0, b1, r0, r1, k0, k1), ...]`` (batch rows, query
    rows, keys; equal neighbouring batch rows merged) and ``band = (lo, hi)`` as :func:`relative_band`.
    Else None."""
    s = of_mask(mask)
    parts = s.parts if isinstance(s, And) else (s,)
    cut = [p for p in parts if isinstance(p, (Documents, Padding))]
    if len(cut) != 1:
        return None
    rest = [p for p in parts if p is not cut[0]]
    band = relative_band(and_(*rest))
    if band is None:
        return None
    struct = cut[0]
    if isinstance(struct, Padding):
        qd, kd = struct.q_lengths, struct.kv_lengths
        merged: list = []
        for b in range(B):
            p = (b, b + 1, 0, min(L if qd is None else int(qd[b]), L), 0, min(S if kd is None else int(kd[b]), S))
            if merged and merged[-1][2:] == p[2:] and merged[-1][1] == p[0]:
                merged[-1] = (merged[-1][0], p[1], *p[2:])
            else:
                merged.append(p)
        return merged, band
    bounds = document_segments(struct, L, S)
    if bounds is None:
        return None
    return [(0, B, a, z, a, z) for a, z in bounds], band


# -------------------------------------------------------------------------------- queries: score_mods


def linear_form(mod):
    """``(alpha, [(bias, beta), ...])`` when ``mod(s) = alpha * s + sum(beta * bias(h, kv - q))``: a chain of
    Temperature, per-head Alibi and RelativeBias; ``bias`` is the Alibi/RelativeBias structure (its
    ``values(d)`` gives the (H, n) bias at offsets d). None otherwise; no mod -> ``(1.0, [])``.

    Example:
        >>> linear_form(compose(Temperature(2.0), Softcap(5.0))) is None
        True
        >>> linear_form(Temperature(2.0))
        (0.5, [])
    """
    s = of_mod(mod)
    if s is None:
        return 1.0, []
    alpha, biases = 1.0, []
    for m in s.parts if isinstance(s, Compose) else (s,):
        if isinstance(m, Temperature):
            alpha /= m.t
            biases = [(b, w / m.t) for b, w in biases]
        elif isinstance(m, RelativeBias) or (isinstance(m, Alibi) and m.per_head):
            biases.append((m, 1.0))
        else:
            return None
    return alpha, biases


def softcap_of(mod) -> float | None:
    """The cap when the score_mod is exactly one Softcap, else None."""
    s = of_mod(mod)
    return s.cap if isinstance(s, Softcap) else None
