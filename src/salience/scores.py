"""How queries and keys are compared, and what is added to the scores.

Two kinds of objects live here.

**Compatibility functions** (the "similarity metrics" of attention) map queries ``(B, H, L, D)`` and keys
``(B, H, S, Dk)`` to raw scores ``(B, H, L, S)``. They are ``nn.Module`` objects so that learned ones train:

* :class:`Dot` ``q . k`` (Luong "dot"),
* :class:`ScaledDot` ``q . k / sqrt(D)`` (Vaswani et al.),
* :class:`General` ``q W k^T`` with a learned ``W`` (Luong "general", bilinear),
* :class:`Additive` ``v^T tanh(W_q q + W_k k)`` (Bahdanau "concat"/additive),
* :class:`Cosine` ``cos(q, k) / temperature``.

Pass one as ``compatibility=`` to :func:`salience.attention` or :func:`salience.reference.attention`, or
build one by name with :func:`compatibility`. Those that reduce to a dot product (all but Additive)
expose ``as_dot(q, k) -> (q', k', scale)`` so the fast kernels can run them.

**score_mods** have FlexAttention's signature ``score_mod(score, b, h, q_idx, kv_idx) -> score`` and are
applied to the (already scaled) scores before masking and softmax: :func:`alibi`, :func:`softcap`,
:func:`relative_bias`, :func:`temperature`, composed with :func:`compose` or ``a >> b`` (a first).

Example:
    >>> import torch, salience
    >>> from salience import scores
    >>> q = k = v = torch.randn(1, 2, 5, 4)
    >>> mod = scores.compose(scores.alibi(scores.alibi_slopes(2)), scores.softcap(20.0))
    >>> salience.attention(q, k, v, score_mod=mod).shape
    torch.Size([1, 2, 5, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from . import structure as st
from ._positions import check_buckets, t5_bucket

__all__ = [
    "ScoreMod",
    "as_score_mod",
    "compose",
    "alibi",
    "alibi_slopes",
    "softcap",
    "relative_bias",
    "t5_bucket",
    "temperature",
    "Compatibility",
    "Dot",
    "ScaledDot",
    "General",
    "Additive",
    "Cosine",
    "compatibility",
]


# ----------------------------------------------------------------------------------------------- score_mods


class ScoreMod:
    """A named score_mod ``(score, b, h, q_idx, kv_idx) -> score``.

    Args:
        fn: the function; must broadcast over the score tensor and integer index tensors.
        name: readable name for ``repr``.
        relative: True when the change depends only on (h, kv_idx - q_idx) and the score (ALiBi, T5 bias,
            softcap, temperature); kernels may then cache a tile's bias per tile offset.
        pointwise: True when it depends on the score alone (softcap, temperature).
        structure: what the mod is, as data (:mod:`salience.structure`); kernels read it instead of the
            name. Default: ``Callable(fn)`` (opaque).
    """

    def __init__(self, fn: Callable, name: str, *, relative: bool = False, pointwise: bool = False,
                 structure: st.ModStructure | None = None):
        self.structure = st.Callable(fn) if structure is None else structure
        self.fn = fn
        self.name = name
        self.__name__ = name
        self.relative = relative or pointwise
        self.pointwise = pointwise

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return self.name

    def __rshift__(self, other) -> ScoreMod:
        """``a >> b`` applies a, then b."""
        return compose(self, other)

    def to(self, device) -> ScoreMod:
        """The same mod with its tensors on ``device`` (a no-op for tensor-free mods)."""
        mover = getattr(self, "_mover", None)
        return mover(device) if mover is not None else self

    #: optional ``_check(B, H, L, S)`` set by factories whose mod only fits some sizes (per-head tables)
    _check = None

    def check(self, B: int, H: int, L: int, S: int) -> None:
        """Raise a ValueError naming the argument when this mod cannot serve a (B, H, L, S) problem.

        :func:`salience.attention`, :func:`~salience.attention_weights`, :func:`~salience.plan` and
        :func:`salience.reference.attention` call it before any path runs, so every path gives the same
        error. Factories set ``mod._check = fn(B, H, L, S)``; :func:`compose` checks every part."""
        if self._check is not None:
            self._check(B, H, L, S)


def as_score_mod(mod, argname: str = "score_mod") -> ScoreMod:
    """Accept a ScoreMod or a plain callable ``(score, b, h, q_idx, kv_idx) -> score``."""
    if isinstance(mod, ScoreMod):
        return mod
    if callable(mod):
        import inspect

        try:
            n = len(
                [
                    p
                    for p in inspect.signature(mod).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                ]
            )
        except (TypeError, ValueError):
            n = 5
        if n != 5:
            raise TypeError(
                f"{argname} must be a score_mod (score, b, h, q_idx, kv_idx) -> score; "
                f"{getattr(mod, '__name__', type(mod).__name__)} takes {n} required arguments. "
                "A mask_mod (b, h, q_idx, kv_idx) -> bool goes to mask=."
            )
        # evaluated like FlexAttention (vmap) when broadcasting cannot serve
        from ._callables import FlexCallable, wrap

        return ScoreMod(wrap(mod, "score"), getattr(mod, "__name__", type(mod).__name__),
                        structure=st.Callable(mod.fn if isinstance(mod, FlexCallable) else mod))
    raise TypeError(f"{argname} must be a callable (score, b, h, q_idx, kv_idx) -> score; got {type(mod).__name__}.")


def compose(*mods) -> ScoreMod:
    """Apply score_mods left to right: ``compose(a, b)(s, ...) == b(a(s, ...), ...)``."""
    if not mods:
        raise ValueError("compose() needs at least one score_mod.")
    ms = [as_score_mod(m, f"mods[{i}]") for i, m in enumerate(mods)]
    if len(ms) == 1:
        return ms[0]

    def fn(score, b, h, q, kv):
        for m in ms:
            score = m(score, b, h, q, kv)
        return score

    out = ScoreMod(
        fn,
        " >> ".join(m.name for m in ms),
        relative=all(m.relative for m in ms),
        pointwise=all(m.pointwise for m in ms),
        structure=st.compose(*(m.structure for m in ms)),
    )
    out._mover = lambda dev: compose(*(m.to(dev) for m in ms))
    out.parts = tuple(ms)  # the components in order, for kernels that recognise them

    def check(B, H, L, S):
        for m in ms:
            m.check(B, H, L, S)

    out._check = check
    return out


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slope schedule (Press et al. 2022) for any head count, float32 (H,).

    For a power of two n the slopes are ``2**(-8 i / n)``, i = 1..n; otherwise the schedule for the
    largest power of two below n, followed by every other slope of the schedule for twice that.

    Example:
        >>> alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1; got {num_heads!r}.")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        s = pow2(num_heads)
    else:
        m = 2 ** int(math.floor(math.log2(num_heads)))
        s = pow2(m) + pow2(2 * m)[0::2][: num_heads - m]
    return torch.tensor(s, dtype=torch.float32)


def alibi(slopes, *, offset: int = 0) -> ScoreMod:
    """ALiBi: add ``-slopes[h] * |q_idx + offset - kv_idx|`` to the scores (Press et al. 2022).

    ``slopes`` is a tensor (H,) (see :func:`alibi_slopes`) or an int head count for the standard schedule, or
    a tensor (B, H) of per-batch slopes (``-slopes[b, h] * ...``; flash-attention's ``alibi_slopes`` may be
    either). Under a causal mask this equals the usual ``slope * (kv_idx - q_idx)``. ``offset`` moves the
    zero-distance diagonal: ``offset = S - L`` is flash-attention's bottom-right convention
    (``-slope * |i + S - L - j|``, the last query at distance 0 from the last key).

    Per-head slopes (with any offset) are a relative bias the fast paths run (``spans``); per-batch slopes
    run on the tile kernels (``blockwise``) unless every row has the same slopes.

    Example:
        >>> m = alibi(2)
        >>> m(torch.zeros(()), 0, torch.tensor(0), torch.tensor(3), torch.tensor(1)).item()
        -0.125
        >>> alibi(2, offset=2)(torch.zeros(()), 0, torch.tensor(0), torch.tensor(3), torch.tensor(1)).item()
        -0.25
    """
    if isinstance(slopes, int) and not isinstance(slopes, bool):
        slopes = alibi_slopes(slopes)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int (S - L for bottom-right alignment); got {type(offset).__name__} {offset!r}.")
    sl = torch.as_tensor(slopes)
    if sl.dim() not in (1, 2) or not sl.is_floating_point():
        raise ValueError(f"slopes must be a float tensor (H,) or (B, H), or an int head count; got {sl.dtype} "
                         f"{tuple(sl.shape)}.")
    if sl.dim() == 2:
        if sl.shape[0] == 1 or bool((sl == sl[:1]).all()):
            return _alibi(sl[0], offset)
        return _alibi_per_batch(sl, offset)
    return _alibi(sl, offset)


def _alibi_per_batch(sl: torch.Tensor, offset: int) -> ScoreMod:
    def fn(score, b, h, q, kv):
        return score - sl.to(score.dtype)[b, h] * (q + offset - kv).abs().to(score.dtype)

    # not named "alibi(": the fast paths' relative bias is per head, not per batch row
    m = ScoreMod(fn, f"alibi_per_batch(<{sl.shape[0]} x {sl.shape[1]} slopes>{f', offset={offset}' if offset else ''})",
                 structure=st.Alibi(sl, offset))
    m.slopes = sl
    m._mover = lambda dev: _alibi_per_batch(sl.to(dev), offset)

    def check(B, H, L, S):
        _check_heads(m, sl.shape[1], H, "slopes per row", f"give slopes of shape (B, H) = ({B}, {H})")
        if sl.shape[0] != B:
            raise ValueError(f"score_mod {m.name} carries slopes for {sl.shape[0]} batch rows but the batch has B={B}; "
                             f"give slopes of shape (B, H) = ({B}, {H}) or (H,).")

    m._check = check
    return m


def _alibi(sl: torch.Tensor, offset: int = 0) -> ScoreMod:
    def fn(score, b, h, q, kv):
        return score - sl.to(score.dtype)[h] * (q + offset - kv).abs().to(score.dtype)

    m = ScoreMod(fn, f"alibi(<{sl.numel()} slopes>{f', offset={offset}' if offset else ''})", relative=True,
                 structure=st.Alibi(sl, offset))
    m.slopes = sl
    m.offset = offset
    m._mover = lambda dev: _alibi(sl.to(dev), offset)
    m._check = lambda B, H, L, S: _check_heads(m, sl.numel(), H, "slopes",
                                               f"build it with alibi({H}) or alibi(alibi_slopes({H}))")
    return m


def _check_heads(mod, n: int, H: int, what: str, fix: str) -> None:
    """A per-head table must have exactly one entry per query head."""
    if n != H:
        raise ValueError(
            f"score_mod {mod.name} carries {n} {what} (one per head) but the attention has H={H} query heads; "
            f"{fix} (one per query head)."
        )


def softcap(cap: float) -> ScoreMod:
    """Soft capping (Gemma 2): ``cap * tanh(score / cap)``, which bounds scores to (-cap, cap).

    Example:
        >>> round(softcap(2.0)(torch.tensor(100.0), 0, 0, 0, 0).item(), 4)
        2.0
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"cap must be a positive finite number; got {cap!r}.")
    c = float(cap)
    m = ScoreMod(lambda s, b, h, q, kv: torch.tanh(s / c) * c, f"softcap({c:g})", pointwise=True,
                 structure=st.Softcap(c))
    m.cap = c
    return m


