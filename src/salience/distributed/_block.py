"""One block of ring attention: local queries against one received key/value segment, at global positions.

A *block* is a run of consecutive global query positions ``[q0, q0 + nq)`` against a run of key positions
``[k0, k0 + nk)``. The mask and score_mod see the global indices. Before anything is computed the block is
classified from the mask's tile bounds (:func:`salience.kernels.blockwise.classify`: analytic for the named
masks of :mod:`salience.masks`, by evaluation otherwise); a block in which no query sees any key is skipped.
Blocks in which every query sees every key, and diagonal blocks of a causal mask, with no score_mod, are
one call of torch's fused CPU flash kernel (:mod:`salience.kernels.fused`, which returns the logsumexp).
The others are computed by the kernels' public block functions,
:func:`salience.kernels.partial.block_forward` and :func:`~salience.kernels.partial.block_backward`,
which pick the fastest exact path for the block (interval spans for windows and documents, the tile
kernel otherwise).

The backward of a block takes the final (merged) output and logsumexp of the whole row, so that the block's
gradients are its exact share of the global gradient (``dS = P * (dP - rowsum(dO * O) + dlse)`` with
``P = exp(S - lse)``); rows whose global logsumexp is -inf get zero gradients.

Shapes (see :mod:`salience._layout`): q ``(B, H, nq, D)``, k ``(B, Hkv, nk, D)``, v ``(B, Hkv, nk, Dv)``,
out ``(B, H, nq, Dv)``, lse ``(B, H, nq)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._result import AttentionResult
from ..blocks import EMPTY, FULL
from ..kernels import blockwise, fused, partial
from ..masks import MaskMod

__all__ = ["Spec", "kind", "is_empty", "block_forward", "block_backward", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for outputs, logsumexps and gradients: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Spec:
    """What every block computes: the mask bound to the global L x S, the score_mod, the scale, the global
    sizes, and a cache of which blocks are empty (filled by the forward, reused by the backward)."""

    mask: MaskMod | None
    score_mod: object | None
    scale: float
    L: int
    S: int
    B: int
    H: int
    cache: dict = field(default_factory=dict)

    def kwargs(self, q0: int, k0: int) -> dict:
        return dict(mask=self.mask, score_mod=self.score_mod, scale=self.scale, q_offset=q0, kv_offset=k0,
                    q_len=self.L, kv_len=self.S)


def kind(spec: Spec, q0: int, nq: int, k0: int, nk: int, device) -> str:
    """How the block ``[q0, q0+nq) x [k0, k0+nk)`` is computed (cached per block):

    * ``"empty"``: no query sees any key: skipped;
    * ``"full"``: every query sees every key and there is no score_mod: one fused kernel call;
    * ``"causal"``: the diagonal block of a causal band (key ``j`` visible to query ``i`` iff ``j <= i``
      locally) with no score_mod: one fused causal kernel call;
    * ``"blocks"``: anything else, through :func:`salience.kernels.partial.block_forward`.
    """
    key = (q0, nq, k0, nk)
    hit = spec.cache.get(key)
    if hit is None:
        hit = spec.cache[key] = _kind(spec, q0, nq, k0, nk, device)
    return hit


def _kind(spec: Spec, q0, nq, k0, nk, device) -> str:
    plain = spec.score_mod is None
    if spec.mask is None:
        return "full" if plain else "blocks"
    band = getattr(spec.mask, "band", None)
    if plain and band is not None and band[0] is None and band[1] == k0 - q0:
        return "causal"  # visible iff (k0 + j) - (q0 + i) <= hi, i.e. j <= i
    bm = blockwise.classify(spec.mask, spec.B, spec.H, nq, nk, q_offset=q0, kv_offset=k0, q_len=spec.L,
                            kv_len=spec.S, device=device)
    if not bool((bm.classes != EMPTY).any()):
        return "empty"
    if plain and bool((bm.classes == FULL).all()):
        return "full"
    return "blocks"


def is_empty(spec: Spec, q0: int, nq: int, k0: int, nk: int, device) -> bool:
    """True when no query of ``[q0, q0+nq)`` sees any key of ``[k0, k0+nk)``."""
    return kind(spec, q0, nq, k0, nk, device) == "empty"


def block_forward(spec: Spec, q, k, v, q0: int, k0: int) -> AttentionResult | None:
    """``(out, lse)`` of queries ``q`` (global rows ``q0..``) over keys ``k, v`` (global keys ``k0..``), in the
    accumulation dtype; None when the block is empty. Rows with no visible key: out 0, lse -inf."""
    how = kind(spec, q0, q.shape[2], k0, k.shape[2], q.device)
    if how == "empty":
        return None
    acc = acc_dtype(q.dtype)
    if how in ("full", "causal") and fused.available(q):
        out, lse = fused.forward(q, k, v, scale=spec.scale, causal=how == "causal")
        return AttentionResult(out.to(acc), lse.to(acc))
    r = partial.block_forward(q, k, v, **spec.kwargs(q0, k0))
    return AttentionResult(r.out.to(acc), r.lse.to(acc))


def block_backward(spec: Spec, q, k, v, out, lse, dout, dlse, q0: int, k0: int):
    """Gradients ``(dq, dk, dv)`` (accumulation dtype) of this block's share of the loss, or None when the
    block is empty.

    Args:
        out: the final output of these query rows over *all* keys (q's dtype), ``(B, H, nq, Dv)``.
        lse: their final logsumexp ``(B, H, nq)`` (-inf for rows that see no key anywhere).
        dout: gradient of the output; dlse: gradient of the logsumexp or None.
    """
    how = kind(spec, q0, q.shape[2], k0, k.shape[2], q.device)
    if how == "empty":
        return None
    acc = acc_dtype(q.dtype)
    if how in ("full", "causal") and fused.available(q):
        dq, dk, dv = fused.backward(dout, q, k, v, out, lse, scale=spec.scale, causal=how == "causal", dlse=dlse)
    else:
        dq, dk, dv = partial.block_backward(q, k, v, out, lse, dout, dlse=dlse, **spec.kwargs(q0, k0))
    return dq.to(acc), dk.to(acc), dv.to(acc)
