"""salience attention as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see it.

Eager calls never come here: :func:`salience.attention` calls :func:`salience.kernels.dispatch.attend` directly.
While torch compiles or exports (``torch.compiler.is_compiling()``), it calls :func:`attend` instead, which puts
two custom ops into the graph:

* ``salience::attention(q, k, v, mask, bias, extras, spec) -> (out, lse)``: out (B, H, L, Dv) in q's dtype, lse
  (B, H, L) in the accumulation dtype (float64 for float64 inputs, float32 otherwise: ``reference._acc_dtype``).
  Its real implementation is ``dispatch.attend`` (plan + run, with the non-finite guard): the eager path.
* ``salience::attention_backward(dout, dlse, q, k, v, out, lse, mask, bias, bias_grad, extras, spec)`` ->
  ``[dq, dk, dv, *dextras, (dbias)]``: the backward of the plan eager training would choose (recomputing from
  the saved q, k, v, out and lse); where eager has none (the chunked reference path, which autograd
  differentiates; the guarded path for NaN/inf keys; an executor without dbias) it differentiates the forward.

Both have fake implementations (shapes and dtypes, layouts that depend on shapes only), and the forward's
autograd registration saves q, k, v, out, lse (plus mask, bias, extras) and calls the backward op.

Decoding has two ops of its own (forward only; see the "decoding" section below): ``salience::decode_forward``
(the decode kernel, pure) and ``salience::kvcache_append`` (the in-place cache write, ``mutates_args`` = the
caches), used by ``salience.attention_with_kvcache`` and by :func:`attend` where eager dispatch would choose the
``decode`` rule.

**What enters the ops, and how.** Tensors that may change from call to call are op inputs: q, k, v, a bool
``mask`` tensor, the ``bias`` tensor, and ``extras``, the tensors requiring grad that a score_mod or compatibility
closes over (``dispatch.grad_tensors``: a T5 bias table, learned ALiBi slopes), so AOT autograd routes their
gradients. Python objects (a salience mask, a user callable, a score_mod, the float scale, the backend) enter as
``spec``, an ``int`` key into a process-local registry of :class:`Spec`. :func:`spec_key` computes it once per
trace (``torch.compiler.assume_constant_result``: dynamo runs it on the real objects, runs the eager checks,
guards on the objects' identity and bakes the int into the graph).

We chose a key over ``torch._library.opaque_object.register_opaque_type``: masks are arbitrary callables (user
lambdas, closures over tensors) that have neither the ``__eq__``, ``__hash__`` and ``__fx_repr__`` a *value*
opaque type needs (to guard on and to print into the FX code), nor a rebuild recipe a *reference* opaque type
would need after serialisation; the opaque-object API is private (``torch._library``) and still changing,
while an ``int`` works in every torch with ``custom_op`` and every backend (aot_eager, inductor, export). The
cost, the same in both designs: a graph or ``ExportedProgram`` refers to mask objects living in this process.

Example:
    >>> import torch, salience
    >>> from salience.kernels import ops
    >>> causal = salience.masks.causal()  # under torch.compile: built once, outside the compiled function
    >>> q = torch.randn(1, 2, 8, 4)
    >>> key = ops.spec_key(causal, None, 0.5, None, None)  # what a trace does once
    >>> out, lse = torch.ops.salience.attention(q, q, q, None, None, [], key)  # q, k, v, mask, bias, extras, spec
    >>> torch.allclose(out, salience.attention(q, q, q, mask=causal, scale=0.5)), lse.shape
    (True, torch.Size([1, 2, 8]))
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._result import AttentionResult
from ..reference import _acc_dtype
from . import dispatch

__all__ = ["FALLBACK", "Spec", "attend", "compiled", "fold_scale", "spec_key", "spec_tensors", "lookup", "DecodeRoute",
           "decode_route_key", "decode_route_of", "band_intervals"]


@dataclass(eq=False)
class Spec:
    """What a compiled call computes besides q, k and v: the validated ``mask`` (a MaskMod or None), ``score_mod``
    (a ScoreMod or None), float ``scale``, ``compatibility`` (None after dot products are folded), ``backend``
    and ``extras``: the tensors requiring grad that the score_mod or compatibility reads (op inputs)."""

    mask: object
    score_mod: object
    scale: object
    compatibility: object
    backend: str | None
    extras: tuple
    user: tuple = ()


_SPECS: dict[int, Spec] = {}
_KEYS: dict[tuple, int] = {}
_LOCK = threading.Lock()


def _trainable(score_mod, compatibility) -> tuple:
    found = list(dispatch.grad_tensors(score_mod)) if score_mod is not None else []
    if compatibility is not None:
        for t in dispatch.grad_tensors(compatibility) + dispatch.grad_tensors(getattr(compatibility, "__dict__", {})):
            if all(t is not f for f in found):
                found.append(t)
    return tuple(found)


def _complete(score_mod, extras, H: int) -> bool:
    from . import problem

    complete = getattr(problem, "grads_complete", None) or getattr(dispatch, "_grads_complete", None)
    return score_mod is None or complete is None or complete(score_mod, list(extras), H, torch.device("cpu"))


#: why a call cannot take the custom op (negative keys): it graph-breaks around the eager path instead, as salience
#: did before this module (so ``fullgraph=True`` raises with this reason, and plain ``torch.compile`` still works)
FALLBACK = {
    -1: "salience.attention: the mask or score_mod was built inside the compiled function (for example "
        "masks.causal() or a & b in forward); salience hands masks to its custom op by identity, so build them "
        "once outside (in __init__, or pass them in) and reuse the objects",
    -2: "salience.attention: a compatibility function with a tensor scale that requires grad is wrapped inside "
        "the trace; pass a float scale or fold it into the compatibility's parameters",
    -3: "salience.attention: dropout_p > 0 inside torch.compile: the kernels draw the dropout mask, and its seed "
        "is not threaded through the custom op yet (the backward must replay it); compile with dropout_p=0 "
        "(model.eval() for layers)",
    -4: "salience.attention: the score_mod depends on tensors requiring grad that salience cannot find, so the "
        "custom op could not give them gradients; expose them as attributes of a salience.scores.ScoreMod "
        "(e.g. .table)",
}


def _built_in_trace(obj) -> bool:
    """True for a salience mask/score_mod object that dynamo created inside the traced function: it reaches a
    constant-result function as an empty shell (its attributes live only in the trace)."""
    from ..masks import MaskMod
    from ..scores import ScoreMod

    return isinstance(obj, (MaskMod, ScoreMod)) and "fn" not in vars(obj)


def _register(mask, score_mod, scale, compatibility, backend) -> int:
    from ..masks import as_mask_mod
    from ..scores import as_score_mod

    if _built_in_trace(mask) or _built_in_trace(score_mod):
        return -1
    if compatibility is not None and "_modules" not in vars(compatibility):
        return -2
    from .._blockmask import resolve

    # the conversions functional._prepare makes, on the real objects (its shape checks ran in the trace, where the
    # sizes may be symbolic: nothing here depends on them, so one graph serves every length)
    m = None if mask is None else as_mask_mod(resolve(mask))
    sm = None if score_mod is None else as_score_mod(score_mod)
    ident = (id(mask), id(score_mod), scale, id(compatibility), backend)
    with _LOCK:
        key = _KEYS.get(ident)
        if key is not None:
            return key
        extras = _trainable(sm, compatibility)
        if not _complete(sm, extras, 1):
            return -4
        key = len(_SPECS)
        # the Spec holds the user's objects, so the ids in ``ident`` stay theirs for the life of the process
        _SPECS[key] = Spec(m, sm, scale, compatibility, backend, extras, (mask, score_mod))
        _KEYS[ident] = key
        return key


@torch.compiler.assume_constant_result
def spec_key(mask, score_mod, scale, compatibility, backend) -> int:
    """The registry key of this call's :class:`Spec` (the same objects give the same key), after the eager
    mask/score_mod conversions on the user's objects (``as_mask_mod``, ``as_score_mod``); a negative key (see
    :data:`FALLBACK`) when the call cannot take the custom op.

    Run at trace time with the real objects (dynamo guards on their identity, so a new mask object recompiles).
    The registry lives in this process: an ``ExportedProgram`` with salience ops runs here, not after
    ``torch.export.save``/``load`` in another process (the mask objects are not serialised)."""
    return _register(mask, score_mod, scale, compatibility, backend)


@torch.compiler.assume_constant_result
def spec_tensors(key: int) -> tuple:
    """The trainable tensors of spec ``key`` (graph inputs of the op, so they get gradients)."""
    return lookup(key).extras


def lookup(key: int) -> Spec:
    """The :class:`Spec` registered under ``key``."""
    try:
        return _SPECS[key]
    except KeyError:
        raise RuntimeError(f"salience spec {key} is not registered in this process: a graph or exported program "
                           "holding salience attention runs only in the process that traced it.") from None


def fold_scale(q: torch.Tensor, scale: torch.Tensor, compatibility) -> tuple:
    """``(q * scale, 1.0)`` for a one-element tensor ``scale`` while torch compiles: reading its value (as eager
    :func:`salience._layout.check_scale` does) would be a data-dependent ``.item()`` that breaks the graph. Its
    size and dtype are checked here; that it is positive and finite is checked when the graph runs
    (``torch._assert_async``: a RuntimeError naming the argument)."""
    if scale.numel() != 1:
        raise ValueError(f"scale must be a single number; got a tensor of shape {tuple(scale.shape)}.")
    if scale.is_complex() or scale.dtype == torch.bool:
        raise TypeError(f"scale must be a positive finite real number or None; got a {scale.dtype} tensor.")
    if compatibility is not None:  # eager multiplies the compatibility's scores: left to it (a graph break)
        return q, scale
    s = scale.reshape(())
    torch._assert_async((s > 0) & torch.isfinite(s), "salience.attention: scale must be positive and finite")
    return q * s.to(q.dtype), 1.0


# --------------------------------------------------------------------------------------------- the ops


def _mask(mask: torch.Tensor | None, q, k, spec: Spec):
    """The spec's mask, or a bool mask tensor (an op input, read when the graph runs) as eager reads it."""
    if mask is None:
        return spec.mask
    from ..reference import check_mods

    return check_mods(mask, None, q.shape[0], q.shape[1], q.shape[2], k.shape[2])[0]


