"""Drop-in functions with the signatures and conventions of the attention APIs people already use.

Porting is one import; each function translates its peer's conventions into salience's masks and score_mods
and calls :func:`salience.attention`, so the same fast paths run (``sdpa``, ``spans``, ``blockwise``):

* :func:`scaled_dot_product_attention`: ``torch.nn.functional.scaled_dot_product_attention``
  (``attn_mask`` bool True = take part, or float added; top-left ``is_causal``; ``scale``; ``enable_gqa``).
* :func:`flex_attention` and :func:`create_block_mask`: ``torch.nn.attention.flex_attention``'s (a torch
  ``BlockMask`` is accepted too, with its block table: full blocks | (partial blocks & mask_mod), as the compiled
  FlexAttention kernel computes it).
* :func:`flash_attn_func` and :func:`flash_attn_varlen_func`: flash-attention's, in its (B, L, H, D) layout,
  with bottom-right ``causal`` and ``window_size``, ``softcap``, ``alibi_slopes`` (H,) or (B, H) and
  ``return_attn_probs``; varlen takes packed (total, H, D) tensors and ``cu_seqlens``.
* :func:`flash_attn_with_kvcache`: flash-attention's decoding call on a (B, S_max, Hkv, D) or paged
  (num_blocks, block_size, Hkv, D) cache, appending new keys in place, with ``cache_batch_idx``,
  ``cache_leftpad``, rotary embeddings, ``return_softmax_lse``; it runs :func:`salience.attention_with_kvcache`.

:func:`plan` says which path a compat call takes: ``compat.plan(compat.flash_attn_func, q, k, v, causal=True)``.
Differences from the peers are listed in docs/compat.md (rows with no visible key give output 0 and lse -inf
everywhere; dropout draws different random numbers).

Example:
    >>> import torch
    >>> from salience.compat import flash_attn_func
    >>> q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    >>> flash_attn_func(q, k, v, causal=True, window_size=(3, -1)).shape
    torch.Size([2, 6, 4, 8])
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from . import _blockmask
from . import masks as M
from . import scores as Sc
from .functional import attention, attention_weights
from .functional import plan as _plan

__all__ = [
    "scaled_dot_product_attention",
    "flex_attention",
    "create_block_mask",
    "CompatBlockMask",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "plan",
]

_PLANS: contextvars.ContextVar = contextvars.ContextVar("salience_compat_plans", default=None)


def _run(q, k, v, **kw):
    """salience.attention, recording the plan when :func:`plan` asked for it."""
    rec = _PLANS.get()
    if rec is not None:
        pk = {n: kw[n] for n in ("mask", "score_mod", "scale", "dropout_p", "layout", "return_lse", "bias") if n in kw}
        rec.append(_plan(q, k, v, **pk))
    return attention(q, k, v, **kw)


def _run_kvcache(q, k_cache, v_cache, k, v, **kw):
    """salience.attention_with_kvcache, recording its :func:`salience.kvcache.plan` when :func:`plan` asked."""
    from . import kvcache

    rec = _PLANS.get()
    if rec is not None:
        rec.append(kvcache.plan(q, k_cache, v_cache, k, v, **{n: x for n, x in kw.items() if n != "return_lse"}))
    return kvcache.attention_with_kvcache(q, k_cache, v_cache, k, v, **kw)


def plan(fn, *args, **kwargs):
    """Run a compat call and return the :class:`salience.kernels.dispatch.Plan` of each salience call it made
    (one Plan, or a list when the call ran per sequence or per batch row); for :func:`flash_attn_with_kvcache`
    the :class:`salience.kvcache.KVCachePlan` of each call (``.path``: ``"decode"`` or ``"fallback"``).

    Example:
        >>> import torch
        >>> from salience import compat
        >>> q = torch.randn(1, 1024, 2, 16)
        >>> compat.plan(compat.flash_attn_func, q, q, q, window_size=(128, 0)).backend
        'spans'
    """
    token = _PLANS.set([])
    try:
        fn(*args, **kwargs)
        plans = _PLANS.get()
    finally:
        _PLANS.reset(token)
    return plans[0] if len(plans) == 1 else plans


def _check_gqa(Hq: int, Hkv: int, enable_gqa: bool, who: str) -> None:
    if Hq != Hkv and not enable_gqa:
        raise ValueError(
            f"{who}: query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for grouped-query "
            "attention (query head i reads key/value head i // (Hq // Hkv)), as in torch.")
    if Hq % Hkv:
        raise ValueError(f"{who}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}).")


# ------------------------------------------------------------------------------------------- torch SDPA


def _bool_mask(m: torch.Tensor, B: int, L: int, S: int):
    """A bool (1|B, 1|H, 1|L, S) mask as a named salience mask where its shape is recognised (right key padding,
    top-left or bottom-right causal), so the fast paths take it; else the tensor itself."""
    if m.shape[1] == 1 and m.shape[2] == 1:  # key mask: right padding?
        lengths = m.reshape(m.shape[0], S).sum(-1)
        if torch.equal(m.reshape(m.shape[0], S), torch.arange(S, device=m.device) < lengths.view(-1, 1)):
            if bool((lengths == S).all()):
                return None
            return M.padding(kv_lengths=lengths.expand(B).cpu())
    if m.shape[0] == 1 and m.shape[1] == 1 and m.shape[2] == L:
        if bool(m.all()):
            return None
        tri = torch.ones(L, S, dtype=torch.bool, device=m.device)
        if torch.equal(m[0, 0], tri.tril()):
            return M.causal()
        if torch.equal(m[0, 0], tri.tril(S - L)):
            return M.causal(align="bottom_right")
    return m


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` with salience's kernels.

    query (N, ..., Hq, L, E), key (N, ..., Hkv, S, E), value (N, ..., Hkv, S, Ev) -> (N, ..., Hq, L, Ev), as in torch.
    ``attn_mask``: bool (True = the key takes part) or float (added to the scaled scores), broadcastable to
    (N, ..., L, S) (2-D (L, S) and 3-D masks included). ``is_causal``: top-left (query i sees keys j <= i),
    like torch; given together with ``attn_mask`` the two are combined (torch raises instead).
    ``enable_gqa``: Hq a multiple of Hkv. ``dropout_p`` is applied whatever the module's training mode (as in
    torch). A row whose keys are all masked gives 0 (as torch >= 2.5 does; older torch gave NaN).

    Masks that salience recognises run on its fast paths: a right key-padding mask (N, 1, 1, S) and causal
    (L, S) triangles become named masks; a float mask of 0 and -inf becomes a bool mask; other bool masks are read
    as tensors (tile kernels); other float masks go to ``salience.attention(bias=...)`` (torch's fused kernel with
    the bias, blocks of -inf keys skipped, and a gradient to the mask when it requires grad).
    """
    for argname, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {argname} must be a torch.Tensor; got {type(t).__name__}.")
        if t.dim() < 2:
            raise ValueError(f"scaled_dot_product_attention: {argname} must have shape (..., L, E); got {tuple(t.shape)}.")
    q, k, v = query, key, value
    lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]) if q.dim() >= 4 else None
    if q.dim() < 4:  # (L, E) or (N, L, E): one head
        q, k, v = (t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 3 else t.unsqueeze(1)
                   for t in (q, k, v))
    elif q.dim() > 4:
        q, k, v = (t.expand(*lead, *t.shape[-3:]).reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _check_gqa(Hq, Hkv, enable_gqa, "scaled_dot_product_attention")
    mask, bias = None, None
    if attn_mask is not None:
        am = attn_mask
        if not isinstance(am, torch.Tensor):
            raise TypeError(f"attn_mask must be a bool or float tensor; got {type(am).__name__}.")
        if query.dim() < 4 and am.dim() == 3:  # (N, L, S) for 3-D inputs: one head
            am = am.unsqueeze(1)
        elif query.dim() > 4 and am.dim() > 2:
            am = am.expand(*lead, *query.shape[-3:-1], S).reshape(-1, *query.shape[-3:-1], S)
        if am.dim() > 4:
            raise ValueError(f"attn_mask with shape {tuple(attn_mask.shape)} does not broadcast to (N, H, L, S).")
        am = am.reshape((1,) * (4 - am.dim()) + tuple(am.shape))
        try:
            torch.broadcast_shapes(am.shape, (B, Hq, L, S))
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (N, H, L, S) = "
                             f"{(B, Hq, L, S)}.") from None
        if am.dtype != torch.bool and not am.requires_grad:
            zero_inf = (am == 0) | (am == float("-inf"))
            if bool(zero_inf.all()):
                am = am == 0
        if am.dtype == torch.bool:
            mask = _bool_mask(am, B, L, S)
        elif am.is_floating_point():
            bias = am
        else:
            raise TypeError(f"attn_mask must be bool or floating point; got {am.dtype}.")
    if is_causal:
        mask = M.causal() if mask is None else M.as_mask_mod(mask) & M.causal()
    out = _run(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p)
    if query.dim() < 4:
        return out.reshape(*query.shape[:-1], out.shape[-1])
    if query.dim() > 4:
        return out.reshape(*lead, *out.shape[1:])
    return out


