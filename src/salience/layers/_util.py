"""Helpers shared by the layers: argument checks and masks/score_mods moved to a block's local indices.

A KV cache or a chunked computation calls :func:`salience.attention` on a block of queries
``q0 .. q0 + L - 1`` and keys ``k0 .. k0 + S - 1`` of a larger problem. A mask or score_mod written for the
whole problem (global indices) is turned into one for the block by :func:`shift_mask` and
:func:`shift_score_mod`; a named mask keeps its analytic tile classification (the tiles are shifted too).
"""

from __future__ import annotations

import math

import torch

from ..masks import MaskMod, causal, dense, padding
from ..masks import shift as _shift
from ..scores import ScoreMod, as_score_mod

__all__ = [
    "cache_mask",
    "check_int",
    "check_prob",
    "check_bool",
    "shift_mask",
    "shift_score_mod",
    "is_top_left_causal",
    "lengths_from_padding",
    "check_lengths",
    "with_padding",
]


def check_int(value, argname: str, minimum: int = 1) -> int:
    """An int >= minimum (bools rejected), or a clear TypeError/ValueError naming ``argname``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argname} must be an int >= {minimum}; got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{argname} must be >= {minimum}; got {value}.")
    return value


def check_prob(p, argname: str = "dropout") -> float:
    """A probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{argname} must be a float in [0, 1); got {type(p).__name__}.")
    if math.isnan(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{argname} must be in [0, 1); got {p}. Use 0.0 to disable it.")
    return float(p)


def check_bool(value, argname: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argname} must be a bool; got {type(value).__name__} {value!r}.")
    return value


def is_top_left_causal(mask) -> bool:
    """True when the mask's structure is top-left causal (read from :mod:`salience.structure`, not its name)."""
    from ..structure import is_top_left_causal as causal

    return isinstance(mask, MaskMod) and causal(mask)


def shift_mask(mask, q_offset: int, kv_offset: int, L_total: int, S_total: int) -> MaskMod:
    """The mask of a block whose first query is global row ``q_offset`` and first key global key ``kv_offset``.

    ``mask`` is written for the whole problem of ``L_total`` queries and ``S_total`` keys (so that
    bottom-right alignment refers to the whole problem). The result evaluates ``mask(b, h, q + q_offset,
    kv + kv_offset)`` and shifts the analytic tile bounds (and a band mask's ``band``) alike.

    Example:
        >>> from salience import masks
        >>> m = shift_mask(masks.sliding_window(1), 3, 2, 6, 6)
        >>> m.to_dense(1, 1, 2, 3)[0, 0].int().tolist(), m.bind(2, 3).band
        ([[1, 1, 0], [0, 1, 1]], (0, 1))
    """
    return _shift(mask, q_offset, kv_offset, L_total, S_total)


def shift_score_mod(mod, q_offset: int, kv_offset: int = 0) -> ScoreMod:
    """``mod`` evaluated at global indices ``q + q_offset``, ``kv + kv_offset`` (pointwise mods unchanged)."""
    m = as_score_mod(mod)
    if (q_offset == 0 and kv_offset == 0) or m.pointwise:
        return m

    def fn(score, b, h, q, kv):
        return m(score, b, h, q + q_offset, kv + kv_offset)

    out = ScoreMod(fn, f"{m.name} @ (q+{q_offset}, kv+{kv_offset})", relative=m.relative)
    out._mover = lambda dev: shift_score_mod(m.to(dev), q_offset, kv_offset)
    out._check = m.check  # per-head tables are checked against H as before the shift
    return out


def cache_mask(mask, offset: int, L: int, S: int):
    """The mask for L new queries at global positions ``offset ..`` over S = offset + L cached keys.

    Top-left causal becomes bottom-right causal (a named mask the kernels know); a single decoding step of
    a causal mask sees every key (no mask). Anything else is shifted with :func:`shift_mask`.
    """
    if mask is None or offset == 0:
        return mask
    if is_top_left_causal(mask) and S == offset + L:
        return None if L == 1 else causal(align="bottom_right")
    return shift_mask(mask, offset, 0, offset + L, S)


def lengths_from_padding(key_padding_mask: torch.Tensor, who: str) -> torch.Tensor:
    """Per-row key counts (B,) of a right-padded ``key_padding_mask`` (B, S) (True = padding)."""
    valid = ~key_padding_mask
    lengths = valid.sum(-1)
    S = key_padding_mask.shape[-1]
    expected = torch.arange(S, device=valid.device).view(1, -1) < lengths.view(-1, 1)
    if not bool((expected == valid).all()):
        raise ValueError(
            f"{who} handles right padding only (each row: real keys first, then padding); the key_padding_mask "
            "given has padding before real keys. Reorder the sequence or use exact attention (core=None)."
        )
    return lengths


def check_lengths(lengths, B: int, S: int, argname: str, device=None, who: str = "") -> torch.Tensor:
    """Per-row lengths as an int64 tensor (B,) with values in [0, S], or a clear ValueError naming ``argname``."""
    t = torch.as_tensor(lengths, device=device)
    pre = f"{who}: " if who else ""
    if t.dim() != 1 or t.shape[0] != B or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{pre}{argname} must be B={B} integer lengths (B,); got {t.dtype} {tuple(t.shape)}.")
    if bool(((t < 0) | (t > S)).any()):
        raise ValueError(f"{pre}{argname} must lie in [0, S={S}]; got {t.tolist()}.")
    return t.long()


def with_padding(m, key_padding_mask, key_lengths, B: int, S: int, device):
    """``m & (keys not padded)``: padding given as ``key_padding_mask`` (B, S), True = padding (torch's
    convention), or as ``key_lengths`` (B,); ``m`` unchanged when neither is given."""
    if key_padding_mask is not None and key_lengths is not None:
        raise ValueError("give key_padding_mask or key_lengths, not both.")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            seen = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise TypeError(
                f"key_padding_mask must be a bool tensor (B, S) with True = padding; got {seen}. For an additive "
                "float mask use mask= with a score_mod, or convert: key_padding_mask = float_mask == float('-inf')."
            )
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"key_padding_mask must have shape (B, S) = ({B}, {S}) (True = padding; with a KVCache it covers "
                f"cached and new keys); got {tuple(key_padding_mask.shape)}."
            )
        pm = dense(~key_padding_mask.to(device).view(B, 1, 1, S))
    elif key_lengths is not None:
        pm = padding(kv_lengths=check_lengths(key_lengths, B, S, "key_lengths", device))
    else:
        return m
    return pm if m is None else m & pm
