"""Executors: the objects that compute a plan, all with one protocol, and the one autograd Function.

An executor has

* ``forward(q, k, v) -> (out, lse)``: out (B, H, L, Dv) in q's dtype, lse (B, H, L) (float32 for half types);
* ``backward(q, k, v, out, lse, dout, dlse) -> (dq, dk, dv, extra)``, ``extra`` the gradients of
  ``grad_tensors`` (the tensors a score_mod or bias closes over that require grad), in their order;
* ``grad_tensors``: a tuple (empty for most);
* ``autograd``: False when :class:`AttentionFunction` wraps it (saving q, k, v, out and lse only, memory
  O(L * D)); True for executors made of differentiable torch operations (the chunked textbook path, torch SDPA
  without a logsumexp), which autograd differentiates itself;
* ``describe() -> (forward, backward)``: what runs in each direction, in words, for :func:`salience.plan`;
* optionally ``reads_hidden_keys = False`` when the kernel never reads a key outside a row's visible set (then a
  NaN stored there cannot reach the row and the dispatcher skips its non-finite guard).

:func:`run` executes any of them.

Example:
    >>> import torch
    >>> from salience.kernels.executors import SdpaExec, run
    >>> q = torch.randn(1, 2, 8, 4)
    >>> run(SdpaExec(causal=True, scale=0.5), q, q, q).out.shape
    torch.Size([1, 2, 8, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._layout import expand_kv
from .._result import AttentionResult
from ..reference import _acc_dtype, scores, softmax_from_scores
from . import fused, native

__all__ = ["SdpaExec", "KeySliceExec", "TorchSdpaExec", "PlanExec", "TileExec", "DecodeExec", "ReferenceExec", "AttentionFunction", "run"]


class SdpaExec:
    """torch's fused CPU flash kernel (private op, preconditions guarded by :mod:`salience.kernels.fused`), with
    ``is_causal`` and an optional additive bias broadcastable to (B, H, L, S)."""

    grad_tensors = ()
    autograd = False

    def __init__(self, causal: bool, scale: float, bias=None):
        self.causal, self.scale, self.bias = causal, scale, bias

    def describe(self):
        what = "torch's fused CPU flash kernel" + (" (is_causal)" if self.causal else "") + (
            " with an additive mask" if self.bias is not None else "")
        return what, "torch's fused CPU flash backward"

    def forward(self, q, k, v):
        out, lse = fused.forward(q, k, v, scale=self.scale, causal=self.causal, bias=self.bias)
        if self.bias is not None:
            empty = torch.isneginf(self.bias).all(-1)
            lse = lse.masked_fill(empty, float("-inf"))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, dlse):
        dq, dk, dv = fused.backward(dout, q, k, v, out, lse, scale=self.scale, causal=self.causal, bias=self.bias,
                                    dlse=dlse)
        return dq, dk, dv, []


class KeySliceExec:
    """torch's fused CPU flash kernel over the keys ``[a, z)`` only, every row seeing exactly those (a decoding
    step's rows under a bottom-right causal mask or a window): k and v are sliced (views, no copy), no mask is
    built, and no key outside the slice is read, so a NaN stored there cannot reach a row (the dispatcher skips
    its non-finite guard). Keys outside the slice get zero gradients."""

    grad_tensors = ()
    autograd = False
    reads_hidden_keys = False

    def __init__(self, a: int, z: int, scale: float):
        if not 0 <= a < z:
            raise ValueError(f"KeySliceExec: expected 0 <= a < z; got a={a}, z={z}")
        self.a, self.z, self.scale = a, z, scale

    def describe(self):
        return (f"torch's fused CPU flash kernel over keys [{self.a}, {self.z}) (a slice, no mask)",
                "torch's fused CPU flash backward over the same keys")

    def forward(self, q, k, v):
        a, z = self.a, self.z
        return fused.forward(q, k[:, :, a:z], v[:, :, a:z], scale=self.scale)

    def backward(self, q, k, v, out, lse, dout, dlse):
        a, z = self.a, self.z
        dq, dks, dvs = fused.backward(dout, q, k[:, :, a:z], v[:, :, a:z], out, lse, scale=self.scale, dlse=dlse)
        if (a, z) == (0, k.shape[2]):
            return dq, dks, dvs, []
        dk, dv = k.new_zeros(k.shape), v.new_zeros(v.shape)
        dk[:, :, a:z], dv[:, :, a:z] = dks, dvs
        return dq, dk, dv, []


class TorchSdpaExec:
    """``torch.nn.functional.scaled_dot_product_attention`` itself (no logsumexp): dtypes or devices without the
    fused CPU op, and dropout without a mask."""

    grad_tensors = ()
    autograd = True

    def __init__(self, causal: bool, scale: float, dropout_p: float = 0.0):
        self.causal, self.scale, self.dropout_p = causal, scale, dropout_p

    def describe(self):
        return "torch SDPA" + (" with dropout" if self.dropout_p else ""), "autograd through torch SDPA"

    def run(self, q, k, v) -> AttentionResult:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=self.dropout_p,
                                             scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        return AttentionResult(out=out, lse=None)


class PlanExec:
    """A span, Toeplitz-bias or interval plan's forward, and the backward of ``backward_plan`` when given (the
    same problem, another kernel: a strided-bias plan's forward with the compiled interval backward)."""

    grad_tensors = ()
    autograd = False

    def __init__(self, plan, scale: float, backward_plan=None):
        self.plan, self.scale = plan, scale
        self.backward_plan = plan if backward_plan is None else backward_plan

    def describe(self):
        fwd = _plan_words(self.plan)
        bp = self.backward_plan
        if getattr(bp, "uses_native", None) is not None:
            bwd = "the compiled interval backward" if bp.lo is not None and native.status() == "compiled" else (
                "torch's fused backward per call")
        else:
            bwd = _plan_words(bp) + " (backward)"
        return fwd, bwd

    def forward(self, q, k, v):
        return self.plan.forward(q, k, v, self.scale)

    def backward(self, q, k, v, out, lse, dout, dlse):
        return (*self.backward_plan.backward(q, k, v, out, lse, dout, dlse, self.scale), [])