# ------------------------------------------------------------------------------------------- FlexAttention


@dataclass
class CompatBlockMask:
    """What :func:`create_block_mask` returns: the mask_mod and the sizes it was made for (torch's BlockMask
    has the same ``mask_mod``, ``shape`` and ``seq_lengths`` attributes). salience classifies tiles itself, so
    no block table is built; ``to_dense()`` evaluates the mask."""

    mask_mod: object
    B: int | None
    H: int | None
    Q_LEN: int
    KV_LEN: int
    BLOCK_SIZE: int | tuple = 128

    @property
    def shape(self):
        return (self.B or 1, self.H or 1, self.Q_LEN, self.KV_LEN)

    @property
    def seq_lengths(self):
        return (self.Q_LEN, self.KV_LEN)

    def to_dense(self, device=None) -> torch.Tensor:
        """The bool mask (B, H, Q_LEN, KV_LEN) (B and H of None give 1)."""
        return M.evaluate(M.as_mask_mod(self.mask_mod), *self.shape, device=device)

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)
        return f"CompatBlockMask({name}, shape={self.shape})"


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=128, _compile=False):
    """FlexAttention's ``create_block_mask``: a :class:`CompatBlockMask` carrying ``mask_mod`` and the sizes.

    ``mask_mod`` is FlexAttention's ``(b, h, q_idx, kv_idx) -> bool`` (a :mod:`salience.masks` object runs on the
    fast paths it is recognised by). Nothing is evaluated here; ``device`` and ``_compile`` are accepted for
    compatibility.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool; got {type(mask_mod).__name__}.")
    for argname, val in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"create_block_mask: {argname} must be an int >= 0; got {val!r}.")
    return CompatBlockMask(mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE)


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None):
    """``torch.nn.attention.flex_attention.flex_attention`` with salience's kernels.

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev). ``score_mod(score, b, h, q_idx, kv_idx)``
    as in FlexAttention. ``block_mask``: from :func:`create_block_mask` (its mask_mod), or torch's own
    ``BlockMask`` (``create_block_mask``, ``BlockMask.from_kv_blocks``), read with its block table as the
    compiled FlexAttention kernel reads it: full blocks are visible without evaluating the mask_mod, partial
    blocks evaluate it, blocks not listed are masked; its ``seq_lengths`` must equal L and S (see
    :mod:`salience._blockmask`; torch's *eager* flex_attention evaluates the mask_mod everywhere instead). A
    :class:`salience.blocks.BlockMask` is accepted too. ``return_lse=True`` returns ``(out, lse)`` with lse
    (B, Hq, L) in natural log. Rows with no visible key give 0 and lse -inf, as FlexAttention does.
    ``kernel_options`` is ignored.
    """
    mask = None
    if _blockmask.is_block_mask(block_mask):
        mask = _blockmask.as_mask(block_mask)
    elif block_mask is not None:
        mm = getattr(block_mask, "mask_mod", None)
        if mm is None:
            raise TypeError(f"block_mask must come from create_block_mask (a mask_mod and sizes); got "
                            f"{type(block_mask).__name__}.")
        ql, kl = block_mask.seq_lengths
        if (ql, kl) != (query.shape[-2], key.shape[-2]):
            raise ValueError(f"block_mask was made for Q_LEN={ql}, KV_LEN={kl} but query has L={query.shape[-2]} "
                             f"and key S={key.shape[-2]}; build it with create_block_mask(..., Q_LEN="
                             f"{query.shape[-2]}, KV_LEN={key.shape[-2]}).")
        if getattr(mm, "__name__", "") != "noop_mask":
            mask = mm
    if query.dim() != 4:
        raise ValueError(f"flex_attention: query must be (B, H, L, E); got {tuple(query.shape)}.")
    _check_gqa(query.shape[1], key.shape[1], enable_gqa, "flex_attention")
    res = _run(query, key, value, mask=mask, score_mod=score_mod, scale=scale, return_lse=return_lse)
    return (res.out, res.lse) if return_lse else res


# ------------------------------------------------------------------------------------------- flash-attention


def _window(causal: bool, window_size, align: str = "bottom_right"):
    """flash-attention's causal/window_size (bottom-right aligned; ``align="top_left"`` is the same when L == S)
    as a salience mask (None = every key)."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right) with -1 for unbounded; got {window_size!r}.")
    left, right = (int(x) for x in window_size)
    if causal:
        right = 0
    lo = None if left < 0 else left
    hi = None if right < 0 else right
    if lo is None and hi is None:
        return None
    if lo is None and hi == 0:
        return M.causal(align=align)
    return M.sliding_window(lo, hi, align=align)


