"""Thin wrappers over torch's fused CPU flash-attention kernels, with their logsumexp.

torch ships a fused online-softmax kernel for the CPU that returns the logsumexp
(``aten::_scaled_dot_product_flash_attention_for_cpu``) and its FlashAttention-2 style backward
(``..._backward``), which recomputes the probabilities from q, k and the logsumexp. Every salience path
that can be expressed as "a query range against a key range, with no mask, a top-left causal mask or an
additive float bias" runs on these two calls. This module adds what salience needs on top:

* different query/key and value head dims (zero-padding to a common width, which is exact);
* an optional gradient of the logsumexp in the backward (the kernel has no input for it; an extra
  value column carries it exactly, see :func:`backward`);
* the bias in a dtype the kernel accepts.

Layout (B, H, L, D) as everywhere; grouped-query heads (``Hkv`` dividing ``H``) are handled by the kernel.

Example:
    >>> import torch
    >>> from salience.kernels import fused
    >>> q = k = v = torch.randn(1, 2, 8, 16)
    >>> out, lse = fused.forward(q, k, v, scale=0.25, causal=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 8, 16]), torch.Size([1, 2, 8]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import _acc_dtype

__all__ = ["available", "forward", "backward", "bias_dtype", "check_operands", "dense_last"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


_OPS: list = []


def _ops():
    if not _OPS:
        aten = torch.ops.aten
        fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
        _OPS.extend((fwd, bwd))
    return _OPS[0], _OPS[1]


def _register_flop_formulas():
    """Let ``torch.utils.flop_counter.FlopCounterMode`` count the CPU flash kernels (torch counts the CUDA
    ones only): computed (not useful) FLOPs, as for torch's other SDPA kernels."""
    try:
        from torch.utils import flop_counter as fc
    except ImportError:  # pragma: no cover
        return
    fwd, bwd = _ops()
    for op, formula in ((fwd, getattr(fc, "sdpa_flop", None)), (bwd, getattr(fc, "sdpa_backward_flop", None))):
        if op is not None and formula is not None and op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)  # formula is already shape-wrapped


_register_flop_formulas()


def available(q: torch.Tensor) -> bool:
    """True when the fused CPU kernels can run on tensors like ``q`` (CPU device, a supported float dtype)."""
    fwd, bwd = _ops()
    return fwd is not None and bwd is not None and q.device.type == "cpu" and q.dtype in _DTYPES


def bias_dtype(q_dtype: torch.dtype, exact_mask: bool) -> torch.dtype:
    """The dtype of an additive bias for the kernel: q's dtype, except float32 for a real-valued bias
    with half-precision inputs (a 0/-inf mask is exact in any dtype)."""
    if q_dtype in (torch.bfloat16, torch.float16) and not exact_mask:
        return torch.float32
    return q_dtype


