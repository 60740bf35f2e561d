"""The dispatch rule table: an ordered list of small rules, each naming the executor for both directions.

A rule is a function ``rule(p: Problem) -> Plan | None``: it returns a :class:`Plan` (backend, reason, details,
and the executor that runs the forward *and* the backward) when it applies, else None. :func:`choose` walks
:data:`RULES` in order and takes the first plan. A forced ``backend=`` walks only the rules of that backend;
when none applies, the call is refused with the reason and the backends that would take it.

To add a path: write an executor (see :mod:`salience.kernels.executors` for the protocol), write a rule that
recognises its problems from the typed structure of the mask and score_mod (never from names), and insert it
in :data:`RULES` before the more general rules it should win over. docs/kernels.md walks through an example.

Example:
    >>> import torch, salience
    >>> from salience.kernels import rules
    >>> [r.__name__ for r in rules.RULES][:3]
    ['not_a_dot_product', 'dropout_on_intervals', 'dropout_in_sdpa']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..structure import independent_pieces, is_top_left_causal, key_padding, relative_band
from . import native
from .executors import DecodeExec, KeySliceExec, PlanExec, ReferenceExec, SdpaExec, TileExec, TorchSdpaExec
from .problem import Problem, grads_complete
from .span_plan import plan_spans
from .toeplitz import BiasPlan, SegmentPlan

__all__ = ["Plan", "BACKENDS", "RULES", "choose"]

BACKENDS = ("sdpa", "spans", "blockwise", "decode", "bias", "reference")


@dataclass
class Plan:
    """What :func:`salience.attention` will do for given inputs: the backend, why, details such as ``skipped``
    (share of the L x S score elements not computed), and the executor of both directions."""

    backend: str
    reason: str
    details: dict = field(default_factory=dict)
    executor: object = field(default=None, repr=False, compare=False)

    @property
    def forward(self) -> str:
        """What computes the forward, in words."""
        return self.executor.describe()[0] if self.executor is not None else "nothing (shape-only call)"

    @property
    def backward(self) -> str:
        """What computes the backward, in words ("none" for forward-only paths such as decoding)."""
        return self.executor.describe()[1] if self.executor is not None else "nothing (shape-only call)"

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.details.items())
        return f"Plan(backend={self.backend!r}: {self.reason}{extra}; forward: {self.forward}; backward: {self.backward})"


class Refused(ValueError):
    """A forced backend cannot take this problem."""


# ------------------------------------------------------------------------------------------- helpers


def _aligned_causal(p: Problem) -> bool:
    return p.mask is not None and is_top_left_causal(p.mask) and p.q_offset == p.kv_offset


def _plain(p: Problem) -> bool:
    """No score_mod left after folding a temperature, and no mask or top-left causal aligned to the inputs."""
    return p.mod_rest is None and (p.mask is None or _aligned_causal(p))


def _reference(p: Problem, reason: str) -> Plan:
    ex = ReferenceExec(p.mask, p.score_mod, p.scale_arg, p.compatibility, p.dropout_p, p.config.reference_chunk,
                       bias=p.bias)
    return Plan("reference", reason, {"skipped": 0.0}, ex)


def _skipped(computed, total) -> float:
    return round(1 - computed / max(1, total), 4)


def _interval_plan(p: Problem, dropout_p: float = 0.0):
    iv = p.intervals
    bias_fn = p.bias_fn() if p.biases else None
    return native.IntervalPlan(iv[0], iv[1], bias_fn, p.B, p.H, p.L, p.S, q_offset=p.q_offset,
                               kv_offset=p.kv_offset, dtype=p.dtype, device=p.device, dropout_p=dropout_p)


def _interval_route(p: Problem, reason: str, dropout_p: float = 0.0) -> Plan:
    ip = _interval_plan(p, dropout_p)
    det = {"skipped": _skipped(ip.computed, p.B * p.L * p.S), **ip.summary()}
    return Plan("spans", reason, det, PlanExec(ip, p.eff_scale))


# ------------------------------------------------------------------------------------------- the rules


def not_a_dot_product(p: Problem):
    """Non-dot compatibility functions (additive, general, ...) run the chunked textbook computation."""
    if p.compatibility is not None:
        return _reference(p, f"{type(p.compatibility).__name__} is not a dot product: chunked textbook computation")
    return None


def dropout_on_intervals(p: Problem):
    """Dropout on an interval mask with at most a relative additive bias: the compiled interval kernels."""
    if p.dropout_p == 0 or p.bias is not None or p.linear is None or p.grad_tensors or not p.native_ok \
            or p.intervals is None:
        return None
    return _interval_route(p, "dropout on an interval mask: the compiled interval kernel, forward and backward, "
                           "with a hashed dropout mask", p.dropout_p)


def dropout_in_sdpa(p: Problem):
    """Dropout without a mask (or top-left causal) and without a logsumexp: torch SDPA's own dropout."""
    if p.dropout_p == 0 or p.score_mod is not None or not (p.mask is None or is_top_left_causal(p.mask)) \
            or p.q_offset != p.kv_offset or p.need_lse or p.bias is not None:
        return None
    ex = TorchSdpaExec(p.mask is not None, p.scale, p.dropout_p)
    return Plan("sdpa", "dropout: torch SDPA with dropout_p", {"skipped": 0.0, "dropout": True}, ex)


