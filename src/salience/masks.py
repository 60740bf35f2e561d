"""Which keys a query may see: mask_mod predicates with FlexAttention's signature.

A mask_mod is a callable ``mask_mod(b, h, q_idx, kv_idx) -> bool`` that says whether query ``q_idx`` of
batch ``b`` and head ``h`` may attend to key ``kv_idx``. The arguments are integer tensors that broadcast
against each other, so the same callable works here, in ``to_dense``, and inside
``torch.nn.attention.flex_attention`` (which calls it under ``vmap`` with scalar tensors).

The factories return :class:`MaskMod` objects: callables with a readable name, combinators ``&``, ``|``
and ``~``, ``to_dense(B, H, L, S)`` and an analytic tile classification used by
:class:`salience.blocks.BlockMask` so that no ``L x S`` evaluation is needed for named masks.

Example:
    >>> import salience.masks as M
    >>> m = M.causal() & M.sliding_window(2)
    >>> m
    causal() & sliding_window(left=2, right=0)
    >>> m.to_dense(1, 1, 4, 4)[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]

Conventions: ``causal()`` is top-left aligned (query i sees keys j <= i);
``causal(align="bottom_right")`` aligns the last query with the last key, the KV-cache convention
(query i sees keys j <= i + S - L). Windows are inclusive on both sides: ``sliding_window(left, right)``
lets query i see keys ``i - left <= j <= i + right``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import structure as st
from ._positions import hash_uniform

__all__ = [
    "MaskMod",
    "TileContext",
    "as_mask_mod",
    "full",
    "causal",
    "sliding_window",
    "padding",
    "document",
    "prefix_lm",
    "global_tokens",
    "dilated",
    "block_diagonal",
    "random_blocks",
    "dense",
    "shift",
    "band",
]

_ALIGNS = ("top_left", "bottom_right")


@dataclass
class TileContext:
    """Tile geometry handed to analytic classifiers: tile start/end indices along queries and keys.

    ``q_start``/``q_end`` have shape ``(nq, 1)`` and ``k_start``/``k_end`` shape ``(1, nk)`` (ends
    exclusive), int64 on ``device``.
    """

    B: int
    H: int
    L: int
    S: int
    q_start: torch.Tensor
    q_end: torch.Tensor
    k_start: torch.Tensor
    k_end: torch.Tensor
    device: torch.device


def index_grid(B: int, H: int, L: int, S: int, device=None):
    """Broadcastable index tensors b (B,1,1,1), h (1,H,1,1), q (1,1,L,1), kv (1,1,1,S)."""
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    return (
        ar(B).view(B, 1, 1, 1),
        ar(H).view(1, H, 1, 1),
        ar(L).view(1, 1, L, 1),
        ar(S).view(1, 1, 1, S),
    )


class MaskMod:
    """A named mask_mod ``(b, h, q_idx, kv_idx) -> bool`` with combinators and tile classification.

    Args:
        fn: the predicate; must broadcast over integer index tensors.
        name: readable name used by ``repr`` (e.g. ``"sliding_window(left=256, right=0)"``).
        tiles: optional analytic classifier ``tiles(ctx) -> (any_visible, all_visible)``, two boolean tensors
            broadcastable to ``(B, H, nq, nk)``; ``any`` may over-estimate and ``all`` under-estimate
            (that only costs work, never correctness).
        relative: True when the predicate depends only on ``kv_idx - q_idx`` (for one call's L and S),
            which lets kernels cache a tile's mask per tile offset.

    Combinations carry ``parts``: ``("&", a, b)``, ``("|", a, b)`` or ``("~", a)`` with bound operands.
        binder: optional ``binder(L, S, device) -> MaskMod`` for masks whose meaning depends on the
            sizes (bottom-right causal) or that hold tensors to move to the device.
        structure: what the mask is, as data (:mod:`salience.structure`); kernels read it instead of the
            name. Default: ``Callable(fn)`` (opaque).
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        *,
        tiles: Callable | None = None,
        relative: bool = False,
        binder: Callable | None = None,
        structure: st.MaskStructure | None = None,
    ):
        self.structure = st.Callable(fn) if structure is None else structure
        self.fn = fn
        self.name = name
        self.__name__ = name
        self._tiles = tiles
        self.relative = relative
        self._binder = binder

    def __call__(self, b, h, q_idx, kv_idx):
        if self._binder is not None and self.fn is None:
            raise ValueError(
                f"{self.name} depends on the query and key lengths; call .bind(L, S) first "
                f"(salience.attention does this for you)."
            )
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return self.name

    # -- sizes ---------------------------------------------------------------------------------------
    #: optional ``_check(B, H, L, S)`` set by factories whose mask only fits some sizes (per-batch lengths, tensors)
    _check = None

    def check(self, B: int, H: int, L: int, S: int) -> None:
        """Raise a ValueError naming the argument when this mask cannot serve a (B, H, L, S) problem.

        :func:`salience.attention`, :func:`~salience.attention_weights`, :func:`~salience.plan` and
        :func:`salience.reference.attention` call it before any path runs, so every path gives the same
        error. Factories set ``mask._check = fn(B, H, L, S)``; ``&``, ``|``, ``~`` and :func:`shift` pass it on."""
        if self._check is not None:
            self._check(B, H, L, S)

    def bind(self, L: int, S: int, device=None) -> MaskMod:
        """The concrete mask for query length L and key length S on ``device``."""
        if self._binder is None:
            return self
        return self._binder(L, S, device)

    # -- evaluation ----------------------------------------------------------------------------------
    def to_dense(self, B: int, H: int, L: int, S: int, device=None) -> torch.Tensor:
        """Evaluate the mask on every (b, h, q, kv): a bool tensor of shape (B, H, L, S)."""
        m = self.bind(L, S, device)
        return evaluate(m, B, H, L, S, device)

    def tile_bounds(self, ctx: TileContext):
        """``(any_visible, all_visible)`` per tile, or None when the mask has no analytic form."""
        m = self.bind(ctx.L, ctx.S, ctx.device)
        if m._tiles is None:
            return None
        return m._tiles(ctx)

    # -- combinators ---------------------------------------------------------------------------------
    def __and__(self, other) -> MaskMod:
        return _combine(self, as_mask_mod(other, "other"), "&")

    def __rand__(self, other) -> MaskMod:
        return _combine(as_mask_mod(other, "other"), self, "&")

    def __or__(self, other) -> MaskMod:
        return _combine(self, as_mask_mod(other, "other"), "|")

    def __ror__(self, other) -> MaskMod:
        return _combine(as_mask_mod(other, "other"), self, "|")

    def __invert__(self) -> MaskMod:
        return _invert(self)