def _run_forward(q, k, v, mask, bias, spec: Spec):
    kw = {} if bias is None else {"bias": bias}
    _, res = dispatch.attend(q, k, v, mask=_mask(mask, q, k, spec), score_mod=spec.score_mod, scale=spec.scale,
                             compatibility=spec.compatibility, dropout_p=0.0, need_lse=True, backend=spec.backend,
                             **kw)
    return res


def _out_like(q, v):
    """The layout of the output: contiguous (B, H, L, Dv), from the shapes only (inductor asserts an op's output
    strides against the fake's; the kernels write various layouts, copied into this one when they differ)."""
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1]))


def _lse_like(q):
    return q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))


def _into(t: torch.Tensor, like: torch.Tensor, inputs) -> torch.Tensor:
    """``t`` with the strides of ``like`` (what the fake implementation promised) and sharing no memory with
    ``inputs`` (a custom op's outputs may not alias its inputs); a copy only when it is needed."""
    if t.stride() == like.stride() and t.dtype == like.dtype and not any(
            x is not None and t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs):
        return t
    return like.copy_(t)


@torch.library.custom_op("salience::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               bias: torch.Tensor | None, extras: list[torch.Tensor], spec: int) -> tuple[torch.Tensor, torch.Tensor]:
    res = _run_forward(q, k, v, mask, bias, lookup(spec))
    ins = (q, k, v, mask, bias, *extras)
    return _into(res.out, _out_like(q, v), ins), _into(res.lse, _lse_like(q), ins)


@_attention.register_fake
def _attention_fake(q, k, v, mask, bias, extras, spec):
    return _out_like(q, v), _lse_like(q)


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.sum(dtype=_acc_dtype(t.dtype))))