def dropout_elsewhere(p: Problem):
    if p.dropout_p > 0:
        return _reference(p, "dropout on the weights: chunked textbook computation")
    return None


def _decode_mods(p: Problem):
    """``{"slopes", "q_pos", "softcap", "scale"}`` for the decode kernel when the score_mod is nothing, a temperature,
    one per-head ALiBi (with temperatures) or one softcap; else None."""
    from ..structure import Alibi, softcap_of

    cap = softcap_of(p.score_mod)
    if cap is not None:
        return {"slopes": None, "q_pos": None, "softcap": cap, "scale": p.scale}
    if p.linear is None or len(p.biases) > 1 or any(not isinstance(node, Alibi) for node, _ in p.biases):
        return None
    if not p.biases:
        return {"slopes": None, "q_pos": None, "softcap": None, "scale": p.eff_scale}
    node, w = p.biases[0]
    rows = torch.arange(p.L, dtype=torch.long, device=p.device) + node.offset
    return {"slopes": node.slopes.to(p.device, torch.float32) * w, "q_pos": rows.expand(p.B, p.L),
            "softcap": None, "scale": p.eff_scale}


def decode(p: Problem):
    """A few query rows against a long key/value cache, no gradient: the compiled decode kernel (grouped-query
    aware, reads each cached key and value once, the key axis split across threads), forward only."""
    from . import decode as kdecode

    c = p.config
    if p.bias is not None or p.needs_grad or not p.whole or p.L > c.decode_max_rows or p.S < c.decode_min_keys \
            or p.dropout_p or p.k.dtype != p.dtype or p.v.dtype != p.dtype or not kdecode.available(p.q):
        return None
    mods = _decode_mods(p)
    iv = p.few_row_intervals
    if mods is None or iv is None:
        return None
    lo, hi = (t.expand(p.B, p.L).contiguous() for t in iv)
    ex = DecodeExec(lo, hi, **mods)
    bounds = p.few_row_bounds
    seen = sum(z - a for a, z in zip(*bounds)) if bounds is not None else int((hi - lo).clamp(min=0).sum())
    det = {"skipped": _skipped(seen, p.B * p.L * p.S), "rows": p.L}
    return Plan("decode", f"{p.L} query row(s) against {p.S} cached keys, no gradient: the compiled decode kernel",
                det, ex)


