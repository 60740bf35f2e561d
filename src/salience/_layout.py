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
import numbers
from dataclasses import dataclass

import torch

LAYOUT = "(B, H, L, D)"

#: the values of the ``layout=`` keyword of :func:`salience.attention`: heads before length (the default, torch
#: SDPA's and FlexAttention's order) or length before heads (flash-attn's and most projection outputs' order)
LAYOUTS = ("BHLD", "BLHD")

__all__ = ["LAYOUT", "LAYOUTS", "Shapes", "check_layout", "check_qkv", "expand_kv", "check_scale", "check_dropout",
           "layout_hint"]


def check_layout(layout) -> str:
    """Return ``layout`` if it is ``"BHLD"`` or ``"BLHD"``, else raise naming both."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(
            f"layout must be 'BHLD' (q (B, H, L, D), the default) or 'BLHD' (q (B, L, H, D), flash-attn's order); "
            f"got {layout!r}."
        )
    return layout


def layout_hint(layout: str = "BHLD") -> str:
    """The sentence every shape error ends with: which layout was assumed and how to pass the other one."""
    if layout == "BLHD":
        return ("Tensors are read with layout='BLHD': q (B, L, H, D), k (B, S, Hkv, D), v (B, S, Hkv, Dv); "
                "drop layout= for (B, H, L, D).")
    return (f"Tensors are read as {LAYOUT}: q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); for "
            "(B, L, H, D) input (flash-attn's order) pass layout='BLHD'.")


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


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, same_dim: bool = True, *,
              layout: str = "BHLD", broadcast_batch: bool = False, allow_empty: bool = False) -> Shapes:
    """Validate q, k (and v) against the layout; return their sizes or raise a clear error.

    ``same_dim=False`` allows different query and key head dims (for compatibility functions such as
    General or Additive that do not take a plain dot product). ``layout="BLHD"`` reads the tensors as
    (B, L, H, D) (the sizes returned are the same). ``broadcast_batch=True`` accepts k and v with batch size 1
    against a larger query batch (the caller expands them); ``allow_empty=True`` accepts L = 0 and S = 0.
    Every shape error names the layout assumed and the ``layout=`` option."""
    hint = layout_hint(layout)
    blhd = layout == "BLHD"
    order = "(B, L, H, D)" if blhd else LAYOUT
    names = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in names:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor laid out {order}; got {type(t).__name__}. {hint}")
        if t.dim() != 4:
            fix = (f"{name}.view(1, L, 1, D) or {name}.unsqueeze(2) for a single head" if blhd else
                   f"{name}.view(1, 1, L, D) or {name}.unsqueeze(1) for a single head")
            raise ValueError(
                f"{name} must have 4 dimensions {order}; got {t.dim()} dimensions with shape "
                f"{tuple(t.shape)}. Add the missing batch/head axes, e.g. {fix}. {hint}"
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

    def sizes(t):  # (batch, heads, length, dim) whatever the layout
        b, x, y, d = t.shape
        return (b, y, x, d) if blhd else (b, x, y, d)

    B, H, L, D = sizes(q)
    Bk, Hkv, S, Dk = sizes(k)
    bcast = " (or 1, broadcast over the query batch)" if broadcast_batch else ""
    if Bk != B and not (broadcast_batch and Bk == 1):
        raise ValueError(
            f"k has batch size {Bk} but q has {B} (q {_desc(q)}, k {_desc(k)}); they must match{bcast}. {hint}"
        )
    if Dk != D and same_dim:
        raise ValueError(
            f"k has head dim {Dk} but q has {D} (q {_desc(q)}, k {_desc(k)}); query and key head dims must be "
            f"equal for dot-product scores (project them, or use a compatibility function such as General). {hint}"
        )
    if (L == 0 or S == 0) and not allow_empty:
        raise ValueError(
            f"empty sequence: q has length L={L} and k has length S={S} (q {_desc(q)}, k {_desc(k)}); both must be "
            f">= 1. {hint}"
        )
    if H == 0 or Hkv == 0:
        raise ValueError(f"head counts must be >= 1; got q heads {H}, k heads {Hkv} (q {_desc(q)}, k {_desc(k)}). {hint}")
    if H % Hkv != 0:
        raise ValueError(
            f"q has {H} heads and k has {Hkv} (q {_desc(q)}, k {_desc(k)}): the query head count must be a multiple "
            f"of the key/value head count (grouped-query attention uses kv head i // (H // Hkv)). Choose Hkv "
            f"dividing {H}. {hint}"
        )
    Dv = D
    if v is not None:
        Bv, Hv, Sv, Dv = sizes(v)
        if Bv != B and not (broadcast_batch and Bv == 1):
            raise ValueError(f"v has batch size {Bv} but q has {B} (q {_desc(q)}, v {_desc(v)}); they must match{bcast}. {hint}")
        if Hv != Hkv or Sv != S:
            want = f"(B, S, Hkv, Dv) = ({B}, {S}, {Hkv}, Dv)" if blhd else f"(B, Hkv, S, Dv) = ({B}, {Hkv}, {S}, Dv)"
            raise ValueError(
                f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}: v must have k's heads and length "
                f"{want}. {hint}"
            )
        if Dv == 0:
            raise ValueError(f"v has head dim 0 (v {_desc(v)}); it must be >= 1. {hint}")
    if D == 0:
        raise ValueError(f"q and k have head dim 0 (q {_desc(q)}); it must be >= 1. {hint}")
    return Shapes(B, H, Hkv, L, S, D, Dv)


def expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    """Repeat key/value heads so that query head i reads kv head i // (H // Hkv). (B, Hkv, S, D) -> (B, H, S, D)."""
    Hkv = t.shape[1]
    if Hkv == H:
        return t
    return t.repeat_interleave(H // Hkv, dim=1)


def _real(x):
    """x as a Python float when it is a real number (Python, NumPy scalar or 0-d array), else None."""
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if type(x).__module__ == "numpy" and getattr(x, "shape", None) == () and getattr(x, "dtype", None) is not None \
            and x.dtype.kind in "fiu":
        return float(x)
    return None


def check_scale(scale, D: int) -> float:
    """Return the softmax scale (default 1/sqrt(D)); reject non-finite or non-positive values.

    Accepts a Python or NumPy real number, a NumPy 0-d array or a one-element tensor (read as a float here;
    :func:`salience.attention` keeps a tensor scale that requires grad in the autograd graph)."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number; got a tensor of shape {tuple(scale.shape)}.")
        if scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(f"scale must be a positive finite real number or None; got a {scale.dtype} tensor.")
        scale = float(scale.detach())
    value = _real(scale)
    if value is None:
        raise TypeError(
            f"scale must be a positive finite real number (float, int, NumPy scalar, 0-d array or one-element "
            f"tensor) or None; got {type(scale).__name__}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"scale must be positive and finite; got {value}. Use None for the default 1/sqrt(D) = {1 / math.sqrt(D):.4g}."
        )
    return value


def check_dropout(p) -> float:
    """Reject dropout probabilities outside [0, 1) (Python or NumPy real numbers)."""
    value = _real(p)
    if value is None:
        raise TypeError(f"dropout_p must be a float in [0, 1); got {type(p).__name__}.")
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"dropout_p must be in [0, 1); got {p}. Use 0.0 to disable dropout.")
    return value