def evaluate(mask_mod: Callable, B: int, H: int, L: int, S: int, device=None) -> torch.Tensor:
    """Evaluate any mask_mod on the full (B, H, L, S) grid, checking that it returns booleans."""
    if not isinstance(mask_mod, MaskMod):  # a user callable: FlexAttention's semantics (salience._callables)
        mask_mod = as_mask_mod(mask_mod)
    b, h, q, kv = index_grid(B, H, L, S, device)
    out = mask_mod(b, h, q, kv)
    return check_mask_output(out, mask_mod, (B, H, L, S))


def check_mask_output(out, mask_mod, shape) -> torch.Tensor:
    """Check a mask_mod's result: a bool tensor that broadcasts to ``shape``; return it expanded."""
    if isinstance(out, bool):
        out = torch.tensor(out)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        seen = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(
            f"mask {_name_of(mask_mod)} returned {seen}, not a bool tensor: a mask_mod must return a boolean "
            "(b, h, q_idx, kv_idx) -> bool. Did you pass a score_mod as mask? Use score_mod= for additive scores."
        )
    try:
        return out.expand(shape)
    except RuntimeError as e:
        raise ValueError(
            f"mask {_name_of(mask_mod)} returned shape {tuple(out.shape)}, which does not broadcast to {shape}."
        ) from e


def _name_of(fn) -> str:
    if isinstance(fn, MaskMod):
        return fn.name
    return getattr(fn, "__name__", type(fn).__name__)


def as_mask_mod(mask, argname: str = "mask") -> MaskMod:
    """Accept a MaskMod, a plain callable ``(b, h, q_idx, kv_idx) -> bool`` or a bool tensor."""
    if isinstance(mask, MaskMod):
        return mask
    if isinstance(mask, torch.Tensor):
        return dense(mask)
    if callable(mask):
        import inspect

        try:
            n = len(
                [
                    p
                    for p in inspect.signature(mask).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                ]
            )
        except (TypeError, ValueError):
            n = 4
        if n != 4:
            raise TypeError(
                f"{argname} must be a mask_mod (b, h, q_idx, kv_idx) -> bool; {_name_of(mask)} takes {n} "
                "required arguments. A score_mod (score, b, h, q_idx, kv_idx) goes to score_mod=."
            )
        # evaluated like FlexAttention (vmap) when broadcasting cannot serve
        from ._callables import FlexCallable, wrap

        return MaskMod(wrap(mask, "mask"), _name_of(mask), structure=st.Callable(mask.fn if isinstance(mask, FlexCallable) else mask))
    raise TypeError(
        f"{argname} must be a salience mask (salience.masks.*), a callable (b, h, q_idx, kv_idx) -> bool or a "
        f"bool tensor broadcastable to (B, H, L, S); got {type(mask).__name__}."
    )


# -- combinators ------------------------------------------------------------------------------------


def _paren(m: MaskMod, op: str) -> str:
    if (" & " in m.name or " | " in m.name) and not m.name.startswith("~("):
        if op == "&" and " | " not in m.name:
            return m.name
        if op == "|" and " & " not in m.name:
            return m.name
        return f"({m.name})"
    return m.name