def bias_tensor(p: Problem):
    """A float bias tensor (with a mask, no score_mod): torch's fused kernel with the bias, over just the blocks of
    keys the bias and mask leave finite, with dbias when the bias requires grad (:mod:`salience.kernels.bias`)."""
    if p.bias is None or p.mod_rest is not None or not p.whole:
        return None
    from . import bias as kbias

    got = kbias.executor(p.q, p.k, p.v, p.bias, mask=p.mask, scale=p.eff_scale, need_grad=p.needs_grad,
                         config=p.config.bias)
    if got is None:
        return None
    ex, det = got
    return Plan("bias", "a float bias tensor: torch's fused kernel with it, skipping what it leaves at -inf", det, ex)


def bias_in_tiles(p: Problem):
    """A float bias tensor with a score_mod: the blockwise kernel, the bias added after the score_mod."""
    if p.bias is None or p.backend not in (None, "blockwise"):
        return None
    from dataclasses import replace

    from ..scores import compose
    from . import bias as kbias

    add = kbias.bias_score_mod(kbias.check_bias(p.bias, p.B, p.H, p.L, p.S, p.device))
    plan = tiles(replace(p, score_mod=add if p.score_mod is None else compose(p.score_mod, add), bias=None))
    plan.reason = "a float bias tensor with a score_mod: online softmax over tiles, the bias added after the score_mod"
    return plan


def plain_sdpa(p: Problem):
    """No mask or top-left causal, no score_mod: torch's fused kernel (``is_causal``, no mask tensor)."""
    if p.bias is not None or not _plain(p) or not p.fused_ok:
        return None
    if p.mask is None:
        return Plan("sdpa", "no mask, no score_mod: torch's fused kernel", {"skipped": 0.0},
                    SdpaExec(False, p.eff_scale))
    return Plan("sdpa", "top-left causal: torch's fused kernel with is_causal",
                {"skipped": round(1 - (p.L + 1) / (2 * p.S), 4) if p.L <= p.S else 0.5}, SdpaExec(True, p.eff_scale))


def _key_mask(p: Problem, keep: torch.Tensor) -> torch.Tensor:
    """The compact (B, 1, 1, S) additive key mask of a (B, S) bool ``keep`` for torch's fused kernel."""
    from . import fused

    return torch.zeros(p.B, 1, 1, p.S, dtype=fused.bias_dtype(p.dtype, True), device=p.device).masked_fill_(
        ~keep.view(p.B, 1, 1, p.S), float("-inf"))


def key_padding_sdpa(p: Problem):
    """Key padding (optionally & top-left causal): one fused call with a compact (B, 1, 1, S) key mask."""
    if p.bias is not None or p.mod_rest is not None or not p.fused_ok or not p.whole or p.backend is not None:
        return None
    kp = key_padding(p.mask, p.B, p.S)
    if kp is None:
        return None
    keep, causal_too = kp
    bias = _key_mask(p, keep)
    return Plan("sdpa", "key padding: torch's fused kernel with a compact (B, 1, 1, S) key mask",
                {"skipped": round(1 - float(keep.float().mean()), 4), "key_mask_bytes": bias.numel() * bias.element_size()},
                SdpaExec(causal_too, p.eff_scale, bias))


def _shared_interval(p: Problem):
    """``(a, z)`` Python ints when every query row of every sequence sees the keys ``[a, z)``, a non-empty
    interval; ``(lo, hi)`` (B, 1) tensors when the rows of each sequence share one non-empty interval that differs
    between sequences; None otherwise (rows differ, a row sees nothing, or the mask is not an interval mask)."""
    bounds = p.few_row_bounds
    if bounds is not None:  # a band mask on Python ints (every sequence holds S keys here)
        los, his = bounds
        a, z = los[0], his[0]
        same = all(x == a for x in los) and all(x == z for x in his)
        return (a, z) if same and z > a else None
    iv = p.few_row_intervals
    if iv is None:
        return None
    lo, hi = (t.expand(p.B, p.L) for t in iv)
    a, z = lo[:, :1], hi[:, :1]
    if not (bool((lo == a).all()) and bool((hi == z).all())) or bool((z <= a).any()):
        return None  # rows differ, or a row sees nothing (zeros, which the fused kernel does not give)
    if bool((a == a[0]).all()) and bool((z == z[0]).all()):
        return int(a[0]), int(z[0])
    return a, z


