"""One block of ring attention: local queries against one received key/value segment, at global positions.

A *block* is a run of consecutive global query positions ``[q0, q0 + nq)`` against a run of key positions
``[k0, k0 + nk)``. The mask and score_mod see the global indices. Each block is first classified from the
mask's tile bounds (analytically for the named masks of :mod:`salience.masks`, by evaluation otherwise):

* ``empty``: nothing visible, not computed at all;
* ``full`` (every key visible, no score_mod) and ``causal`` (the block is the diagonal of a causal band):
  torch's fused CPU flash kernel, which returns the logsumexp and has a backward that takes the *global*
  output and logsumexp, exactly what a ring needs;
* ``tiled``: tiles of ``TILE`` queries against the key span their non-empty key tiles cover; the mask is
  evaluated only where a tile is partially visible. Any mask, any score_mod, any device.

The backward of a block takes the final (merged) output and logsumexp of the whole row, so that the block's
gradients are its exact share of the global gradient: with ``p = exp(s - lse)``,
``dV = p^T dO``, ``dS = p * (dO V^T - rowsum(dO * O))``, ``dQ = dS K scale``, ``dK = dS^T Q scale``
(through the score_mod's derivative when there is one). Rows whose global logsumexp is -inf (no visible key
anywhere) get zero gradients.

Shapes (see :mod:`salience._layout`): q ``(B, H, nq, D)``, k ``(B, Hkv, nk, D)``, v ``(B, Hkv, nk, Dv)``,
out ``(B, H, nq, Dv)``, lse ``(B, H, nq)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._layout import expand_kv
from .._result import AttentionResult
from ..blocks import EMPTY, FULL
from ..masks import MaskMod, TileContext, check_mask_output
from ..reference import softmax_from_scores

__all__ = ["TILE", "Spec", "BlockPlan", "plan_block", "block_forward", "block_backward", "acc_dtype"]

#: query/key tile size used to classify blocks and to run the tiled path
TILE = 128

_NEG_INF = float("-inf")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for outputs, logsumexps and gradients: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flash_available(q: torch.Tensor, Dv: int) -> bool:
    return (
        q.device.type == "cpu"
        and q.shape[-1] == Dv
        and q.dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


@dataclass
class Spec:
    """What every block computes: the bound mask (global L x S), score_mod, scale and global sizes."""

    mask: MaskMod | None
    score_mod: object | None
    scale: float
    L: int
    S: int
    B: int
    H: int
    Hkv: int
    D: int
    Dv: int
    use_flash: bool = True
    cache: dict = field(default_factory=dict)


@dataclass
class BlockPlan:
    """How one block is computed: ``kind`` in empty/full/causal/tiled, and for tiled the per-query-tile
    key spans (in key tiles) and whether a span needs the mask evaluated."""

    kind: str
    spans: list = field(default_factory=list)  # per q tile: (lo, hi, needs_mask) in key tiles, or None


def _edges(start: int, n: int, device):
    s = torch.arange(0, n, TILE, device=device)
    e = torch.clamp(s + TILE, max=n)
    return s + start, e + start


def _classes(spec: Spec, q0: int, nq: int, k0: int, nk: int, device) -> torch.Tensor:
    """Tile classes (nq_t, nk_t): EMPTY / PARTIAL / FULL, reduced over batch and heads (a tile is FULL only
    if it is full for every batch row and head, EMPTY only if empty for all)."""
    qs, qe = _edges(q0, nq, device)
    ks, ke = _edges(k0, nk, device)
    m = spec.mask
    ctx = TileContext(spec.B, spec.H, spec.L, spec.S, qs.view(-1, 1), qe.view(-1, 1), ks.view(1, -1),
                      ke.view(1, -1), torch.device(device) if device is not None else qs.device)
    bounds = m.tile_bounds(ctx)
    if bounds is not None:
        any_, all_ = (torch.as_tensor(t, device=qs.device) for t in bounds)
        shape = torch.broadcast_shapes(any_.shape, all_.shape, (qs.numel(), ks.numel()))
        any_, all_ = any_.expand(shape), all_.expand(shape)
        while any_.dim() > 2:
            any_, all_ = any_.any(0), all_.all(0)
    else:
        any_, all_ = _evaluate_tiles(spec, qs, qe, k0, nk, device)
    full = all_ & any_
    return torch.where(full, FULL, torch.where(any_, 1, EMPTY)).to(torch.int8)


def _evaluate_tiles(spec: Spec, qs, qe, k0, nk, device):
    """Classify tiles of an arbitrary callable mask by evaluating it, one query tile at a time."""
    B, H = spec.B, spec.H
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    kv = torch.arange(k0, k0 + nk, device=device).view(1, 1, 1, -1)
    nkt = (nk + TILE - 1) // TILE
    pad = nkt * TILE - nk
    anys, alls = [], []
    for a, z in zip(qs.tolist(), qe.tolist()):
        qi = torch.arange(a, z, device=device).view(1, 1, -1, 1)
        vis = check_mask_output(spec.mask(b, h, qi, kv), spec.mask, (B, H, z - a, nk))
        anys.append(torch.nn.functional.pad(vis, (0, pad), value=False).view(B, H, -1, nkt, TILE).any(-1).any(2))
        alls.append(torch.nn.functional.pad(vis, (0, pad), value=True).view(B, H, -1, nkt, TILE).all(-1).all(2))
    any_ = torch.stack(anys, 2).any(0).any(0)
    all_ = torch.stack(alls, 2).all(0).all(0)
    return any_, all_


def plan_block(spec: Spec, q0: int, nq: int, k0: int, nk: int, device) -> BlockPlan:
    """Classify the block ``[q0, q0+nq) x [k0, k0+nk)`` (global positions); cached per block in ``spec``."""
    key = (q0, nq, k0, nk)
    hit = spec.cache.get(key)
    if hit is not None:
        return hit
    plan = _plan_block(spec, q0, nq, k0, nk, device)
    spec.cache[key] = plan
    return plan


def _plan_block(spec: Spec, q0, nq, k0, nk, device) -> BlockPlan:
    flash = spec.use_flash and spec.score_mod is None
    if spec.mask is None:
        return BlockPlan("full" if flash else "tiled", [(0, (nk + TILE - 1) // TILE, False)] * ((nq + TILE - 1) // TILE))
    band = getattr(spec.mask, "band", None)
    if flash and band is not None and band[0] is None and band[1] is not None and band[1] == k0 - q0:
        # visible iff (k0 + j) - (q0 + i) <= hi, i.e. j <= i: a top-left causal block
        return BlockPlan("causal")
    c = _classes(spec, q0, nq, k0, nk, device)
    if not bool((c != EMPTY).any()):
        return BlockPlan("empty")
    if flash and bool((c == FULL).all()):
        return BlockPlan("full")
    ne = c != EMPTY
    nkt = c.shape[1]
    spans = []
    for i in range(c.shape[0]):
        row = ne[i]
        if not bool(row.any()):
            spans.append(None)
            continue
        idx = torch.nonzero(row).view(-1)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        needs_mask = not bool((c[i, lo:hi] == FULL).all())
        spans.append((lo, hi, needs_mask))
    del nkt
    return BlockPlan("tiled", spans)


# ------------------------------------------------------------------------------------------- forward


def _flash_forward(q, k, v, causal: bool, scale: float, H: int) -> AttentionResult:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, expand_kv(k, H), expand_kv(v, H), 0.0, causal, scale=scale
    )
    return AttentionResult(out=out, lse=lse)


def _index(spec: Spec, device):
    b = torch.arange(spec.B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(spec.H, device=device).view(1, -1, 1, 1)
    return b, h


def _tile_scores(spec: Spec, qt, kt, qpos, kpos, b, h, needs_mask: bool):
    """Scores (B, H, tq, tk) of a query tile against a key span, score_mod applied, hidden keys -inf."""
    s = (qt @ kt.transpose(-2, -1)) * spec.scale
    if spec.score_mod is not None:
        s2 = spec.score_mod(s, b, h, qpos.view(1, 1, -1, 1), kpos.view(1, 1, 1, -1))
        if not isinstance(s2, torch.Tensor) or s2.shape != s.shape:
            seen = tuple(s2.shape) if isinstance(s2, torch.Tensor) else type(s2).__name__
            raise ValueError(
                f"score_mod {getattr(spec.score_mod, 'name', spec.score_mod)} returned {seen} for scores of shape "
                f"{tuple(s.shape)}; a score_mod must return a tensor of the score's shape."
            )
        s = s2.to(s.dtype)
    if needs_mask:
        vis = check_mask_output(
            spec.mask(b, h, qpos.view(1, 1, -1, 1), kpos.view(1, 1, 1, -1)), spec.mask, tuple(s.shape)
        )
        s = s.masked_fill(~vis, _NEG_INF)
    return s


def _compute_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def block_forward(spec: Spec, q, k, v, q0: int, k0: int) -> AttentionResult | None:
    """Attention of queries ``q`` (global positions ``q0..``) over keys ``k, v`` (positions ``k0..``).

    Returns ``(out, lse)`` for this block alone (out in the accumulation dtype or q's dtype, lse in the
    accumulation dtype; rows with no visible key: out 0, lse -inf), or None when the block is empty."""
    nq, nk = q.shape[2], k.shape[2]
    plan = plan_block(spec, q0, nq, k0, nk, q.device)
    if plan.kind == "empty":
        return None
    if plan.kind in ("full", "causal"):
        return _flash_forward(q, k, v, plan.kind == "causal", spec.scale, spec.H)
    cd = _compute_dtype(q.dtype)
    acc = acc_dtype(q.dtype)
    qc, ke, ve = q.to(cd), expand_kv(k, spec.H).to(cd), expand_kv(v, spec.H).to(cd)
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], _NEG_INF, dtype=acc, device=q.device)
    b, h = _index(spec, q.device)
    for i, span in enumerate(plan.spans):
        if span is None:
            continue
        lo, hi, needs_mask = span
        a, z = i * TILE, min((i + 1) * TILE, nq)
        ka, kz = lo * TILE, min(hi * TILE, nk)
        qpos = torch.arange(q0 + a, q0 + z, device=q.device)
        kpos = torch.arange(k0 + ka, k0 + kz, device=q.device)
        s = _tile_scores(spec, qc[:, :, a:z], ke[:, :, ka:kz], qpos, kpos, b, h, needs_mask)
        w, l_t = softmax_from_scores(s)
        out[:, :, a:z] = (w @ ve[:, :, ka:kz]).to(acc)
        lse[:, :, a:z] = l_t.to(acc)
    return AttentionResult(out=out, lse=lse)


# ------------------------------------------------------------------------------------------ backward


def safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see no key anywhere) replaced by +inf, so that exp(s - lse) is 0 there."""
    return torch.where(lse == _NEG_INF, torch.full((), float("inf"), dtype=lse.dtype, device=lse.device), lse)