def _combine(a: MaskMod, b: MaskMod, op: str) -> MaskMod:
    name = f"{_paren(a, op)} {op} {_paren(b, op)}"
    sized = a._binder is not None or b._binder is not None

    def make(ma: MaskMod, mb: MaskMod) -> MaskMod:
        if op == "&":
            fn = lambda b_, h, q, kv: ma(b_, h, q, kv) & mb(b_, h, q, kv)  # noqa: E731
        else:
            fn = lambda b_, h, q, kv: ma(b_, h, q, kv) | mb(b_, h, q, kv)  # noqa: E731

        tiles = None
        if ma._tiles is not None and mb._tiles is not None:

            def tiles(ctx):
                a_any, a_all = ma._tiles(ctx)
                b_any, b_all = mb._tiles(ctx)
                if op == "&":
                    return a_any & b_any, a_all & b_all
                return a_any | b_any, a_all | b_all

        join = st.and_ if op == "&" else st.or_
        out = MaskMod(fn, name, tiles=tiles, relative=ma.relative and mb.relative,
                      structure=join(ma.structure, mb.structure))
        out.parts = (op, ma, mb)  # the structure, for kernels that recognise combinations
        return out

    join = st.and_ if op == "&" else st.or_
    out = (make(a, b) if (a.fn is not None and b.fn is not None)
           else MaskMod(None, name, structure=join(a.structure, b.structure)))
    if sized:
        out._binder = lambda L, S, dev: make(a.bind(L, S, dev), b.bind(L, S, dev))
    out.relative = a.relative and b.relative
    out._check = lambda B, H, L, S: (a.check(B, H, L, S), b.check(B, H, L, S))
    return out


def _invert(a: MaskMod) -> MaskMod:
    name = f"~({a.name})" if (" " in a.name) else f"~{a.name}"

    def make(ma: MaskMod) -> MaskMod:
        tiles = None
        if ma._tiles is not None:

            def tiles(ctx):
                a_any, a_all = ma._tiles(ctx)
                return ~a_all, ~a_any

        out = MaskMod(lambda b, h, q, kv: ~ma(b, h, q, kv), name, tiles=tiles, relative=ma.relative,
                      structure=st.not_(ma.structure))
        out.parts = ("~", ma)
        return out

    out = make(a) if a.fn is not None else MaskMod(None, name, structure=st.not_(a.structure))
    if a._binder is not None:
        out._binder = lambda L, S, dev: make(a.bind(L, S, dev))
    out.relative = a.relative
    out._check = a.check
    return out


# -- factories -------------------------------------------------------------------------------------


def _check_int(value, argname: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argname} must be an int >= {minimum}; got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{argname} must be >= {minimum}; got {value}.")
    return value


def full() -> MaskMod:
    """Every query sees every key (the same as no mask)."""

    def tiles(ctx):
        t = torch.ones((), dtype=torch.bool, device=ctx.device)
        return t, t

    return MaskMod(lambda b, h, q, kv: (q >= 0) & (kv >= 0), "full()", tiles=tiles, relative=True,
                   structure=st.Full())


def _band(lo: float, hi: float, name: str) -> MaskMod:
    """Visible iff lo <= kv_idx - q_idx <= hi (bounds may be infinite)."""
    lo_i = None if lo == -math.inf else int(lo)
    hi_i = None if hi == math.inf else int(hi)

    def fn(b, h, q, kv):
        d = kv - q
        if lo_i is None and hi_i is None:  # sliding_window(None, None): every key
            return d == d
        if lo_i is None:
            return d <= hi_i
        if hi_i is None:
            return d >= lo_i
        return (d >= lo_i) & (d <= hi_i)

    def tiles(ctx):
        dmin = ctx.k_start - (ctx.q_end - 1)
        dmax = (ctx.k_end - 1) - ctx.q_start
        lo_t = -(2**62) if lo_i is None else lo_i
        hi_t = 2**62 if hi_i is None else hi_i
        any_ = (dmax >= lo_t) & (dmin <= hi_t)
        all_ = (dmin >= lo_t) & (dmax <= hi_t)
        return any_, all_

    m = MaskMod(fn, name, tiles=tiles, relative=True, structure=st.Band(lo, hi))
    m.band = (lo_i, hi_i)
    return m


def causal(align: str = "top_left", *, q_lengths=None, kv_lengths=None) -> MaskMod:
    """Causal mask. ``align="top_left"`` (default): query i sees keys j <= i.
    ``align="bottom_right"``: the last query sees the last key, query i sees keys j <= i + (S - L)
    (the KV-cache convention, where S >= L; flash-attention's ``causal=True``).

    ``q_lengths``/``kv_lengths`` (B,) (both, with ``align="bottom_right"``) align each sequence of a right-padded
    batch to its own lengths: in batch row b query i sees keys j <= i + kv_lengths[b] - q_lengths[b] (what
    flash-attention's varlen functions do per sequence). It does not hide the padding: combine it with
    ``padding(q_lengths, kv_lengths)``. Such a mask runs on the tile kernels (``blockwise``; its tiles are
    classified analytically); salience.compat's varlen functions run each sequence on the fast paths instead.

    Example:
        >>> causal(align="bottom_right").to_dense(1, 1, 2, 4)[0, 0].int().tolist()
        [[1, 1, 1, 0], [1, 1, 1, 1]]
        >>> causal("bottom_right", q_lengths=[2], kv_lengths=[3]).to_dense(1, 1, 2, 4)[0, 0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 1, 0]]
    """
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}; got {align!r}.")
    if q_lengths is not None or kv_lengths is not None:
        return _per_sequence_band(None, 0, align, q_lengths, kv_lengths, "causal")
    if align == "top_left":
        m = _band(-math.inf, 0, "causal()")
        m.kind = ("causal", "top_left")
        return m
    name = "causal(align='bottom_right')"

    def binder(L, S, device):
        m = _band(-math.inf, S - L, name)
        m.kind = ("causal", "bottom_right")
        return m

    out = MaskMod(None, name, binder=binder, relative=True, structure=st.Band(-math.inf, 0, "bottom_right"))
    out.kind = ("causal", "bottom_right")
    return out