def shared_interval_sdpa(p: Problem):
    """A few query rows per sequence (at most ``decode_max_rows``) that all see one interval of keys, as in a
    decoding step under a bottom-right causal mask or a window: torch's fused kernel over that slice of the keys
    (no mask; no key outside it is read, so no non-finite guard) when the interval is the same for every
    sequence, else with a compact (B, 1, 1, S) key mask (for short caches the decode rule leaves)."""
    if p.bias is not None or p.mod_rest is not None or not p.fused_ok or not p.whole or p.mask is None \
            or p.L > p.config.decode_max_rows or p.backend not in (None, "sdpa"):
        return None
    iv = _shared_interval(p)
    if iv is None:
        return None
    a, z = iv
    if isinstance(a, int):
        what = "every key" if (a, z) == (0, p.S) else f"the keys [{a}, {z})"
        return Plan("sdpa", f"every one of the {p.L} query row(s) sees {what}: torch's fused kernel over them, "
                    "no mask", {"skipped": round(1 - (z - a) / p.S, 4)}, KeySliceExec(a, z, p.eff_scale))
    if p.backend is not None:
        return None
    keys = torch.arange(p.S, device=a.device)
    keep = ((keys >= a) & (keys < z)).to(p.device)  # (B, S)
    return Plan("sdpa", f"the {p.L} query row(s) of each sequence see one interval of keys: torch's fused kernel "
                "with a compact (B, 1, 1, S) key mask", {"skipped": round(1 - float(keep.float().mean()), 4)},
                SdpaExec(False, p.eff_scale, _key_mask(p, keep)))


def torch_sdpa(p: Problem):
    """Dtypes/devices without the fused CPU op: torch SDPA itself (it gives no logsumexp)."""
    if p.bias is not None or not _plain(p) or p.fused_ok or p.need_lse:
        return None
    return Plan("sdpa", f"no fused CPU kernel for {p.dtype} on {p.device}: torch SDPA (no logsumexp)",
                {"skipped": 0.0}, TorchSdpaExec(_aligned_causal(p), p.eff_scale))


def tiny(p: Problem):
    if p.backend is None and p.allow_reference and p.score_elements <= p.config.tiny:
        return _reference(p, f"tiny problem ({p.score_elements} score elements): one dense pass is fastest")
    return None


def untracked_grads(p: Problem):
    """A score_mod that depends on tensors requiring grad that salience cannot find: exact autograd only."""
    if p.score_mod is None or grads_complete(p.score_mod, p.grad_tensors, p.H, p.device):
        return None
    if p.backend is None and p.allow_reference:
        return _reference(p, "the score_mod depends on tensors requiring grad that salience cannot find; the "
                          "chunked reference keeps autograd exact")
    raise Refused(f"score_mod {p.score_mod!r} closes over tensors requiring grad that salience cannot find; use "
                  "backend=None or 'reference' (or expose them as attributes of a ScoreMod).")


def interval_spans(p: Problem):
    """Each query row sees one key interval, no score_mod: fused calls over just those keys."""
    if p.bias is not None or not p.fused_ok or p.mod_rest is not None or p.intervals is None:
        return None
    lo, hi = p.intervals
    plan = plan_spans(lo, hi, p.B, p.L, p.S, dtype=p.dtype, device=p.device, config=p.config)
    if p.backend != "spans" and plan.efficiency < p.config.min_span_efficiency:
        return None
    det = {"skipped": _skipped(plan.computed, p.B * p.L * p.S), **plan.summary(), "backward": native.describe(p.q)}
    return Plan("spans", "each query row sees one key interval: fused calls over just those keys", det,
                PlanExec(plan, p.eff_scale))


