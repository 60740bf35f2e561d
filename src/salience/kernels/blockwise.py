"""The blockwise kernel: online softmax over (query tile, key tile) pairs, for any mask and score_mod.

For each query tile the kernel walks the key tiles that the :class:`~salience.blocks.BlockMask` says are
not empty, in chunks of consecutive tiles (one large matmul per chunk):

1. scores of the chunk, accumulated in float32 for bfloat16/float16 inputs;
2. the score_mod on the chunk (softcap and temperature are folded into in-place passes);
3. the mask, evaluated only on the chunk's *partial* tiles (full tiles are never evaluated) and cached
   per tile offset when the mask depends only on ``kv_idx - q_idx`` (windows, causal);
4. an online-softmax update of the running max, sum and output.

It returns the output and the logsumexp. The backward (FlashAttention-2 style) recomputes each chunk from
q, k, v, the output and the logsumexp, skipping the same tiles, so training memory is O(L * D) plus one
chunk; fully masked rows get zero gradients. A score_mod that closes over tensors requiring grad (a learned
relative-position table) gets its gradient too, through autograd on each chunk.

One (query block, key block) pair of a larger problem at global offsets (ring attention) is
:mod:`salience.kernels.partial`'s job.

Example:
    >>> import torch
    >>> from salience import masks
    >>> from salience.kernels.blockwise import TileKernel
    >>> q = torch.randn(1, 2, 64, 16)
    >>> tk = TileKernel(1, 2, 64, 64, mask=masks.causal().bind(64, 64), scale=0.25, q_tile=16, kv_tile=16)
    >>> out, lse = tk.forward(q, q, q)
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 64, 16]), torch.Size([1, 2, 64]))
"""

from __future__ import annotations

import torch

from ..blocks import EMPTY, FULL, PARTIAL, BlockMask
from ..masks import as_mask_mod, check_mask_output, shift
from ..reference import _acc_dtype
from ..structure import softcap_of

__all__ = ["TileKernel", "classify"]

#: query rows per tile and keys per tile
Q_TILE = 128
KV_TILE = 128
#: at most this many score elements (B * H * rows * keys) per chunk
CHUNK_ELEMENTS = 1 << 22
#: softcaps up to this value skip the running max (exp(cap) * keys stays far from float32 overflow)
SOFTCAP_FIXED_MAX = 60.0
SOFTCAP_FIXED_MAX_F64 = 600.0
#: mask elements evaluated at once when classifying an arbitrary mask_mod
EVAL_ELEMENTS = 1 << 18
#: cache of partial-tile masks (bytes) kept between tiles, forward and backward
MASK_CACHE_BYTES = 16 << 20


# ------------------------------------------------------------------------------------- tile classification


def classify(mask, B: int, H: int, L: int, S: int, *, q_block: int = Q_TILE, kv_block: int = KV_TILE,
             q_offset: int = 0, kv_offset: int = 0, q_len: int | None = None, kv_len: int | None = None,
             device=None) -> BlockMask:
    """Classify the (query tile, key tile) pairs of a mask for a block at the given global offsets.

    Analytic for the named factories; otherwise the mask is evaluated one query tile at a time, reducing
    only over the batch/head axes the mask really depends on (a mask that ignores ``b`` and ``h`` costs
    O(L * S), not O(B * H * L * S)).

    Returns:
        a :class:`~salience.blocks.BlockMask` over the local block (classes of shape (Bm, Hm, nq, nk)),
        whose ``mask`` takes local indices.

    Example:
        >>> from salience import masks
        >>> classify(masks.causal(), 1, 1, 256, 256).counts()
        {'empty': 1, 'partial': 2, 'full': 1}
    """
    Lg = q_offset + L if q_len is None else q_len
    Sg = kv_offset + S if kv_len is None else kv_len
    if q_offset == 0 and kv_offset == 0 and (Lg, Sg) == (L, S):
        local = as_mask_mod(mask).bind(L, S, device)
    else:  # the global mask seen through the block's local indices
        local = shift(as_mask_mod(mask), q_offset, kv_offset, Lg, Sg).bind(L, S, device)
    if local._tiles is not None:
        return BlockMask.from_mask(local, B, H, L, S, q_block=q_block, kv_block=kv_block, device=device)
    nk = (S + kv_block - 1) // kv_block
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    per = max(1, EVAL_ELEMENTS // (q_block * kv_block))  # key tiles per evaluation
    out = []
    for q0 in range(0, L, q_block):
        n = min(q_block, L - q0)
        qi = torch.arange(q0, q0 + n, device=device).view(1, 1, -1, 1)
        row = []
        for t0 in range(0, nk, per):
            k0, k1 = t0 * kv_block, min(S, (t0 + per) * kv_block)
            kv = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
            raw = local(b, h, qi, kv)
            check_mask_output(raw, local, (B, H, n, k1 - k0))  # bool and broadcastable, or a clear error
            raw = torch.as_tensor(raw)
            raw = raw.view((1,) * (4 - raw.dim()) + tuple(raw.shape))
            bm, hm = raw.shape[0], raw.shape[1]
            vis = raw.expand(bm, hm, n, k1 - k0)
            nt = (k1 - k0 + kv_block - 1) // kv_block
            pad = nt * kv_block - (k1 - k0)
            any_ = torch.nn.functional.pad(vis, (0, pad), value=False).view(bm, hm, n, nt, kv_block).any(-1).any(2)
            all_ = torch.nn.functional.pad(vis, (0, pad), value=True).view(bm, hm, n, nt, kv_block).all(-1).all(2)
            row.append(torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8))
        bm = max(r.shape[0] for r in row)
        hm = max(r.shape[1] for r in row)
        out.append(torch.cat([r.expand(bm, hm, r.shape[-1]) for r in row], dim=-1))
    bm = max(o.shape[0] for o in out)
    hm = max(o.shape[1] for o in out)
    classes = torch.stack([o.expand(bm, hm, nk) for o in out], dim=2)
    return BlockMask(classes, q_block, kv_block, L, S, local, False)


