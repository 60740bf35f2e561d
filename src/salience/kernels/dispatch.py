"""Choose the compute path for one attention call, and run it with a memory-light backward.

Backends (all exact; each returns the output and the logsumexp):

* ``"sdpa"``: torch's fused CPU flash kernel, for no mask and top-left causal with no score_mod (causal goes
  through ``is_causal``; no mask tensor is built). Forced with a mask, it materialises the equivalent dense
  mask, like calling torch SDPA with a boolean mask (useful as a baseline).
* ``"spans"``: masks whose visible keys form one interval per query row (documents, sliding windows,
  prefix-LM, padding, bottom-right causal and their ``&``): fused calls over just the keys each run of rows
  needs (:mod:`salience.kernels.spans`), with the compiled interval backward
  (:mod:`salience.kernels.native`). With an additive relative score_mod (ALiBi, T5 relative bias, with
  temperature), or with dropout, the compiled interval kernels run both directions (float32/float64; in
  bfloat16/float16 a band mask's bias goes into torch's fused call as a strided Toeplitz view instead).
* ``"blockwise"``: everything else (any mask_mod, any score_mod such as softcap): online softmax over
  (query tile, key tile) pairs that skips empty tiles (:mod:`salience.kernels.blockwise`).
* ``"reference"``: the textbook computation chunked over query rows: dropout where the compiled kernels
  cannot take it, non-dot compatibility functions, and tiny problems where one dense pass is fastest.

Training: every path except ``"reference"`` runs under one ``autograd.Function`` that saves only q, k, v,
the output and the logsumexp and recomputes the rest in the backward (FlashAttention-2 style), so memory is
O(L * D), not O(L * S); fully masked rows get zero gradients.

``choose(...)`` returns a :class:`Plan` (backend, reason, share of work skipped) without computing
attention; ``backend=`` forces a path.

Example:
    >>> import torch, salience
    >>> q = torch.randn(1, 2, 4096, 16)
    >>> p = salience.plan(q, q, q, mask=salience.masks.sliding_window(128))
    >>> p.backend, p.details["skipped"] > 0.9
    ('spans', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._layout import expand_kv
from .._result import AttentionResult
from ..masks import MaskMod
from ..reference import _acc_dtype, scores, softmax_from_scores
from . import fused, native
from .blockwise import TileKernel
from .spans import BiasPlan, SegmentPlan, independent_pieces, plan_spans, relative_band, row_spans

__all__ = ["Plan", "BACKENDS", "choose", "run", "attend", "AttentionFunction"]

BACKENDS = ("sdpa", "spans", "blockwise", "reference")

#: query rows per chunk on the reference path
REFERENCE_CHUNK = 512
#: problems with at most this many score elements (B * H * L * S) that need a mask or score_mod run in
#: one dense pass (kernel set-up would cost more than the work)
TINY = 1 << 15
#: the span path is used when it computes at least this share of useful score elements
MIN_SPAN_EFFICIENCY = 0.2


@dataclass
class Plan:
    """What :func:`salience.attention` will do for given inputs: the backend, why, and details such as
    ``skipped`` (share of the L x S score elements not computed)."""

    backend: str
    reason: str
    details: dict = field(default_factory=dict)
    executor: object = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.details.items())
        return f"Plan(backend={self.backend!r}: {self.reason}{extra})"


# ----------------------------------------------------------------------------------------- score mods


def _mod_parts(mod):
    """The component mods of a composition, in order (a mod that is not a composition: [mod])."""
    parts = getattr(mod, "parts", None)
    if parts is not None:
        return [p for m in parts for p in _mod_parts(m)]
    return [mod]


def _is_temperature(m):
    return isinstance(getattr(m, "t", None), float) and getattr(m, "name", "").startswith("temperature(")


def _is_relative_additive(m):
    name = getattr(m, "name", "")
    return (name.startswith("alibi(") and hasattr(m, "slopes")) or (
        name.startswith("relative_bias(") and hasattr(m, "table"))


def linear_form(mod):
    """``(alpha, [(bias_mod, beta), ...])`` when ``mod(s) = alpha * s + sum(beta * bias(h, kv - q))`` (a chain
    of temperature, alibi and relative_bias); None otherwise. ``mod=None`` -> ``(1.0, [])``."""
    if mod is None:
        return 1.0, []
    alpha, biases = 1.0, []
    for m in _mod_parts(mod):
        if _is_temperature(m):
            alpha /= m.t
            biases = [(b, w / m.t) for b, w in biases]
        elif _is_relative_additive(m):
            biases.append((m, 1.0))
        else:
            return None
    return alpha, biases


def grad_tensors(mod) -> list:
    """Tensors requiring grad that a score_mod closes over (found in attributes, closures, modules)."""
    found, seen = [], set()

    def visit(obj, depth):
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad and all(obj is not f for f in found):
                found.append(obj)
            return
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                visit(p, depth + 1)
            return
        if isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x, depth + 1)
            return
        if isinstance(obj, dict):
            for x in obj.values():
                visit(x, depth + 1)
            return
        if callable(obj) or hasattr(obj, "__dict__"):
            for attr in ("table", "slopes", "fn", "__self__", "__func__"):
                if hasattr(obj, attr):
                    visit(getattr(obj, attr), depth + 1)
            clo = getattr(obj, "__closure__", None)
            for c in clo or ():
                try:
                    visit(c.cell_contents, depth + 1)
                except ValueError:
                    pass
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict) and not isinstance(obj, type):
                for k, x in d.items():
                    if k not in ("fn", "table", "slopes"):
                        visit(x, depth + 1)

    visit(mod, 0)
    return found


def _grads_complete(mod, found, H, device) -> bool:
    """True when every tensor the score_mod's output depends on (for grads) is in ``found``."""
    s = torch.zeros(1, H, 2, 2, device=device)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    qi = torch.arange(2, device=device).view(1, 1, -1, 1)
    ki = torch.arange(2, device=device).view(1, 1, 1, -1)
    with torch.enable_grad():
        try:
            out = mod(s, b, h, qi, ki)
        except Exception:  # noqa: BLE001 - the probe cannot tell; the real call reports a broken mod itself
            return True
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return True
    stop = {id(t.grad_fn) for t in found if t.grad_fn is not None}
    leaves = {id(t) for t in found}
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in leaves:
            return False
        stack.extend(n for n, _ in node.next_functions)
    return True