def _relative_ok(p: Problem) -> bool:
    return p.bias is None and p.fused_ok and bool(p.biases) and not p.grad_tensors


def interval_relative_compiled(p: Problem):
    """Interval mask + relative additive bias (ALiBi, T5) in float32/float64: the compiled interval kernels."""
    if not _relative_ok(p) or not p.native_ok or p.intervals is None or p.dtype not in (torch.float32, torch.float64):
        return None
    return _interval_route(p, "interval mask + relative additive bias: the compiled interval kernel, forward and "
                           "backward")


def _compiled_backward(p: Problem):
    return _interval_plan(p) if p.native_ok and p.intervals is not None else None


def band_toeplitz(p: Problem):
    """Band mask + relative additive bias: fused calls with a strided Toeplitz bias (bf16/f16 run it in their
    own dtype, about 3x faster than the compiled kernels' float32)."""
    band = relative_band(p.mask) if _relative_ok(p) else None
    if band is None:
        return None
    bp = BiasPlan(band, p.bias_fn(), p.B, p.H, p.L, p.S, q_offset=p.q_offset, kv_offset=p.kv_offset, dtype=p.dtype,
                  device=p.device, config=p.config)
    det = {"skipped": _skipped(bp.computed, p.L * p.S), **bp.summary()}
    return Plan("spans", "band mask + relative additive bias: fused calls with a strided Toeplitz bias", det,
                PlanExec(bp, p.eff_scale, _compiled_backward(p)))


def segments_toeplitz(p: Problem):
    """Packed documents or padding + relative additive bias: each piece its own band problem."""
    seg = independent_pieces(p.mask, p.B, p.L, p.S) if _relative_ok(p) and p.whole else None
    if seg is None:
        return None
    sp = SegmentPlan(seg[0], seg[1], p.bias_fn(), p.B, p.H, p.L, p.S, dtype=p.dtype, device=p.device,
                     config=p.config)
    det = {"skipped": _skipped(sp.computed, p.L * p.S), **sp.summary()}
    return Plan("spans", "packed documents or padding + relative additive bias: each document or sequence as its "
                "own band problem with a strided Toeplitz bias", det, PlanExec(sp, p.eff_scale, _compiled_backward(p)))


def interval_relative_half(p: Problem):
    """Other interval masks (prefix-LM, per-batch document ids) + relative bias in bf16/f16: compiled kernels."""
    if not _relative_ok(p) or not p.native_ok or p.intervals is None:
        return None
    return _interval_route(p, "interval mask + relative additive bias: the compiled interval kernel, forward and "
                           "backward")


def derived_callable(p: Problem):
    """A user's mask callable (alone or combined with named masks): its structure derived once per (callable,
    shape, device) and cached (:mod:`salience.kernels.derive`): row intervals run on the span/interval kernels,
    anything else on a block map whose partial tiles' bits are reused by every later call."""
    if p.bias is not None or p.mask is None:
        return None
    from . import derive

    relative = p.biases and not p.grad_tensors
    got = derive.executor(
        p.mask, p.q, p.k, p.v, scale=p.eff_scale if (relative or p.mod_rest is None) else p.scale,
        score_mod=None if relative else p.mod_rest, need_grad=p.needs_grad,
        grad_tensors=() if relative else tuple(p.grad_tensors), q_offset=p.q_offset, kv_offset=p.kv_offset,
        q_len=p.Lg, kv_len=p.Sg, relative_bias=p.bias_fn() if relative else None)
    if got is None:
        return None
    ex, det = got
    backend = "spans" if det["structure"] == "intervals" and not isinstance(ex, TileExec) and (
        p.mod_rest is None or relative) else "blockwise"
    if p.backend is not None and p.backend != backend:
        return None
    if backend == "spans" and "backward" not in det:
        det["backward"] = native.describe(p.q)
    return Plan(backend, f"a mask callable whose structure ({det['structure']}) was derived once and cached", det, ex)