def temperature(t: float) -> ScoreMod:
    """Divide scores by ``t``: t > 1 flattens the weights, t < 1 sharpens them.

    Example:
        >>> temperature(2.0)(torch.tensor(3.0), 0, 0, 0, 0).item()
        1.5
    """
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"t must be a positive finite number; got {t!r}.")
    tt = float(t)
    m = ScoreMod(lambda s, b, h, q, kv: s / tt, f"temperature({tt:g})", pointwise=True,
                 structure=st.Temperature(tt))
    m.t = tt
    return m


def relative_bias(table: torch.Tensor, num_buckets: int = 32, max_distance: int = 128,
                  bidirectional: bool = True) -> ScoreMod:
    """T5 relative position bias: add ``table[bucket(kv_idx - q_idx), h]`` to the scores.

    ``table`` has shape (num_buckets, H), e.g. the weight of ``nn.Embedding(num_buckets, H)``; it may
    require grad (the bias then trains through the reference and the kernels).

    Example:
        >>> m = relative_bias(torch.arange(8.0).view(8, 1), num_buckets=8, max_distance=16)
        >>> m(torch.zeros(()), 0, torch.tensor(0), torch.tensor(0), torch.tensor(3)).item()
        6.0
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
        seen = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a float tensor (num_buckets, H); got {seen}.")
    check_buckets(num_buckets, max_distance, bidirectional)
    if table.shape[0] != num_buckets:
        raise ValueError(f"table has {table.shape[0]} rows but num_buckets={num_buckets}; they must match.")
    return _relative_bias(table, num_buckets, max_distance, bidirectional)


def _relative_bias(table, num_buckets, max_distance, bidirectional) -> ScoreMod:
    def fn(score, b, h, q, kv):
        bucket = t5_bucket(kv - q, num_buckets, max_distance, bidirectional)
        return score + table[bucket, h].to(score.dtype)

    m = ScoreMod(
        fn,
        f"relative_bias(num_buckets={num_buckets}, max_distance={max_distance}, bidirectional={bidirectional})",
        relative=True,
        structure=st.RelativeBias(table, num_buckets, max_distance, bidirectional),
    )
    m.table = table
    m._mover = lambda dev: _relative_bias(table.to(dev), num_buckets, max_distance, bidirectional)
    m._check = lambda B, H, L, S: _check_heads(
        m, table.shape[1], H, "table columns",
        f"give table the shape (num_buckets, H) = ({num_buckets}, {H}), e.g. nn.Embedding({num_buckets}, {H}).weight")
    return m


# ------------------------------------------------------------------------------------ compatibility functions


class Compatibility(nn.Module):
    """Base class: ``forward(q, k) -> scores``; q (B, H, L, D), k (B, H, S, Dk), scores (B, H, L, S)."""

    #: whether ``as_dot`` is available (scores are a scaled dot product of transformed q and k)
    dot_reducible: bool = True

    def as_dot(self, q: torch.Tensor, k: torch.Tensor):
        """Return ``(q', k', scale)`` with ``scores == scale * q' @ k'^T``."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce to a dot product.")

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q2, k2, scale = self.as_dot(q, k)
        return (q2 @ k2.transpose(-2, -1)) * scale