def _executor_grads(q, k, v, out, lse, dout, dlse, mask, bias, bias_grad: bool, spec: Spec):
    """``(dq, dk, dv, {id(tensor) or "bias": grad})`` from the plan's own backward, or None where eager would not
    run one (the reference path, which autograd differentiates, and the guarded path for NaN/inf keys)."""
    from . import fused

    m = _mask(mask, q, k, spec)
    if m is not None and not (_all_finite(k) and _all_finite(v)):
        return None
    qd, kd, vd = fused.dense_last(q), fused.dense_last(k), fused.dense_last(v)
    with _autograd_on(), torch.enable_grad():  # the plan eager training would choose (grads wanted)
        b = None if bias is None else bias.detach().requires_grad_(bias_grad)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (qd, kd, vd))
        pl = dispatch.choose(qg, kg, vg, mask=m, score_mod=spec.score_mod, compatibility=spec.compatibility,
                             need_lse=True, backend=spec.backend, scale=spec.scale, dropout_p=0.0,
                             **({} if b is None else {"bias": b}))
        ex = pl.executor
        if ex is None or getattr(ex, "autograd", False) or not hasattr(ex, "backward"):
            return None
        # executors differentiate a score_mod's tensors with autograd inside their backward
        dq, dk, dv, extra = ex.backward(qd, kd, vd, out.to(q.dtype), lse, dout.contiguous(), dlse)
    owners = getattr(ex, "grad_tensors", None) or getattr(getattr(ex, "kernel", None), "grad_tensors", ())
    by_id = {id(t): g for t, g in zip(owners, extra)}
    if bias_grad:
        if by_id.get(id(b)) is None:
            return None  # this executor does not give dbias: differentiate the forward instead
        by_id["bias"] = by_id[id(b)]
    return dq, dk, dv, by_id


