"""The one layout of salience, declared once.

Every public tensor argument is laid out as ``(B, H, L, D)``:

* ``B`` batch size,
* ``H`` number of heads (query heads; keys and values may have ``Hkv`` heads with ``H % Hkv == 0``),
* ``L`` query length (``S`` is the key/value length, which may differ),
* ``D`` head dimension of queries and keys (``Dv`` for values, which may differ).

Grouped-query and multi-query attention are expressed by head counts alone: query head ``i`` reads
key/value head ``i // (H // Hkv)``.

Shapes used in docstrings:

* ``q``: ``(B, H, L, D)``
* ``k``: ``(B, Hkv, S, D)``
* ``v``: ``(B, Hkv, S, Dv)``
* output: ``(B, H, L, Dv)``; logsumexp: ``(B, H, L)`` (float32 or float64); weights: ``(B, H, L, S)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUT = "(B, H, L, D)"

__all__ = ["LAYOUT", "Shapes", "check_qkv", "expand_kv", "check_scale", "check_dropout"]


@dataclass(frozen=True)
class Shapes:
    """Sizes read off validated q, k, v."""

    B: int
    H: int
    Hkv: int
    L: int
    S: int
    D: int
    Dv: int

    @property
    def group(self) -> int:
        """How many query heads share one key/value head."""
        return self.H // self.Hkv


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, same_dim: bool = True) -> Shapes:
    """Validate q, k (and v) against the layout; return their sizes or raise a clear error.

    ``same_dim=False`` allows different query and key head dims (for compatibility functions such as
    General or Additive that do not take a plain dot product)."""
    names = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in names:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor laid out {LAYOUT}; got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions {LAYOUT}; got {t.dim()} dimensions with shape "
                f"{tuple(t.shape)}. Add the missing batch/head axes, e.g. {name}.view(1, 1, L, D) or "
                f"{name}.unsqueeze(1) for a single head."
            )
        if not (t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}. Cast it, e.g. {name}.float().")
    for name, t in names[1:]:
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype. "
                f"Cast with {name}.to(q.dtype)."
            )
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; move them to one device with {name}.to(q.device)."
            )
    B, H, L, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch size {Bk} but q has {B} (q {_desc(q)}, k {_desc(k)}); they must match.")
    if Dk != D and same_dim:
        raise ValueError(
            f"k has head dim {Dk} but q has {D} (q {_desc(q)}, k {_desc(k)}); query and key head dims must be "
            "equal for dot-product scores (project them, or use a compatibility function such as General)."
        )
    if L == 0 or S == 0:
        raise ValueError(
            f"empty sequence: q has length L={L} and k has length S={S} (layout {LAYOUT}); both must be >= 1."
        )
    if H == 0 or Hkv == 0:
        raise ValueError(f"head counts must be >= 1; got q heads {H}, k heads {Hkv}.")
    if H % Hkv != 0:
        raise ValueError(
            f"q has {H} heads and k has {Hkv}: the query head count must be a multiple of the key/value head "
            f"count (grouped-query attention uses kv head i // (H // Hkv)). Choose Hkv dividing {H}."
        )
    Dv = D
    if v is not None:
        Bv, Hv, Sv, Dv = v.shape
        if Bv != B:
            raise ValueError(f"v has batch size {Bv} but q has {B}; they must match.")
        if Hv != Hkv or Sv != S:
            raise ValueError(
                f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}: v must have k's heads and length "
                f"(B, Hkv, S, Dv) = ({B}, {Hkv}, {S}, Dv)."
            )
        if Dv == 0:
            raise ValueError("v has head dim 0; it must be >= 1.")
    if D == 0:
        raise ValueError("q and k have head dim 0; it must be >= 1.")
    return Shapes(B, H, Hkv, L, S, D, Dv)


def expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    """Repeat key/value heads so that query head i reads kv head i // (H // Hkv). (B, Hkv, S, D) -> (B, H, S, D)."""
    Hkv = t.shape[1]
    if Hkv == H:
        return t
    return t.repeat_interleave(H // Hkv, dim=1)


def check_scale(scale, D: int) -> float:
    """Return the softmax scale (default 1/sqrt(D)); reject non-finite or non-positive values."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number; got a tensor of shape {tuple(scale.shape)}.")
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive finite float or None; got {type(scale).__name__}.")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"scale must be positive and finite; got {scale}. Use None for the default 1/sqrt(D) = {1 / math.sqrt(D):.4g}."
        )
    return float(scale)


def check_dropout(p) -> float:
    """Reject dropout probabilities outside [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1); got {type(p).__name__}.")
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"dropout_p must be in [0, 1); got {p}. Use 0.0 to disable dropout.")
    return float(p)
