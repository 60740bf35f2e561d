"""The textbook attention: the specification every fast path is tested against.

It materialises the full ``(B, H, L, S)`` score matrix, works in any floating dtype (float64 included) and
favours clarity over speed. Steps, in order:

1. scores = compatibility(q, k) (default: ``scale * q @ k^T`` with ``scale = 1/sqrt(D)``),
2. scores = score_mod(scores, b, h, q_idx, kv_idx),
3. scores = scores + bias (an optional float tensor broadcastable to (B, H, L, S); -inf hides a key),
4. scores of keys the mask hides are set to -inf,
5. lse = logsumexp over keys; weights = exp(scores - lse) (rows with no visible key: weights 0, lse -inf),
6. (optional dropout on the weights), out = weights @ v.

Layout (B, H, L, D); see :mod:`salience._layout`.

Example:
    >>> import torch
    >>> from salience import reference, masks
    >>> q = k = v = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    >>> r = reference.attention(q, k, v, mask=masks.causal())
    >>> r.weights[0, 0].triu(1).abs().sum().item()
    0.0
"""

from __future__ import annotations

import torch

from ._layout import check_dropout, check_qkv, check_scale, expand_kv
from ._result import ReferenceResult
from .masks import as_mask_mod, check_mask_output
from .scores import Compatibility, as_score_mod

__all__ = ["attention", "scores", "softmax_from_scores"]


def check_mods(mask, score_mod, B: int, H: int, L: int, S: int):
    """The call's mask and score_mod as MaskMod / ScoreMod (or None), checked against (B, H, L, S) with their
    ``check`` hooks (per-head tables, per-batch lengths, mask tensor shapes) before any path runs."""
    m = None if mask is None else as_mask_mod(mask)
    sm = None if score_mod is None else as_score_mod(score_mod)
    for mod in (m, sm):
        if mod is not None and callable(getattr(mod, "check", None)):
            mod.check(B, H, L, S)
    return m, sm


def fold_scale(q: torch.Tensor, scale):
    """``(q, scale)`` with a tensor ``scale`` that requires grad folded into q (``q * scale``, scale 1.0), so its
    gradient flows on every path (the kernels take the scale as a float); other scales are returned unchanged.
    Only for plain dot-product scores: with a compatibility function the scale multiplies its scores."""
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        return q * scale.reshape(()).to(q.dtype), 1.0
    return q, scale