def _bias_fn(biases, H, Lg, device, dtype):
    """d -> (H, n) sum of the additive relative biases at offsets d = kv_idx - q_idx."""

    def fn(d):
        q0 = max(0, -int(d.min())) if d.numel() else 0
        qi = torch.full((1, 1, 1, 1), q0, dtype=torch.long, device=device)
        ki = (q0 + d).view(1, 1, 1, -1)
        h = torch.arange(H, device=device).view(1, -1, 1, 1)
        b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        z = torch.zeros(1, H, 1, d.numel(), dtype=dtype, device=device)
        total = torch.zeros(H, d.numel(), dtype=dtype, device=device)
        for m, w in biases:
            mm = m.to(device) if hasattr(m, "to") else m
            total += w * mm(z, b, h, qi, ki).to(dtype).view(H, -1)
        return total

    return fn


def _interval(iv, biases, H, B, L, S, Lg, q_offset, kv_offset, dtype, dev, dropout_p=0.0):
    """A :class:`native.IntervalPlan` over the row intervals ``iv`` with the summed relative ``biases`` (if any)."""
    bias_fn = _bias_fn(biases, H, Lg, dev, _acc_dtype(dtype)) if biases else None
    return native.IntervalPlan(iv[0], iv[1], bias_fn, B, H, L, S, q_offset=q_offset, kv_offset=kv_offset,
                               dtype=dtype, device=dev, dropout_p=dropout_p)