def _plan_words(plan) -> str:
    name = type(plan).__name__
    return {"SpanPlan": "torch's fused kernel over each row run's key interval",
            "BiasPlan": "torch's fused kernel with a strided Toeplitz bias",
            "SegmentPlan": "torch's fused kernel per document/sequence with a strided Toeplitz bias",
            "IntervalPlan": "the compiled interval kernel"}.get(name, name)


class TileExec:
    """The blockwise online-softmax kernel (:class:`salience.kernels.blockwise.TileKernel`)."""

    autograd = False

    def __init__(self, kernel):
        self.kernel = kernel
        self.grad_tensors = tuple(getattr(kernel, "grad_tensors", ()))

    def describe(self):
        return "online softmax over non-empty tiles", "recomputed tiles from the logsumexp"

    def forward(self, q, k, v):
        return self.kernel.forward(q, k, v)

    def backward(self, q, k, v, out, lse, dout, dlse):
        return self.kernel.backward(q, k, v, out, lse, dout, dlse)


class DecodeExec:
    """The compiled decode kernel (:func:`salience.kernels.decode.forward`) over per-row key intervals; forward
    only (decoding needs no backward: the rule never picks it when a gradient is needed). It reads only the keys
    in each row's interval, so a NaN or inf stored elsewhere cannot reach a row: the dispatcher's non-finite guard
    (a pass over the whole cache) is not needed."""

    grad_tensors = ()
    autograd = False
    reads_hidden_keys = False

    def __init__(self, lo, hi, *, scale: float, slopes=None, q_pos=None, softcap=None):
        self.lo, self.hi, self.scale = lo, hi, float(scale)
        if slopes is not None:  # (H,) or (B, H) -> (B, H), as the kernel reads them
            slopes = slopes.reshape(-1, slopes.shape[-1]).expand(lo.shape[0], slopes.shape[-1])
        self.slopes, self.q_pos = slopes, q_pos
        self.softcap = None if softcap is None else float(softcap)

    def describe(self):
        return "the compiled decode kernel over each row's key interval", "none: decoding is forward only"

    def forward(self, q, k, v):
        from . import decode

        # the dispatcher validated q, k, v and the rule made lo, hi (B, L) int64 (decode.forward_checked)
        return decode.forward_checked(q, k, v, self.lo, self.hi, self.scale, self.slopes, self.q_pos, self.softcap)

    def backward(self, q, k, v, out, lse, dout, dlse):
        raise NotImplementedError("the decode path is forward only; the dispatcher does not choose it when a "
                                  "gradient is needed (use backend=None)")


class ReferenceExec:
    """The textbook computation chunked over query rows (autograd differentiates it)."""

    grad_tensors = ()
    autograd = True

    def __init__(self, mask, score_mod, scale, compatibility, dropout_p, chunk: int, bias=None):
        self.mask, self.score_mod, self.scale = mask, score_mod, scale
        self.compatibility, self.dropout_p, self.chunk, self.bias = compatibility, dropout_p, chunk, bias

    def describe(self):
        return f"the textbook computation in chunks of {self.chunk} query rows", "autograd through it"

    def run(self, q, k, v) -> AttentionResult:
        H, L = q.shape[1], q.shape[2]
        ke, ve = expand_kv(k, H), expand_kv(v, H)
        outs, lses = [], []
        for i in range(0, L, self.chunk):
            rows = torch.arange(i, min(i + self.chunk, L), device=q.device)
            kw = {} if self.bias is None else {"bias": self.bias}  # scores() reads the rows it needs
            s = scores(q[:, :, i:i + self.chunk], ke, mask=self.mask, score_mod=self.score_mod, scale=self.scale,
                       compatibility=self.compatibility, rows=rows, L=L, **kw)
            w, lse = softmax_from_scores(s)
            if self.dropout_p > 0:
                w = F.dropout(w, p=self.dropout_p)
            outs.append(w @ ve)
            lses.append(lse)
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
        return AttentionResult(out=out, lse=lse.to(_acc_dtype(q.dtype)))


class AttentionFunction(torch.autograd.Function):
    """``apply(executor, q, k, v, *grad_tensors) -> (out, lse)``; saves q, k, v, out, lse only."""

    @staticmethod
    def forward(ctx, ex, q, k, v, *extras):
        out, lse = ex.forward(q, k, v)
        ctx.ex = ex
        ctx.n_extra = len(extras)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, extra = ctx.ex.backward(q, k, v, out, lse, dout, dlse)
        extra = list(extra) + [None] * (ctx.n_extra - len(extra))
        return (None, dq, dk, dv, *extra)


def run(ex, q, k, v) -> AttentionResult:
    """Execute an executor: ``(out, lse)`` as an :class:`AttentionResult` (lse None for torch SDPA, which does
    not produce it). Under autograd, the executor's own backward runs (through :class:`AttentionFunction`)."""
    if ex.autograd:
        return ex.run(q, k, v)
    extras = list(ex.grad_tensors)
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in extras))
    if not needs_grad:
        with torch.no_grad():
            out, lse = ex.forward(q, k, v)
        return AttentionResult(out=out, lse=lse)
    out, lse = AttentionFunction.apply(ex, q, k, v, *extras)
    return AttentionResult(out=out, lse=lse)