def broadcast_batch(t: torch.Tensor, B: int) -> torch.Tensor:
    """k or v of batch size 1 against B queries: a stride-0 expand (no copy)."""
    return t if t.shape[0] == B else t.expand(B, *t.shape[1:])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask=None,
    score_mod=None,
    scale: float | None = None,
    compatibility: Compatibility | None = None,
    heads: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    L: int | None = None,
    batches: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked, modified scores ``(B, H', L', S)`` (hidden entries -inf) in q's dtype.

    ``batches``, ``heads`` and ``rows`` (int64 index tensors) say which batch entries, query heads and rows q
    holds, so that
    score_mod and mask see the true indices; ``L`` is the full query length (for bottom-right masks).
    ``bias`` ((Bb, Hb, Lb, Sb), each axis 1 or the full size) is added after the score_mod, before the mask.
    """
    B, Hq, Lq, _ = q.shape
    S = k.shape[-2]
    dev = q.device
    h_idx = (heads if heads is not None else torch.arange(Hq, device=dev)).view(1, -1, 1, 1)
    q_idx = (rows if rows is not None else torch.arange(Lq, device=dev)).view(1, 1, -1, 1)
    b_idx = (batches if batches is not None else torch.arange(B, device=dev)).view(-1, 1, 1, 1)
    kv_idx = torch.arange(S, device=dev).view(1, 1, 1, -1)
    L_full = Lq if L is None else L
    if compatibility is not None:
        s = compatibility(q, k)
        if scale is not None:
            s = s * scale
    else:
        s = (q @ k.transpose(-2, -1)) * check_scale(scale, q.shape[-1])
    if score_mod is not None:
        mod = as_score_mod(score_mod)
        mod = mod.to(dev) if hasattr(mod, "to") else mod
        s2 = mod(s, b_idx, h_idx, q_idx, kv_idx)
        if not isinstance(s2, torch.Tensor) or s2.shape != s.shape:
            seen = tuple(s2.shape) if isinstance(s2, torch.Tensor) else type(s2).__name__
            raise ValueError(
                f"score_mod {getattr(mod, 'name', mod)} returned {seen} for scores of shape {tuple(s.shape)}; "
                "a score_mod must return a tensor of the score's shape (use torch ops that broadcast)."
            )
        s = s2.to(s.dtype)
    if bias is not None:  # a float bias (Bb, Hb, Lb, Sb), each 1 or full size: added after the score_mod
        s = s + select_bias(bias, b_idx, h_idx, q_idx).to(s.dtype)
    if mask is not None:
        m = as_mask_mod(mask).bind(L_full, S, dev)
        vis = check_mask_output(m(b_idx, h_idx, q_idx, kv_idx), m, tuple(s.shape))
        s = s.masked_fill(~vis, float("-inf"))
    return s


def select_bias(bias: torch.Tensor, b_idx, h_idx, q_idx) -> torch.Tensor:
    """The entries of a 4-D float bias (Bb, Hb, Lb, Sb) (each axis 1 or full) for the batch entries, heads and
    rows ``b_idx`` (B', 1, 1, 1), ``h_idx`` (1, H', 1, 1), ``q_idx`` (1, 1, L', 1): broadcastable to the scores.
    A bias with fewer axes is read as the trailing ones."""
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    for axis, idx in ((0, b_idx), (1, h_idx), (2, q_idx)):
        if bias.shape[axis] > 1:
            bias = bias.index_select(axis, idx.flatten().to(bias.device))
    return bias


def softmax_from_scores(s: torch.Tensor, sinks: torch.Tensor | None = None):
    """``(weights, lse)`` from masked scores; rows with no visible key give weights 0 and lse -inf
    without NaN in forward or backward.

    The softmax is the max-subtracted one (``exp(s - max) / sum``; exact shifts, so scores of size 1e3-1e4, from
    large relative biases, lose no precision in the subtraction), accumulated in float32 for bfloat16/float16
    scores (as torch's softmax does) and in float64 for float64: ``weights`` come back in the scores' dtype,
    ``lse`` (B, H, L) in the accumulation dtype, so a reduced-precision row still sums to 1 within its rounding.

    ``sinks`` (broadcastable to (B, H), e.g. (H,)): a learned sink logit per head, a virtual key with value 0
    that takes part in every row's softmax (gpt-oss, StreamingLLM): ``lse = log(exp(sink) + sum exp(s))`` and
    the weights of the real keys sum to ``1 - exp(sink - lse)``. A row that sees no key then has weights 0 and
    lse = sink."""
    acc = _acc_dtype(s.dtype)
    x = s.to(acc)
    if sinks is not None:
        x = torch.cat([x, _sink_column(sinks, x)], dim=-1)
    if x.shape[-1]:
        mx = x.amax(-1, keepdim=True).detach()
    else:  # S = 0 (and no sink): every row sees no key
        mx = torch.full((*x.shape[:-1], 1), float("-inf"), dtype=acc, device=s.device)
    row_any = mx != float("-inf")  # a row with no visible key has max -inf
    e = torch.exp(x - torch.where(row_any, mx, torch.zeros((), dtype=acc, device=s.device)))  # hidden: exp(-inf) = 0
    total = e.sum(-1, keepdim=True)
    ones = torch.ones((), dtype=acc, device=s.device)
    w = e / torch.where(row_any, total, ones)
    lse = torch.where(row_any, mx + torch.log(torch.where(row_any, total, ones)),
                      torch.full((), float("-inf"), dtype=acc, device=s.device))
    if sinks is not None:
        w = w[..., :-1]
    return w.to(s.dtype), lse.squeeze(-1)


def _sink_column(sinks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The sink logits as one extra score column (B, H, L, 1) beside scores ``x`` (B, H, L, S)."""
    B, H, L = x.shape[:3]
    return sinks.to(x.dtype).reshape(-1, H, 1, 1).expand(B, H, L, 1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask=None,
    score_mod=None,
    scale: float | None = None,
    compatibility: Compatibility | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> ReferenceResult:
    """Textbook attention in q's dtype.

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv), one floating dtype, H % Hkv == 0.
        mask: a mask_mod ``(b, h, q_idx, kv_idx) -> bool`` (True = visible), a MaskMod or a bool tensor.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score``, applied after scaling.
        scale: multiplies q @ k^T; default 1/sqrt(D).
        compatibility: a :class:`salience.scores.Compatibility` replacing the scaled dot product.
        dropout_p: dropout on the weights (the returned weights are before dropout).
        sinks: one sink logit per query head, (H,) or (B, H): a virtual key of value 0 appended to every row's
            scores before the softmax (see :func:`softmax_from_scores`).
        bias: a float tensor broadcastable to (B, H, L, S) (-inf hides a key), added to the scores after the
            score_mod and before the mask (as torch SDPA adds a float ``attn_mask`` to the scaled scores).

    Returns:
        :class:`ReferenceResult` with ``out`` (B, H, L, Dv), ``lse`` (B, H, L), ``weights`` (B, H, L, S).
    """
    shp = check_qkv(q, k, v, same_dim=compatibility is None, broadcast_batch=True, allow_empty=True)
    if compatibility is None or scale is not None:
        check_scale(scale, shp.D)
    p = check_dropout(dropout_p)
    mask, score_mod = check_mods(mask, score_mod, shp.B, shp.H, shp.L, shp.S)
    k, v = broadcast_batch(k, shp.B), broadcast_batch(v, shp.B)
    if compatibility is None:
        q, scale = fold_scale(q, scale)
    H = q.shape[1]
    ke, ve = expand_kv(k, H), expand_kv(v, H)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    s = scores(q, ke, mask=mask, score_mod=score_mod, scale=scale, compatibility=compatibility, bias=bias)
    if sinks is not None:
        from .kernels.merge import check_sinks

        sinks = check_sinks(sinks, shp.B, shp.H)
    w, lse = softmax_from_scores(s, sinks=sinks)
    wd = w
    if p > 0:
        keep = torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32) >= p
        wd = w * keep.to(w.dtype) / (1 - p)
    out = wd @ ve
    lse = lse.to(_acc_dtype(q.dtype))
    return ReferenceResult(out=out, lse=lse, weights=w)