class Dot(Compatibility):
    """Unscaled dot product ``q . k`` (Luong "dot").

    Example:
        >>> Dot()(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 3, 2)).tolist()
        [[[[2.0, 2.0, 2.0]]]]
    """

    def as_dot(self, q, k):
        return q, k, 1.0


class ScaledDot(Compatibility):
    """Scaled dot product ``q . k * scale`` with ``scale = 1/sqrt(D)`` by default (Vaswani et al. 2017).

    Example:
        >>> ScaledDot()(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4)).item()
        2.0
    """

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = scale

    def as_dot(self, q, k):
        return q, k, self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])


class General(Compatibility):
    """Bilinear ``q W k^T`` with a learned ``W`` of shape (query_dim, key_dim) (Luong "general").

    Query and key dims may differ. Initialised to the identity when the dims match.

    Example:
        >>> g = General(4, 3)
        >>> g(torch.randn(2, 1, 5, 4), torch.randn(2, 1, 6, 3)).shape
        torch.Size([2, 1, 5, 6])
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, scale: float | None = 1.0):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        w = torch.empty(query_dim, key_dim)
        if query_dim == key_dim:
            nn.init.eye_(w)
        else:
            nn.init.xavier_uniform_(w)
        self.weight = nn.Parameter(w)
        self.scale = scale

    def as_dot(self, q, k):
        if q.shape[-1] != self.weight.shape[0] or k.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"General expects query dim {self.weight.shape[0]} and key dim {self.weight.shape[1]}; "
                f"got q {tuple(q.shape)} and k {tuple(k.shape)}."
            )
        return q @ self.weight.to(q.dtype), k, (self.scale if self.scale is not None else 1.0 / math.sqrt(k.shape[-1]))


class Additive(Compatibility):
    """Additive (Bahdanau) scores ``v^T tanh(W_q q + W_k k)`` with hidden size ``hidden``.

    Costs O(L * S * hidden) memory and work; there is no dot-product form, so attention with it runs on the
    reference path, chunked over queries.

    Example:
        >>> a = Additive(4, 4, hidden=8)
        >>> a(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4)).shape
        torch.Size([1, 1, 2, 3])
    """

    dot_reducible = False

    def __init__(self, query_dim: int, key_dim: int | None = None, hidden: int | None = None):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        hidden = query_dim if hidden is None else hidden
        self.w_q = nn.Linear(query_dim, hidden, bias=False)
        self.w_k = nn.Linear(key_dim, hidden, bias=True)
        self.v = nn.Linear(hidden, 1, bias=False)

    def project_keys(self, k: torch.Tensor) -> torch.Tensor:
        """``W_k k`` (B, H, S, hidden): compute once and reuse across decoder steps."""
        return self.w_k(k)

    def scores_from_projected(self, q: torch.Tensor, k_proj: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Scores from queries and keys already passed through :meth:`project_keys`."""
        qp = self.w_q(q)
        outs = []
        for i in range(0, qp.shape[-2], chunk):
            e = torch.tanh(qp[..., i : i + chunk, None, :] + k_proj[..., None, :, :])
            outs.append(self.v(e).squeeze(-1))
        return torch.cat(outs, dim=-2)

    def forward(self, q, k):
        return self.scores_from_projected(q, self.project_keys(k))