def _reduce_heads(g: torch.Tensor, Hkv: int) -> torch.Tensor:
    B, H = g.shape[:2]
    if H == Hkv:
        return g
    return g.view(B, Hkv, H // Hkv, *g.shape[2:]).sum(2)


def block_backward(spec: Spec, q, k, v, out, lse_safe, dout, delta, q0: int, k0: int):
    """Gradients ``(dq, dk, dv)`` of this block's share of the loss, or None for an empty block.

    Args:
        out: the final output of these query rows over *all* keys (q's dtype), ``(B, H, nq, Dv)``.
        lse_safe: their final logsumexp (accumulation dtype) with -inf replaced by +inf (:func:`safe_lse`).
        dout: gradient of the output ``(B, H, nq, Dv)``.
        delta: ``rowsum(dout * out)`` in the accumulation dtype ``(B, H, nq)`` (tiled path only).

    dq is ``(B, H, nq, D)``, dk ``(B, Hkv, nk, D)``, dv ``(B, Hkv, nk, Dv)``, in the accumulation dtype.
    """
    nq, nk = q.shape[2], k.shape[2]
    plan = plan_block(spec, q0, nq, k0, nk, q.device)
    acc = acc_dtype(q.dtype)
    if plan.kind == "empty":
        return None
    if plan.kind in ("full", "causal"):
        H = spec.H
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, expand_kv(k, H), expand_kv(v, H), out, lse_safe, 0.0, plan.kind == "causal", scale=spec.scale
        )
        return dq.to(acc), _reduce_heads(dk, spec.Hkv).to(acc), _reduce_heads(dv, spec.Hkv).to(acc)
    cd = _compute_dtype(q.dtype)
    qc, ke, ve = q.to(cd), expand_kv(k, spec.H).to(cd), expand_kv(v, spec.H).to(cd)
    doc = dout.to(cd)
    lse_c = lse_safe.to(cd)
    delta_c = delta.to(cd)
    dq = torch.zeros(qc.shape, dtype=acc, device=q.device)
    dk = torch.zeros(ke.shape, dtype=acc, device=q.device)
    dv = torch.zeros(ve.shape, dtype=acc, device=q.device)
    b, h = _index(spec, q.device)
    for i, span in enumerate(plan.spans):
        if span is None:
            continue
        lo, hi, needs_mask = span
        a, z = i * TILE, min((i + 1) * TILE, nq)
        ka, kz = lo * TILE, min(hi * TILE, nk)
        qpos = torch.arange(q0 + a, q0 + z, device=q.device)
        kpos = torch.arange(k0 + ka, k0 + kz, device=q.device)
        qt, kt, vt = qc[:, :, a:z], ke[:, :, ka:kz], ve[:, :, ka:kz]
        if spec.score_mod is not None:
            with torch.enable_grad():
                raw = ((qt @ kt.transpose(-2, -1)) * spec.scale).detach().requires_grad_(True)
                smod = _score_mod_only(spec, raw, b, h, qpos, kpos)
                s = smod.detach()
                if needs_mask:
                    s = _mask_scores(spec, s, b, h, qpos, kpos)
        else:
            s = _tile_scores(spec, qt, kt, qpos, kpos, b, h, needs_mask)
        p = torch.exp(s - lse_c[:, :, a:z, None])
        do_t = doc[:, :, a:z]
        dv[:, :, ka:kz] += (p.transpose(-2, -1) @ do_t).to(acc)
        ds = p * (do_t @ vt.transpose(-2, -1) - delta_c[:, :, a:z, None])
        if spec.score_mod is not None:
            (ds,) = torch.autograd.grad(smod, raw, ds)
            ds = torch.where(p > 0, ds, torch.zeros((), dtype=ds.dtype, device=ds.device)) if needs_mask else ds
        dq[:, :, a:z] = ((ds @ kt) * spec.scale).to(acc)
        dk[:, :, ka:kz] += ((ds.transpose(-2, -1) @ qt) * spec.scale).to(acc)
    return dq, _reduce_heads(dk, spec.Hkv), _reduce_heads(dv, spec.Hkv)


def _score_mod_only(spec: Spec, raw, b, h, qpos, kpos):
    s2 = spec.score_mod(raw, b, h, qpos.view(1, 1, -1, 1), kpos.view(1, 1, 1, -1))
    return s2.to(raw.dtype)


def _mask_scores(spec: Spec, s, b, h, qpos, kpos):
    vis = check_mask_output(spec.mask(b, h, qpos.view(1, 1, -1, 1), kpos.view(1, 1, 1, -1)), spec.mask, tuple(s.shape))
    return s.masked_fill(~vis, _NEG_INF)
