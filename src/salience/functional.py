"""The public functional core: :func:`attention`, :func:`attention_weights` and :func:`plan`.

Layout (B, H, L, D) everywhere (see :mod:`salience._layout`): q (B, H, L, D), k (B, Hkv, S, D),
v (B, Hkv, S, Dv), output (B, H, L, Dv). Query head i reads key/value head ``i // (H // Hkv)``.
"""

from __future__ import annotations

import torch

from ._layout import check_dropout, check_qkv, check_scale, expand_kv
from ._result import AttentionResult
from .kernels import dispatch
from .masks import as_mask_mod
from .reference import scores as _scores
from .reference import softmax_from_scores
from .scores import Compatibility, as_score_mod

__all__ = ["attention", "attention_weights", "plan", "AttentionResult"]


def _prepare(q, k, v, mask, score_mod, scale, compatibility, dropout_p=0.0):
    if compatibility is not None and not isinstance(compatibility, Compatibility):
        raise TypeError(
            f"compatibility must be a salience.scores.Compatibility (Dot, ScaledDot, General, Additive, Cosine); "
            f"got {type(compatibility).__name__}."
        )
    shp = check_qkv(q, k, v, same_dim=compatibility is None)
    if compatibility is None or scale is not None:
        scale = check_scale(scale, shp.D)
    p = check_dropout(dropout_p)
    m = None if mask is None else as_mask_mod(mask)
    sm = None if score_mod is None else as_score_mod(score_mod)
    if compatibility is not None and compatibility.dot_reducible:
        q2, k2, s = compatibility.as_dot(q, k)
        if isinstance(s, torch.Tensor):
            q2, s = q2 * s, 1.0
        q, k, scale, compatibility = q2, k2, float(s) * (1.0 if scale is None else scale), None
    return q, k, v, m, sm, scale, compatibility, p, shp


def plan(q, k, v=None, *, mask=None, score_mod=None, scale=None, compatibility=None, return_lse=False,
         backend=None, dropout_p: float = 0.0) -> dispatch.Plan:
    """Describe the path :func:`attention` would take for these inputs, without computing it.

    Example:
        >>> import torch, salience
        >>> q = torch.randn(1, 2, 8, 4)
        >>> salience.plan(q, q, q, mask=salience.masks.causal()).backend
        'sdpa'
    """
    v = k if v is None else v
    q, k, v, m, sm, scale, compat, p, _ = _prepare(q, k, v, mask, score_mod, scale, compatibility, dropout_p)
    return dispatch.choose(q, k, v, mask=m, score_mod=sm, compatibility=compat, need_lse=return_lse,
                           backend=backend, scale=scale, dropout_p=p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask=None,
    score_mod=None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    compatibility: Compatibility | None = None,
    backend: str | None = None,
):
    """Exact softmax attention.

    Args:
        q: queries (B, H, L, D).
        k: keys (B, Hkv, S, D); H must be a multiple of Hkv (grouped / multi-query attention).
        v: values (B, Hkv, S, Dv); Dv may differ from D.
        mask: which keys each query may see: a :mod:`salience.masks` object, any callable
            ``(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's mask_mod) or a bool tensor broadcastable to
            (B, H, L, S). True = visible. Rows with no visible key give output 0.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` applied to the scaled scores
            (see :mod:`salience.scores`: alibi, softcap, relative_bias, temperature).
        scale: multiplier of q @ k^T; default 1/sqrt(D).
        dropout_p: dropout probability on the attention weights, in [0, 1).
        return_lse: also return the logsumexp of the scores (B, H, L).
        compatibility: a :class:`salience.scores.Compatibility` replacing the scaled dot product.
        backend: force a path (see :func:`plan`); None chooses the fastest exact one.

    Returns:
        The output (B, H, L, Dv), or an :class:`AttentionResult` ``(out, lse)`` when ``return_lse=True``.

    Example:
        >>> import torch, salience
        >>> q, k, v = torch.randn(2, 8, 16, 64), torch.randn(2, 2, 16, 64), torch.randn(2, 2, 16, 32)
        >>> salience.attention(q, k, v, mask=salience.masks.sliding_window(4)).shape
        torch.Size([2, 8, 16, 32])
    """
    q, k, v, m, sm, scale, compat, p, _ = _prepare(q, k, v, mask, score_mod, scale, compatibility, dropout_p)
    pl, res = dispatch.attend(q, k, v, mask=m, score_mod=sm, scale=scale, compatibility=compat, dropout_p=p,
                              need_lse=return_lse, backend=backend)
    if return_lse and res.lse is None:
        raise RuntimeError(f"backend {pl.backend!r} does not provide the logsumexp here; use backend=None.")
    return res if return_lse else res.out


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask=None,
    score_mod=None,
    scale: float | None = None,
    compatibility: Compatibility | None = None,
    heads=None,
    rows=None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights (softmax probabilities) for the heads and query rows asked for.

    Only the selected ``heads`` (sequence of query-head indices) and ``rows`` (sequence of query indices,
    a slice, or None for all) are computed, so a few rows of a long sequence cost O(rows x S).
    If ``lse`` (B, H, L) from ``attention(..., return_lse=True)`` is given, the weights are
    ``exp(score - lse)`` directly, without a second reduction over the keys.

    Returns:
        weights (B, len(heads), len(rows), S) in q's dtype; rows with no visible key are 0.

    Example:
        >>> import torch, salience
        >>> q = torch.randn(1, 4, 10, 8)
        >>> w = salience.attention_weights(q, q, mask=salience.masks.causal(), heads=[1], rows=[9])
        >>> w.shape, round(w.sum().item(), 5)
        (torch.Size([1, 1, 1, 10]), 1.0)
    """
    q, k, _, m, sm, scale, compat, _, shp = _prepare(q, k, k, mask, score_mod, scale, compatibility)
    dev = q.device
    h_idx = _select(heads, shp.H, "heads", dev)
    r_idx = _select(rows, shp.L, "rows", dev)
    qs = q.index_select(1, h_idx).index_select(2, r_idx)
    ks = expand_kv(k, shp.H).index_select(1, h_idx)
    s = _scores(qs, ks, mask=m, score_mod=sm, scale=scale, compatibility=compat, heads=h_idx, rows=r_idx, L=shp.L)
    if lse is None:
        w, _ = softmax_from_scores(s)
        return w
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape (B, H, L) = {tuple(q.shape[:3])}; got {tuple(lse.shape)}.")
    l_sel = lse.index_select(1, h_idx).index_select(2, r_idx).unsqueeze(-1)
    finite = l_sel != float("-inf")
    w = torch.exp(s.to(l_sel.dtype) - torch.where(finite, l_sel, torch.zeros_like(l_sel)))
    return torch.where(finite, w, torch.zeros_like(w)).to(q.dtype)


def _select(sel, n: int, argname: str, device) -> torch.Tensor:
    if sel is None:
        return torch.arange(n, device=device)
    if isinstance(sel, slice):
        return torch.arange(n, device=device)[sel]
    if isinstance(sel, int) and not isinstance(sel, bool):
        sel = [sel]
    t = torch.as_tensor(sel, device=device)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{argname} must be None, a slice, an int or a 1-D sequence of ints; got {sel!r}.")
    if t.numel() and (int(t.min()) < -n or int(t.max()) >= n):
        raise ValueError(f"{argname} {t.tolist()} out of range for size {n}.")
    return t.long().remainder(n)