def _slopes(alibi_slopes, B: int, H: int):
    if alibi_slopes is None:
        return None
    sl = torch.as_tensor(alibi_slopes)
    if sl.shape not in ((H,), (B, H)) or not sl.is_floating_point():
        raise ValueError(f"alibi_slopes must be a float tensor (nheads,) = ({H},) or (batch_size, nheads) = "
                         f"({B}, {H}); got {sl.dtype} {tuple(sl.shape)}.")
    if sl.dim() == 2 and bool((sl == sl[:1]).all()):
        sl = sl[0]
    return sl


def _score_mod(softcap: float, slopes, offset: int):
    mods = []
    if softcap and softcap > 0:
        mods.append(Sc.softcap(float(softcap)))
    if slopes is not None:
        mods.append(Sc.alibi(slopes, offset=offset))  # added after the softcap, as flash-attention does
    return None if not mods else Sc.compose(*mods)


def _flash(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, slopes, return_probs):
    """One (B, L, H, D) problem with per-head slopes (or None)."""
    L, S = q.shape[1], k.shape[1]
    mask = _window(causal, window_size, "top_left" if L == S else "bottom_right")
    sm = _score_mod(softcap, slopes, S - L)
    res = _run(q, k, v, mask=mask, score_mod=sm, scale=softmax_scale, dropout_p=dropout_p, return_lse=True,
               layout="BLHD")
    probs = None
    if return_probs:
        probs = attention_weights(q, k, mask=mask, score_mod=sm, scale=softmax_scale, lse=res.lse, layout="BLHD")
    return res.out, res.lse, probs