def tiles(p: Problem):
    """Everything else: online softmax over (query tile, key tile) pairs that skips empty tiles."""
    if p.bias is not None:
        return None
    from .blockwise import TileKernel

    common = dict(q_offset=p.q_offset, kv_offset=p.kv_offset, q_len=p.Lg, kv_len=p.Sg, device=p.device,
                  q_tile=p.config.q_tile, kv_tile=p.config.kv_tile)
    if p.biases and not p.grad_tensors:  # relative additive bias: a Toeplitz view per tile, never evaluated per tile
        tk = TileKernel(p.B, p.H, p.L, p.S, mask=p.mask, scale=p.eff_scale, bias_dtype=_acc(p),
                        relative_bias=p.bias_fn(), **common)
    else:
        tk = TileKernel(p.B, p.H, p.L, p.S, mask=p.mask, score_mod=p.mod_rest,
                        scale=p.eff_scale if p.mod_rest is None else p.scale, grad_tensors=p.grad_tensors, **common)
    det = {"skipped": round(tk.skipped_fraction(), 4)}
    if tk.block_mask is not None:
        det["tiles"] = tk.block_mask.counts()
    reason = "forced by backend=" if p.backend == "blockwise" else (
        "general mask/score_mod: online softmax over non-empty tiles")
    return Plan("blockwise", reason, det, TileExec(tk))


def _acc(p: Problem):
    from ..reference import _acc_dtype

    return _acc_dtype(p.dtype)


#: the backends each rule can give (a forced ``backend=`` walks only the rules that can give it)
_BACKENDS_OF = {}


def _rule(backends, fn):
    _BACKENDS_OF[fn] = (backends,) if isinstance(backends, str) else tuple(backends)
    return fn


#: the rules, in order: the first that applies is the plan
RULES = [
    _rule("reference", not_a_dot_product),
    _rule("spans", dropout_on_intervals),
    _rule("sdpa", dropout_in_sdpa),
    _rule("reference", dropout_elsewhere),
    _rule("decode", decode),
    _rule("bias", bias_tensor),
    _rule("blockwise", bias_in_tiles),
    _rule("sdpa", plain_sdpa),
    _rule("sdpa", key_padding_sdpa),
    _rule("sdpa", shared_interval_sdpa),
    _rule("sdpa", torch_sdpa),
    _rule("reference", tiny),
    _rule("reference", untracked_grads),
    _rule("spans", interval_spans),
    _rule("spans", interval_relative_compiled),
    _rule("spans", band_toeplitz),
    _rule("spans", segments_toeplitz),
    _rule("spans", interval_relative_half),
    _rule(("spans", "blockwise"), derived_callable),
    _rule("blockwise", tiles),
]


def backends_of(rule) -> tuple:
    """The backends a rule can give."""
    return _BACKENDS_OF[rule]


def no_kernel(p: Problem):
    """What no kernel takes (a bias tensor before its executor exists for these inputs): the textbook computation."""
    return _reference(p, "no kernel takes this problem: chunked textbook computation")


RULES.append(_rule("reference", no_kernel))


# ------------------------------------------------------------------------------------------ choosing


def choose(p: Problem) -> Plan:
    """The first plan of :data:`RULES` for the problem, or the forced backend's (refused when it cannot)."""
    if p.backend is not None and p.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {p.backend!r}.")
    if p.backend is not None:
        return _forced(p)
    for rule in RULES:
        plan = rule(p)
        if plan is not None:
            return plan
    raise AssertionError("unreachable: the last rule always applies")


def _forced(p: Problem) -> Plan:
    b = p.backend
    if b == "reference":
        return _reference(p, "forced by backend=")
    if p.compatibility is not None:
        raise Refused(f"backend={b!r} cannot apply the compatibility function {type(p.compatibility).__name__} (it "
                      "is not a dot product); use backend=None or 'reference'.")
    if p.dropout_p > 0:
        return _forced_dropout(p)
    if b == "sdpa":
        return _forced_sdpa(p)
    untracked_grads(p)
    for rule in RULES:
        if b in backends_of(rule):
            plan = rule(p)
            if plan is not None:
                return plan
    raise Refused(_REFUSALS.get(b, _refusal_generic)(p))


