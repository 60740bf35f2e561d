"""Toeplitz-bias plans: a band mask with an additive bias that depends only on the head and ``kv_idx - q_idx``.

ALiBi and T5 relative buckets on causal masks, sliding windows, packed documents and padding run as torch's
fused CPU kernel with the bias passed as a strided view of one vector per head (never an ``L x S`` tensor):
:class:`BiasPlan` for one band problem, :class:`SegmentPlan` for independent rectangles (documents, padded
sequences) that are each a band problem. Block sizes come from a :class:`salience.kernels.config.KernelConfig`.

Example:
    >>> import torch
    >>> from salience.kernels.toeplitz import BiasPlan
    >>> bias = lambda d: -0.5 * d.abs().float().unsqueeze(0)  # one head, ALiBi-like
    >>> p = BiasPlan((None, 0), bias, 1, 1, 64, 64)
    >>> q = torch.randn(1, 1, 64, 16)
    >>> p.forward(q, q, q, 0.25)[0].shape
    torch.Size([1, 1, 64, 16])
"""

from __future__ import annotations

import torch

from ..reference import _acc_dtype
from . import fused
from .config import DEFAULT, KernelConfig
from .span_plan import _windows

__all__ = ["BiasPlan", "SegmentPlan"]

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
                 q_block=None, config: KernelConfig = DEFAULT):
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
        self.qb = q_block or (config.bias_window_q_block if bounded else config.bias_q_block.get(dtype, 256))
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

    def __init__(self, pieces, band, bias_fn, B, H, L, S, *, dtype=torch.float32, device=None,
                 config: KernelConfig = DEFAULT):
        plans: dict = {}
        self.pieces = []
        for b0, b1, r0, r1, k0, k1 in pieces:
            if r1 <= r0 or k1 <= k0 or b1 <= b0:
                continue
            key = (b1 - b0, r1 - r0, k1 - k0)
            if key not in plans:
                plans[key] = BiasPlan(band, bias_fn, b1 - b0, H, r1 - r0, k1 - k0, dtype=dtype, device=device,
                                       config=config)
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


def _expand_heads(t, H):
    if t.shape[1] != H:
        t = t.repeat_interleave(H // t.shape[1], dim=1)
    return t.contiguous()