def _check_flash(q, k, v, who, dims):
    for argname, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            shape = "(batch_size, seqlen, nheads, headdim)" if dims == 4 else "(total_tokens, nheads, headdim)"
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{who}: {argname} must be a tensor {shape}; got {got}.")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"{who}: q has {q.shape[-2]} heads, not a multiple of k's {k.shape[-2]} (MQA/GQA).")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attention's ``flash_attn_func`` with salience's kernels.

    q (batch_size, seqlen_q, nheads, headdim), k and v (batch_size, seqlen_k, nheads_k, headdim): nheads a
    multiple of nheads_k (MQA/GQA). ``causal`` and ``window_size=(left, right)`` (-1 = unbounded) are aligned
    bottom-right: query i sees keys ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``
    (causal sets right = 0). ``softcap > 0``: ``softcap * tanh(score / softcap)`` on the scaled scores, before
    the mask and ALiBi. ``alibi_slopes`` (nheads,) or (batch_size, nheads): ``-slope * |i + seqlen_k - seqlen_q - j|``
    added to the scores. ``deterministic`` is accepted (salience's CPU paths are deterministic).

    Returns:
        out (batch_size, seqlen_q, nheads, headdim); with ``return_attn_probs=True`` the tuple
        ``(out, softmax_lse, attn_probs)`` like flash-attention: lse (batch_size, nheads, seqlen_q) and the
        softmax probabilities (batch_size, nheads, seqlen_q, seqlen_k) (exact, without the dropout pattern).
    """
    _check_flash(q, k, v, "flash_attn_func", 4)
    B, _, H, _ = q.shape
    slopes = _slopes(alibi_slopes, B, H)
    if slopes is not None and slopes.dim() == 2:  # per-batch slopes: each row on the fast paths
        parts = [_flash(q[b:b + 1], k[b:b + 1] if k.shape[0] > 1 else k, v[b:b + 1] if v.shape[0] > 1 else v,
                        dropout_p, softmax_scale, causal, window_size, softcap, slopes[b], return_attn_probs)
                 for b in range(B)]
        out, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        probs = torch.cat([p[2] for p in parts]) if return_attn_probs else None
    else:
        out, lse, probs = _flash(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, slopes,
                                 return_attn_probs)
    return (out, lse, probs) if return_attn_probs else out


def _cu(cu, argname: str, total: int) -> list:
    t = torch.as_tensor(cu)
    if t.dim() != 1 or t.numel() < 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{argname} must be a 1-D integer tensor (batch_size + 1,) of cumulative lengths; got "
                         f"{t.dtype} {tuple(t.shape)}.")
    c = t.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] > total:
        raise ValueError(f"{argname} must start at 0, never decrease and end at most at the {total} packed tokens; "
                         f"got {c if len(c) <= 10 else str(c[:10])[:-1] + ', ...]'}.")
    return c


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attention's ``flash_attn_varlen_func``: sequences packed without padding.

    q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim); sequence b is rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v.
    ``causal``, ``window_size`` and ALiBi are aligned bottom-right *per sequence* (query i of sequence b sees
    keys j <= i + len_k[b] - len_q[b] under causal), as in flash-attention. When every sequence has as many
    keys as queries the packed problem runs in one call with a document mask (``masks.document``) and the
    window/causal band; otherwise each sequence runs on its own (each on the fast paths).

    Returns:
        out (total_q, nheads, headdim); with ``return_attn_probs=True`` ``(out, softmax_lse, attn_probs)``:
        lse (nheads, total_q) and the probabilities (batch_size, nheads, max_seqlen_q, max_seqlen_k), zero
        beyond each sequence's lengths. Rows past ``cu_seqlens_q[-1]`` give 0.
    """
    if block_table is not None:
        raise NotImplementedError("flash_attn_varlen_func: block_table (paged KV cache) is not supported; gather "
                                  "the pages into packed k and v first.")
    _check_flash(q, k, v, "flash_attn_varlen_func", 3)
    cq, ck = _cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0]), _cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q describes {len(cq) - 1} sequences but cu_seqlens_k {len(ck) - 1}.")
    B, H, Tq = len(cq) - 1, q.shape[1], q.shape[0]
    lq = [b - a for a, b in zip(cq, cq[1:])]
    lk = [b - a for a, b in zip(ck, ck[1:])]
    if B and (max(lq) > max_seqlen_q or max(lk) > max_seqlen_k):
        raise ValueError(f"max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k} are below the longest sequences "
                         f"({max(lq)} queries, {max(lk)} keys).")
    slopes = _slopes(alibi_slopes, B, H)
    Dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if B and cq == ck and not return_attn_probs and (slopes is None or slopes.dim() == 1):
        n = cq[-1]
        ids = torch.repeat_interleave(torch.arange(B), torch.tensor(lq))
        win = _window(causal, window_size, "top_left")  # every sequence has L == S: top-left == bottom-right
        mask = M.document(ids) if win is None else M.document(ids) & win
        sm = _score_mod(softcap, slopes, 0)
        res = _run(q[:n].unsqueeze(0), k[:n].unsqueeze(0), v[:n].unsqueeze(0), mask=mask, score_mod=sm,
                   scale=softmax_scale, dropout_p=dropout_p, return_lse=True, layout="BLHD")
        out, lse = res.out[0], res.lse[0]
        if n < Tq:
            out = torch.cat([out, out.new_zeros(Tq - n, H, Dv)])
            lse = torch.cat([lse, lse.new_full((H, Tq - n), float("-inf"))], dim=1)
        return out
    outs, lses, probs = [], [], []
    for b in range(B):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        o, lse, p = _flash(q[cq[b]:cq[b + 1]].unsqueeze(0), k[ck[b]:ck[b + 1]].unsqueeze(0),
                           v[ck[b]:ck[b + 1]].unsqueeze(0), dropout_p, softmax_scale, causal, window_size, softcap,
                           sl, return_attn_probs)
        outs.append(o[0])
        lses.append(lse[0])
        if return_attn_probs:
            probs.append(torch.nn.functional.pad(p[0], (0, max_seqlen_k - lk[b], 0, max_seqlen_q - lq[b])))
    if cq[-1] < Tq:
        outs.append(q.new_zeros(Tq - cq[-1], H, Dv))
        lses.append(torch.full((H, Tq - cq[-1]), float("-inf"), dtype=acc, device=q.device))
    out = torch.cat(outs) if outs else q.new_zeros(Tq, H, Dv)
    if not return_attn_probs:
        return out
    lse = torch.cat(lses, dim=1) if lses else torch.full((H, Tq), float("-inf"), dtype=acc, device=q.device)
    pr = torch.stack(probs) if probs else q.new_zeros(0, H, max_seqlen_q, max_seqlen_k)
    return out, lse, pr