def _interval_plan(ip, B, L, S, eff_scale, reason) -> Plan:
    det = {"skipped": round(1 - ip.computed / max(1, B * L * S), 4), **ip.summary()}
    return Plan("spans", reason, det, _PlanExec(ip, eff_scale))


def _dropout_plan(q, m, score_mod, sc, dropout_p, B, H, L, S, Lg, Sg, q_offset, kv_offset, dev):
    """Dropout on the compiled interval kernels (linear memory, logsumexp returned), or None when they cannot
    take this problem."""
    lin = linear_form(score_mod)
    if lin is None or (score_mod is not None and grad_tensors(score_mod)) or not native.available(q):
        return None
    iv = row_spans(m, B, L, S, q_offset=q_offset, kv_offset=kv_offset, q_len=Lg, kv_len=Sg, device=dev)
    if iv is None:
        return None
    alpha, biases = lin
    ip = _interval(iv, biases, H, B, L, S, Lg, q_offset, kv_offset, q.dtype, dev, dropout_p)
    return _interval_plan(ip, B, L, S, sc * alpha, "dropout on an interval mask: the compiled interval kernel, "
                          "forward and backward, with a hashed dropout mask")


# ---------------------------------------------------------------------------------------------- executors


class _SdpaExec:
    def __init__(self, causal: bool, scale: float, bias=None):
        self.causal, self.scale, self.bias = causal, scale, bias

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


class _PlanExec:
    """Runs a plan's forward, and the backward of ``backward_plan`` when given (the same problem, another
    kernel: a strided-bias plan's forward with the compiled interval backward)."""

    def __init__(self, plan, scale: float, backward_plan=None):
        self.plan, self.scale = plan, scale
        self.backward_plan = plan if backward_plan is None else backward_plan

    def forward(self, q, k, v):
        return self.plan.forward(q, k, v, self.scale)

    def backward(self, q, k, v, out, lse, dout, dlse):
        return (*self.backward_plan.backward(q, k, v, out, lse, dout, dlse, self.scale), [])


class _TileExec:
    def __init__(self, kernel: TileKernel):
        self.kernel = kernel

    def forward(self, q, k, v):
        return self.kernel.forward(q, k, v)

    def backward(self, q, k, v, out, lse, dout, dlse):
        return self.kernel.backward(q, k, v, out, lse, dout, dlse)


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


# ---------------------------------------------------------------------------------------------- choosing


def _is_top_left_causal(mask) -> bool:
    return isinstance(mask, MaskMod) and getattr(mask, "kind", None) == ("causal", "top_left")


def _ctx(q, k, v, q_offset, kv_offset, q_len, kv_len):
    B, H, L, D = q.shape
    S = k.shape[2]
    Lg = q_offset + L if q_len is None else q_len
    Sg = kv_offset + S if kv_len is None else kv_len
    return B, H, L, S, Lg, Sg


