"""The public functional core: :func:`attention`, :func:`attention_weights` and :func:`plan`.

Layout (B, H, L, D) everywhere (see :mod:`salience._layout`): q (B, H, L, D), k (B, Hkv, S, D),
v (B, Hkv, S, Dv), output (B, H, L, Dv). Query head i reads key/value head ``i // (H // Hkv)``.
"""

from __future__ import annotations

import torch

from . import _blockmask
from ._layout import check_dropout, check_layout, check_qkv, check_scale, expand_kv
from ._result import AttentionResult
from .kernels import bias as _kbias
from .kernels import dispatch
from .kernels.merge import check_sinks, with_sinks
from .reference import _acc_dtype, broadcast_batch, check_mods, fold_scale, softmax_from_scores
from .reference import scores as _scores
from .scores import Compatibility

__all__ = ["attention", "attention_weights", "plan", "AttentionResult"]


def _prepare(q, k, v, mask, score_mod, scale, compatibility, dropout_p=0.0, layout="BHLD"):
    if compatibility is not None and not isinstance(compatibility, Compatibility):
        raise TypeError(
            f"compatibility must be a salience.scores.Compatibility (Dot, ScaledDot, General, Additive, Cosine); "
            f"got {type(compatibility).__name__}."
        )
    layout = check_layout(layout)
    mask = _blockmask.resolve(mask)  # a salience or torch BlockMask: full | (partial & mask_mod), built once
    shp = check_qkv(q, k, v, same_dim=compatibility is None, layout=layout, broadcast_batch=True, allow_empty=True)
    if layout == "BLHD":  # views: (B, L, H, D) -> (B, H, L, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = broadcast_batch(k, shp.B), broadcast_batch(v, shp.B)
    if isinstance(scale, torch.Tensor) and torch.compiler.is_compiling():  # no .item() in a graph: fold into q
        from .kernels import ops
        q, scale = ops.fold_scale(q, scale, compatibility)
    grad_scale = isinstance(scale, torch.Tensor) and scale.requires_grad
    if compatibility is None or scale is not None:
        checked = check_scale(scale, shp.D)
        # a tensor scale that requires grad: folded into q (scale 1.0) for dot products, after as_dot for
        # compatibility functions that reduce to one, else kept as a tensor (the reference path multiplies by it)
        scale = scale if grad_scale else checked
    if compatibility is None and grad_scale:
        q, scale = fold_scale(q, scale)
    elif grad_scale and not compatibility.dot_reducible:
        compatibility, scale = _Scaled(compatibility, scale), None
    p = check_dropout(dropout_p)
    m, sm = check_mods(mask, score_mod, shp.B, shp.H, shp.L, shp.S)
    if compatibility is not None and compatibility.dot_reducible and not _shape_only(q, shp):
        q2, k2, s = compatibility.as_dot(q, k)
        if isinstance(s, torch.Tensor):
            q2, s = q2 * s, 1.0
        if grad_scale:
            q2, scale = fold_scale(q2, scale)
        q, k, scale, compatibility = q2, k2, float(s) * (1.0 if scale is None else scale), None
    return q, k, v, m, sm, scale, compatibility, p, shp


class _Scaled(Compatibility):
    """``scale * compatibility(q, k)`` for a tensor scale that requires grad (the paths take float scales)."""

    dot_reducible = False

    def __init__(self, inner: Compatibility, scale: torch.Tensor):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, q, k):
        s = self.inner(q, k)
        return s * self.scale.reshape(()).to(s.dtype)


def _shape_only(q, shp) -> bool:
    """Nothing to compute: an empty batch or sequence, or meta tensors (shapes without data)."""
    return shp.B == 0 or shp.L == 0 or shp.S == 0 or q.device.type == "meta"


def _shape_only_reason(q, shp) -> str:
    if q.device.type == "meta":
        return "meta tensors: outputs of the right shape and dtype on the meta device; no kernel runs"
    return (f"empty problem (B={shp.B}, L={shp.L}, S={shp.S}): the textbook formulas on empty tensors (with S=0 every "
            "row sees no key: output 0, lse -inf); no kernel runs")


def _check_bias(bias, q, shp) -> dict:
    """``{"bias": bias}`` for the dispatcher after checking its shape, dtype and device at this boundary (``{}``
    for None): the rule table runs it on :mod:`salience.kernels.bias` or adds it on the general paths."""
    if bias is None:
        return {}
    _kbias.check_bias(bias, shp.B, shp.H, shp.L, shp.S, q.device)
    return {"bias": bias}