def sliding_window(left: int | None, right: int | None = 0, *, align: str = "top_left", q_lengths=None,
                   kv_lengths=None) -> MaskMod:
    """Local window: query i sees keys ``i - left <= j <= i + right`` (both ends inclusive).

    ``sliding_window(w)`` is the causal window of the last ``w`` keys plus the query's own position.
    ``left=None`` / ``right=None``: unbounded on that side (flash-attention's ``-1``).
    ``align="bottom_right"`` centres the window on ``i + S - L`` (the last query on the last key:
    flash-attention's ``window_size`` convention); for L == S both alignments agree. With ``q_lengths`` and
    ``kv_lengths`` (B,) and ``align="bottom_right"`` each sequence of a padded batch is aligned to its own
    lengths (centre ``i + kv_lengths[b] - q_lengths[b]``; see :func:`causal`).

    Example:
        >>> sliding_window(1, 1).to_dense(1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
        >>> sliding_window(1, 0, align="bottom_right").to_dense(1, 1, 2, 4)[0, 0].int().tolist()
        [[0, 1, 1, 0], [0, 0, 1, 1]]
    """
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}; got {align!r}.")
    if left is not None:
        _check_int(left, "left")
    if right is not None:
        _check_int(right, "right")
    lo = -math.inf if left is None else -left
    hi = math.inf if right is None else right
    if q_lengths is not None or kv_lengths is not None:
        return _per_sequence_band(None if left is None else -left, right, align, q_lengths, kv_lengths,
                                  f"sliding_window(left={left}, right={right}")
    if align == "top_left":
        m = _band(lo, hi, f"sliding_window(left={left}, right={right})")
        m.kind = ("sliding_window", left, right)
        return m
    name = f"sliding_window(left={left}, right={right}, align='bottom_right')"

    def binder(L, S, device):
        off = 0 if L is None or S is None else S - L
        m = _band(lo + off, hi + off, name)
        m.kind = ("sliding_window", left, right, "bottom_right")
        return m

    out = MaskMod(None, name, binder=binder, relative=True, structure=st.Band(lo, hi, "bottom_right"))
    out.kind = ("sliding_window", left, right, "bottom_right")
    return out


def _per_sequence_band(lo, hi, align, q_lengths, kv_lengths, head: str) -> MaskMod:
    """Visible iff ``lo <= kv_idx - q_idx - (kv_lengths[b] - q_lengths[b]) <= hi`` (None = unbounded)."""
    if align != "bottom_right":
        raise ValueError("q_lengths/kv_lengths align each sequence's last query with its last key; pass "
                         "align='bottom_right' with them (top-left alignment does not depend on the lengths).")
    ql = _lengths(q_lengths, "q_lengths")
    kl = _lengths(kv_lengths, "kv_lengths")
    if ql is None or kl is None:
        raise ValueError("per-sequence alignment needs both q_lengths and kv_lengths (B,).")
    if ql.shape != kl.shape:
        raise ValueError(f"q_lengths has {ql.numel()} entries but kv_lengths has {kl.numel()}; give one per batch row.")
    off_all = kl - ql
    shown = (lambda t: t.tolist() if t.numel() <= 8 else f"<{t.numel()} lengths>")  # noqa: E731
    opener = "causal(" if head == "causal" else head + ", "  # head: "causal" or "sliding_window(left=.., right=.."
    name = f"{opener}align='bottom_right', q_lengths={shown(ql)}, kv_lengths={shown(kl)})"

    def binder(L, S, device):
        off = off_all.to(device)

        def fn(b, h, q, kv):
            d = kv - q - off[b]
            if lo is None and hi is None:
                return d == d
            if lo is None:
                return d <= hi
            if hi is None:
                return d >= lo
            return (d >= lo) & (d <= hi)

        def tiles(ctx):
            o = off.view(-1, 1, 1, 1)
            dmin = ctx.k_start - (ctx.q_end - 1) - o
            dmax = (ctx.k_end - 1) - ctx.q_start - o
            lo_t = -(2**62) if lo is None else lo
            hi_t = 2**62 if hi is None else hi
            return (dmax >= lo_t) & (dmin <= hi_t), (dmin >= lo_t) & (dmax <= hi_t)

        m = MaskMod(fn, name, tiles=tiles, structure=st.PerSequence(
            -math.inf if lo is None else lo, math.inf if hi is None else hi, ql.to(device), kl.to(device)))
        m.kind = ("per_sequence_band", lo, hi, ql, kl)
        return m

    out = _unbound(binder)
    sizes = (("q_lengths", ql, ql.numel(), int(ql.max()) if ql.numel() else 0, "L"),
             ("kv_lengths", kl, kl.numel(), int(kl.max()) if kl.numel() else 0, "S"))
    out._check = lambda B, H, L, S: _check_lengths(name, sizes, B, {"L": L, "S": S})
    return out


def _lengths(x, argname: str) -> torch.Tensor | None:
    if x is None:
        return None
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{argname} must be a 1-D integer sequence of per-batch lengths (B,); got {t.dtype} {tuple(t.shape)}.")
    if (t < 0).any():
        raise ValueError(f"{argname} must be >= 0; got {t.tolist()}.")
    return t.long()