def choose(q, k, v, *, mask, score_mod, compatibility, need_lse: bool, backend: str | None, scale=None,
           dropout_p: float = 0.0, q_offset: int = 0, kv_offset: int = 0, q_len: int | None = None,
           kv_len: int | None = None, allow_reference: bool = True) -> Plan:
    """Pick a backend for validated inputs (mask a MaskMod or None, score_mod a ScoreMod or None) and
    prepare its executor. See the module docstring for the backends. ``q_offset``/``kv_offset``/``q_len``/
    ``kv_len`` place the inputs in a larger problem (see :func:`salience.kernels.blockwise.block_forward`);
    ``allow_reference=False`` keeps the choice on the kernels that support them."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}.")
    B, H, L, S, Lg, Sg = _ctx(q, k, v, q_offset, kv_offset, q_len, kv_len)
    dev = q.device
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    total = B * H * L * S
    m = None if mask is None else mask.bind(Lg, Sg, dev)
    if m is not None and getattr(m, "name", None) == "full()":
        m = None

    def reference(reason):
        return Plan("reference", reason, {"skipped": 0.0})

    if compatibility is not None:
        if backend not in (None, "reference"):
            raise ValueError(
                f"backend={backend!r} cannot apply the compatibility function {type(compatibility).__name__} (it "
                "is not a dot product); use backend=None or 'reference'.")
        return reference(f"{type(compatibility).__name__} is not a dot product: chunked textbook computation")
    if dropout_p > 0:
        if backend not in (None, "reference", "sdpa", "spans"):
            raise ValueError(f"dropout_p > 0 runs on backend 'spans' (the compiled interval kernels), 'reference' or "
                             f"'sdpa' (without a mask); got {backend!r}.")
        if backend in (None, "spans"):
            dp = _dropout_plan(q, m, score_mod, sc, dropout_p, B, H, L, S, Lg, Sg, q_offset, kv_offset, dev)
            if dp is not None:
                return dp
            if backend == "spans":
                raise ValueError("backend='spans' with dropout_p > 0 needs the compiled interval kernels "
                                 f"({native.describe(q)}), a mask with one key interval per query row (got {m!r}) "
                                 "and no score_mod other than temperature/alibi/relative_bias without trainable "
                                 f"tensors (got {score_mod!r}); use backend=None.")
        if backend != "reference" and score_mod is None and (m is None or _is_top_left_causal(m)) \
                and q_offset == kv_offset and not need_lse:
            return Plan("sdpa", "dropout: torch SDPA with dropout_p", {"skipped": 0.0, "dropout": True})
        return reference("dropout on the weights: chunked textbook computation")
    if backend == "reference":
        return reference("forced by backend=")

    lin = linear_form(score_mod)
    alpha, biases = lin if lin is not None else (1.0, None)
    eff_scale = sc * alpha
    mod_rest = None if (lin is not None and not biases) else score_mod  # temperature alone folds into scale
    fused_ok = fused.available(q)
    aligned_causal = m is not None and _is_top_left_causal(m) and q_offset == kv_offset
    plain = mod_rest is None and (m is None or aligned_causal)

    # -- forced backends --------------------------------------------------------------------------
    if backend == "sdpa":
        if mod_rest is not None:
            raise ValueError("backend='sdpa' cannot apply a score_mod (other than temperature); use backend=None.")
        if not fused_ok:
            raise ValueError(f"backend='sdpa' needs the fused CPU kernel; inputs are {q.dtype} on {q.device}.")
        if plain:
            return Plan("sdpa", "forced by backend=", {"skipped": 0.5 if aligned_causal else 0.0},
                        _SdpaExec(aligned_causal, eff_scale))
        dense = m.to_dense(B, H, L, S, dev) if (q_offset, kv_offset, Lg, Sg) == (0, 0, L, S) else _dense_shifted(
            m, B, H, L, S, q_offset, kv_offset, dev)
        bias = torch.zeros(dense.shape, dtype=fused.bias_dtype(q.dtype, True), device=dev).masked_fill_(
            ~dense, float("-inf"))
        return Plan("sdpa", "forced by backend=: dense L x S mask, like torch SDPA with a boolean mask",
                    {"skipped": 0.0, "dense_mask_bytes": bias.numel() * bias.element_size()}, _SdpaExec(False, eff_scale, bias))

    # -- automatic choice -------------------------------------------------------------------------
    if plain and backend in (None, "sdpa") and fused_ok:
        if m is None:
            return Plan("sdpa", "no mask, no score_mod: torch's fused kernel", {"skipped": 0.0},
                        _SdpaExec(False, eff_scale))
        return Plan("sdpa", "top-left causal: torch's fused kernel with is_causal",
                    {"skipped": round(1 - (L + 1) / (2 * S), 4) if L <= S else 0.5}, _SdpaExec(True, eff_scale))
    kp = _key_padding(m, B, S) if (mod_rest is None and backend is None and fused_ok and q_offset == 0
                                   and kv_offset == 0 and (Lg, Sg) == (L, S)) else None
    if kp is not None:  # key padding (optionally & top-left causal): one fused call with a (B, 1, 1, S) mask
        keep, causal_too = kp
        bias = torch.zeros(B, 1, 1, S, dtype=fused.bias_dtype(q.dtype, True), device=dev).masked_fill_(
            ~keep.view(B, 1, 1, S), float("-inf"))
        return Plan("sdpa", "key padding: torch's fused kernel with a compact (B, 1, 1, S) key mask",
                    {"skipped": round(1 - float(keep.float().mean()), 4), "key_mask_bytes": bias.numel() * bias.element_size()},
                    _SdpaExec(causal_too, eff_scale, bias))
    if plain and backend in (None, "sdpa") and not fused_ok and not need_lse:
        return Plan("sdpa", f"no fused CPU kernel for {q.dtype} on {q.device}: torch SDPA (no logsumexp)",
                    {"skipped": 0.0, "torch_sdpa": True, "causal": aligned_causal, "scale": eff_scale})
    if backend is None and total <= TINY and allow_reference:
        return reference(f"tiny problem ({total} score elements): one dense pass is fastest")

    gtensors = grad_tensors(score_mod) if score_mod is not None else []
    if score_mod is not None and not _grads_complete(score_mod, gtensors, H, dev):
        if backend is None and allow_reference:
            return reference("the score_mod depends on tensors requiring grad that salience cannot find; the "
                             "chunked reference keeps autograd exact")
        raise ValueError(f"score_mod {score_mod!r} closes over tensors requiring grad that salience cannot find; "
                         "use backend=None or 'reference' (or expose them as attributes of a ScoreMod).")

    # spans: interval masks, no score_mod
    if backend in (None, "spans") and fused_ok and mod_rest is None:
        sp = row_spans(m, B, L, S, q_offset=q_offset, kv_offset=kv_offset, q_len=Lg, kv_len=Sg, device=dev)
        if sp is not None:
            plan = plan_spans(sp[0], sp[1], B, L, S, dtype=q.dtype, device=dev)
            if backend == "spans" or plan.efficiency >= MIN_SPAN_EFFICIENCY:
                det = {"skipped": round(1 - plan.computed / max(1, B * L * S), 4), **plan.summary(),
                       "backward": native.describe(q)}
                return Plan("spans", "each query row sees one key interval: fused calls over just those keys", det,
                            _PlanExec(plan, eff_scale))
    # spans with a Toeplitz bias: band mask + additive relative bias without trainable tensors
    if backend in (None, "spans") and fused_ok and biases and not gtensors:
        # float32/float64: the compiled interval kernels are the faster forward too (causal + ALiBi at 16K:
        # 1479 against 1666 ms; window 256 + ALiBi 68 against 105 ms); in bfloat16/float16 torch's kernel runs
        # in the input dtype and is about 3x faster than the kernels' float32, so the strided-bias plans lead
        # in every dtype the backward is the compiled interval kernel's when it is built
        ip = None
        if native.available(q):
            iv = row_spans(m, B, L, S, q_offset=q_offset, kv_offset=kv_offset, q_len=Lg, kv_len=Sg, device=dev)
            if iv is not None:
                ip = _interval(iv, biases, H, B, L, S, Lg, q_offset, kv_offset, q.dtype, dev)
        reason = "interval mask + relative additive bias: the compiled interval kernel, forward and backward"
        if ip is not None and q.dtype in (torch.float32, torch.float64):
            return _interval_plan(ip, B, L, S, eff_scale, reason)
        band = relative_band(m)
        if band is not None:
            bp = BiasPlan(band, _bias_fn(biases, H, Lg, dev, _acc_dtype(q.dtype)), B, H, L, S, q_offset=q_offset,
                          kv_offset=kv_offset, dtype=q.dtype, device=dev)
            det = {"skipped": round(1 - bp.computed / max(1, L * S), 4), **bp.summary()}
            return Plan("spans", "band mask + relative additive bias: fused calls with a strided Toeplitz bias",
                        det, _PlanExec(bp, eff_scale, ip))
        seg = independent_pieces(m, B, L, S) if (q_offset, kv_offset, Lg, Sg) == (0, 0, L, S) else None
        if seg is not None:
            sp = SegmentPlan(seg[0], seg[1], _bias_fn(biases, H, Lg, dev, _acc_dtype(q.dtype)), B, H, L, S,
                             dtype=q.dtype, device=dev)
            det = {"skipped": round(1 - sp.computed / max(1, L * S), 4), **sp.summary()}
            return Plan("spans", "packed documents or padding + relative additive bias: each document or "
                        "sequence as its own band problem with a strided Toeplitz bias", det,
                        _PlanExec(sp, eff_scale, ip))
        if ip is not None:  # other interval masks (prefix-LM, per-batch document ids) in bfloat16/float16
            return _interval_plan(ip, B, L, S, eff_scale, reason)
    if backend == "spans":
        raise ValueError(
            f"backend='spans' needs a mask whose visible keys form one interval per query row (got {m!r}) and no "
            f"score_mod other than temperature/alibi/relative_bias (on a band mask, packed documents or padding, or "
            f"on any interval mask when the compiled kernels are built: {native.describe(q)}) (got {score_mod!r}); use "
            "backend=None or 'blockwise'.")
    common = dict(q_offset=q_offset, kv_offset=kv_offset, q_len=Lg, kv_len=Sg, device=dev)
    if biases and not gtensors:  # relative additive bias: a Toeplitz view per tile, never evaluated per tile
        tk = TileKernel(B, H, L, S, mask=m, scale=eff_scale, bias_dtype=_acc_dtype(q.dtype),
                        relative_bias=_bias_fn(biases, H, Lg, dev, _acc_dtype(q.dtype)), **common)
    else:
        tk = TileKernel(B, H, L, S, mask=m, score_mod=mod_rest, scale=eff_scale if mod_rest is None else sc,
                        grad_tensors=gtensors, **common)
    det = {"skipped": round(tk.skipped_fraction(), 4)}
    if tk.block_mask is not None:
        det["tiles"] = tk.block_mask.counts()
    reason = "forced by backend=" if backend == "blockwise" else (
        "general mask/score_mod: online softmax over non-empty tiles")
    return Plan("blockwise", reason, det, _TileExec(tk))


def _key_padding(m, B: int, S: int):
    """``(keep (B, S) bool, causal)`` when ``m`` is ``padding(kv_lengths=...)``, alone or ``&`` top-left causal,
    with every batch row keeping at least one key; else None. Such masks need no per-row span work: torch's
    fused kernel takes a compact key mask at about the cost of no mask."""
    causal_too = False
    parts = getattr(m, "parts", None)
    if parts is not None and parts[0] == "&":
        _, a, b = parts
        if _is_top_left_causal(a):
            m, causal_too = b, True
        elif _is_top_left_causal(b):
            m, causal_too = a, True
        else:
            return None
    kind = getattr(m, "kind", None)
    if not (isinstance(kind, tuple) and kind[0] == "padding" and kind[1] is None and kind[2] is not None):
        return None
    kl = kind[2]
    if kl.numel() != B or bool((kl <= 0).any()):
        return None
    return torch.arange(S, device=kl.device).view(1, S) < kl.view(B, 1), causal_too


def _dense_shifted(m, B, H, L, S, q_offset, kv_offset, dev):
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    qi = (q_offset + torch.arange(L, device=dev)).view(1, 1, -1, 1)
    ki = (kv_offset + torch.arange(S, device=dev)).view(1, 1, 1, -1)
    return torch.as_tensor(m(b, h, qi, ki)).expand(B, H, L, S)


# ---------------------------------------------------------------------------------------------- running


def _reference_chunked(q, k, v, mask, score_mod, scale, compatibility, dropout_p, L_full=None) -> AttentionResult:
    H, L = q.shape[1], q.shape[2]
    ke, ve = expand_kv(k, H), expand_kv(v, H)
    outs, lses = [], []
    for i in range(0, L, REFERENCE_CHUNK):
        rows = torch.arange(i, min(i + REFERENCE_CHUNK, L), device=q.device)
        s = scores(q[:, :, i:i + REFERENCE_CHUNK], ke, mask=mask, score_mod=score_mod, scale=scale,
                   compatibility=compatibility, rows=rows, L=L if L_full is None else L_full)
        w, lse = softmax_from_scores(s)
        if dropout_p > 0:
            w = F.dropout(w, p=dropout_p)
        outs.append(w @ ve)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
    return AttentionResult(out=out, lse=lse.to(_acc_dtype(q.dtype)))


def run(plan: Plan, q, k, v, *, mask=None, score_mod=None, scale=None, compatibility=None,
        dropout_p: float = 0.0) -> AttentionResult:
    """Execute a plan from :func:`choose`; returns an :class:`AttentionResult` (lse None only for SDPA with
    dropout, which does not produce it)."""
    if plan.backend == "reference":
        return _reference_chunked(q, k, v, mask, score_mod, scale, compatibility, dropout_p)
    if plan.details.get("torch_sdpa"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=plan.details["causal"], scale=plan.details["scale"],
                                             enable_gqa=q.shape[1] != k.shape[1])
        return AttentionResult(out=out, lse=None)
    if plan.details.get("dropout"):
        H, Hkv = q.shape[1], k.shape[1]
        causal = mask is not None
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale,
                                             enable_gqa=H != Hkv)
        return AttentionResult(out=out, lse=None)
    ex = plan.executor
    if ex is None:
        raise ValueError("this Plan has no executor; build it with salience.kernels.dispatch.choose.")
    extras = list(getattr(getattr(ex, "kernel", None), "grad_tensors", ()))
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in extras))
    if not needs_grad:
        with torch.no_grad():
            out, lse = ex.forward(q, k, v)
        return AttentionResult(out=out, lse=lse)
    out, lse = AttentionFunction.apply(ex, q, k, v, *extras)
    return AttentionResult(out=out, lse=lse)


def _all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or inf: one summing pass (an overflowing sum of finite values only sends
    the call down the exact guarded route, which is still right)."""
    with torch.no_grad():
        return bool(torch.isfinite(t.sum(dtype=_acc_dtype(t.dtype))))