def _check_backend(backend) -> None:
    if backend is not None and backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS} or None; got {backend!r}.")


def _shape_only_result(q, k, v, shp) -> AttentionResult:
    """The result of an empty or meta problem, the same whatever the backend: out (B, H, L, Dv) (zeros when S=0)
    and lse (B, H, L) (-inf when S=0), in the autograd graph of q, k and v (backward gives empty/zero grads)."""
    ke, ve = expand_kv(k, shp.H), expand_kv(v, shp.H)
    s = q.sum(-1, keepdim=True) * 0 + ke.sum(-1).unsqueeze(-2) * 0  # (B, H, L, S), no data read
    w, lse = softmax_from_scores(s)
    return AttentionResult(out=w.to(ve.dtype) @ ve, lse=lse.to(_acc_dtype(q.dtype)))


def plan(q, k, v=None, *, mask=None, score_mod=None, scale=None, compatibility=None, return_lse=False,
         backend=None, dropout_p: float = 0.0, layout: str = "BHLD", sinks=None, bias=None) -> dispatch.Plan:
    """Describe the path :func:`attention` would take for these inputs, without computing it.

    Example:
        >>> import torch, salience
        >>> q = torch.randn(1, 2, 8, 4)
        >>> salience.plan(q, q, q, mask=salience.masks.causal()).backend
        'sdpa'
    """
    v = k if v is None else v
    q, k, v, m, sm, scale, compat, p, shp = _prepare(q, k, v, mask, score_mod, scale, compatibility, dropout_p,
                                                     layout)
    extra = _check_bias(bias, q, shp)
    if _shape_only(q, shp):
        _check_backend(backend)
        return dispatch.Plan("reference", _shape_only_reason(q, shp), {"skipped": 0.0})
    if sinks is not None:
        check_sinks(sinks, shp.B, shp.H)
    pl = dispatch.choose(q, k, v, mask=m, score_mod=sm, compatibility=compat,
                         need_lse=return_lse or sinks is not None, backend=backend, scale=scale, dropout_p=p, **extra)
    if sinks is not None:
        pl.details["sinks"] = "merged after the kernel (a virtual key of value 0), both directions"
    return pl


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
    layout: str = "BHLD",
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
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
        layout: ``"BHLD"`` (default) reads q, k, v as above; ``"BLHD"`` reads q (B, L, H, D), k (B, S, Hkv, D),
            v (B, S, Hkv, Dv) (flash-attn's order) and returns the output (B, L, H, Dv); lse stays (B, H, L).
        sinks: attention sinks, one learned logit per query head, (H,) or (B, H), in the score domain (gpt-oss's
            ``sinks``/``s_aux``): a virtual key of value 0 in every row's softmax, so the weights of the real
            keys sum to less than 1; the lse includes it, a row with no visible key gives 0 and lse = sink, and
            the sinks get gradients. Works on every path (see :func:`salience.kernels.merge.with_sinks`).
        bias: a float tensor broadcastable to (B, H, L, S) (H = query heads; each axis 1 or full; fewer axes are
            trailing ones; (B, H, L, S) in both layouts), added to the scores like torch SDPA's float
            ``attn_mask``: scores = score_mod(scale * q @ k^T) + bias, then ``mask`` hides keys (-inf). -inf in
            the bias hides a key whatever the score_mod does; rows with every key at -inf give 0. It gets a
            gradient when it requires grad. Without another score_mod it runs on torch's fused kernel with the
            bias, skipping the blocks of keys the bias leaves at -inf (see :mod:`salience.kernels.bias`).

    ``mask`` may also be a prebuilt block mask, :class:`salience.blocks.BlockMask` or torch's FlexAttention
    ``BlockMask``: visible = full blocks | (partial blocks & its mask_mod), as FlexAttention's kernel computes it.

    k and v may have batch size 1 against a larger query batch (broadcast, no copy). ``scale`` may be a number
    (NumPy scalars included) or a one-element tensor; one that requires grad gets its gradient. An empty batch
    or sequence (B, L or S = 0) gives an empty output (S = 0: zeros, lse -inf) on every backend, and meta tensors
    give meta outputs of the right shape. See docs/edges.md.

    Returns:
        The output (B, H, L, Dv), or an :class:`AttentionResult` ``(out, lse)`` when ``return_lse=True``.

    Example:
        >>> import torch, salience
        >>> q, k, v = torch.randn(2, 8, 16, 64), torch.randn(2, 2, 16, 64), torch.randn(2, 2, 16, 32)
        >>> salience.attention(q, k, v, mask=salience.masks.sliding_window(4)).shape
        torch.Size([2, 8, 16, 32])
    """
    q, k, v, m, sm, scale, compat, p, shp = _prepare(q, k, v, mask, score_mod, scale, compatibility, dropout_p,
                                                     layout)
    extra = _check_bias(bias, q, shp)
    if sinks is not None:
        check_sinks(sinks, shp.B, shp.H)
    if _shape_only(q, shp):
        _check_backend(backend)
        res = _shape_only_result(q, k, v, shp)
    else:
        need = return_lse or sinks is not None
        attend = dispatch.attend
        if torch.compiler.is_compiling():  # torch.compile/export: the salience::attention custom op, no graph break
            from .kernels import ops
            attend = ops.compiled(mask, score_mod)
        pl, res = attend(q, k, v, mask=m, score_mod=sm, scale=scale, compatibility=compat, dropout_p=p,
                         need_lse=need, backend=backend, **extra)
        if need and res.lse is None:
            raise RuntimeError(f"backend {pl.backend!r} does not provide the logsumexp here (return_lse=True or "
                               "sinks need it); use backend=None.")
    if sinks is not None:
        res = with_sinks(res.out, res.lse, sinks)
    if layout == "BLHD":
        res = AttentionResult(out=res.out.transpose(1, 2), lse=res.lse)
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
    layout: str = "BHLD",
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights (softmax probabilities) for the heads and query rows asked for.

    Only the selected ``heads`` (sequence of query-head indices) and ``rows`` (sequence of query indices,
    a slice, or None for all) are computed, so a few rows of a long sequence cost O(rows x S).
    If ``lse`` (B, H, L) from ``attention(..., return_lse=True)`` is given, the weights are
    ``exp(score - lse)`` directly, without a second reduction over the keys. ``layout="BLHD"`` reads q and k
    as (B, L, H, D) and (B, S, Hkv, D); the weights and ``lse`` are (B, H, ...) in both layouts. With ``sinks``
    (as in :func:`attention`) the weights of a row sum to less than 1 (the sink takes the rest); an ``lse`` from
    ``attention(..., sinks=..., return_lse=True)`` already includes them. ``bias`` (broadcastable to (B, H, L, S))
    is added as in :func:`attention`; pass the same one there so that ``lse`` matches.

    Returns:
        weights (B, len(heads), len(rows), S) in q's dtype; rows with no visible key are 0.

    Example:
        >>> import torch, salience
        >>> q = torch.randn(1, 4, 10, 8)
        >>> w = salience.attention_weights(q, q, mask=salience.masks.causal(), heads=[1], rows=[9])
        >>> w.shape, round(w.sum().item(), 5)
        (torch.Size([1, 1, 1, 10]), 1.0)
    """
    q, k, _, m, sm, scale, compat, _, shp = _prepare(q, k, k, mask, score_mod, scale, compatibility, 0.0, layout)
    b4 = None
    if bias is not None:
        b4 = _kbias.check_bias(bias, shp.B, shp.H, shp.L, shp.S, q.device)
    dev = q.device
    if _shape_only(q, shp):
        h_idx = _select(heads, shp.H, "heads", "cpu")
        r_idx = _select(rows, shp.L, "rows", "cpu")
        if lse is not None and lse.shape != q.shape[:3]:
            raise ValueError(f"lse must have shape (B, H, L) = {tuple(q.shape[:3])}; got {tuple(lse.shape)}.")
        return q.new_zeros(shp.B, h_idx.numel(), r_idx.numel(), shp.S)
    h_idx = _select(heads, shp.H, "heads", dev)
    r_idx = _select(rows, shp.L, "rows", dev)
    qs = q.index_select(1, h_idx).index_select(2, r_idx)
    ks = expand_kv(k, shp.H).index_select(1, h_idx)
    s = _scores(qs, ks, mask=m, score_mod=sm, scale=scale, compatibility=compat, heads=h_idx, rows=r_idx, L=shp.L,
                bias=b4)
    if lse is None:
        sk = None
        if sinks is not None:
            sk = check_sinks(sinks, shp.B, shp.H).to(dev)
            sk = sk.reshape(-1, shp.H).expand(shp.B, shp.H).index_select(1, h_idx)
        w, _ = softmax_from_scores(s, sinks=sk)
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