class Cosine(Compatibility):
    """Cosine similarity divided by a temperature: ``cos(q, k) / temperature``.

    With ``learnable=True`` the log-temperature is a parameter (as in Swin v2).

    Example:
        >>> round(Cosine(0.5)(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2)).item(), 4)
        2.0
    """

    def __init__(self, temperature: float = 0.1, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be positive and finite; got {temperature}.")
        lt = torch.tensor(math.log(temperature))
        self.log_temperature = nn.Parameter(lt) if learnable else None
        if not learnable:
            self.register_buffer("_log_t", lt)
        self.eps = eps

    def as_dot(self, q, k):
        lt = self.log_temperature if self.log_temperature is not None else self._log_t
        qn = q / q.norm(dim=-1, keepdim=True).clamp(min=self.eps)
        kn = k / k.norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return qn, kn, torch.exp(-lt).to(q.dtype)


_BY_NAME = {"dot": Dot, "scaled_dot": ScaledDot, "general": General, "additive": Additive, "cosine": Cosine}


def compatibility(name: str, *args, **kwargs) -> Compatibility:
    """Build a compatibility function by name: ``dot``, ``scaled_dot``, ``general``, ``additive``, ``cosine``.

    Example:
        >>> compatibility("general", 4).weight.shape
        torch.Size([4, 4])
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown compatibility {name!r}; choose one of {sorted(_BY_NAME)}.")
    return _BY_NAME[name](*args, **kwargs)