def padding(q_lengths=None, kv_lengths=None) -> MaskMod:
    """Right padding: in batch b only the first ``q_lengths[b]`` queries and ``kv_lengths[b]`` keys are real.

    Padded query rows see nothing and give output 0. Either argument may be None (no padding on that side).

    Example:
        >>> padding(kv_lengths=[2]).to_dense(1, 1, 2, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0]]
    """
    ql = _lengths(q_lengths, "q_lengths")
    kl = _lengths(kv_lengths, "kv_lengths")
    if ql is None and kl is None:
        raise ValueError("padding() needs q_lengths, kv_lengths or both.")
    if ql is not None and kl is not None and ql.shape != kl.shape:
        raise ValueError(f"q_lengths has {ql.numel()} entries but kv_lengths has {kl.numel()}; give one per batch row.")
    parts = []
    if ql is not None:
        parts.append(f"q_lengths={ql.tolist() if ql.numel() <= 8 else f'<{ql.numel()} lengths>'}")
    if kl is not None:
        parts.append(f"kv_lengths={kl.tolist() if kl.numel() <= 8 else f'<{kl.numel()} lengths>'}")
    name = f"padding({', '.join(parts)})"

    def binder(L, S, device):
        qd = None if ql is None else ql.to(device)
        kd = None if kl is None else kl.to(device)

        def fn(b, h, q, kv):
            if qd is None:
                return kv < kd[b]
            if kd is None:
                return q < qd[b]
            return (q < qd[b]) & (kv < kd[b])

        def tiles(ctx):
            anys, alls = [], []
            if qd is not None:
                ln = qd.view(-1, 1, 1, 1)
                anys.append(ctx.q_start < ln)
                alls.append(ctx.q_end <= ln)
            if kd is not None:
                ln = kd.view(-1, 1, 1, 1)
                anys.append(ctx.k_start < ln)
                alls.append(ctx.k_end <= ln)
            a = anys[0] if len(anys) == 1 else anys[0] & anys[1]
            f = alls[0] if len(alls) == 1 else alls[0] & alls[1]
            return a, f

        m = MaskMod(fn, name, tiles=tiles, structure=st.Padding(qd, kd))
        m.kind = ("padding", qd, kd)
        return m

    out = _unbound(binder)
    # sizes read once here (Python ints), so the per-call check does no tensor work (nor breaks a compiled graph)
    sizes = tuple((argname, t, t.numel(), int(t.max()) if t.numel() else 0, axis)
                  for argname, t, axis in (("q_lengths", ql, "L"), ("kv_lengths", kl, "S")) if t is not None)
    out._check = lambda B, H, L, S: _check_lengths(name, sizes, B, {"L": L, "S": S})
    return out


def _check_lengths(name: str, sizes, B: int, limits: dict) -> None:
    """Per-batch lengths: one per batch row, each in [0, the length it cuts]."""
    for argname, t, count, top, axis in sizes:
        n = limits[axis]
        if count != B:
            raise ValueError(
                f"mask {name}: {argname} holds {count} lengths but the batch has B={B}; give one length per "
                f"batch row, shape (B,) = ({B},)."
            )
        if top > n:
            raise ValueError(
                f"mask {name}: {argname} {t.tolist() if count <= 8 else f'(max {top})'} exceed "
                f"{axis}={n}; each length must be in [0, {n}] (the tensors are right-padded to {axis})."
            )


