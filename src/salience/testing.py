"""The relative-error rule used to test every fast path against the float64 reference.

A result computed in dtype T passes when its error against the float64 reference is at most ``k`` times
the error of the reference itself computed in T (k = 2), plus a small absolute floor (needed for float64,
where the reference error is zero):

    max|fast - ref64| <= k * max|ref_T - ref64| + floor * (1 + max(max|ref64|, magnitude))

``magnitude`` (default 0) is the size of the terms the result is computed from, for results that cancel to
(near) zero: a row that sees one key has weight exactly 1 and gradient dq exactly 0, which autograd's softmax
backward reproduces exactly in float32 while FlashAttention-2's ``dS = P (dP - rowsum(dout * out))`` (every fused
kernel, torch SDPA's included) leaves float32 rounding of ``|dout| |v|`` there. Pass
``magnitude = max|dout| * max|v| * max|k| * scale`` for such gradients (see tests/test_edges_precision.py).

Example:
    >>> import torch, salience
    >>> from salience.testing import assert_rel_close
    >>> q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    >>> ref64 = salience.reference.attention(q, k, v).out
    >>> ref32 = salience.reference.attention(q.float(), k.float(), v.float()).out
    >>> assert_rel_close(salience.attention(q.float(), k.float(), v.float()), ref32, ref64)
"""

from __future__ import annotations

import torch

__all__ = ["assert_rel_close", "rel_error_report", "DEFAULT_FLOOR"]

#: absolute floors per dtype (relative to 1 + max|reference|)
DEFAULT_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_error_report(fast: torch.Tensor, ref_t: torch.Tensor, ref64: torch.Tensor, k: float = 2.0, floor=None,
                     magnitude: float = 0.0):
    """``(err_fast, bound)`` for the rule above; NaN anywhere in ``fast`` gives err = inf."""
    if fast.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(fast.shape)} differs from the reference {tuple(ref64.shape)}")
    f64, r64, rt = fast.detach().double(), ref64.detach().double(), ref_t.detach().double()
    inf_same = (f64 == r64) | (torch.isinf(f64) & torch.isinf(r64) & (torch.sign(f64) == torch.sign(r64)))
    diff = torch.where(inf_same, torch.zeros_like(f64), (f64 - r64).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    dref = torch.where((rt == r64) | (torch.isinf(rt) & torch.isinf(r64)), torch.zeros_like(rt), (rt - r64).abs())
    finite_ref = r64[torch.isfinite(r64)]
    scale = 1.0 + max(float(finite_ref.abs().max()) if finite_ref.numel() else 0.0, float(magnitude))
    fl = DEFAULT_FLOOR.get(fast.dtype, 1e-6) if floor is None else floor
    err = float(diff.max()) if diff.numel() else 0.0
    bound = k * (float(dref.max()) if dref.numel() else 0.0) + fl * scale
    return err, bound


def assert_rel_close(fast, ref_t, ref64, k: float = 2.0, floor=None, what: str = "result",
                     magnitude: float = 0.0) -> None:
    """Assert the relative-error rule; the message gives both errors."""
    err, bound = rel_error_report(fast, ref_t, ref64, k, floor, magnitude)
    if not err <= bound:
        raise AssertionError(
            f"{what}: error {err:.3e} against the float64 reference exceeds {bound:.3e} "
            f"({k}x the same-dtype reference error plus floor); dtype {fast.dtype}, shape {tuple(fast.shape)}"
        )
