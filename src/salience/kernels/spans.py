"""The span path: masks whose visible keys form one contiguous interval per query row.

Causal masks (either alignment), sliding windows, packed documents with sorted ids, prefix-LM, padding,
block-diagonal masks and any ``&`` of them have, for every query row ``i``, a visible key interval
``[lo_i, hi_i)``. :func:`row_spans` derives these intervals analytically (O(L) work, no ``L x S``
evaluation), and :class:`SpanPlan` cuts the rows into runs that the fused CPU kernel
(:mod:`salience.kernels.fused`) computes over just the keys they need:

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
tensor. The backward uses the fused backward per call, given the final output and logsumexp.

Example:
    >>> import torch
    >>> from salience import masks
    >>> from salience.kernels.spans import row_spans
    >>> lo, hi = row_spans(masks.sliding_window(2).bind(5, 5), 1, 5, 5)
    >>> lo.tolist(), hi.tolist()
    ([[0, 0, 0, 1, 2]], [[1, 2, 3, 4, 5]])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference import _acc_dtype
from . import fused, native

__all__ = ["row_spans", "mask_parts", "relative_band", "SpanPlan", "plan_spans", "BiasPlan"]

#: rows per block on band runs (by dtype; the fused kernel's tiling favours larger blocks with AMX bf16)
BAND_Q_BLOCK = {torch.float32: 32, torch.float64: 32, torch.bfloat16: 32, torch.float16: 32}
#: rows per block on band runs in the backward (rounded to a multiple of the forward's block)
BAND_Q_BLOCK_BWD = {torch.float32: 192, torch.float64: 192, torch.bfloat16: 256, torch.float16: 256}
#: rows per block for irregular rows
GENERIC_Q_BLOCK = 64
#: runs shorter than this are computed as irregular rows
MIN_RUN = 16
#: at most this many query rows per fused call on band runs (bounds temporaries: the forward's output block,
#: the backward's key-window gradients)
MAX_ROWS_PER_CALL = 8192
MAX_ROWS_PER_CALL_BWD = 512


# ------------------------------------------------------------------------------------------ mask analysis


def mask_parts(m):
    """``(op, part, part)`` for ``a & b`` / ``a | b``, ``("~", part)`` for ``~a``, or None.

    Read from the ``parts`` attribute that :mod:`salience.masks` combinators set on their bound results.
    """
    return getattr(m, "parts", None)


def _band_of(m):
    band = getattr(m, "band", None)
    if band is not None:
        return band
    if getattr(m, "kind", None) == ("causal", "top_left"):
        return (None, 0)
    return None


def relative_band(m):
    """``(lo, hi)`` with visible iff ``lo <= kv_idx - q_idx <= hi`` (None = unbounded) when the bound mask
    is such a band (causal, sliding windows and their intersections), else None. ``None`` mask -> (None, None)."""
    if m is None or getattr(m, "name", None) == "full()":
        return (None, None)
    band = _band_of(m)
    if band is not None:
        return band
    parts = mask_parts(m)
    if parts is not None and parts[0] == "&":
        a, b = relative_band(parts[1]), relative_band(parts[2])
        if a is None or b is None:
            return None
        lo = a[0] if b[0] is None else (b[0] if a[0] is None else max(a[0], b[0]))
        hi = a[1] if b[1] is None else (b[1] if a[1] is None else min(a[1], b[1]))
        return (lo, hi)
    return None


def _global_spans(m, B, rows, Sg, device):
    """(lo, hi) of shape (1 or B, len(rows)) in global key coordinates, or None when not an interval mask."""
    n = rows.numel()
    zeros = torch.zeros(1, n, dtype=torch.long, device=device)
    if m is None or getattr(m, "name", None) == "full()":
        return zeros, zeros + Sg
    band = _band_of(m)
    if band is not None:
        lo = zeros if band[0] is None else (rows + band[0]).view(1, -1)
        hi = zeros + Sg if band[1] is None else (rows + band[1] + 1).view(1, -1)
        return lo, hi
    kind = getattr(m, "kind", None)
    if isinstance(kind, tuple) and kind:
        if kind[0] == "prefix_lm":
            n_pre = kind[1]
            return zeros, torch.clamp(rows + 1, min=n_pre).view(1, -1)
        if kind[0] == "block_diagonal":
            size = kind[1]
            lo = (torch.div(rows, size, rounding_mode="floor") * size).view(1, -1)
            return lo, lo + size
        if kind[0] == "padding":
            qd, kd = kind[1], kind[2]
            hi = (zeros + Sg) if kd is None else kd.to(device).view(-1, 1).expand(-1, n)
            if qd is not None:
                real = rows.view(1, -1) < qd.to(device).view(-1, 1)
                hi = torch.where(real, hi, torch.zeros((), dtype=torch.long, device=device))
            return torch.zeros_like(hi), hi
        if kind[0] == "document":
            qd, kd = kind[1].to(device), kind[2].to(device)
            k2 = kd if kd.dim() == 2 else kd.unsqueeze(0)
            if k2.shape[-1] > 1 and bool((k2[:, 1:] < k2[:, :-1]).any()):
                return None  # keys of one document are not contiguous
            q2 = qd if qd.dim() == 2 else qd.unsqueeze(0)
            if q2.shape[-1] <= int(rows.max()):
                return None
            qv = q2[:, rows]
            if k2.shape[0] != qv.shape[0]:
                k2, qv = k2.expand(max(k2.shape[0], qv.shape[0]), -1), qv.expand(max(k2.shape[0], qv.shape[0]), -1)
            k2 = k2.contiguous()
            return (torch.searchsorted(k2, qv.contiguous(), right=False),
                    torch.searchsorted(k2, qv.contiguous(), right=True))
    parts = mask_parts(m)
    if parts is not None and parts[0] in ("&", "|"):
        a = _global_spans(parts[1], B, rows, Sg, device)
        b = _global_spans(parts[2], B, rows, Sg, device)
        if a is None or b is None:
            return None
        (alo, ahi), (blo, bhi) = a, b
        if parts[0] == "&":
            return torch.maximum(alo, blo), torch.minimum(ahi, bhi)
        a_empty, b_empty = ahi <= alo, bhi <= blo
        lo, hi = torch.minimum(alo, blo), torch.maximum(ahi, bhi)
        lo = torch.where(a_empty, blo, torch.where(b_empty, alo, lo))
        hi = torch.where(a_empty, bhi, torch.where(b_empty, ahi, hi))
        touching = (torch.maximum(alo, blo) <= torch.minimum(ahi, bhi)) | a_empty | b_empty
        if not bool(touching.all()):
            return None  # the union has a gap in some row
        return lo, hi
    return None


def row_spans(mask, B: int, L: int, S: int, *, q_offset: int = 0, kv_offset: int = 0, q_len: int | None = None,
              kv_len: int | None = None, device=None):
    """Visible key interval ``[lo, hi)`` of every query row, or None when the mask is not an interval mask.

    Args:
        mask: a bound :class:`salience.masks.MaskMod` (bound to the global lengths) or None.
        B, L, S: batch size and the local query/key lengths.
        q_offset, kv_offset: global index of the first local query and key.
        q_len, kv_len: global lengths (default ``q_offset + L`` and ``kv_offset + S``).

    Returns:
        ``(lo, hi)`` int64 tensors of shape (1 or B, L) in *local* key coordinates, clipped to [0, S];
        rows with no visible key have ``lo == hi``.
    """
    Sg = kv_offset + S if kv_len is None else kv_len
    dev = torch.device("cpu") if device is None else device
    rows = torch.arange(q_offset, q_offset + L, device=dev)
    got = _global_spans(mask, B, rows, Sg, dev)
    if got is None:
        return None
    lo, hi = got
    lo = torch.clamp(lo - kv_offset, 0, S)
    hi = torch.clamp(hi - kv_offset, 0, S)
    nonempty = hi > lo
    lo = torch.where(nonempty, lo, torch.zeros_like(lo))
    hi = torch.where(nonempty, hi, torch.zeros_like(hi))
    return lo.cpu(), hi.cpu()


# ---------------------------------------------------------------------------------------------- the plan


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
        ctx = _Tensors(q, k, v)
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
        ctx = _Tensors(q, k, v)
        for call in self.calls:
            _run_backward(call, ctx, out, lse, dout, dlse, scale, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Tensors:
    """q, k, v plus lazily made contiguous / head-expanded copies for the strided band views."""

    def __init__(self, q, k, v):
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


def _band_chunks(call: _Call):
    """Split a band call into sub-calls of at most MAX_ROWS_PER_CALL rows: (block offset, nblocks)."""
    per = max(1, MAX_ROWS_PER_CALL // call.q_block)
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
        for t0, nb in _band_chunks(call):
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
        target = BAND_Q_BLOCK_BWD.get(q.dtype, qb)
        qb_b = max(qb, (target // qb) * qb)
        head = (n // qb_b) * qb_b
        mdt = fused.bias_dtype(q.dtype, exact_mask=True)
        for rs0, ks0, nrows, bq in ((r0, k0, head, qb_b), (r0 + head, k0 + head, n - head, qb)):
            if nrows == 0:
                continue
            mask = _band_mask_cached(bq, width, mdt, q.device)
            per = max(1, MAX_ROWS_PER_CALL_BWD // bq)
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
               device=None, q_block: int | None = None) -> SpanPlan:
    """Build a :class:`SpanPlan` from row intervals ``(lo, hi)`` of shape (1 or B, L) (see :func:`row_spans`).

    Example:
        >>> import torch
        >>> lo, hi = torch.zeros(1, 64, dtype=torch.long), torch.tensor([[32] * 32 + [64] * 32])
        >>> plan_spans(lo, hi, 1, 64, 64).summary()["calls_by_kind"]
        {'full': 2}
    """
    dev = torch.device("cpu") if device is None else device
    qb_max = q_block or BAND_Q_BLOCK.get(dtype, 64)
    mdt = fused.bias_dtype(dtype, exact_mask=True)
    plan = SpanPlan(B, L, S, lo=lo, hi=hi)
    plan.visible = int((hi - lo).sum()) * (B // lo.shape[0])
    groups: dict = {}
    irregular: list = []  # (b0, b1, r0, r1)
    band_masks: dict = {}

    def add(kind, nrows, nkeys, piece, cost):
        key = (kind, nrows, nkeys, piece[1] - piece[0])
        if kind == "masked" or key not in groups:
            c = _Call(kind, nrows, nkeys, [piece])
            groups[(key, len(groups)) if kind == "masked" else key] = c
        else:
            groups[key].pieces.append(piece)
        plan.computed += cost

    runs = []
    for bi in range(lo.shape[0]):
        b0, b1 = (0, B) if lo.shape[0] == 1 else (bi, bi + 1)
        for kind, r0, r1 in _runs(lo[bi], hi[bi]):
            runs.append((kind, b0, b1, r0, r1, int(lo[bi, r0]), int(hi[bi, r0])))
    # short flat runs are worth their own fused call only when many share a shape (one batched call)
    shapes: dict = {}
    for kind, b0, b1, r0, r1, a_lo, a_hi in runs:
        if kind == "flat":
            shapes[(r1 - r0, a_hi - a_lo, b1 - b0)] = shapes.get((r1 - r0, a_hi - a_lo, b1 - b0), 0) + 1
    for kind, b0, b1, r0, r1, a_lo, a_hi in runs:
        n, nb = r1 - r0, b1 - b0
        short = n < MIN_RUN
        if kind == "flat" and short and shapes[(n, a_hi - a_lo, nb)] * n >= MIN_RUN * 4:
            short = False
        if kind == "irregular" or short:
            irregular.append((b0, b1, r0, r1))
            continue
        seg = len(plan.segments)
        if kind == "flat":
            plan.segments.append((b0, b1, r0, r1, 1))
            add("full", n, a_hi - a_lo, (b0, b1, r0, a_lo, None, seg), nb * n * (a_hi - a_lo))
        elif kind == "causal":
            full_keys = a_hi - 1 - a_lo
            plan.segments.append((b0, b1, r0, r1, 2 if full_keys > 0 else 1))
            if full_keys > 0:
                add("full", n, full_keys, (b0, b1, r0, a_lo, None, seg), nb * n * full_keys)
            add("causal", n, n, (b0, b1, r0, a_hi - 1, None, seg), nb * n * (n + 1) // 2)
        else:  # band: blocks of qb rows, one shared mask, strided key windows
            width = a_hi - a_lo
            qb = qb_max if q_block else min(qb_max, max(16, 1 << (width.bit_length() - 1)))
            nblk = n // qb
            if nblk == 0:
                irregular.append((b0, b1, r0, r1))
                continue
            span = qb - 1 + width
            mk = band_masks.get((qb, width))
            if mk is None:
                mk = band_masks[(qb, width)] = _band_mask(qb, width, mdt, dev)
            plan.segments.append((b0, b1, r0, r0 + nblk * qb, 1))
            groups[("band", len(groups))] = _Call("band", qb, span, [(b0, b1, r0, a_lo, mk, seg)], nblocks=nblk,
                                                 q_block=qb)
            plan.computed += nb * nblk * qb * span
            if nblk * qb < n:
                irregular.append((b0, b1, r0 + nblk * qb, r1))
    # irregular rows: blocks with explicit masks (merge adjacent ranges of one batch selector first)
    irregular.sort()
    merged: list = []
    for b0, b1, r0, r1 in irregular:
        if merged and merged[-1][0] == b0 and merged[-1][1] == b1 and merged[-1][3] == r0:
            merged[-1] = (b0, b1, merged[-1][2], r1)
        else:
            merged.append((b0, b1, r0, r1))
    bi_of = (lambda b0: 0) if lo.shape[0] == 1 else (lambda b0: b0)
    for b0, b1, r0, r1 in merged:
        lo_b, hi_b = lo[bi_of(b0)], hi[bi_of(b0)]
        for s in range(r0, r1, GENERIC_Q_BLOCK):
            e = min(r1, s + GENERIC_Q_BLOCK)
            lo_s, hi_s = lo_b[s:e], hi_b[s:e]
            nonempty = hi_s > lo_s
            if not bool(nonempty.any()):
                continue
            k0 = int(lo_s[nonempty].min())
            k1 = int(hi_s[nonempty].max())
            seg = len(plan.segments)
            plan.segments.append((b0, b1, s, e, 1))
            mask = _interval_mask(lo_s, hi_s, k0, k1 - k0, mdt, dev)
            add("masked", e - s, k1 - k0, (b0, b1, s, k0, mask, seg), (b1 - b0) * (e - s) * (k1 - k0))
    plan.calls = list(groups.values())
    return plan


# ------------------------------------------------------------------------------ band mask + relative bias

#: rows per fused call on the band + bias path
BIAS_Q_BLOCK = {torch.float32: 1024, torch.float64: 512, torch.bfloat16: 1024, torch.float16: 1024}
#: rows per block when the band is bounded on both sides (a sliding window): each block's key range is its
#: rows plus the window, so short blocks waste little (window 256 + ALiBi at N=16384: 96 ms with 32-row
#: blocks, 194 ms with 1024)
BIAS_WINDOW_Q_BLOCK = 32


class BiasPlan:
    """A band mask (``lo <= kv_idx - q_idx <= hi``, e.g. causal or a sliding window) with an additive bias
    that depends only on the head and ``kv_idx - q_idx`` (ALiBi, T5 relative bias).

    Per block of query rows, one fused call over the keys the band allows. Its bias is never materialised:
    it is a strided view of one vector ``g[h, d]`` per head (mask folded in as -inf) with row stride 1 and
    column stride 1, which is a Toeplitz matrix once the block's query rows are taken in reverse order
    (``bias[i', j] = g[h, j + i' + c]``). Interior blocks of a window share one view and run as one call.

    Args:
        band: ``(lo, hi)`` relative bounds in global indices (None = unbounded).
        bias_fn: ``bias_fn(d) -> (H or 1, n)`` float tensor, the bias for offsets ``d = kv_idx - q_idx``.
        B, H, L, S, q_offset, kv_offset: the block in the global problem.
    """

    def __init__(self, band, bias_fn, B, H, L, S, *, q_offset=0, kv_offset=0, dtype=torch.float32, device=None,
                 q_block=None):
        self.B, self.H, self.L, self.S = B, H, L, S
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.lo_d = band[0]
        self.hi_d = band[1]
        dev = torch.device("cpu") if device is None else device
        self.dmin = kv_offset - q_offset - L + 1
        d = torch.arange(self.dmin, self.dmin + L + S - 1, device=dev)
        g = bias_fn(d)
        if g.dim() == 1:
            g = g.unsqueeze(0)
        g = g.to(fused.bias_dtype(dtype, exact_mask=False))
        vis = torch.ones_like(d, dtype=torch.bool)
        if self.lo_d is not None:
            vis &= d >= self.lo_d
        if self.hi_d is not None:
            vis &= d <= self.hi_d
        g = g.masked_fill(~vis, float("-inf"))
        # one row per (b, h) so that the (B*H) batch axis of the fused call has a single stride
        self.g = g.expand(H, -1).unsqueeze(0).expand(B, H, -1).reshape(B * H, -1).contiguous()
        bounded = self.lo_d is not None and self.hi_d is not None
        self.qb = q_block or (BIAS_WINDOW_Q_BLOCK if bounded else BIAS_Q_BLOCK.get(dtype, 256))
        self.blocks = []  # (r0, r1, k0, k1) local
        self.computed = 0
        for r0 in range(0, L, self.qb):
            r1 = min(L, r0 + self.qb)
            k0 = 0 if self.lo_d is None else max(0, q_offset + r0 + self.lo_d - kv_offset)
            k1 = S if self.hi_d is None else min(S, q_offset + r1 - 1 + self.hi_d - kv_offset + 1)
            if k1 > k0:
                self.blocks.append((r0, r1, k0, k1))
                self.computed += (r1 - r0) * (k1 - k0)
        # group runs of interior blocks with equal shape and equal bias offset into one strided call
        self.calls = []
        i = 0
        while i < len(self.blocks):
            r0, r1, k0, k1 = self.blocks[i]
            j = i + 1
            while (j < len(self.blocks) and self.blocks[j][1] - self.blocks[j][0] == r1 - r0 == self.qb
                   and self.blocks[j][3] - self.blocks[j][2] == k1 - k0
                   and self.blocks[j][2] - self.blocks[j - 1][2] == self.qb):
                j += 1
            self.calls.append((i, j))
            i = j

    def summary(self) -> dict:
        return {"fused_calls": len(self.calls), "q_block": self.qb}

    def _bias_view(self, nrows, r1, k0, nkeys, nblocks=None):
        idx0 = k0 + self.L - r1
        BH, n = self.g.shape
        off = self.g.storage_offset() + idx0
        if nblocks is None:
            return self.g.as_strided((BH, 1, nrows, nkeys), (n, 0, 1, 1), off)
        return self.g.as_strided((BH, nblocks, nrows, nkeys), (n, 0, 1, 1), off)

    def _row_empty(self, r0, r1, k0, k1, device):
        """Rows of a block with no visible key (their lse must be -inf)."""
        gq = self.q_offset + torch.arange(r0, r1, device=device)
        lo = torch.full_like(gq, self.kv_offset + k0) if self.lo_d is None else torch.clamp(gq + self.lo_d, min=self.kv_offset + k0)
        hi = torch.full_like(gq, self.kv_offset + k1 - 1) if self.hi_d is None else torch.clamp(gq + self.hi_d, max=self.kv_offset + k1 - 1)
        return hi < lo

    def _inputs(self, q, k, v, i, j):
        r0, r1, k0, k1 = self.blocks[i]
        nb = j - i
        B, H = q.shape[0], q.shape[1]
        if nb == 1:
            qr = q[:, :, r0:r1].flip(2)
            return qr, k[:, :, k0:k1], v[:, :, k0:k1], self._bias_view(r1 - r0, r1, k0, k1 - k0), 1
        qc = q[:, :, r0:r0 + nb * self.qb].contiguous()
        qr = qc.view(B * H, nb, self.qb, -1).flip(2)
        kc, vc = _expand_heads(k, H), _expand_heads(v, H)
        kw = _windows(kc, 0, B, k0, nb, self.qb, k1 - k0)
        vw = _windows(vc, 0, B, k0, nb, self.qb, k1 - k0)
        return qr, kw, vw, self._bias_view(self.qb, r1, k0, k1 - k0, nb), nb

    def forward(self, q, k, v, scale: float):
        B, H, L, _ = q.shape
        Dv = v.shape[-1]
        acc = _acc_dtype(q.dtype)
        out = q.new_zeros(B, H, L, Dv)
        lse = torch.full((B, H, L), float("-inf"), dtype=acc, device=q.device)
        for i, j in self.calls:
            r0, r1, k0, k1 = self.blocks[i]
            qr, kk, vv, bias, nb = self._inputs(q, k, v, i, j)
            if nb == 1:
                o, l_ = fused.forward(qr, kk, vv, scale=scale, bias=bias.view(B, H, r1 - r0, k1 - k0))
                rows = slice(r0, r1)
                o, l_ = o.flip(2), l_.flip(2)
                empty = self._row_empty(r0, r1, k0, k1, q.device)
                if bool(empty.any()):
                    l_ = l_.masked_fill(empty, float("-inf"))
                out[:, :, rows] = o
                lse[:, :, rows] = l_
            else:
                o, l_ = fused.forward(qr, kk, vv, scale=scale, bias=bias)
                n = nb * self.qb
                l_ = l_.flip(2).reshape(B, H, n)
                empty = self._rows_empty_grouped(r0, k0, k1 - k0, nb, q.device)
                if bool(empty.any()):
                    l_ = l_.masked_fill(empty, float("-inf"))
                out[:, :, r0:r0 + n] = o.flip(2).reshape(B, H, n, Dv)
                lse[:, :, r0:r0 + n] = l_
        return out, lse

    def _rows_empty_grouped(self, r0, k0, nk, nb, device):
        """Rows of nb consecutive blocks (block t: rows r0 + t*qb.., keys k0 + t*qb..) with no visible key."""
        t = torch.arange(nb * self.qb, device=device) // self.qb
        gq = self.q_offset + r0 + torch.arange(nb * self.qb, device=device)
        ka = self.kv_offset + k0 + t * self.qb
        kb = ka + nk - 1
        lo = ka if self.lo_d is None else torch.maximum(gq + self.lo_d, ka)
        hi = kb if self.hi_d is None else torch.minimum(gq + self.hi_d, kb)
        return hi < lo

    def backward(self, q, k, v, out, lse, dout, dlse, scale: float):
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for i, j in self.calls:
            r0, r1, k0, k1 = self.blocks[i]
            qr, kk, vv, bias, nb = self._inputs(q, k, v, i, j)
            if nb == 1:
                sl = slice(r0, r1)
                rev = lambda t, sl=sl: t[:, :, sl].flip(2)  # noqa: E731
                gq, gk, gv = fused.backward(rev(dout), qr, kk, vv, rev(out), rev(lse), scale=scale,
                                            bias=bias.view(B, H, r1 - r0, k1 - k0),
                                            dlse=None if dlse is None else rev(dlse))
                dq[:, :, sl] += gq.flip(2)
                dk[:, :, k0:k1] += gk
                dv[:, :, k0:k1] += gv
                continue
            n = nb * self.qb
            sl = slice(r0, r0 + n)

            def blk(t, sl=sl, nb=nb):
                return t[:, :, sl].reshape(B * H, nb, self.qb, *t.shape[3:]).flip(2)

            gq, gk, gv = fused.backward(blk(dout), qr, kk, vv, blk(out), blk(lse), scale=scale, bias=bias,
                                        dlse=None if dlse is None else blk(dlse))
            dq[:, :, sl] += gq.flip(2).reshape(B, H, n, D)
            nk = k1 - k0
            idx = (k0 + torch.arange(nb).view(-1, 1) * self.qb + torch.arange(nk).view(1, -1)).view(-1).to(q.device)
            for grad, accum in ((gk, dk), (gv, dv)):
                g = grad.reshape(B, H, nb * nk, -1).to(acc)
                if Hkv != H:
                    g = g.view(B, Hkv, H // Hkv, nb * nk, -1).sum(2)
                accum.index_add_(2, idx, g)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class SegmentPlan:
    """Masks that cut the problem into independent rectangles, with a relative additive bias: each rectangle
    is its own band problem.

    Packed documents (``document(ids)`` or ``document(ids) & band`` with the same sorted ids for queries and
    keys) and right padding (``padding(...)`` or ``padding(...) & band``) leave every query with keys from
    one rectangle of rows and keys only, and a bias that depends only on ``kv_idx - q_idx`` (ALiBi, T5
    buckets) is the same inside every rectangle. Each rectangle runs as a :class:`BiasPlan` on views of its
    rows and keys (rectangles of equal size share one plan); rows outside every rectangle get a zero output
    and logsumexp -inf, keys outside every rectangle zero gradients.

    Args:
        pieces: ``[(b0, b1, r0, r1, k0, k1), ...]``: batch rows b0..b1-1, query rows r0..r1-1 and keys
            k0..k1-1 of one rectangle; rectangles do not overlap.
        band, bias_fn: as for :class:`BiasPlan`.
    """

    def __init__(self, pieces, band, bias_fn, B, H, L, S, *, dtype=torch.float32, device=None):
        plans: dict = {}
        self.pieces = []
        for b0, b1, r0, r1, k0, k1 in pieces:
            if r1 <= r0 or k1 <= k0 or b1 <= b0:
                continue
            key = (b1 - b0, r1 - r0, k1 - k0)
            if key not in plans:
                plans[key] = BiasPlan(band, bias_fn, b1 - b0, H, r1 - r0, k1 - k0, dtype=dtype, device=device)
            self.pieces.append((b0, b1, r0, r1, k0, k1, plans[key]))
        self.computed = sum(p.computed * (b1 - b0) for b0, b1, _, _, _, _, p in self.pieces) / max(1, B)
        rows = torch.zeros(B, L, dtype=torch.bool)
        keys = torch.zeros(B, S, dtype=torch.bool)
        for b0, b1, r0, r1, k0, k1, _ in self.pieces:
            rows[b0:b1, r0:r1] = True
            keys[b0:b1, k0:k1] = True
        self.all_rows, self.all_keys = bool(rows.all()), bool(keys.all())

    def summary(self) -> dict:
        return {"pieces": len(self.pieces), "fused_calls": sum(len(p.calls) for *_, p in self.pieces)}

    def forward(self, q, k, v, scale: float):
        B, H, L, _ = q.shape
        acc = _acc_dtype(q.dtype)
        if self.all_rows:
            out = q.new_empty(B, H, L, v.shape[-1])
            lse = torch.empty(B, H, L, dtype=acc, device=q.device)
        else:
            out = q.new_zeros(B, H, L, v.shape[-1])
            lse = torch.full((B, H, L), float("-inf"), dtype=acc, device=q.device)
        for b0, b1, r0, r1, k0, k1, p in self.pieces:
            out[b0:b1, :, r0:r1], lse[b0:b1, :, r0:r1] = p.forward(
                q[b0:b1, :, r0:r1], k[b0:b1, :, k0:k1], v[b0:b1, :, k0:k1], scale)
        return out, lse

    def backward(self, q, k, v, out, lse, dout, dlse, scale: float):
        new = torch.empty_like if self.all_rows and self.all_keys else torch.zeros_like
        dq, dk, dv = new(q), new(k), new(v)
        for b0, b1, r0, r1, k0, k1, p in self.pieces:
            rs, ks = slice(r0, r1), slice(k0, k1)
            dq[b0:b1, :, rs], dk[b0:b1, :, ks], dv[b0:b1, :, ks] = p.backward(
                q[b0:b1, :, rs], k[b0:b1, :, ks], v[b0:b1, :, ks], out[b0:b1, :, rs], lse[b0:b1, :, rs],
                dout[b0:b1, :, rs], None if dlse is None else dlse[b0:b1, :, rs], scale)
        return dq, dk, dv


def _is_structure(m) -> bool:
    """True for a bound ``document(...)`` or ``padding(...)`` mask."""
    kind = getattr(m, "kind", None)
    return kind is not None and kind[0] in ("document", "padding")


def _split_band(m):
    """``(structure, band)`` for ``m`` = structure or structure & band (band a relative band), else None."""
    if _is_structure(m):
        return m, (None, None)
    parts = mask_parts(m)
    if parts is None or parts[0] != "&":
        return None
    a, b = parts[1], parts[2]
    if _is_structure(b):
        a, b = b, a
    if not _is_structure(a):
        return None
    band = relative_band(b)
    return None if band is None else (a, band)


def independent_pieces(m, B: int, L: int, S: int):
    """``(pieces, band)`` for :class:`SegmentPlan` when the bound mask ``m`` is packed documents or right
    padding, optionally ``&`` a relative band (causal, sliding window); else None."""
    if m is None:
        return None
    split = _split_band(m)
    if split is None:
        return None
    struct, band = split
    kind = struct.kind
    if kind[0] == "padding":
        _, qd, kd = kind
        pieces = []
        for b in range(B):
            r1 = L if qd is None else int(qd[b])
            k1 = S if kd is None else int(kd[b])
            pieces.append((b, b + 1, 0, min(r1, L), 0, min(k1, S)))
        # batch rows with equal lengths share one call
        merged = []
        for p in pieces:
            if merged and merged[-1][2:] == p[2:] and merged[-1][1] == p[0]:
                merged[-1] = (merged[-1][0], p[1], *p[2:])
            else:
                merged.append(p)
        return merged, band
    bounds = document_segments(struct, L, S)
    if bounds is None:
        return None
    return [(0, B, a, b, a, b) for a, b in bounds], band


def document_segments(m, L: int, S: int):
    """The documents' row ranges ``[(start, end), ...]`` when the bound mask ``m`` is ``document(ids)`` with
    the same 1-d ids for queries and keys and one contiguous run per document (the packed case); else None."""
    kind = getattr(m, "kind", None)
    if kind is None or kind[0] != "document" or L != S or L == 0:
        return None
    _, qd, kd = kind
    if qd.dim() != 1 or kd.dim() != 1 or qd.shape[0] != L or not torch.equal(qd, kd):
        return None
    cut = (torch.nonzero(qd[1:] != qd[:-1]).view(-1) + 1).tolist()
    edges = [0] + cut + [L]
    if len(edges) - 1 != int(torch.unique(qd).numel()):  # an id in two runs: not block-diagonal
        return None
    return list(zip(edges[:-1], edges[1:]))


def _expand_heads(t, H):
    if t.shape[1] != H:
        t = t.repeat_interleave(H // t.shape[1], dim=1)
    return t.contiguous()