def _autograd_on():
    """Autograd inside a custom op's implementation, which runs below the autograd dispatch keys."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _recompute_grads(q, k, v, dout, dlse, mask, bias, spec: Spec):
    """Gradients by differentiating the eager forward: what eager autograd does on the reference and guarded
    paths, and the route for a bias that needs a gradient."""
    with _autograd_on(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        br = None if bias is None else bias.detach().requires_grad_(True)
        res = _run_forward(*leaves, mask, br, spec)
        outs, gouts = [res.out], [dout]
        if dlse is not None:
            outs.append(res.lse)
            gouts.append(dlse.to(res.lse.dtype))
        ins = leaves + ([] if br is None else [br]) + list(spec.extras)
        grads = list(torch.autograd.grad(outs, ins, gouts, allow_unused=True))
    by_id = {id(t): g for t, g in zip(spec.extras, grads[len(ins) - len(spec.extras):])}
    if br is not None:
        by_id["bias"] = grads[3]
    return grads[0], grads[1], grads[2], by_id


@torch.library.custom_op("salience::attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                        bias: torch.Tensor | None, bias_grad: bool, extras: list[torch.Tensor],
                        spec: int) -> list[torch.Tensor]:
    sp = lookup(spec)
    if dlse is not None and not bool(dlse.any()):
        dlse = None  # AOT autograd passes zeros for an lse nobody used: the kernels' cheaper backward without it
    got = _executor_grads(q, k, v, out, lse, dout, dlse, mask, bias, bias_grad, sp)
    if got is None:
        got = _recompute_grads(q, k, v, dout, dlse, mask, bias, sp)
    dq, dk, dv, by_id = got
    grads = [dq, dk, dv] + [by_id.get(id(real)) for real in sp.extras[:len(extras)]]
    ins = [q, k, v, *extras]
    if bias_grad:
        grads.append(by_id.get("bias"))
        ins.append(bias)
    # contiguous gradients, as the fake below promises (layouts that depend on shapes only, never on the input
    # strides, which inductor may choose differently from eager)
    everything = (dout, dlse, q, k, v, out, lse, mask, bias, *extras)
    return [t.new_zeros(t.shape) if g is None else _into(g, t.new_empty(t.shape), everything) for g, t in zip(grads, ins)]


@_attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, mask, bias, bias_grad, extras, spec):
    return [t.new_empty(t.shape) for t in (q, k, v, *extras, *([bias] if bias_grad else []))]


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, extras, spec = inputs
    out, lse = output
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]
    ctx.opt = (mask is not None, bias is not None)
    ctx.save_for_backward(q, k, v, out, lse, *[t for t in (mask, bias) if t is not None], *extras)
    ctx.spec = spec


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    mask = rest.pop(0) if ctx.opt[0] else None
    bias = rest.pop(0) if ctx.opt[1] else None
    if dout is None:
        dout = torch.zeros_like(out)
    g = torch.ops.salience.attention_backward(dout, dlse, q, k, v, out, lse, mask, bias, ctx.bias_grad, rest,
                                              ctx.spec)
    n = 3 + len(rest)
    return g[0], g[1], g[2], None, (g[n] if ctx.bias_grad else None), list(g[3:n]), None


_attention.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- the entry


def compiled(mask, score_mod):
    """The ``attend`` :func:`salience.attention` calls while torch compiles: :func:`attend` bound to the user's
    own ``mask`` and ``score_mod`` objects (the validated copies made inside the trace are not real objects)."""

    def bound(q, k, v, **kw):
        return attend(q, k, v, user_mask=mask, user_score_mod=score_mod, **kw)

    return bound


def attend(q, k, v, *, mask, score_mod, scale, compatibility, dropout_p, need_lse, backend, bias=None,
           user_mask=None, user_score_mod=None) -> tuple:
    """Drop-in for :func:`salience.kernels.dispatch.attend` while torch compiles: ``(plan, result)`` through the
    ``salience::attention`` custom op; ``user_mask``/``user_score_mod`` are the objects given to
    :func:`salience.attention` (``mask``/``score_mod`` are their validated forms). The plan is a placeholder: the
    real one is chosen when the op runs."""
    # a bool mask tensor is an op input (a graph input may hold other values next call); other masks go by key
    mask_t = user_mask if isinstance(user_mask, torch.Tensor) else None
    if mask_t is None and bias is None and dropout_p == 0 and compatibility is None and backend in (None, "decode"):
        got = _decode_attend(q, k, v, scale, user_mask, user_score_mod)
        if got is not None:
            return got
    key = -3 if dropout_p > 0 else spec_key(None if mask_t is not None else user_mask, user_score_mod, scale,
                                            compatibility, backend)
    if key < 0:  # the eager path behind a graph break, with the reason (fullgraph=True raises it)
        torch._dynamo.graph_break(msg=FALLBACK[key])
        return dispatch.attend(q, k, v, mask=mask, score_mod=score_mod, scale=scale, compatibility=compatibility,
                               dropout_p=dropout_p, need_lse=need_lse, backend=backend,
                               **({} if bias is None else {"bias": bias}))
    extras = list(spec_tensors(key))
    out, lse = torch.ops.salience.attention(q, k, v, mask_t, bias, extras, key)
    pl = dispatch.Plan("compiled", "torch.library custom op salience::attention: the path is chosen when it runs",
                       {"spec": key})
    return pl, AttentionResult(out=out, lse=lse)


# --------------------------------------------------------------------------------------------- decoding
#
# Decoding under torch.compile / torch.export takes the decode kernel through two ops of its own instead of the
# generic salience::attention op (whose implementation would plan the call again at every step):
#
# * ``salience::decode_forward(q, k, v, lo, hi, block_table, slopes, q_pos, sinks, scale, softcap) -> (out, lse)``:
#   pure; its implementation is :func:`salience.kernels.decode.forward` with every argument check;
# * ``salience::kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table) -> ()``: writes the new keys and
#   values in place (``mutates_args`` = the two caches), after the checks of ``attention_with_kvcache`` on the
#   values of the lengths and of the block table (no slot outside the cache, no two writes into one slot).
#
# The row intervals [lo, hi) are computed in the graph from the cache lengths (tensors: new lengths do not
# recompile); which masks and score_mods take this route is decided once per (mask, score_mod) object pair at trace
# time (:func:`decode_route`), like :func:`spec_key`.


# Registered with torch.library.Library (schema, one CompositeExplicitAutograd kernel, a fake) rather than
# torch.library.custom_op: custom_op's Python layers (autograd wrapper, defaults, redispatch) cost about 65 us per
# call here, as much as the kernel on a small cache; this costs about 5. Neither op has a backward (decoding is
# forward only; callers never pass tensors that require grad: decode.forward refuses them).
_DECODE_LIB = torch.library.Library("salience", "FRAGMENT")
_DECODE_LIB.define("decode_forward(Tensor q, Tensor k, Tensor v, Tensor lo, Tensor hi, Tensor? block_table, "
                   "Tensor? slopes, Tensor? q_pos, Tensor? sinks, float scale, float? softcap) -> (Tensor, Tensor)")
_DECODE_LIB.define("kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens, "
                   "Tensor? block_table) -> ()")


def _decode_forward(q, k, v, lo, hi, block_table, slopes, q_pos, sinks, scale, softcap):
    from . import decode

    out, lse = decode.forward(q, k, v, lo=lo, hi=hi, scale=scale, block_table=block_table, slopes=slopes,
                              q_pos=q_pos, softcap=softcap, sinks=sinks)
    # decode.forward allocates both results (they never alias an input) contiguous, as the fake promises
    return out.contiguous(), lse.contiguous()


def _decode_forward_fake(q, k, v, lo, hi, block_table, slopes, q_pos, sinks, scale, softcap):
    from . import decode

    decode._check(q, k, v, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks)  # shapes and dtypes
    return _out_like(q, v), _lse_like(q)


def _kvcache_append_fake(k_cache, v_cache, k, v, cache_seqlens, block_table):
    return None


_DECODE_LIB.impl("decode_forward", _decode_forward, "CompositeExplicitAutograd")
torch.library.register_fake("salience::decode_forward", _decode_forward_fake, lib=_DECODE_LIB)
torch.library.register_fake("salience::kvcache_append", _kvcache_append_fake, lib=_DECODE_LIB)


def implement_kvcache_append(fn) -> None:
    """Register ``fn(k_cache, v_cache, k, v, cache_seqlens, block_table)`` (``salience.kvcache.append_checked``,
    which registers itself when salience.kvcache is imported: this module does not import it) as the
    implementation of ``salience::kvcache_append``."""
    _DECODE_LIB.impl("kvcache_append", fn, "CompositeExplicitAutograd")


class DecodeRoute(NamedTuple):
    """How the decode kernel takes a (mask, score_mod) pair: the band ``lo_d <= kv - q - shift <= hi_d`` (None:
    unbounded; ``bottom_right``: shift = S - L), and the score_mod as the kernel takes it (a factor on the scale,
    a softcap, ALiBi ``slopes`` with the query positions offset by ``offset``)."""

    lo_d: int | None
    hi_d: int | None
    bottom_right: bool
    scale_mult: float
    softcap: float | None
    offset: int
    slopes: torch.Tensor | None


_ROUTE_KEYS: dict[tuple, int] = {}
_ROUTES: list = []  # (DecodeRoute, (mask, score_mod)): the objects kept alive so that their ids stay theirs


def _decode_route(mask, score_mod):
    from .decode import band_of, kernel_mods

    if _built_in_trace(mask) or _built_in_trace(score_mod):
        return None
    if mask is None:
        band = (None, None, False)
    elif isinstance(mask, torch.Tensor) or not callable(mask):
        return None
    else:
        from .._blockmask import resolve
        from ..masks import as_mask_mod

        band = band_of(as_mask_mod(resolve(mask), "mask"))
    if band is None:
        return None
    if score_mod is None:
        mods = {"scale_mult": 1.0, "softcap": None, "slopes": None, "offset": 0}
    else:
        from ..scores import as_score_mod

        mods, _ = kernel_mods(as_score_mod(score_mod))
    if mods is None or (mods["slopes"] is not None and mods["slopes"].requires_grad):
        return None
    slopes = None if mods["slopes"] is None else mods["slopes"].detach().float().contiguous()
    return DecodeRoute(band[0], band[1], bool(band[2]), float(mods["scale_mult"]), mods["softcap"],
                       int(mods["offset"]), slopes)


@torch.compiler.assume_constant_result
def decode_route_key(mask, score_mod) -> int:
    """A key for :func:`decode_route_of` when the decode kernel takes ``mask`` and ``score_mod`` as they are
    (no mask or a band mask: causal, sliding windows, either alignment; no score_mod, temperatures, one softcap or
    one per-head ALiBi with constant slopes), else -1. Run at trace time on the real objects (dynamo guards on
    their identity, so the same objects give the same key without being looked at again)."""
    ident = (id(mask), id(score_mod))
    with _LOCK:
        key = _ROUTE_KEYS.get(ident)
        if key is None:
            route = _decode_route(mask, score_mod)
            key = -1
            if route is not None:
                key = len(_ROUTES)
                _ROUTES.append((route, (mask, score_mod)))
            _ROUTE_KEYS[ident] = key
            if key < 0:
                _ROUTES.append((None, (mask, score_mod)))  # keeps the objects (and so the ident) alive
        return key


@torch.compiler.assume_constant_result
def _route_consts(key: int) -> tuple:
    r = _ROUTES[key][0]
    return (r.lo_d, r.hi_d, r.bottom_right, r.scale_mult, r.softcap, r.offset, r.slopes is not None)


@torch.compiler.assume_constant_result
def _route_slopes(key: int) -> torch.Tensor:
    return _ROUTES[key][0].slopes


def decode_route_of(key: int) -> DecodeRoute:
    """The :class:`DecodeRoute` of a key from :func:`decode_route_key` (trace-time constants)."""
    *consts, has_slopes = _route_consts(key)
    return DecodeRoute(*consts, _route_slopes(key) if has_slopes else None)


def _known(cond) -> bool:
    """True when ``cond`` (a bool, or a condition on symbolic sizes) holds for every size the graph serves, without
    adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(cond)