def _forced_dropout(p: Problem) -> Plan:
    b = p.backend
    rule = {"spans": dropout_on_intervals, "sdpa": dropout_in_sdpa}.get(b)
    if rule is None:
        raise Refused(f"dropout_p > 0 runs on backend 'spans' (the compiled interval kernels), 'reference' or "
                      f"'sdpa' (without a mask); got {b!r}.")
    plan = rule(p)
    if plan is not None:
        return plan
    if b == "spans":
        raise Refused("backend='spans' with dropout_p > 0 needs the compiled interval kernels "
                      f"({native.describe(p.q)}), a mask with one key interval per query row (got {p.mask!r}) "
                      "and no score_mod other than temperature/alibi/relative_bias without trainable "
                      f"tensors (got {p.score_mod!r}); use backend=None.")
    raise Refused("backend='sdpa' with dropout_p > 0 needs no mask (or top-left causal), no score_mod, no bias "
                  "and no logsumexp (torch SDPA's own dropout); use backend=None.")


def _forced_sdpa(p: Problem) -> Plan:
    from . import fused

    if p.mod_rest is not None:
        raise Refused("backend='sdpa' cannot apply a score_mod (other than temperature); use backend=None.")
    if not p.fused_ok:
        raise Refused(f"backend='sdpa' needs the fused CPU kernel; inputs are {p.dtype} on {p.device}.")
    if _plain(p) and p.bias is None:
        return Plan("sdpa", "forced by backend=", {"skipped": 0.5 if _aligned_causal(p) else 0.0},
                    SdpaExec(_aligned_causal(p), p.eff_scale))
    dt = fused.bias_dtype(p.dtype, True)
    bias = torch.zeros(p.B, 1, p.L, p.S, dtype=dt, device=p.device)
    if p.mask is not None:
        bias = torch.where(_dense(p), torch.zeros((), dtype=dt, device=p.device), float("-inf"))
    if p.bias is not None:
        bias = bias + p.bias.to(bias.dtype)
    return Plan("sdpa", "forced by backend=: dense L x S mask, like torch SDPA with a boolean mask",
                {"skipped": 0.0, "dense_mask_bytes": bias.numel() * bias.element_size()},
                SdpaExec(False, p.eff_scale, bias))


def _dense(p: Problem) -> torch.Tensor:
    """(B, H or 1, L, S) bool: the bound mask at the inputs' global positions."""
    dev = p.device
    b = torch.arange(p.B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(p.H, device=dev).view(1, -1, 1, 1)
    qi = (p.q_offset + torch.arange(p.L, device=dev)).view(1, 1, -1, 1)
    ki = (p.kv_offset + torch.arange(p.S, device=dev)).view(1, 1, 1, -1)
    return torch.as_tensor(p.mask(b, h, qi, ki)).expand(p.B, p.H, p.L, p.S)


def _refusal_spans(p: Problem) -> str:
    return (f"backend='spans' needs a mask whose visible keys form one interval per query row (got {p.mask!r}) and "
            "no score_mod other than temperature/alibi/relative_bias (on a band mask, packed documents or padding, "
            f"or on any interval mask when the compiled kernels are built: {native.describe(p.q)}) (got "
            f"{p.score_mod!r}); use backend=None or 'blockwise'.")


def _refusal_generic(p: Problem) -> str:
    return (f"backend={p.backend!r} cannot take this problem (mask {p.mask!r}, score_mod {p.score_mod!r}, "
            f"{p.dtype}, L={p.L}, S={p.S}{', a bias tensor' if p.bias is not None else ''}); use backend=None.")


_REFUSALS = {"spans": _refusal_spans}