def _bad_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S) bool: keys whose key or value vector holds a NaN or inf."""
    with torch.no_grad():
        return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def _rows_seeing(m, bad: torch.Tensor, H: int, L: int) -> torch.Tensor:
    """(B, H, L) bool: query rows whose mask lets them see at least one key flagged in ``bad`` (B, Hkv, S)."""
    B, Hkv, S = bad.shape
    dev = bad.device
    cols = bad.any(0).any(0).nonzero().flatten()  # the keys that are bad for some (batch, kv head)
    hit = torch.zeros(B, H, L, dtype=torch.bool, device=dev)
    badh = bad.repeat_interleave(H // Hkv, dim=1)[..., cols]  # (B, H, n)
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    kv = cols.view(1, 1, 1, -1)
    step = max(1, (1 << 22) // max(1, B * H * cols.numel()))
    for i in range(0, L, step):
        qi = torch.arange(i, min(L, i + step), device=dev).view(1, 1, -1, 1)
        vis = torch.as_tensor(m(b, h, qi, kv)).expand(B, H, qi.shape[2], cols.numel())
        hit[:, :, i:i + step] = (vis & badh.unsqueeze(2)).any(-1)
    return hit


def _guarded(q, k, v, mask, run_clean, reference_rows):
    """Run attention so that a key a row cannot see never changes that row, whatever it holds.

    The kernels multiply hidden keys' values by a zero weight (and add their scores to -inf), which lets a
    NaN or inf stored at a hidden key (a padding slot, a key outside a window) poison rows that never see
    it. When k or v holds a non-finite value, the kernels run on copies with those entries zeroed (the
    gradient still flows to every finite entry), and the rows that do see a non-finite key are recomputed
    by the textbook formula on the original tensors, so they get exactly what eager attention gives."""
    if mask is None or (_all_finite(k) and _all_finite(v)):
        return run_clean(q, k, v)
    bad = _bad_keys(k, v)
    kc = torch.where(torch.isfinite(k), k, torch.zeros((), dtype=k.dtype, device=k.device))
    vc = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))
    res = run_clean(q, kc, vc)
    L = q.shape[2]
    hit = _rows_seeing(mask.bind(L, k.shape[2], q.device), bad, q.shape[1], L)
    if not hit.any():
        return res
    out, lse = res.out.clone(), None if res.lse is None else res.lse.clone()
    for b, h in hit.any(2).nonzero().tolist():  # recompute only the (batch, head, row) triples that see one
        r = hit[b, h].nonzero().flatten()
        ref = reference_rows(b, h, r)
        out[b, h, r] = ref.out[0, 0].to(out.dtype)
        if lse is not None:
            lse[b, h, r] = ref.lse[0, 0].to(lse.dtype)
    return AttentionResult(out=out, lse=lse)


def _reference_rows(q, k, v, mask, score_mod, scale, compatibility, dropout_p, b, h, rows) -> AttentionResult:
    """The textbook result of query rows ``rows`` of batch ``b``, head ``h`` on the original k and v."""
    g = q.shape[1] // k.shape[1]
    bi, hi = torch.tensor([b], device=q.device), torch.tensor([h], device=q.device)
    s = scores(q[b:b + 1, h:h + 1].index_select(2, rows), k[b:b + 1, h // g:h // g + 1], mask=mask,
               score_mod=score_mod, scale=scale, compatibility=compatibility, batches=bi, heads=hi, rows=rows,
               L=q.shape[2])
    w, lse = softmax_from_scores(s)
    if dropout_p > 0:
        w = F.dropout(w, p=dropout_p)
    return AttentionResult(out=w @ v[b:b + 1, h // g:h // g + 1], lse=lse.to(_acc_dtype(q.dtype)))


def _opaque_to_compile(fn):
    """``torch.compiler.disable(fn)``, made when first needed: applying it at import would import
    ``torch._dynamo`` (about 2 s, more than ``import torch`` itself). Until ``torch._dynamo`` is loaded nothing
    can be compiling, so ``fn`` runs as is; from then on every call goes through ``torch.compiler.disable(fn)``.
    Dynamo reads ``_torchdynamo_disable`` on the wrapper and graph-breaks around it, as around ``fn`` disabled."""
    import functools
    import sys

    disabled = []

    @functools.wraps(fn)
    def opaque(*args, **kwargs):
        if not disabled:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    opaque._torchdynamo_disable = True
    return opaque


@_opaque_to_compile
def attend(q, k, v, *, mask, score_mod, scale, compatibility, dropout_p, need_lse, backend) -> tuple:
    """``choose`` then ``run`` (opaque to torch.compile, which graph-breaks around it): ``(plan, result)``.

    Inputs are given a unit last-axis stride once here (the fused and compiled kernels assume it), and keys
    a row cannot see never change that row, even when they hold NaN or inf (see :func:`_guarded`)."""
    q, k, v = fused.dense_last(q), fused.dense_last(k), fused.dense_last(v)  # once here, not per kernel call
    pl = choose(q, k, v, mask=mask, score_mod=score_mod, compatibility=compatibility, need_lse=need_lse,
                backend=backend, scale=scale, dropout_p=dropout_p)

    def run_clean(q_, k_, v_):
        return run(pl, q_, k_, v_, mask=mask, score_mod=score_mod, scale=scale, compatibility=compatibility,
                   dropout_p=dropout_p)

    def reference_rows(b, h, rows):
        return _reference_rows(q, k, v, mask, score_mod, scale, compatibility, dropout_p, b, h, rows)

    return pl, _guarded(q, k, v, mask, run_clean, reference_rows)
