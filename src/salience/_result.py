"""Return types shared by the functional API and the kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionResult", "ReferenceResult"]


@dataclass
class AttentionResult:
    """Output ``(B, H, L, Dv)`` and logsumexp ``(B, H, L)`` of the scores over the visible keys.

    ``lse`` is float32 for low-precision inputs (float64 for float64) and ``-inf`` for rows with no
    visible key, whose output is 0.
    """

    out: torch.Tensor
    lse: torch.Tensor

    def __iter__(self):  # lets `out, lse = attention(..., return_lse=True)` work; always two values
        return iter((self.out, self.lse))


@dataclass
class ReferenceResult:
    """The reference computation: output (B, H, L, Dv), logsumexp (B, H, L) and weights (B, H, L, S)."""

    out: torch.Tensor
    lse: torch.Tensor
    weights: torch.Tensor
