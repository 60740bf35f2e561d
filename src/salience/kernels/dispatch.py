"""Choose the compute path for one attention call and run it.

Backends:

* ``"sdpa"``: torch's fused ``scaled_dot_product_attention``, used for no mask and top-left causal with no
  score_mod (no mask tensor is built; causal goes through ``is_causal``).
* ``"reference"``: the textbook computation, chunked over query rows so memory stays O(chunk x S); any mask,
  score_mod or compatibility function.

``plan(...)`` returns the choice and the reason without computing anything; ``backend=`` forces a path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._result import AttentionResult
from ..masks import MaskMod
from ..reference import _acc_dtype, scores, softmax_from_scores

__all__ = ["Plan", "BACKENDS", "choose", "run"]

BACKENDS = ("sdpa", "reference")

#: query rows per chunk on the reference path
REFERENCE_CHUNK = 512


@dataclass
class Plan:
    """What :func:`salience.attention` will do for given inputs: the backend and why."""

    backend: str
    reason: str
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.details.items())
        return f"Plan(backend={self.backend!r}: {self.reason}{extra})"


def _is_top_left_causal(mask) -> bool:
    return isinstance(mask, MaskMod) and getattr(mask, "kind", None) == ("causal", "top_left")


def choose(q, k, v, *, mask, score_mod, compatibility, need_lse: bool, backend: str | None) -> Plan:
    """Pick a backend for validated inputs (mask already a MaskMod or None)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}.")
        if backend == "sdpa" and (score_mod is not None or compatibility is not None):
            raise ValueError("backend='sdpa' cannot apply a score_mod or compatibility function; use backend=None.")
        return Plan(backend, "forced by backend=")
    simple = score_mod is None and compatibility is None and not need_lse
    if simple and mask is None:
        return Plan("sdpa", "no mask, no score_mod: torch's fused kernel")
    if simple and _is_top_left_causal(mask):
        return Plan("sdpa", "top-left causal: torch's fused kernel with is_causal")
    return Plan("reference", "general mask/score_mod/logsumexp: chunked textbook computation")


def _sdpa(q, k, v, mask, scale, dropout_p) -> torch.Tensor:
    H, Hkv = q.shape[1], k.shape[1]
    causal = mask is not None
    if mask is not None and not _is_top_left_causal(mask):
        dense = mask.to_dense(q.shape[0], H, q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, dropout_p=dropout_p, scale=scale, enable_gqa=H != Hkv
        )
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale, enable_gqa=H != Hkv
    )


def _reference_chunked(q, k, v, mask, score_mod, scale, compatibility, dropout_p) -> AttentionResult:
    from .._layout import expand_kv

    H, L = q.shape[1], q.shape[2]
    ke, ve = expand_kv(k, H), expand_kv(v, H)
    outs, lses = [], []
    for i in range(0, L, REFERENCE_CHUNK):
        rows = torch.arange(i, min(i + REFERENCE_CHUNK, L), device=q.device)
        s = scores(q[:, :, i : i + REFERENCE_CHUNK], ke, mask=mask, score_mod=score_mod, scale=scale,
                   compatibility=compatibility, rows=rows, L=L)
        w, lse = softmax_from_scores(s)
        if dropout_p > 0:
            w = F.dropout(w, p=dropout_p)
        outs.append(w @ ve)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
    return AttentionResult(out=out, lse=lse.to(_acc_dtype(q.dtype)))


def run(plan: Plan, q, k, v, *, mask, score_mod, scale, compatibility, dropout_p) -> AttentionResult | torch.Tensor:
    """Execute a plan; returns a tensor for sdpa (no lse) and an AttentionResult otherwise."""
    if plan.backend == "sdpa":
        return _sdpa(q, k, v, mask, scale, dropout_p)
    return _reference_chunked(q, k, v, mask, score_mod, scale, compatibility, dropout_p)
