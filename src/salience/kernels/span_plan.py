"""Span plans: query rows cut into runs that torch's fused CPU kernel computes over just the keys they see.

Given one visible key interval ``[lo_i, hi_i)`` per query row (see :func:`salience.structure.row_intervals`),
:func:`plan_spans` cuts the rows into runs that the fused CPU kernel (:mod:`salience.kernels.fused`) computes
over just the keys they need:

* **flat** runs (every row the same interval, e.g. one document) -> one fused call, no mask;
* **causal** runs (the interval grows by one key per row) -> one fused call with ``is_causal`` over the
  triangle plus, when the interval starts earlier, one unmasked call over the rectangle before it, merged
  with :func:`salience.merge`;
* **band** runs (the interval slides by one key per row, a sliding window) -> the rows are cut into
  blocks of ``q_block`` queries, and all blocks go to *one* fused call: the key windows are strided views
  of k and v (no copy) and the band mask is one small ``(q_block, span)`` tensor shared by every block;
* anything else (short or irregular runs) -> blocks of rows with an explicit mask over the key range
  they need.

Runs of the same shape are batched into one call (e.g. many equal-length documents), so Python overhead
stays small. Work is O(sum of computed spans) and memory O(L * D) plus one block's mask: no ``L x S``
tensor. The backward is the compiled interval kernel's when it is built (:mod:`salience.kernels.native`),
else the fused backward per call, given the final output and logsumexp. Block sizes come from a
:class:`salience.kernels.config.KernelConfig`.

Example:
    >>> import torch
    >>> from salience.kernels.span_plan import plan_spans
    >>> lo, hi = torch.zeros(1, 64, dtype=torch.long), torch.tensor([[32] * 32 + [64] * 32])
    >>> plan_spans(lo, hi, 1, 64, 64).summary()["calls_by_kind"]
    {'full': 2}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference import _acc_dtype
from . import fused, native
from .config import DEFAULT, KernelConfig

__all__ = ["SpanPlan", "plan_spans"]

@dataclass
class _Call:
    """One fused call: pieces of equal shape, run batched."""

    kind: str  # "full", "causal", "masked", "band"
    nrows: int
    nkeys: int
    pieces: list  # (b0, b1, r0, k0, mask_or_None, seg_index)
    # band only
    nblocks: int = 0
    q_block: int = 0


@dataclass
class SpanPlan:
    """How the rows of one problem are cut into fused calls.

    Attributes:
        B, L, S: sizes; calls: the fused calls; seg_parts: for each segment of rows, how many calls
        contribute to it (2 for causal runs that start after their interval, which are merged);
        computed: score elements the calls compute (per batch row and head); visible: elements the mask
        shows; segments: number of row runs.
    """

    B: int
    L: int
    S: int
    calls: list = field(default_factory=list)
    segments: list = field(default_factory=list)  # (b0, b1, r0, r1, nparts)
    computed: int = 0
    visible: int = 0
    lo: torch.Tensor | None = None  # (1 or B, L) row intervals the plan was built from
    config: KernelConfig = DEFAULT
    hi: torch.Tensor | None = None

    def _intervals(self, which: str) -> list:
        """Row intervals (b0, b1, r0, r1) that no segment covers ("uncovered") or that no band call covers
        ("not_band"), computed once."""
        cache = self.__dict__.setdefault("_interval_cache", {})
        if which in cache:
            return cache[which]
        cov = torch.zeros(self.B, self.L + 1, dtype=torch.bool)
        for b0, b1, r0, r1, _ in self.segments:
            cov[b0:b1, r0:r1] = True
        band = torch.zeros(self.B, self.L + 1, dtype=torch.bool)
        for c in self.calls:
            if c.kind == "band":
                b0, b1, r0 = c.pieces[0][:3]
                band[b0:b1, r0:r0 + c.nblocks * c.q_block] = True
        for name, m in (("uncovered", cov), ("not_band", band)):
            out = []
            rows = [m[b] for b in range(self.B)]
            same = all(torch.equal(rows[0], r) for r in rows[1:])
            for b in ([0] if same else range(self.B)):
                flip = torch.nonzero(rows[b][1:] != rows[b][:-1]).view(-1) + 1
                edges = [0] + flip.tolist() + [self.L]
                for a, z in zip(edges[:-1], edges[1:]):
                    if z > a and not bool(rows[b][a]):
                        out.append((0, self.B, a, z) if same else (b, b + 1, a, z))
            cache[name] = out
        return cache[which]

    @property
    def efficiency(self) -> float:
        """visible / computed (1.0 = no wasted work)."""
        return self.visible / max(1, self.computed)

    def summary(self) -> dict:
        kinds = {}
        for c in self.calls:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {"fused_calls": len(self.calls), "calls_by_kind": kinds, "row_runs": len(self.segments),
                "useful_work": round(self.efficiency, 3)}

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, q, k, v, scale: float):
        """``(out, lse)`` for validated q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)."""
        B, H, L, _ = q.shape
        Dv = v.shape[-1]
        acc = _acc_dtype(q.dtype)
        out = q.new_empty(B, H, L, Dv)
        for b0, b1, r0, r1 in self._intervals("uncovered"):  # rows no call writes: no visible key
            out[b0:b1, :, r0:r1] = 0
        lse = torch.full((B, H, L), float("-inf"), dtype=acc, device=q.device)
        pending = {}
        ctx = _Tensors(q, k, v, self.config)
        for call in self.calls:
            for piece, (o, l) in _run_forward(call, ctx, scale):
                b0, b1, r0 = piece[0], piece[1], piece[2]
                seg = piece[5]
                nparts = self.segments[seg][4]
                if call.kind == "band":
                    rows = o.shape[2]
                    out[b0:b1, :, r0:r0 + rows] = o
                    lse[b0:b1, :, r0:r0 + rows] = l
                    continue
                if nparts == 1:
                    out[b0:b1, :, r0:r0 + call.nrows] = o
                    lse[b0:b1, :, r0:r0 + call.nrows] = l
                elif seg in pending:
                    from .merge import merge

                    o1, l1 = pending.pop(seg)
                    m = merge(o1, l1, o, l)
                    out[b0:b1, :, r0:r0 + call.nrows] = m.out
                    lse[b0:b1, :, r0:r0 + call.nrows] = m.lse
                else:
                    pending[seg] = (o, l)
        return out, lse

    # -- backward ---------------------------------------------------------------------------------
    def uses_native(self, q) -> bool:
        """Whether :meth:`backward` runs the compiled interval kernel for inputs like ``q``."""
        return self.lo is not None and native.available(q)

    def backward(self, q, k, v, out, lse, dout, dlse, scale: float):
        """``(dq, dk, dv)`` given the output and logsumexp of :meth:`forward` and their gradients.

        Uses the compiled interval backward (:mod:`salience.kernels.native`) when it is available, which visits
        only the keys each tile of rows can see; otherwise torch's fused backward on the plan's calls."""
        if self.uses_native(q):
            return native.span_backward(q, k, v, out, lse, dout, dlse, self.lo, self.hi, scale)
        acc = _acc_dtype(q.dtype)
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        for b0, b1, r0, r1 in self._intervals("not_band"):  # band rows are assigned, the others accumulate
            dq[b0:b1, :, r0:r1] = 0
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        ctx = _Tensors(q, k, v, self.config)
        for call in self.calls:
            _run_backward(call, ctx, out, lse, dout, dlse, scale, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Tensors:
    """q, k, v plus lazily made contiguous / head-expanded copies for the strided band views."""

    def __init__(self, q, k, v, config: KernelConfig):
        self.config = config
        self.q, self.k, self.v = q, k, v
        self._band = None

    def band_inputs(self):
        if self._band is None:
            H = self.q.shape[1]
            k, v = self.k, self.v
            if k.shape[1] != H:
                k = k.repeat_interleave(H // k.shape[1], dim=1)
                v = v.repeat_interleave(H // v.shape[1], dim=1)
            self._band = (self.q.contiguous(), k.contiguous(), v.contiguous())
        return self._band


def _band_mask(q_block: int, width: int, dtype, device) -> torch.Tensor:
    """(q_block, q_block - 1 + width) additive mask: row r sees local keys r <= j < r + width."""
    span = q_block - 1 + width
    r = torch.arange(q_block, device=device).view(-1, 1)
    j = torch.arange(span, device=device).view(1, -1)
    vis = (j >= r) & (j < r + width)
    return torch.zeros(q_block, span, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))


def _interval_mask(lo, hi, k0: int, nkeys: int, dtype, device) -> torch.Tensor:
    """(rows, nkeys) additive mask from per-row intervals (global-local key coords, offset by k0)."""
    j = torch.arange(k0, k0 + nkeys, device=device).view(1, -1)
    vis = (j >= lo.to(device).view(-1, 1)) & (j < hi.to(device).view(-1, 1))
    return torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))


def _band_chunks(call: _Call, max_rows: int):
    """Split a band call into sub-calls of at most ``max_rows`` rows: (block offset, nblocks)."""
    per = max(1, max_rows // call.q_block)
    for t0 in range(0, call.nblocks, per):
        yield t0, min(per, call.nblocks - t0)


def _windows(x: torch.Tensor, b0: int, b1: int, start: int, nblocks: int, stride: int, width: int):
    """(nb*H, nblocks, width, D) overlapping windows of a contiguous (B, H, N, D) tensor, no copy."""
    _, H, N, D = x.shape
    off = x.storage_offset() + (b0 * H * N + start) * D
    return x.as_strided(((b1 - b0) * H, nblocks, width, D), (N * D, stride * D, D, 1), off)


def _run_forward(call: _Call, ctx: _Tensors, scale: float):
    """Yield (piece, (out, lse)) for every piece of a call; out (nb, H, rows, Dv), lse (nb, H, rows)."""
    q, k, v = ctx.q, ctx.k, ctx.v
    if call.kind == "band":
        qc, kc, vc = ctx.band_inputs()
        b0, b1, r0, k0, mask, seg = call.pieces[0]
        H = q.shape[1]
        for t0, nb in _band_chunks(call, ctx.config.max_rows_per_call):
            qb = call.q_block
            qw = _windows(qc, b0, b1, r0 + t0 * qb, nb, qb, qb)
            kw = _windows(kc, b0, b1, k0 + t0 * qb, nb, qb, call.nkeys)
            vw = _windows(vc, b0, b1, k0 + t0 * qb, nb, qb, call.nkeys)
            o, lse = fused.forward(qw, kw, vw, scale=scale, bias=mask)
            o = o.reshape(b1 - b0, H, nb * qb, -1)
            lse = lse.reshape(b1 - b0, H, nb * qb)
            yield (b0, b1, r0 + t0 * qb, k0, None, seg), (o, lse)
        return
    qs, ks, vs, bias = _gather(call, q, k, v)
    o, lse = fused.forward(qs, ks, vs, scale=scale, causal=call.kind == "causal", bias=bias)
    if call.kind == "masked":
        lse = _fix_empty_rows(lse, bias)
    n = len(call.pieces)
    if n == 1:
        yield call.pieces[0], (o, lse)
        return
    nb = o.shape[0] // n
    for i, piece in enumerate(call.pieces):
        yield piece, (o[i * nb:(i + 1) * nb], lse[i * nb:(i + 1) * nb])


def _fix_empty_rows(lse, bias):
    """Rows whose mask hides every key get lse -inf (the kernel reports 0)."""
    empty = torch.isneginf(bias).all(-1)  # (n or 1, 1, rows), broadcasts over heads
    return lse.masked_fill(empty, float("-inf"))


def _gather(call: _Call, q, k, v):
    """The inputs of a non-band call: views for one piece, stacked copies for several."""
    nr, nk = call.nrows, call.nkeys
    if len(call.pieces) == 1:
        b0, b1, r0, k0, mask, _ = call.pieces[0]
        bias = None if mask is None else mask.view(1, 1, nr, nk)
        return q[b0:b1, :, r0:r0 + nr], k[b0:b1, :, k0:k0 + nk], v[b0:b1, :, k0:k0 + nk], bias
    qs = torch.cat([q[b0:b1, :, r0:r0 + nr] for b0, b1, r0, k0, _, _ in call.pieces])
    ks = torch.cat([k[b0:b1, :, k0:k0 + nk] for b0, b1, r0, k0, _, _ in call.pieces])
    vs = torch.cat([v[b0:b1, :, k0:k0 + nk] for b0, b1, r0, k0, _, _ in call.pieces])
    bias = None
    if call.kind == "masked":
        bias = torch.cat([m.view(1, 1, nr, nk).expand(b1 - b0, 1, nr, nk) for b0, b1, _, _, m, _ in call.pieces])
    return qs, ks, vs, bias


_MASKS: dict = {}


def _band_mask_cached(q_block, width, dtype, device):
    key = (q_block, width, dtype, str(device))
    m = _MASKS.get(key)
    if m is None:
        if len(_MASKS) > 64:
            _MASKS.clear()
        m = _MASKS[key] = _band_mask(q_block, width, dtype, device)
    return m


def _band_backward_call(ctx, qc, kc, vc, b0, b1, rs, ks0, nb, qb, nk, mask, out, lse, dout, dlse, scale, dq, dk, dv):
    """Backward of nb band blocks of qb rows (rows rs.., keys ks0.. advancing qb per block, nk keys each)."""
    H = ctx.q.shape[1]
    Hkv = ctx.k.shape[1]
    qw = _windows(qc, b0, b1, rs, nb, qb, qb)
    kw = _windows(kc, b0, b1, ks0, nb, qb, nk)
    vw = _windows(vc, b0, b1, ks0, nb, qb, nk)
    nrow = nb * qb
    shp = ((b1 - b0) * H, nb, qb)
    o_ = out[b0:b1, :, rs:rs + nrow].reshape(*shp, -1)
    l_ = lse[b0:b1, :, rs:rs + nrow].reshape(shp)
    do_ = dout[b0:b1, :, rs:rs + nrow].reshape(*shp, -1)
    dl_ = None if dlse is None else dlse[b0:b1, :, rs:rs + nrow].reshape(shp)
    gq, gk, gv = fused.backward(do_, qw, kw, vw, o_, l_, scale=scale, bias=mask, dlse=dl_)
    dq[b0:b1, :, rs:rs + nrow] = gq.reshape(b1 - b0, H, nrow, -1)  # band rows get exactly one write
    _add_windows(dk, gk, b0, b1, ks0, nb, qb, nk, Hkv)
    _add_windows(dv, gv, b0, b1, ks0, nb, qb, nk, Hkv)


def _add_windows(acc, grad, b0, b1, start, nb, stride, width, Hkv):
    """acc[b0:b1, :, start + t*stride : ... + width] += grad[:, t] for every window t, without copies: windows
    t, t + m, t + 2m, ... (m = ceil(width / stride)) do not overlap, so each residue is one strided add."""
    nbatch = b1 - b0
    H = grad.shape[0] // nbatch
    if Hkv != H:  # grouped-query heads: sum the group first
        grad = grad.reshape(nbatch, Hkv, H // Hkv, nb, width, grad.shape[-1]).sum(2).reshape(nbatch * Hkv, nb, width, -1)
    m = -(-width // stride)
    _, Hk, N, D = acc.shape
    for r in range(min(m, nb)):
        cnt = (nb - r + m - 1) // m
        off = acc.storage_offset() + (b0 * Hk * N + start + r * stride) * D
        view = acc.as_strided((nbatch * Hk, cnt, width, D), (N * D, m * stride * D, D, 1), off)
        view.add_(grad[:, r::m])


def _run_backward(call: _Call, ctx: _Tensors, out, lse, dout, dlse, scale, dq, dk, dv):
    q, k, v = ctx.q, ctx.k, ctx.v
    if call.kind == "band":
        # the backward kernel is more efficient on taller blocks than the forward: re-block the run
        qc, kc, vc = ctx.band_inputs()
        b0, b1, r0, k0, _, _ = call.pieces[0]
        qb = call.q_block
        width = call.nkeys - qb + 1
        n = call.nblocks * qb
        target = ctx.config.band_q_block_bwd.get(q.dtype, qb)
        qb_b = max(qb, (target // qb) * qb)
        head = (n // qb_b) * qb_b
        mdt = fused.bias_dtype(q.dtype, exact_mask=True)
        for rs0, ks0, nrows, bq in ((r0, k0, head, qb_b), (r0 + head, k0 + head, n - head, qb)):
            if nrows == 0:
                continue
            mask = _band_mask_cached(bq, width, mdt, q.device)
            per = max(1, ctx.config.max_rows_per_call_bwd // bq)
            for t0 in range(0, nrows // bq, per):
                nb = min(per, nrows // bq - t0)
                _band_backward_call(ctx, qc, kc, vc, b0, b1, rs0 + t0 * bq, ks0 + t0 * bq, nb, bq, bq - 1 + width,
                                    mask, out, lse, dout, dlse, scale, dq, dk, dv)
        return
    qs, ks, vs, bias = _gather(call, q, k, v)
    nr, nkey = call.nrows, call.nkeys
    pieces = call.pieces
    os_ = torch.cat([out[b0:b1, :, r0:r0 + nr] for b0, b1, r0, _, _, _ in pieces])
    ls_ = torch.cat([lse[b0:b1, :, r0:r0 + nr] for b0, b1, r0, _, _, _ in pieces])
    do_ = torch.cat([dout[b0:b1, :, r0:r0 + nr] for b0, b1, r0, _, _, _ in pieces])
    dl_ = None if dlse is None else torch.cat([dlse[b0:b1, :, r0:r0 + nr] for b0, b1, r0, _, _, _ in pieces])
    gq, gk, gv = fused.backward(do_, qs, ks, vs, os_, ls_, scale=scale, causal=call.kind == "causal", bias=bias,
                                dlse=dl_)
    i = 0
    for b0, b1, r0, k0, _, _ in pieces:
        n = b1 - b0
        dq[b0:b1, :, r0:r0 + nr] += gq[i:i + n]
        dk[b0:b1, :, k0:k0 + nkey] += gk[i:i + n]
        dv[b0:b1, :, k0:k0 + nkey] += gv[i:i + n]
        i += n


# ---------------------------------------------------------------------------------------- building plans


def _runs(lo: torch.Tensor, hi: torch.Tensor):
    """Cut rows into runs: yields (kind, r0, r1) with kind in flat/causal/band/irregular; empty rows skipped."""
    L = lo.numel()
    ne = (hi > lo)
    if L == 1:
        if bool(ne[0]):
            yield ("flat", 0, 1)
        return
    dlo, dhi = lo[1:] - lo[:-1], hi[1:] - hi[:-1]
    code = torch.full((L - 1,), 3, dtype=torch.long)
    code[(dlo == 0) & (dhi == 0)] = 0
    code[(dlo == 0) & (dhi == 1)] = 1
    code[(dlo == 1) & (dhi == 1)] = 2
    code[~(ne[1:] & ne[:-1])] = 4
    change = (torch.nonzero(code[1:] != code[:-1]).view(-1) + 1).tolist()
    starts = [0] + change
    ends = change + [L - 1]
    codes = code[torch.tensor(starts, dtype=torch.long)].tolist()
    names = {0: "flat", 1: "causal", 2: "band"}
    ne_l = ne.tolist()
    row = 0  # first row not yet assigned
    for s, e, c in zip(starts, ends, codes):
        # the code run [s, e) relates rows s..e (inclusive)
        if c in names:
            r0 = max(row, s)
            if r0 <= e:
                yield (names[c], r0, e + 1)
                row = e + 1
            continue
        # irregular (3) or touching an empty row (4): rows s..e-1 stand alone, row e goes to the next run
        for r in range(max(row, s), e):
            if ne_l[r]:
                yield ("irregular", r, r + 1)
        row = max(row, e)
    for r in range(row, L):
        if ne_l[r]:
            yield ("irregular", r, r + 1)


def plan_spans(lo: torch.Tensor, hi: torch.Tensor, B: int, L: int, S: int, dtype=torch.float32,
               device=None, q_block: int | None = None, config: KernelConfig = DEFAULT) -> SpanPlan:
    """Build a :class:`SpanPlan` from row intervals ``(lo, hi)`` of shape (1 or B, L) (see
    :func:`salience.structure.row_intervals`); block sizes from ``config``.

    Example:
        >>> import torch
        >>> lo, hi = torch.zeros(1, 64, dtype=torch.long), torch.tensor([[32] * 32 + [64] * 32])
        >>> plan_spans(lo, hi, 1, 64, 64).summary()["calls_by_kind"]
        {'full': 2}
    """
    bld = _Builder(lo, hi, B, L, S, dtype, device, q_block, config)
    runs = bld.runs()
    # short flat runs are worth their own fused call only when many share a shape (one batched call)
    shapes: dict = {}
    for kind, b0, b1, r0, r1, a_lo, a_hi in runs:
        if kind == "flat":
            shapes[(r1 - r0, a_hi - a_lo, b1 - b0)] = shapes.get((r1 - r0, a_hi - a_lo, b1 - b0), 0) + 1
    for kind, b0, b1, r0, r1, a_lo, a_hi in runs:
        n = r1 - r0
        short = n < config.min_run and not (kind == "flat" and shapes[(n, a_hi - a_lo, b1 - b0)] * n >= config.min_run * 4)
        if kind == "irregular" or short:
            bld.irregular.append((b0, b1, r0, r1))
        elif kind == "band":
            bld.band(b0, b1, r0, r1, a_lo, a_hi)
        else:
            bld.regular(kind, b0, b1, r0, r1, a_lo, a_hi)
    bld.irregular_rows()
    bld.plan.calls = list(bld.groups.values())
    return bld.plan


class _Builder:
    """The state of :func:`plan_spans` while it cuts rows into calls."""

    def __init__(self, lo, hi, B, L, S, dtype, device, q_block, config):
        self.lo, self.hi, self.B, self.q_block, self.config = lo, hi, B, q_block, config
        self.dev = torch.device("cpu") if device is None else device
        self.qb_max = q_block or config.band_q_block.get(dtype, 64)
        self.mdt = fused.bias_dtype(dtype, exact_mask=True)
        self.plan = SpanPlan(B, L, S, lo=lo, hi=hi, config=config)
        self.plan.visible = int((hi - lo).sum()) * (B // lo.shape[0])
        self.groups: dict = {}
        self.irregular: list = []  # (b0, b1, r0, r1)
        self.band_masks: dict = {}

    def add(self, kind, nrows, nkeys, piece, cost):
        key = (kind, nrows, nkeys, piece[1] - piece[0])
        if kind == "masked" or key not in self.groups:
            self.groups[(key, len(self.groups)) if kind == "masked" else key] = _Call(kind, nrows, nkeys, [piece])
        else:
            self.groups[key].pieces.append(piece)
        self.plan.computed += cost

    def runs(self) -> list:
        """``(kind, b0, b1, r0, r1, lo, hi)`` for every run of rows of every batch selector."""
        out = []
        for bi in range(self.lo.shape[0]):
            b0, b1 = (0, self.B) if self.lo.shape[0] == 1 else (bi, bi + 1)
            for kind, r0, r1 in _runs(self.lo[bi], self.hi[bi]):
                out.append((kind, b0, b1, r0, r1, int(self.lo[bi, r0]), int(self.hi[bi, r0])))
        return out

    def regular(self, kind, b0, b1, r0, r1, a_lo, a_hi):
        """A flat run (one unmasked call) or a causal run (is_causal over the triangle + the rectangle before)."""
        n, nb, seg, segments = r1 - r0, b1 - b0, len(self.plan.segments), self.plan.segments
        if kind == "flat":
            segments.append((b0, b1, r0, r1, 1))
            self.add("full", n, a_hi - a_lo, (b0, b1, r0, a_lo, None, seg), nb * n * (a_hi - a_lo))
            return
        full_keys = a_hi - 1 - a_lo
        segments.append((b0, b1, r0, r1, 2 if full_keys > 0 else 1))
        if full_keys > 0:
            self.add("full", n, full_keys, (b0, b1, r0, a_lo, None, seg), nb * n * full_keys)
        self.add("causal", n, n, (b0, b1, r0, a_hi - 1, None, seg), nb * n * (n + 1) // 2)

    def band(self, b0, b1, r0, r1, a_lo, a_hi):
        """A band run: blocks of qb rows, one shared mask, strided key windows (one call)."""
        n, width = r1 - r0, a_hi - a_lo
        qb = self.qb_max if self.q_block else min(self.qb_max, max(16, 1 << (width.bit_length() - 1)))
        nblk = n // qb
        if nblk == 0:
            self.irregular.append((b0, b1, r0, r1))
            return
        span = qb - 1 + width
        mk = self.band_masks.get((qb, width))
        if mk is None:
            mk = self.band_masks[(qb, width)] = _band_mask(qb, width, self.mdt, self.dev)
        seg = len(self.plan.segments)
        self.plan.segments.append((b0, b1, r0, r0 + nblk * qb, 1))
        self.groups[("band", len(self.groups))] = _Call("band", qb, span, [(b0, b1, r0, a_lo, mk, seg)],
                                                        nblocks=nblk, q_block=qb)
        self.plan.computed += (b1 - b0) * nblk * qb * span
        if nblk * qb < n:
            self.irregular.append((b0, b1, r0 + nblk * qb, r1))

    def irregular_rows(self):
        """Irregular rows: blocks with explicit masks (adjacent ranges of one batch selector merged first)."""
        merged: list = []
        for b0, b1, r0, r1 in sorted(self.irregular):
            if merged and merged[-1][0] == b0 and merged[-1][1] == b1 and merged[-1][3] == r0:
                merged[-1] = (b0, b1, merged[-1][2], r1)
            else:
                merged.append((b0, b1, r0, r1))
        step = self.config.generic_q_block
        for b0, b1, r0, r1 in merged:
            bi = 0 if self.lo.shape[0] == 1 else b0
            for s in range(r0, r1, step):
                e = min(r1, s + step)
                lo_s, hi_s = self.lo[bi, s:e], self.hi[bi, s:e]
                nonempty = hi_s > lo_s
                if not bool(nonempty.any()):
                    continue
                k0, k1 = int(lo_s[nonempty].min()), int(hi_s[nonempty].max())
                seg = len(self.plan.segments)
                self.plan.segments.append((b0, b1, s, e, 1))
                mask = _interval_mask(lo_s, hi_s, k0, k1 - k0, self.mdt, self.dev)
                self.add("masked", e - s, k1 - k0, (b0, b1, s, k0, mask, seg), (b1 - b0) * (e - s) * (k1 - k0))