def _pad_last(t: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
    if t.shape[-1] == width:
        return t
    return F.pad(t, (0, width - t.shape[-1]), value=value)


def dense_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with a unit stride on its last axis (a copy only when it has another stride).

    The private CPU flash kernels read every operand through ``data_ptr`` and the strides of the leading
    axes, but assume ``stride(-1) == 1`` without checking it (the public ``F.scaled_dot_product_attention``
    makes such inputs contiguous first). A ``x[..., ::2]`` slice, keys stored (B, H, D, S) and passed
    transposed, or an expanded last axis would otherwise be read as garbage. Stride-0 (expanded) batch, head
    and length axes are read correctly through their strides and are not copied."""
    if t is None or t.dim() == 0:
        return t
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def check_operands(q, k, v, bias=None):
    """The kernels' preconditions, checked in one place before every call: q, k, v are floating tensors of
    one supported dtype on the CPU, 4-D, with matching batch and grouped heads; a bias is floating or bool
    and broadcastable to (B, H, L, S). Returns q, k, v and bias with unit last-axis strides."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fused kernels take one dtype of {_DTYPES} for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.device.type != "cpu" or k.device != q.device or v.device != q.device:
        raise ValueError(f"fused kernels run on the CPU; got q on {q.device}, k on {k.device}, v on {v.device}.")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fused kernels take 4-D (B, H, L, D) tensors; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}.")
    B, H, L, _ = q.shape
    if k.shape[0] != B or v.shape[0] != B or H % k.shape[1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"fused kernels: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv) with H % Hkv == 0.")
    if bias is not None:
        S = k.shape[2]
        try:
            torch.broadcast_shapes(bias.shape, (B, H, L, S))
        except RuntimeError:
            raise ValueError(f"fused kernels: bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"(B, H, L, S) = {(B, H, L, S)}.") from None
    return dense_last(q), dense_last(k), dense_last(v), dense_last(bias)


def forward(q, k, v, *, scale: float, causal: bool = False, bias: torch.Tensor | None = None):
    """Fused attention over all of k (top-left causal if ``causal``; ``bias`` added to the scaled scores).

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv).
        bias: float tensor broadcastable to (B, H, L, S); -inf hides a key.

    Returns:
        ``(out, lse)``: out (B, H, L, Dv) in q's dtype, lse (B, H, L) float32 (float64 for float64).
        A row whose keys are all hidden by ``bias`` gets out 0 and lse 0 from the kernel; callers that can
        produce such rows set their lse to -inf themselves.
    """
    fwd, _ = _ops()
    q, k, v, bias = check_operands(q, k, v, bias)
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        w = max(D, Dv)
        out, lse = fwd(_pad_last(q, w), _pad_last(k, w), _pad_last(v, w), 0.0, causal, attn_mask=bias, scale=scale)
        return out[..., :Dv], lse
    return fwd(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)


def backward(dout, q, k, v, out, lse, *, scale: float, causal: bool = False, bias=None, dlse=None):
    """Gradients of attention with respect to q, k and v, recomputed from the logsumexp.

    ``out`` and ``lse`` may be the *final* output and logsumexp of a larger computation in which this
    call saw only part of the keys: the gradients are then this part's exact contribution (the
    FlashAttention-2 identity ``dS = P * (dP - rowsum(dout * out))`` with ``P = exp(S - lse)``).
    ``dlse`` (B, H, L), the gradient of the logsumexp, enters as ``rowsum - dlse``: it is carried by one
    extra value column (v padded with 0, dout with 1, out with ``-dlse``), which leaves dP unchanged.

    Rows with lse -inf (no visible key anywhere) must have no visible key here either; they get zero
    gradients.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.
    """
    _, bwd = _ops()
    q, k, v, bias = check_operands(q, k, v, bias)
    D, Dv = q.shape[-1], v.shape[-1]
    lse = dense_last(torch.where(torch.isneginf(lse), torch.zeros((), dtype=lse.dtype), lse))
    if lse.dtype != _acc_dtype(q.dtype):
        lse = lse.float()
    out = dense_last(out.to(q.dtype))
    dout = dense_last(dout.to(q.dtype))
    extra = dlse is not None
    w = max(D, Dv) + (1 if extra else 0)
    if w == D == Dv:
        # the kernel reads out and lse through their strides (and makes dout contiguous itself)
        dq, dk, dv = bwd(dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
        return dq, dk, dv
    qp, kp, vp = _pad_last(q, w), _pad_last(k, w), _pad_last(v, w)
    dop, op_ = _pad_last(dout, w), _pad_last(out, w)
    if extra:
        dop = dop.clone()
        op_ = op_.clone()
        dop[..., w - 1] = 1.0
        op_[..., w - 1] = -dlse.to(q.dtype)
    dq, dk, dv = bwd(dop.contiguous(), qp, kp, vp, op_.contiguous(), lse.contiguous(), 0.0, causal,
                     attn_mask=bias, scale=scale)
    return dq[..., :D], dk[..., :D], dv[..., :Dv]
