"""One block of ring attention: local queries against one received key/value segment, at global positions.

A *block* is a run of consecutive global query positions ``[q0, q0 + nq)`` against a run of key positions
``[k0, k0 + nk)``. The mask and score_mod see the global indices. Before anything is computed the block is
classified from the mask's tile bounds (:func:`salience.kernels.blockwise.classify`: analytic for the named
masks of :mod:`salience.masks`, by evaluation otherwise); a block in which no query sees any key is skipped.
The others are computed by the kernels' public block functions,
:func:`salience.kernels.blockwise.block_forward` and :func:`~salience.kernels.blockwise.block_backward`,
which pick the fastest exact path for the block (torch's fused CPU flash kernel for full blocks and causal
diagonals, interval spans for windows and documents, the tile kernel otherwise).

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
from ..blocks import EMPTY
from ..kernels import blockwise
from ..masks import MaskMod

__all__ = ["Spec", "is_empty", "block_forward", "block_backward", "acc_dtype"]


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


def is_empty(spec: Spec, q0: int, nq: int, k0: int, nk: int, device) -> bool:
    """True when no query of ``[q0, q0+nq)`` sees any key of ``[k0, k0+nk)`` (cached per block)."""
    if spec.mask is None:
        return False
    key = (q0, nq, k0, nk)
    hit = spec.cache.get(key)
    if hit is None:
        bm = blockwise.classify(spec.mask, spec.B, spec.H, nq, nk, q_offset=q0, kv_offset=k0, q_len=spec.L,
                                kv_len=spec.S, device=device)
        hit = spec.cache[key] = not bool((bm.classes != EMPTY).any())
    return hit


def block_forward(spec: Spec, q, k, v, q0: int, k0: int) -> AttentionResult | None:
    """``(out, lse)`` of queries ``q`` (global rows ``q0..``) over keys ``k, v`` (global keys ``k0..``), in the
    accumulation dtype; None when the block is empty. Rows with no visible key: out 0, lse -inf."""
    if is_empty(spec, q0, q.shape[2], k0, k.shape[2], q.device):
        return None
    r = blockwise.block_forward(q, k, v, **spec.kwargs(q0, k0))
    acc = acc_dtype(q.dtype)
    return AttentionResult(r.out.to(acc), r.lse.to(acc))


def block_backward(spec: Spec, q, k, v, out, lse, dout, dlse, q0: int, k0: int):
    """Gradients ``(dq, dk, dv)`` (accumulation dtype) of this block's share of the loss, or None when the
    block is empty.

    Args:
        out: the final output of these query rows over *all* keys (q's dtype), ``(B, H, nq, Dv)``.
        lse: their final logsumexp ``(B, H, nq)`` (-inf for rows that see no key anywhere).
        dout: gradient of the output; dlse: gradient of the logsumexp or None.
    """
    if is_empty(spec, q0, q.shape[2], k0, k.shape[2], q.device):
        return None
    g = blockwise.block_backward(q, k, v, out, lse, dout, dlse=dlse, **spec.kwargs(q0, k0))
    acc = acc_dtype(q.dtype)
    return g.dq.to(acc), g.dk.to(acc), g.dv.to(acc)
