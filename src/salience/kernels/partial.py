"""Attention of one block of a larger problem: the building block of ring attention and of split keys.

:func:`block_forward` computes a (query block, key block) pair whose rows and keys sit at global offsets, with
masks and score_mods evaluated at global indices; results over disjoint key blocks merge exactly with
:func:`salience.merge`. :func:`block_backward` gives the block's share of the gradients from the merged output
and logsumexp (FlashAttention-2's backward), so nothing of size L x S is stored.

Example:
    >>> import torch, salience
    >>> from salience.kernels.partial import block_forward
    >>> q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    >>> a = block_forward(q, k[:, :, :5], v[:, :, :5], mask=salience.masks.causal(), kv_len=8)
    >>> b = block_forward(q, k[:, :, 5:], v[:, :, 5:], mask=salience.masks.causal(), kv_offset=5)
    >>> bool(torch.allclose(salience.merge(a.out, a.lse, b.out, b.lse).out, salience.attention(q, k, v, mask=salience.masks.causal())))
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._layout import check_qkv, check_scale
from .._result import AttentionResult
from ..masks import as_mask_mod
from ..scores import as_score_mod
from . import dispatch

__all__ = ["block_forward", "block_backward", "BlockGrads"]


class BlockGrads(NamedTuple):
    """Gradients returned by :func:`block_backward`: dq (B, H, L, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


def _check_block_args(q, k, v, q_offset, kv_offset, q_len, kv_len):
    shp = check_qkv(q, k, v)
    for name, val in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an int >= 0 (the global index of the block's first row); got {val!r}.")
    for name, val, off, n in (("q_len", q_len, q_offset, shp.L), ("kv_len", kv_len, kv_offset, shp.S)):
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, int) or val < off + n:
            raise ValueError(
                f"{name} is the global length and must be an int >= offset + block length = {off} + {n} = {off + n}; "
                f"got {val!r}.")
    return shp


def _block_plan(q, k, v, mask, score_mod, scale, q_offset, kv_offset, q_len, kv_len, backend):
    shp = _check_block_args(q, k, v, q_offset, kv_offset, q_len, kv_len)
    sc = check_scale(scale, shp.D)
    if backend == "reference":
        raise ValueError("backend='reference' does not take block offsets; use None, 'sdpa', 'spans' or 'blockwise'.")
    m = None if mask is None else as_mask_mod(mask)
    sm = None if score_mod is None else as_score_mod(score_mod)
    plan = dispatch.choose(q, k, v, mask=m, score_mod=sm, compatibility=None, need_lse=True, backend=backend,
                           scale=sc, q_offset=q_offset, kv_offset=kv_offset, q_len=q_len, kv_len=kv_len,
                           allow_reference=False)
    return plan, sc


def block_forward(q, k, v, *, mask=None, score_mod=None, scale=None, q_offset: int = 0, kv_offset: int = 0,
                  q_len: int | None = None, kv_len: int | None = None, backend: str | None = None) -> AttentionResult:
    """Attention of one query block against one key block of a larger problem: ``(out, lse)``.

    The block's query rows are the global rows ``q_offset .. q_offset + L - 1`` and its keys the global keys
    ``kv_offset .. kv_offset + S - 1``; ``mask`` and ``score_mod`` are evaluated at global indices and bound
    to the global lengths ``q_len`` and ``kv_len`` (default: offset + block length). Results over disjoint
    key blocks combine exactly with :func:`salience.merge`. Differentiable (the backward recomputes from
    the saved output and logsumexp), or use :func:`block_backward` explicitly with the merged results.

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv).
        mask, score_mod, scale: as in :func:`salience.attention`.
        q_offset, kv_offset: global index of the first query row and key of the block.
        q_len, kv_len: global query and key lengths.
        backend: force ``"sdpa"``, ``"spans"`` or ``"blockwise"`` (default: the fastest exact one).

    Returns:
        :class:`~salience.AttentionResult`: out (B, H, L, Dv) in q's dtype, lse (B, H, L) float32 (float64 for
        float64); rows that see no key of this block get out 0 and lse -inf.

    Example:
        >>> import torch, salience
        >>> q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
        >>> a = block_forward(q, k[:, :, :5], v[:, :, :5], mask=salience.masks.causal(), kv_len=8)
        >>> b = block_forward(q, k[:, :, 5:], v[:, :, 5:], mask=salience.masks.causal(), kv_offset=5)
        >>> whole = salience.attention(q, k, v, mask=salience.masks.causal())
        >>> bool(torch.allclose(salience.merge(a.out, a.lse, b.out, b.lse).out, whole))
        True
    """
    plan, _ = _block_plan(q, k, v, mask, score_mod, scale, q_offset, kv_offset, q_len, kv_len, backend)
    return dispatch.run(plan, q, k, v)


def block_backward(q, k, v, out, lse, dout, *, mask=None, score_mod=None, scale=None, q_offset: int = 0,
                   kv_offset: int = 0, q_len: int | None = None, kv_len: int | None = None, dlse=None,
                   backend: str | None = None) -> BlockGrads:
    """Gradients of one (query block, key block) pair, given the *final* output and logsumexp of the rows.

    When a row's attention is split over several key blocks (ring attention), pass the merged ``out`` and
    ``lse`` (over all blocks) and the gradient ``dout`` of the merged output: each block's result is then its
    exact share, and the sum over key blocks of ``dq`` is the full query gradient (FlashAttention-2's
    ``dS = P * (dP - rowsum(dout * out))`` with ``P = exp(S - lse)``). Nothing of size L x S is stored.

    Args:
        q, k, v: the block's inputs, as in :func:`block_forward`.
        out: (B, H, L, Dv) final output of the rows; lse: (B, H, L) their final logsumexp (-inf = no key).
        dout: (B, H, L, Dv) gradient of the loss with respect to ``out``.
        dlse: optional (B, H, L) gradient with respect to ``lse``.
        mask, score_mod, scale, q_offset, kv_offset, q_len, kv_len, backend: as in :func:`block_forward`.

    Returns:
        :class:`BlockGrads` ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v. Gradients of tensors a
        score_mod closes over are not returned here (use autograd through :func:`block_forward` for those).

    Example:
        >>> import torch, salience
        >>> q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        >>> res = block_forward(q, k, v)
        >>> do = torch.randn(1, 1, 6, 4, dtype=torch.float64)
        >>> g = block_backward(q, k, v, res.out, res.lse, do)
        >>> res.out.backward(do)
        >>> bool(torch.allclose(g.dq, q.grad) and torch.allclose(g.dv, v.grad))
        True
    """
    plan, _ = _block_plan(q, k, v, mask, score_mod, scale, q_offset, kv_offset, q_len, kv_len, backend)
    B, H, L, _ = q.shape
    for name, t, shape in (("out", out, (B, H, L, v.shape[-1])), ("lse", lse, (B, H, L)),
                           ("dout", dout, (B, H, L, v.shape[-1])), ("dlse", dlse, (B, H, L))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (the block's rows); got {tuple(t.shape)}.")
    with torch.no_grad():
        dq, dk, dv, _ = plan.executor.backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                                               dout.detach(), None if dlse is None else dlse.detach())
    return BlockGrads(dq, dk, dv)