# ------------------------------------------------------------------------------------------- score mods


def _mod_form(mod):
    """('softcap', cap) when the score_mod's structure is one Softcap, ('generic', mod) otherwise, None for no mod."""
    if mod is None:
        return None
    cap = softcap_of(mod)
    return ("softcap", float(cap)) if cap is not None else ("generic", mod)


def _apply_generic(mod, s, b, h, qi, ki):
    s2 = mod(s, b, h, qi, ki)
    if not isinstance(s2, torch.Tensor) or s2.shape != s.shape:
        seen = tuple(s2.shape) if isinstance(s2, torch.Tensor) else type(s2).__name__
        raise ValueError(
            f"score_mod {getattr(mod, 'name', getattr(mod, '__name__', mod))} returned {seen} for scores of shape "
            f"{tuple(s.shape)}; a score_mod must return a tensor of the score's shape (use torch ops that broadcast)."
        )
    return s2.to(s.dtype)


# ---------------------------------------------------------------------------------------------- the kernel


class TileKernel:
    """Forward and backward of the blockwise kernel for one problem.

    Args:
        B, H, L, S: batch, query heads, local query and key lengths.
        mask: a mask (MaskMod, callable or bool tensor) in *global* indices, or None.
        score_mod: a score_mod in global indices, or None.
        scale: multiplier of q @ k^T.
        q_offset, kv_offset, q_len, kv_len: where this block sits in the global problem (defaults: the
            block is the whole problem).
        grad_tensors: tensors the score_mod closes over that require grad; :meth:`backward` returns their
            gradients.
        block_map: a precomputed structure in local indices (``kernels.derive.Intervals`` or ``BlockMap``:
            ``classes_at(q_tile, kv_tile)`` and ``hidden(r0, r1, k0, k1)``): tiles are classified and partial
            tiles masked from it, and ``mask`` (may be None) only names the mask.

    ``forward(q, k, v)`` returns ``(out, lse)``; ``backward(q, k, v, out, lse, dout, dlse)`` returns
    ``(dq, dk, dv, grads_of_grad_tensors)``. k and v may have fewer heads than q (grouped-query).
    """

    def __init__(self, B, H, L, S, *, mask=None, score_mod=None, scale: float, q_offset: int = 0, kv_offset: int = 0,
                 q_len: int | None = None, kv_len: int | None = None, device=None, grad_tensors=(),
                 q_tile: int | None = None, kv_tile: int | None = None, relative_bias=None, bias_dtype=None,
                 block_map=None):
        self.q_tile = Q_TILE if q_tile is None else q_tile
        self.kv_tile = KV_TILE if kv_tile is None else kv_tile
        self.B, self.H, self.L, self.S = B, H, L, S
        self.scale = float(scale)
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.q_len = q_offset + L if q_len is None else q_len
        self.kv_len = kv_offset + S if kv_len is None else kv_len
        self.device = device
        self.grad_tensors = tuple(grad_tensors)
        self._set_mod(score_mod, relative_bias, bias_dtype)
        nonempty, full = self._classify(mask, block_map)
        self.relative = self.local_mask is not None and bool(getattr(self.local_mask, "relative", False))
        self._chunk_plan(nonempty.tolist(), full.tolist())
        self._cache: dict = {}
        self._cache_bytes = 0
        self._bidx = torch.arange(B, device=device).view(-1, 1, 1, 1)
        self._hidx = torch.arange(H, device=device).view(1, -1, 1, 1)

    def _set_mod(self, score_mod, relative_bias, bias_dtype):
        self.mod = score_mod
        self.form = _mod_form(score_mod)
        if self.form is not None and self.form[0] == "generic" and hasattr(score_mod, "to"):
            self.mod = score_mod.to(self.device) if self.device is not None else score_mod
            self.form = ("generic", self.mod)
        self.g = None
        if relative_bias is not None:
            if score_mod is not None:
                raise ValueError("TileKernel takes a score_mod or a relative_bias, not both.")
            # one vector per head over d = kv_idx - q_idx; with each tile's rows taken in reverse order the bias
            # of a (rows x keys) chunk is the strided view g[h, c + i' + j] (a Toeplitz matrix), never built
            d = torch.arange(self.kv_offset - self.q_offset - self.L + 1, self.kv_offset - self.q_offset + self.S,
                             device=self.device)
            g = relative_bias(d)
            g = g.unsqueeze(0) if g.dim() == 1 else g
            self.g = g.to(bias_dtype or torch.float32).contiguous()
            self.form = ("bias", None)

    def _classify(self, mask, block_map):
        """``(nonempty, full)`` (nq, nk) bool tile tables; sets ``block_mask`` and ``local_mask``."""
        B, H, L, S, qt, kt = self.B, self.H, self.L, self.S, self.q_tile, self.kv_tile
        self.block_mask = None
        self._bmap = block_map
        if block_map is not None:  # a precomputed structure (kernels/derive.py): classes and bits, never the mask
            classes = block_map.classes_at(qt, kt)
            named = as_mask_mod(mask) if mask is not None else None
            self.block_mask = BlockMask(classes, qt, kt, L, S, named, False)
            self.local_mask = block_map
        elif mask is None:
            self.local_mask = None
            nonempty = torch.ones((L + qt - 1) // qt, (S + kt - 1) // kt, dtype=torch.bool)
            return nonempty, nonempty
        else:
            self.block_mask = classify(mask, B, H, L, S, q_block=qt, kv_block=kt, q_offset=self.q_offset,
                                       kv_offset=self.kv_offset, q_len=self.q_len, kv_len=self.kv_len,
                                       device=self.device)
            self.local_mask = self.block_mask.mask
        c = self.block_mask.classes.flatten(0, 1)
        return (c != EMPTY).any(0).cpu(), (c == FULL).all(0).cpu()

    def _chunk_plan(self, ne_l, full_l):
        """Per query tile, chunks of consecutive non-empty key tiles: (k0, k1, [(a, b) partial column ranges
        relative to k0]); counts the computed score elements."""
        L, S, qt, kt = self.L, self.S, self.q_tile, self.kv_tile
        budget = max(kt, CHUNK_ELEMENTS // max(1, self.B * self.H * qt))
        max_tiles = max(1, budget // kt)
        self.plan, self.computed = [], 0
        for i, (ne_row, full_row) in enumerate(zip(ne_l, full_l)):
            chunks, j, nk = [], 0, len(ne_row)
            while j < nk:
                if not ne_row[j]:
                    j += 1
                    continue
                j0 = j
                while j < nk and ne_row[j] and j - j0 < max_tiles:
                    j += 1
                k0, k1 = j0 * kt, min(S, j * kt)
                chunks.append((k0, k1, [(t * kt - k0, min(S, (t + 1) * kt) - k0) for t in range(j0, j)
                                        if not full_row[t]]))
                self.computed += (min(L, (i + 1) * qt) - i * qt) * (k1 - k0)
            self.plan.append(chunks)

    # -- helpers ------------------------------------------------------------------------------------
    def skipped_fraction(self) -> float:
        return 1.0 - self.computed / max(1, self.L * self.S)

    def _hidden(self, r0: int, r1: int, a: int, b: int):
        """Bool (Bm, Hm, r1-r0, b-a): True where the mask hides the key (local rows r0:r1, keys a:b); rows in
        reverse order when the kernel runs with a Toeplitz bias."""
        rev = self.g is not None
        key = (a - r0, r1 - r0, b - a, rev) if self.relative else (r0, a, r1 - r0, b - a, rev)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        dev = self.device
        if self._bmap is not None:
            hid = self._bmap.hidden(r0, r1, a, b).to(dev)
            hid = hid.flip(2) if rev else hid
        else:
            qi = (torch.arange(r1 - 1, r0 - 1, -1, device=dev) if rev else torch.arange(r0, r1, device=dev))
            ki = torch.arange(a, b, device=dev).view(1, 1, 1, -1)
            vis = torch.as_tensor(self.local_mask(self._bidx, self._hidx, qi.view(1, 1, -1, 1), ki))
            hid = ~vis.view((1,) * (4 - vis.dim()) + tuple(vis.shape))
        size = hid.numel()
        if self._cache_bytes + size <= MASK_CACHE_BYTES:
            self._cache[key] = hid
            self._cache_bytes += size
        return hid

    def _scores(self, qt, kc, r0, r1, k0, k1, partial, need_aux=False):
        """Scores of one chunk after score_mod and mask (a tensor not tracked by autograd), and for the
        backward ``aux``: the tanh values for softcap, or ``(raw, modded)`` with an autograd graph for a
        generic score_mod."""
        s = torch.matmul(qt, kc.transpose(-1, -2))
        aux = None
        form = self.form
        if form is not None:
            if form[0] == "bias":  # rows of qt are reversed: the bias is a positive-stride view of g
                n = self.g.shape[-1]
                off = self.g.storage_offset() + k0 - r1 + self.L
                s.add_(self.g.as_strided((1, self.g.shape[0], r1 - r0, k1 - k0), (0, n, 1, 1), off))
            elif form[0] == "softcap":
                s.tanh_()  # q was pre-scaled by scale / cap
                if need_aux:
                    aux = s.clone()
                s.mul_(form[1])
            else:
                qi = (self.q_offset + torch.arange(r0, r1, device=s.device)).view(1, 1, -1, 1)
                ki = (self.kv_offset + torch.arange(k0, k1, device=s.device)).view(1, 1, 1, -1)
                if need_aux:
                    raw = s.requires_grad_(True)
                    with torch.enable_grad():
                        modded = _apply_generic(form[1], raw, self._bidx, self._hidx, qi, ki)
                    aux = (raw, modded)
                    s = modded.detach().clone() if partial else modded.detach()
                else:
                    s = _apply_generic(form[1], s, self._bidx, self._hidx, qi, ki)
        for a, b in partial:
            s[..., a:b].masked_fill_(self._hidden(r0, r1, k0 + a, k0 + b), float("-inf"))
        return s, aux

    def _q_scale(self):
        if self.form is not None and self.form[0] == "softcap":
            return self.scale / self.form[1]
        return self.scale

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, q, k, v):
        """``(out, lse)``: out (B, H, L, Dv) in q's dtype, lse (B, H, L) float32 (float64 for float64)."""
        B, H, L, _ = q.shape
        acc = _acc_dtype(q.dtype)
        ke = _expand(k, H).to(acc)
        ve = _expand(v, H).to(acc)
        Dv = v.shape[-1]
        out = torch.zeros(B, H, L, Dv, dtype=q.dtype, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), dtype=acc, device=q.device)
        qs = self._q_scale()
        rev = self.g is not None
        fixed_max = self.form is not None and self.form[0] == "softcap" and self.form[1] <= (
            SOFTCAP_FIXED_MAX_F64 if acc == torch.float64 else SOFTCAP_FIXED_MAX)
        with torch.no_grad():
            for i, chunks in enumerate(self.plan):
                if not chunks:
                    continue
                r0, r1 = i * self.q_tile, min(L, (i + 1) * self.q_tile)
                qt = q[:, :, r0:r1].to(acc) * qs
                if rev:
                    qt = qt.flip(2)
                m = l = o = None
                for k0, k1, partial in chunks:
                    s, _ = self._scores(qt, ke[:, :, k0:k1], r0, r1, k0, k1, partial)
                    if fixed_max:
                        # softcapped scores lie in (-cap, cap): exp cannot overflow or vanish, so no running max
                        # (and no rescaling between chunks) is needed
                        s.exp_()
                        ps, po = s.sum(-1), torch.matmul(s, ve[:, :, k0:k1])
                        l, o = (ps, po) if l is None else (l + ps, o + po)
                        m_s = 0.0
                        continue
                    cm = s.amax(-1)
                    if m is None:
                        m_new = cm
                    else:
                        m_new = torch.maximum(m, cm)
                    m_safe = torch.where(torch.isneginf(m_new), torch.zeros((), dtype=acc, device=s.device), m_new)
                    s.sub_(m_safe.unsqueeze(-1)).exp_()
                    ps = s.sum(-1)
                    po = torch.matmul(s, ve[:, :, k0:k1])
                    if m is None:
                        l, o = ps, po
                    else:
                        alpha = torch.exp(m - m_safe)
                        l = l * alpha + ps
                        o = o * alpha.unsqueeze(-1) + po
                    m = m_new
                    m_s = m_safe
                nonzero = l > 0
                lt = torch.where(nonzero, m_s + torch.log(torch.where(nonzero, l, torch.ones_like(l))),
                                 torch.full_like(l, float("-inf")))
                ot = (o / torch.where(nonzero, l, torch.ones_like(l)).unsqueeze(-1)).to(q.dtype)
                lse[:, :, r0:r1] = lt.flip(-1) if rev else lt
                out[:, :, r0:r1] = ot.flip(2) if rev else ot
        return out, lse

    # -- backward -----------------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, dout, dlse=None):
        """``(dq, dk, dv, extra)`` from the output and logsumexp of :meth:`forward` (or of a larger problem
        that this block is part of); ``dlse`` is the gradient of the logsumexp or None."""
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        acc = _acc_dtype(q.dtype)
        ke = _expand(k, H).to(acc)
        ve = _expand(v, H).to(acc)
        dq = torch.zeros(B, H, L, D, dtype=acc, device=q.device)
        dk = torch.zeros(ke.shape, dtype=acc, device=q.device)
        dv = torch.zeros(ve.shape, dtype=acc, device=q.device)
        extra = [None] * len(self.grad_tensors)
        do = dout.to(acc)
        delta = (do * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc)
        lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(acc)
        qs = self._q_scale()
        rev = self.g is not None
        generic = self.form is not None and self.form[0] == "generic"
        for i, chunks in enumerate(self.plan):
            if not chunks:
                continue
            r0, r1 = i * self.q_tile, min(L, (i + 1) * self.q_tile)
            qt = q[:, :, r0:r1].to(acc)
            do_t = do[:, :, r0:r1]
            dlt = delta[:, :, r0:r1].unsqueeze(-1)
            lt = lse_safe[:, :, r0:r1].unsqueeze(-1)
            if rev:  # the Toeplitz bias works on rows in reverse order
                qt, do_t, dlt, lt = qt.flip(2), do_t.flip(2), dlt.flip(2), lt.flip(2)
            qt_s = qt * qs
            for k0, k1, partial in chunks:
                kc, vc = ke[:, :, k0:k1], ve[:, :, k0:k1]
                with torch.no_grad():
                    s, aux = self._scores(qt_s, kc, r0, r1, k0, k1, partial, need_aux=self.form is not None)
                    p = (s - lt).exp_()
                    dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), do_t)
                    dp = torch.matmul(do_t, vc.transpose(-1, -2))
                    ds = dp.sub_(dlt).mul_(p)
                if self.form is not None and self.form[0] == "softcap":
                    ds = ds.mul_(1.0 - aux * aux)  # d(cap * tanh(x / cap)) / dx
                elif generic:
                    raw, modded = aux
                    grads = torch.autograd.grad(modded, (raw,) + self.grad_tensors, ds, allow_unused=True)
                    ds = grads[0] if grads[0] is not None else torch.zeros_like(ds)
                    for t, g in enumerate(grads[1:]):
                        if g is not None:
                            extra[t] = g if extra[t] is None else extra[t] + g
                with torch.no_grad():
                    ds = ds * self.scale
                    dqt = torch.matmul(ds, kc)
                    dq[:, :, r0:r1] += dqt.flip(2) if rev else dqt
                    dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qt)
        if Hkv != H:
            dk = dk.view(B, Hkv, H // Hkv, *dk.shape[2:]).sum(2)
            dv = dv.view(B, Hkv, H // Hkv, *dv.shape[2:]).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), extra


def _expand(t: torch.Tensor, H: int) -> torch.Tensor:
    if t.shape[1] == H:
        return t
    return t.repeat_interleave(H // t.shape[1], dim=1)