# ------------------------------------------------------------------------------ flash_attn_with_kvcache


def _int_vector(x, argname: str, B: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.shape[0] != B or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"flash_attn_with_kvcache: {argname} must be an integer tensor (batch_size,) = ({B},); got "
                         f"{t.dtype} {tuple(t.shape)}.")
    return t.to(torch.long).cpu()


def _rotate(x, cos, sin, pos, interleaved: bool):
    """flash-attention's rotary embedding of x (B, T, H, D) at positions ``pos`` (B, T): the first ``2 *
    cos.shape[1]`` features turn, pairs (0, 1), (2, 3), ... when ``interleaved``, else (i, i + rotary_dim / 2)."""
    rd = 2 * cos.shape[1]
    c = cos[pos].unsqueeze(2).to(torch.float32)  # (B, T, 1, rd / 2)
    s_ = sin[pos].unsqueeze(2).to(torch.float32)
    xr = x[..., :rd].to(torch.float32)
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        turned = torch.stack((a * c - b * s_, a * s_ + b * c), dim=-1).flatten(-2)
    else:
        a, b = xr[..., : rd // 2], xr[..., rd // 2:]
        turned = torch.cat((a * c - b * s_, a * s_ + b * c), dim=-1)
    return torch.cat((turned.to(x.dtype), x[..., rd:]), dim=-1)


def _check_rotary(rotary_cos, rotary_sin, k, D: int, need: int):
    if rotary_cos is None and rotary_sin is None:
        return None
    if rotary_cos is None or rotary_sin is None or k is None:
        raise ValueError("flash_attn_with_kvcache: rotary_cos and rotary_sin go together, and only with new k and v "
                         "(the new keys and the queries are rotated at their positions).")
    if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > D:
        raise ValueError(f"flash_attn_with_kvcache: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) "
                         f"with rotary_dim <= headdim={D}; got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}.")
    if need > rotary_cos.shape[0]:
        raise ValueError(f"flash_attn_with_kvcache: rotary_cos covers {rotary_cos.shape[0]} positions but position "
                         f"{need - 1} is rotated (cache_seqlens + new tokens); give seqlen_ro >= {need}.")
    return rotary_cos, rotary_sin


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attention's ``flash_attn_with_kvcache`` on :func:`salience.attention_with_kvcache`.

    Args:
        q: (batch_size, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or with ``block_table`` a paged pool
            (num_blocks, block_size, nheads_k, headdim) (any block size); nheads a multiple of nheads_k.
        k, v: new keys and values (batch_size, seqlen_new, nheads_k, headdim), written into the caches in place at
            positions ``cache_seqlens[b] ..`` before attending.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), with k and v: the new keys are rotated at positions
            ``cache_seqlens[b] + t``; the queries at ``cache_seqlens[b] + i`` when causal or windowed, else all at
            ``cache_seqlens[b]`` (``rotary_interleaved``: pairs (0, 1), (2, 3) ... else GPT-NeoX halves).
        cache_seqlens: int or (batch_size,) keys already cached per sequence (default: the whole cache).
        cache_batch_idx: (batch_size,) the cache row of each sequence (default 0..batch_size-1).
        cache_leftpad: (batch_size,) the first cached key of each sequence (keys before it are not seen; the
            positions of causal, window and ALiBi count from the end of the sequence, as in flash-attention).
        block_table: (batch_size, max_num_blocks_per_seq) pool block of each logical block.
        causal, window_size: bottom-right aligned: query i sees keys ``i + S_b - seqlen_q - left .. i + S_b -
            seqlen_q + right`` of the ``S_b = cache_seqlens[b] + seqlen_new`` keys (causal: right = 0).
        softcap: > 0 caps the scaled scores (``softcap * tanh(s / softcap)``), before ALiBi.
        alibi_slopes: (nheads,) or (batch_size, nheads): ``-slope * |i + S_b - seqlen_q - j|`` added.
        num_splits: accepted; salience splits the key axis across threads by itself.

    Returns:
        out (batch_size, seqlen_q, nheads, headdim); with ``return_softmax_lse=True`` also the logsumexp
        (batch_size, nheads, seqlen_q) float32. Rows that see no key give 0 (lse -inf).

    Differences: duplicate ``cache_batch_idx`` entries that append are refused (flash-attention leaves which write
    wins undefined); ``cache_leftpad`` and ALiBi with sequences of different lengths run one call per sequence.

    Example:
        >>> import torch
        >>> kc, vc = torch.zeros(2, 64, 2, 16), torch.zeros(2, 64, 2, 16)   # (B, S_max, Hkv, D)
        >>> q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
        >>> out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([5, 9]), causal=True)
        >>> out.shape, bool(torch.equal(kc[1, 9], k[1, 0]))
        (torch.Size([2, 1, 4, 16]), True)
    """
    who = "flash_attn_with_kvcache"
    for argname, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)) + (
            (("k", k), ("v", v)) if k is not None or v is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{who}: {argname} must be a 4-D tensor in flash-attention's (batch, seqlen, heads, "
                             f"headdim) layout; got {got}.")
    B, L, H, D = q.shape
    L_new = 0 if k is None else k.shape[1]
    paged = block_table is not None
    if paged and (cache_batch_idx is not None or cache_leftpad is not None):
        raise NotImplementedError(f"{who}: cache_batch_idx and cache_leftpad with a block_table are not supported "
                                  "(flash-attention does not take them together either); index the block table.")
    cap = (block_table.shape[1] * k_cache.shape[1]) if paged and block_table.dim() == 2 else k_cache.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{who}: new k and v need cache_seqlens (where to write them).")
        cache_seqlens = cap
    lens = (torch.full((B,), int(cache_seqlens), dtype=torch.long) if isinstance(cache_seqlens, int)
            else _int_vector(cache_seqlens, "cache_seqlens", B))
    banded = causal or tuple(window_size) != (-1, -1)
    rot = _check_rotary(rotary_cos, rotary_sin, k, D, int(lens.max()) + max(L_new, L if banded else 1) if B else 0)
    if rot is not None:
        q_at = lens.view(-1, 1) + (torch.arange(L) if banded else 0)
        q = _rotate(q, *rot, q_at.expand(B, L), rotary_interleaved)
        k = _rotate(k, *rot, lens.view(-1, 1) + torch.arange(L_new), rotary_interleaved)
    mask = _window(causal, window_size)  # bottom-right in each sequence's own keys
    slopes = _slopes(alibi_slopes, B, H)
    rows = None if cache_batch_idx is None else _int_vector(cache_batch_idx, "cache_batch_idx", B)
    starts = None if cache_leftpad is None else _int_vector(cache_leftpad, "cache_leftpad", B)
    totals = (lens + L_new).tolist()
    kw = dict(scale=softmax_scale, return_lse=True)
    t = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731  (B, T, H, D) views -> (B, H, T, D)
    one_call = starts is None and (slopes is None or (slopes.dim() == 1 and len(set(totals)) <= 1))
    if one_call:
        kc, vc, bt = t(k_cache), t(v_cache), block_table
        if rows is not None:  # each sequence's cache row as a pool block of seqlen_cache slots
            bt = rows.view(B, 1).to(torch.int32)
        sm = _score_mod(softcap, slopes, totals[0] - L if totals else 0)
        res = _run_kvcache(t(q), kc, vc, t(k), t(v), cache_seqlens=lens, block_table=bt, mask=mask,
                                     score_mod=sm, **kw)
        out, lse = res.out, res.lse
    else:
        outs, lses = [], []
        for b in range(B):
            r = b if rows is None else int(rows[b])
            a = 0 if starts is None else int(starts[b])
            if not 0 <= a <= int(lens[b]):
                raise ValueError(f"{who}: cache_leftpad[{b}] = {a} lies outside [0, cache_seqlens[{b}] = {int(lens[b])}].")
            sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
            # keys from the left pad on (a view: appends land in the cache); a paged pool is shared as it is
            kc, vc = (c.transpose(1, 2) if paged else c[r:r + 1, a:].transpose(1, 2) for c in (k_cache, v_cache))
            sm = _score_mod(softcap, sl, totals[b] - a - L)
            sel = slice(b, b + 1)
            res = _run_kvcache(t(q[sel]), kc, vc, None if k is None else t(k[sel]),
                                         None if v is None else t(v[sel]), cache_seqlens=int(lens[b]) - a,
                                         block_table=None if block_table is None else block_table[sel], mask=mask,
                                         score_mod=sm, **kw)
            outs.append(res.out)
            lses.append(res.lse)
        out = torch.cat(outs) if outs else q.new_zeros(0, H, L, v_cache.shape[-1])
        lse = torch.cat(lses) if lses else torch.zeros(0, H, L)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out