@torch.compiler.assume_constant_result
def _decode_settings() -> tuple:
    """``(decode_max_rows, decode_min_keys, kernel built and not FORCE_TORCH)`` at trace time (the configuration
    is a context variable, which dynamo does not trace; a graph keeps the values it was traced with)."""
    from . import decode
    from .config import current

    c = current()
    return c.decode_max_rows, c.decode_min_keys, decode.available()


def _decode_attend(q, k, v, scale, mask, score_mod):
    """``(plan, result)`` through ``salience::decode_forward`` where eager dispatch would choose the ``decode`` rule
    (a few query rows against many keys, no gradient, a band mask, kernel score_mods, one dtype, the compiled
    kernel available), else None. The thresholds are read from the configuration in force at trace time."""
    from . import decode

    B, H, L, _ = q.shape
    S = k.shape[2]
    max_rows, min_keys, ready = _decode_settings()
    # sizes may be symbolic (dynamic shapes, export with a Dim): decide only what is known without adding a guard
    # on them (a guard like L <= 16 would narrow the shapes the graph serves); else the generic op decides per call
    if not ready or not isinstance(scale, (int, float)) or not _known(L <= max_rows) or not _known(S >= min_keys) or \
            k.dtype != q.dtype or \
            v.dtype != q.dtype or q.device.type != "cpu" or q.dtype not in decode._KERNEL_DTYPES or \
            (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return None
    key = decode_route_key(mask, score_mod)
    if key < 0:
        return None
    route = decode_route_of(key)
    lo, hi = band_intervals(route, torch.full((B,), S, dtype=torch.long, device=q.device), L)
    q_pos = None
    if route.slopes is not None:
        q_pos = (torch.arange(L, device=q.device) + route.offset).view(1, -1).expand(B, L).contiguous()
    out, lse = torch.ops.salience.decode_forward(q, k, v, lo, hi, None, route.slopes, q_pos, None,
                                                 float(scale) * route.scale_mult, route.softcap)
    pl = dispatch.Plan("decode", "torch.library custom op salience::decode_forward: a few query rows against a "
                       "long key/value cache, no gradient", {"spec": key})
    return pl, AttentionResult(out=out, lse=lse)


def band_intervals(route: DecodeRoute, total: torch.Tensor, L: int) -> tuple:
    """``(lo, hi)`` (B, L) int64: the keys ``[lo, hi)`` each query row of each sequence sees under the route's band,
    sequence b holding ``total[b]`` keys (tensor ops only: no host read, so they trace into a graph). Empty rows
    get (0, 0).

    Example:
        >>> import salience
        >>> route = decode_route_of(decode_route_key(salience.masks.sliding_window(2, align="bottom_right"), None))
        >>> lo, hi = band_intervals(route, torch.tensor([10, 1]), 1)
        >>> lo.tolist(), hi.tolist()
        ([[7], [0]], [[10], [1]])
    """
    from .decode import band_intervals as on_band

    return on_band((route.lo_d, route.hi_d, route.bottom_right), total, L)