def _ids(x, argname: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() not in (1, 2) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(
            f"{argname} must be integer document ids of shape (L,) or (B, L); got {t.dtype} {tuple(t.shape)}."
        )
    return t.long()


def _seg_minmax(ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
    """Min and max of ids[..., s:e] for each tile (ids (..., N) -> (..., n_tiles)), via padding to a grid."""
    n = ids.shape[-1]
    t = int((ends - starts).max())
    nt = starts.numel()
    idx = (starts.view(-1, 1) + torch.arange(t, device=ids.device).view(1, -1)).clamp(max=n - 1)
    vals = ids[..., idx]  # (..., nt, t)
    return vals.amin(-1).view(*ids.shape[:-1], nt), vals.amax(-1).view(*ids.shape[:-1], nt)


def document(ids, kv_ids=None) -> MaskMod:
    """Per-document mask for packed sequences: query i sees key j iff ``ids[i] == kv_ids[j]``.

    ``ids`` has shape (L,) or (B, L); ``kv_ids`` (default ``ids``) has shape (S,) or (B, S). Combine with
    ``causal()`` for packed causal language modelling. Tile classification is exact when ids are sorted
    (the packed case) and conservative otherwise.

    Example:
        >>> document([0, 0, 1]).to_dense(1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    qi = _ids(ids, "ids")
    ki = qi if kv_ids is None else _ids(kv_ids, "kv_ids")
    name = f"document(<{qi.shape[-1]} ids, {int(torch.unique(qi).numel())} documents>)"

    def binder(L, S, device):
        if L is not None and qi.shape[-1] != L:
            raise ValueError(f"document ids cover {qi.shape[-1]} queries but the query length is L={L}.")
        if S is not None and ki.shape[-1] != S:
            raise ValueError(
                f"document kv_ids cover {ki.shape[-1]} keys but the key length is S={S}; pass kv_ids= of length S."
            )
        qd, kd = qi.to(device), ki.to(device)

        if qd.dim() == 1 and kd.dim() == 1:
            fn = lambda b, h, q, kv: qd[q] == kd[kv]  # noqa: E731
        else:
            q2 = qd if qd.dim() == 2 else qd.unsqueeze(0)
            k2 = kd if kd.dim() == 2 else kd.unsqueeze(0)
            fn = lambda b, h, q, kv: q2[b if q2.shape[0] > 1 else 0 * b, q] == k2[b if k2.shape[0] > 1 else 0 * b, kv]  # noqa: E731

        def tiles(ctx):
            q2 = qd if qd.dim() == 2 else qd.unsqueeze(0)
            k2 = kd if kd.dim() == 2 else kd.unsqueeze(0)
            qmin, qmax = _seg_minmax(q2, ctx.q_start.view(-1), ctx.q_end.view(-1))
            kmin, kmax = _seg_minmax(k2, ctx.k_start.view(-1), ctx.k_end.view(-1))
            qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
            kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
            any_ = (qmax >= kmin) & (kmax >= qmin)
            all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
            return any_, all_

        m = MaskMod(fn, name, tiles=tiles, structure=st.Documents(qd, kd))
        m.kind = ("document", qd, kd)
        return m

    def check(B, H, L, S):
        for argname, t in (("ids", qi), ("kv_ids", ki)):
            if t.dim() == 2 and t.shape[0] not in (1, B):
                raise ValueError(
                    f"mask {name}: {argname} has shape {tuple(t.shape)} (B, length) but the batch has B={B}; give "
                    f"one row per batch row, or shape (length,) for ids shared by the batch."
                )

    out = _unbound(binder)
    out._check = check
    return out


def prefix_lm(n: int) -> MaskMod:
    """Prefix language model: the first ``n`` keys are visible to every query, the rest causally.

    Query i sees key j iff ``j < n or j <= i``.

    Example:
        >>> prefix_lm(2).to_dense(1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    _check_int(n, "n")

    def fn(b, h, q, kv):
        return (kv < n) | (kv <= q)

    def tiles(ctx):
        lim_lo = torch.clamp(ctx.q_start, min=n - 1)  # last visible key for the tile's first query
        lim_hi = torch.clamp(ctx.q_end - 1, min=n - 1)
        return ctx.k_start <= lim_hi, (ctx.k_end - 1) <= lim_lo

    m = MaskMod(fn, f"prefix_lm({n})", tiles=tiles, structure=st.PrefixLM(n))
    m.kind = ("prefix_lm", n)
    return m


def _membership_counts(idx: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
    """How many of the sorted unique indices fall in [start, end) for each tile."""
    return torch.searchsorted(idx, ends, right=False) - torch.searchsorted(idx, starts, right=False)


def global_tokens(indices) -> MaskMod:
    """Global tokens (Longformer/BigBird style): the listed positions see every key and are seen by every query.

    Usually combined with a local pattern: ``sliding_window(128, 128) | global_tokens([0])``.

    Example:
        >>> global_tokens([0]).to_dense(1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    """
    idx = torch.unique(torch.as_tensor(indices, dtype=torch.long).view(-1))
    if idx.numel() and (idx < 0).any():
        raise ValueError(f"indices must be >= 0; got {idx.tolist()}.")
    shown = idx.tolist() if idx.numel() <= 8 else f"<{idx.numel()} indices>"
    name = f"global_tokens({shown})"

    def binder(L, S, device):
        gd = idx.to(device)

        def fn(b, h, q, kv):
            return (q.unsqueeze(-1) == gd).any(-1) | (kv.unsqueeze(-1) == gd).any(-1)

        def tiles(ctx):
            cq = _membership_counts(gd, ctx.q_start.contiguous(), ctx.q_end.contiguous())
            ck = _membership_counts(gd, ctx.k_start.contiguous(), ctx.k_end.contiguous())
            any_ = (cq > 0) | (ck > 0)
            all_ = (cq == ctx.q_end - ctx.q_start) | (ck == ctx.k_end - ctx.k_start)
            return any_, all_

        return MaskMod(fn, name, tiles=tiles, structure=st.GlobalTokens(gd))

    return _unbound(binder)


def dilated(stride: int) -> MaskMod:
    """Dilated (strided) pattern: query i sees key j iff ``(i - j) % stride == 0``.

    Example:
        >>> dilated(2).to_dense(1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    _check_int(stride, "stride", 1)

    def fn(b, h, q, kv):
        return torch.remainder(q - kv, stride) == 0

    def tiles(ctx):
        dmin = ctx.k_start - (ctx.q_end - 1)
        dmax = (ctx.k_end - 1) - ctx.q_start
        any_ = torch.div(dmax, stride, rounding_mode="floor") * stride >= dmin
        all_ = torch.full_like(any_, stride == 1)
        return any_, all_

    return MaskMod(fn, f"dilated({stride})", tiles=tiles, relative=True, structure=st.Dilated(stride))


def block_diagonal(size: int) -> MaskMod:
    """Blocks of ``size`` tokens attend only within themselves: visible iff ``i // size == j // size``.

    Example:
        >>> block_diagonal(2).to_dense(1, 1, 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    _check_int(size, "size", 1)

    def fn(b, h, q, kv):
        return torch.div(q, size, rounding_mode="floor") == torch.div(kv, size, rounding_mode="floor")

    def tiles(ctx):
        qa, qb = ctx.q_start // size, (ctx.q_end - 1) // size
        ka, kb = ctx.k_start // size, (ctx.k_end - 1) // size
        return (qb >= ka) & (kb >= qa), (qa == qb) & (ka == kb) & (qa == ka)

    m = MaskMod(fn, f"block_diagonal({size})", tiles=tiles, structure=st.BlockDiagonal(size))
    m.kind = ("block_diagonal", size)
    return m


def random_blocks(density: float, block: int = 64, seed: int = 0) -> MaskMod:
    """Random block sparsity (BigBird's random part): each (block x block) cell is visible with
    probability ``density``, decided by a seeded hash, so the pattern is the same at any size.

    Example:
        >>> m = random_blocks(0.5, block=2, seed=1)
        >>> bool((m.to_dense(1, 1, 8, 8) == m.to_dense(1, 1, 8, 8)).all())
        True
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a float in [0, 1]; got {density!r}.")
    _check_int(block, "block", 1)
    _check_int(seed, "seed")
    name = f"random_blocks(density={density}, block={block}, seed={seed})"

    def fn(b, h, q, kv):
        qb = torch.div(q, block, rounding_mode="floor")
        kb = torch.div(kv, block, rounding_mode="floor")
        return hash_uniform(qb, kb, seed) < density

    def tiles(ctx):
        nqb = (ctx.L + block - 1) // block
        nkb = (ctx.S + block - 1) // block
        grid = fn(None, None, torch.arange(nqb, device=ctx.device).view(-1, 1) * block,
                  torch.arange(nkb, device=ctx.device).view(1, -1) * block)
        cs = torch.zeros(nqb + 1, nkb + 1, dtype=torch.long, device=ctx.device)
        cs[1:, 1:] = grid.long().cumsum(0).cumsum(1)
        qa, qz = ctx.q_start // block, (ctx.q_end - 1) // block + 1
        ka, kz = ctx.k_start // block, (ctx.k_end - 1) // block + 1
        cnt = cs[qz, kz] - cs[qa, kz] - cs[qz, ka] + cs[qa, ka]
        return cnt > 0, cnt == (qz - qa) * (kz - ka)

    return MaskMod(fn, name, tiles=tiles, structure=st.RandomBlocks(float(density), block, seed))


def dense(mask: torch.Tensor) -> MaskMod:
    """Wrap an explicit boolean mask broadcastable to (B, H, L, S) (True = visible) as a mask_mod.

    Example:
        >>> dense(torch.tensor([[True, False]])).to_dense(1, 1, 1, 2).tolist()
        [[[[True, False]]]]
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        seen = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"mask tensor must have dtype torch.bool (True = may attend); got {seen}. "
            "For an additive float bias use a score_mod, e.g. lambda s, b, h, q, kv: s + bias[b, h, q, kv]."
        )
    if mask.dim() not in (2, 4):
        extra = ""
        if mask.dim() == 3:
            extra = (" A 3-D mask is ambiguous: (B, L, S) per batch row or (H, L, S) per head (torch SDPA broadcasts "
                     "it from the right, as (H, L, S)); salience refuses to guess.")
        raise ValueError(
            f"mask tensor must have shape (L, S) or (B|1, H|1, L, S); got {mask.dim()} dimensions "
            f"{tuple(mask.shape)}.{extra} Add the axis explicitly: mask[:, None] for one mask per batch row "
            f"(B, 1, L, S), mask[None] for one per head (1, H, L, S)."
        )
    m4 = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    name = f"dense(<bool mask {tuple(mask.shape)}>)"

    def binder(L, S, device):
        md = m4.to(device)
        if L is not None and (md.shape[-2] not in (1, L) or md.shape[-1] not in (1, S)):
            raise ValueError(f"mask tensor of shape {tuple(mask.shape)} does not broadcast to (B, H, L={L}, S={S}).")
        Bm, Hm = md.shape[0], md.shape[1]

        def fn(b, h, q, kv):
            return md[b if Bm > 1 else 0 * b, h if Hm > 1 else 0 * h, q if md.shape[2] > 1 else 0 * q,
                      kv if md.shape[3] > 1 else 0 * kv]

        def tiles(ctx):
            full = md.expand(md.shape[0], md.shape[1], L, S)
            nq, nk = ctx.q_start.numel(), ctx.k_start.numel()
            tq = int((ctx.q_end - ctx.q_start).max())
            tk = int((ctx.k_end - ctx.k_start).max())
            pad = torch.nn.functional.pad
            padded_any = pad(full, (0, nk * tk - S, 0, nq * tq - L), value=False)
            padded_all = pad(full, (0, nk * tk - S, 0, nq * tq - L), value=True)
            sh = (md.shape[0], md.shape[1], nq, tq, nk, tk)
            return padded_any.view(sh).any(5).any(3), padded_all.view(sh).all(5).all(3)

        m = MaskMod(fn, name, tiles=tiles, structure=st.Dense(md))
        m.kind = ("dense", md)
        return m

    def check(B, H, L, S):
        want = (B, H, L, S)
        if any(n not in (1, w) for n, w in zip(m4.shape, want)):
            bad = ", ".join(f"{ax}: {n} (needs 1 or {w})" for ax, n, w in zip("BHLS", m4.shape, want) if n not in (1, w))
            raise ValueError(
                f"mask tensor of shape {tuple(mask.shape)} does not broadcast to (B, H, L, S) = {want}: {bad}. "
                "Give it shape (L, S) or (B|1, H|1, L, S)."
            )

    out = _unbound(binder)
    out._check = check
    return out


def _unbound(binder) -> MaskMod:
    """A mask usable as-is (tensors on their creation device) that re-binds to a call's sizes and device."""
    m = binder(None, None, None)
    m._binder = binder
    return m

def shift(mask, q_offset: int, kv_offset: int, L_total: int | None = None, S_total: int | None = None) -> MaskMod:
    """The mask of one block of a larger problem, in the block's local indices.

    The block's first query is global row ``q_offset`` and its first key global key ``kv_offset``; ``mask``
    is written for the whole problem of ``L_total`` queries and ``S_total`` keys (default: the block ends
    the problem, ``offset + block length``), so bottom-right alignment refers to the whole problem. The result
    evaluates ``mask(b, h, q + q_offset, kv + kv_offset)``; named masks keep their analytic tile
    classification (the tiles are shifted too) and band masks their ``band``. Used by KV caches, chunked
    and distributed computation.

    Example:
        >>> m = shift(sliding_window(1), 3, 2, 6, 6)
        >>> m.to_dense(1, 1, 2, 3)[0, 0].int().tolist(), m.bind(2, 3).band
        ([[1, 1, 0], [0, 1, 1]], (0, 1))
    """
    m = as_mask_mod(mask)
    for argname, val in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        _check_int(val, argname)
    if q_offset == 0 and kv_offset == 0 and L_total is None and S_total is None:
        return m
    name = f"{m.name} @ (q+{q_offset}, kv+{kv_offset})"

    def binder(L, S, device):
        Lg = L_total if L_total is not None else (None if L is None else q_offset + L)
        Sg = S_total if S_total is not None else (None if S is None else kv_offset + S)
        inner = m.bind(Lg, Sg, device) if Lg is not None and Sg is not None else m

        def fn(b, h, q, kv):
            return inner(b, h, q + q_offset, kv + kv_offset)

        tiles = None
        if inner._tiles is not None:

            def tiles(ctx):
                g = TileContext(ctx.B, ctx.H, Lg, Sg, ctx.q_start + q_offset, ctx.q_end + q_offset,
                                ctx.k_start + kv_offset, ctx.k_end + kv_offset, ctx.device)
                return inner._tiles(g)

        if inner is m:  # sizes unknown: the structure keeps the totals it will be resolved with
            structure = st.shifted(m.structure, q_offset, kv_offset, L_total, S_total)
        else:
            structure = st.shifted(inner.structure, q_offset, kv_offset)
        out = MaskMod(fn if inner.fn is not None else None, name, tiles=tiles, relative=m.relative,
                      structure=structure)
        band = getattr(inner, "band", None)
        if band is not None:  # lo <= kv_idx - q_idx <= hi in local indices
            d = q_offset - kv_offset
            out.band = (None if band[0] is None else band[0] + d, None if band[1] is None else band[1] + d)
        return out

    out = _unbound(binder)
    out.relative = m.relative
    out._check = lambda B, H, L, S: m.check(B, H, q_offset + L if L_total is None else L_total,
                                            kv_offset + S if S_total is None else S_total)
    return out


def band(lo: int | None, hi: int | None, align: str = "top_left") -> MaskMod:
    """A relative band: query i sees key j iff ``lo <= j - i <= hi`` (both ends inclusive; None = unbounded).

    With ``align="bottom_right"`` the offset is measured from the bottom-right diagonal:
    ``lo <= j - i - (S - L) <= hi``. A band that is a named mask comes back as that mask (``band(None, 0)``
    is ``causal()``, ``band(-w, 0)`` is ``sliding_window(w)``, ``band(None, None)`` is ``full()``); any other,
    e.g. one that excludes the diagonal, is a band of its own with analytic tiles. Its structure is
    :class:`salience.structure.Band`; ``lo > hi`` gives the empty mask (every row sees nothing).

    Example:
        >>> band(None, 0)
        causal()
        >>> band(-3, -2).to_dense(1, 1, 4, 4)[0, 0].int().tolist()
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    """
    if align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}; got {align!r}.")
    for argname, val in (("lo", lo), ("hi", hi)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            raise TypeError(f"{argname} must be an int or None (unbounded); got {type(val).__name__} {val!r}.")
    if lo is None and hi is None:
        return full()
    if lo is None and hi == 0:
        return causal(align)
    if (lo is None or lo <= 0) and (hi is None or hi >= 0):
        return sliding_window(None if lo is None else -lo, hi, align=align)
    lo_f = -math.inf if lo is None else lo
    hi_f = math.inf if hi is None else hi
    name = f"band(lo={lo}, hi={hi})" if align == "top_left" else f"band(lo={lo}, hi={hi}, align='bottom_right')"
    if align == "top_left":
        return _band(lo_f, hi_f, name)

    def binder(L, S, device):
        off = 0 if L is None or S is None else S - L
        return _band(lo_f + off, hi_f + off, name)

    return MaskMod(None, name, binder=binder, relative=True, structure=st.Band(lo_f, hi_f, "bottom_right"))
