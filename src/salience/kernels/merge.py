"""Merge two partial attention results over disjoint key sets with their logsumexps.

If ``(out1, lse1)`` is attention over key set K1 and ``(out2, lse2)`` over a disjoint set K2, then
``merge`` gives attention over K1 u K2 exactly:

    lse = log(exp(lse1) + exp(lse2)),  out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2.

Rows with no visible key in either part (both lse -inf) give out 0 and lse -inf, never NaN.
The same primitive serves key tiles, split-K work and ring attention.
"""

from __future__ import annotations

import torch

from .._result import AttentionResult

__all__ = ["merge", "with_sinks", "check_sinks"]


def merge(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> AttentionResult:
    """Combine two partial results over disjoint keys.

    Args:
        out1, out2: (B, H, L, Dv) partial outputs (any floating dtype; the result has out1's dtype).
        lse1, lse2: (B, H, L) their logsumexps (-inf where a part saw no key).

    Returns:
        :class:`AttentionResult` ``(out, lse)``; lse in float32 (float64 if either input is float64).

    Example:
        >>> import torch, salience
        >>> q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(3))
        >>> a = salience.attention(q, k[:, :, :2], v[:, :, :2], return_lse=True)
        >>> b = salience.attention(q, k[:, :, 2:], v[:, :, 2:], return_lse=True)
        >>> whole = salience.attention(q, k, v)
        >>> bool(torch.allclose(salience.merge(a.out, a.lse, b.out, b.lse).out, whole))
        True
    """
    if out1.shape != out2.shape:
        raise ValueError(f"out1 and out2 must have one shape; got {tuple(out1.shape)} and {tuple(out2.shape)}.")
    if lse1.shape != out1.shape[:-1] or lse2.shape != out1.shape[:-1]:
        raise ValueError(
            f"lse1/lse2 must have shape {tuple(out1.shape[:-1])} (out without its last dim); "
            f"got {tuple(lse1.shape)} and {tuple(lse2.shape)}."
        )
    acc = torch.float64 if torch.float64 in (lse1.dtype, lse2.dtype, out1.dtype) else torch.float32
    a, b = lse1.to(acc), lse2.to(acc)
    lse = torch.logaddexp(a, b)
    finite = lse != float("-inf")
    safe = torch.where(finite, lse, torch.zeros((), dtype=acc, device=lse.device))
    w1 = torch.where(finite, torch.exp(a - safe), torch.zeros((), dtype=acc, device=lse.device))
    w2 = torch.where(finite, torch.exp(b - safe), torch.zeros((), dtype=acc, device=lse.device))
    out = w1.unsqueeze(-1) * out1.to(acc) + w2.unsqueeze(-1) * out2.to(acc)
    return AttentionResult(out=out.to(out1.dtype), lse=lse)


def check_sinks(sinks, B: int, H: int) -> torch.Tensor:
    """Validate sink logits against (B, H): a floating tensor of shape (H,), (1, H) or (B, H)."""
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        seen = sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise TypeError(f"sinks must be a floating tensor of sink logits, shape (H,) or (B, H); got {seen}.")
    if sinks.dim() not in (1, 2) or sinks.shape[-1] != H or (sinks.dim() == 2 and sinks.shape[0] not in (1, B)):
        raise ValueError(f"sinks must have shape (H,) = ({H},) or (B, H) = ({B}, {H}) (one logit per query head); got "
                         f"{tuple(sinks.shape)}.")
    return sinks


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> AttentionResult:
    """Add attention sinks to a finished result: ``merge`` with a virtual key of value 0 and logit ``sinks``.

    ``sinks`` (H,) or (B, H) are logits in the score domain (after scale and score_mod). The result is what a
    softmax over the real keys plus one sink column gives: ``lse' = log(exp(lse) + exp(sink))`` and
    ``out' = exp(lse - lse') * out``; a row with no visible key (lse -inf) gets out 0 and lse = sink. Gradients
    reach ``out``, ``lse`` and ``sinks``.

    Example:
        >>> import torch, salience
        >>> q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
        >>> r = salience.attention(q, k, v, return_lse=True)
        >>> s = with_sinks(r.out, r.lse, torch.zeros(2, dtype=torch.float64))
        >>> bool(torch.allclose(s.lse, torch.logaddexp(r.lse, torch.zeros(()))))
        True
    """
    B, H = out.shape[:2]
    acc = torch.float64 if torch.float64 in (lse.dtype, out.dtype) else torch.float32
    sk = check_sinks(sinks, B, H).to(acc).reshape(-1, H, 1)  # (1 or B, H, 1) against lse (B, H, L)
    a = lse.to(acc)
    new = torch.logaddexp(a, sk.expand_as(a))
    keep = torch.where(a == float("-inf"), torch.zeros((), dtype=acc, device=a.device), torch.exp(a - new))
    return AttentionResult(out=(keep.unsqueeze(-1) * out.to(acc)).to(out.dtype), lse=new)
