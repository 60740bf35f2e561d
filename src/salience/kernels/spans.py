"""Mask analysis: the visible key interval of every query row, and masks that cut a problem into rectangles.

Causal masks (either alignment), sliding windows, packed documents with sorted ids, prefix-LM, padding,
block-diagonal masks and any ``&`` of them have, for every query row ``i``, a visible key interval
``[lo_i, hi_i)``. :func:`row_spans` derives these intervals analytically (O(L) work, no ``L x S``
evaluation); :mod:`salience.kernels.span_plan` and the compiled interval kernels run on them.

Example:
    >>> from salience import masks
    >>> from salience.kernels.spans import row_spans
    >>> lo, hi = row_spans(masks.sliding_window(2).bind(5, 5), 1, 5, 5)
    >>> lo.tolist(), hi.tolist()
    ([[0, 0, 0, 1, 2]], [[1, 2, 3, 4, 5]])
"""

from __future__ import annotations

import torch

__all__ = ["row_spans", "mask_parts", "relative_band", "independent_pieces", "document_segments"]


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

