"""Attention with an additive float bias tensor: torch's fused CPU kernel, -inf structure skipped, dbias.

``scores = scale * q @ k^T + bias`` (bias broadcastable to (B, H, L, S), -inf hides a key), then a mask (if
any) hides keys, then the softmax, exactly as torch SDPA's float ``attn_mask``. This module provides the
executor that runs it (the protocol of :mod:`salience.kernels.dispatch`: ``forward(q, k, v) -> (out, lse)``,
``backward(q, k, v, out, lse, dout, dlse) -> (dq, dk, dv, [dbias])``, ``grad_tensors`` = the tensors that get
the extra gradients, in order):

* **Structure.** The bias is scanned once (cached per tensor object and version) for its -inf structure: for
  each block of ``BiasConfig.rows`` query rows, the key window ``[lo, hi)`` outside which the bias is -inf for
  every batch entry, head and row of the block. A mask narrows the windows further through its tile classes
  (:class:`salience.blocks.BlockMask`). A bias that is -inf above the diagonal everywhere (causal, with any
  values below), or any bias with ``mask=masks.causal()``, runs as one fused call with the kernel's own
  ``is_causal`` skipping as well (exact, since those keys are hidden anyway; about half the work in one call,
  no mask evaluated). Otherwise, when the windows skip at least
  ``min_skip`` of the score elements, each row block is one fused call over just its window; else one fused
  call takes the whole bias, as ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` does. A cheap probe
  (a grid of sampled entries) skips the scan for biases with no -inf in sight.
* **Forward**: ``aten::_scaled_dot_product_flash_attention_for_cpu`` with the bias slice as ``attn_mask``
  (through :mod:`salience.kernels.fused`, which guards its preconditions). Rows whose keys are all -inf give
  output 0 and lse -inf.
* **Backward**: the fused flash backward with the same bias slices; when the bias requires grad, a tiled
  recompute instead: per tile of ``grad_rows`` rows, ``P = exp(s - lse)``, ``dS = P * (dP - rowsum(dout *
  out) + dlse)``, dq, dk, dv from dS and P, and ``dbias`` = dS summed over the bias's broadcast axes (memory
  linear in L apart from dbias itself).
* Keys holding NaN or inf never change rows that cannot see them, whether the mask or a -inf in the bias hides
  them: the dispatcher's guard (:mod:`salience.kernels.guard`) runs the executor on zeroed copies and recomputes
  the rows that do see such a key by the textbook formula. Run directly (not through the dispatcher), the
  executor applies the same guard itself; its finiteness check is the guard's remembered one
  (:func:`salience.kernels.guard.finite_pair`), so a call through the dispatcher makes one pass over k and v.

Example:
    >>> import torch
    >>> from salience.kernels import bias as kb
    >>> q = k = v = torch.randn(1, 2, 64, 16)
    >>> causal = torch.full((64, 64), float("-inf")).triu(1)
    >>> ex, details = kb.executor(q, k, v, causal, scale=0.25, need_grad=False)
    >>> details["is_causal"], details["blocks"]
    (True, 1)
    >>> band = causal + torch.full((64, 64), float("-inf")).tril(-9)  # query i sees keys i-8 .. i
    >>> ex, details = kb.executor(q, k, v, band, scale=0.25, need_grad=False, config=kb.BiasConfig(rows=16))
    >>> out, lse = ex.forward(q, k, v)
    >>> out.shape, details["blocks"], details["skipped"]
    (torch.Size([1, 2, 64, 16]), 4, 0.6562)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .._layout import expand_kv
from .._result import AttentionResult
from ..blocks import EMPTY, FULL, BlockMask
from ..masks import check_mask_output
from ..reference import _acc_dtype
from . import fused, guard
from .config import BiasConfig

__all__ = ["BiasConfig", "BiasExecutor", "executor", "check_bias", "key_windows", "bias_score_mod"]


DEFAULT = BiasConfig()


def check_bias(bias, B: int, H: int, L: int, S: int, device) -> torch.Tensor:
    """``bias`` as a 4-D view (1|B, 1|H, 1|L, 1|S), or a ValueError/TypeError that says what was seen and the fix.

    H is the number of *query* heads. Fewer than 4 axes are read as trailing axes (an (L, S) bias is shared by
    every batch entry and head), as torch broadcasting does."""
    want = f"(B, H, L, S) = {(B, H, L, S)} (H = query heads; each axis 1 or that size)"
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a float tensor broadcastable to {want}; got {type(bias).__name__}.")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor (added to the scores); got {bias.dtype}. For a "
                        "boolean mask (True = visible) use mask=, or convert: torch.zeros(m.shape).masked_fill(~m, "
                        "float('-inf')).")
    if bias.dim() > 4:
        raise ValueError(f"bias has {bias.dim()} axes {tuple(bias.shape)}; it must broadcast to {want}.")
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    for n, full, name in zip(b4.shape, (B, H, L, S), "BHLS"):
        if n not in (1, full):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to {want}: its {name} axis has "
                             f"size {n}. Give that axis size 1 or {full}" +
                             (" (a bias per kv head must be repeated to the query heads)." if name == "H" else "."))
    if bias.device != torch.device(device):
        raise ValueError(f"bias is on {bias.device} but q is on {device}; move it with bias.to(q.device).")
    return b4


def bias_score_mod(b4: torch.Tensor):
    """A :class:`salience.scores.ScoreMod` adding a 4-D bias (1|B, 1|H, 1|L, 1|S): the general paths' form of
    ``bias=`` (with another score_mod, dropout or a compatibility function)."""
    from ..scores import ScoreMod

    n = b4.shape

    def fn(score, b, h, q, kv):
        idx = [i.clamp(max=m - 1) if m > 1 else i * 0 for i, m in zip((b, h, q, kv), n)]
        return score + b4[idx[0], idx[1], idx[2], idx[3]].to(score.dtype)

    mod = ScoreMod(fn, f"bias(<{tuple(n)}>)")
    mod.table = b4  # found by dispatch.grad_tensors when it requires grad
    return mod


# ---------------------------------------------------------------------------------------------- structure

_WINDOWS: dict = {}
_WINDOWS_MAX = 16


def _probe_has_neginf(b4: torch.Tensor, n: int) -> bool:
    ri = torch.linspace(0, b4.shape[2] - 1, min(n, b4.shape[2]), device=b4.device).long()
    ci = torch.linspace(0, b4.shape[3] - 1, min(n, b4.shape[3]), device=b4.device).long()
    return bool(torch.isneginf(b4.index_select(2, ri).index_select(3, ci)).any())


def key_windows(bias: torch.Tensor, b4: torch.Tensor, L: int, S: int, rows: int, probe: int = 64):
    """``(lo, hi, causal)``: lo, hi int64 (nblocks,) per block of ``rows`` query rows, the bias being -inf
    outside keys ``[lo, hi)`` for every batch entry, head and row of the block (an all -inf block gives
    lo = hi = 0); ``causal`` True when it is -inf above the diagonal (query i, keys j > i) everywhere, so that
    the fused kernel's own top-left ``is_causal`` skipping is exact. None when a probe of sampled entries finds
    no -inf. Cached per ``bias`` object and version."""
    key = (id(bias), bias._version, bias.data_ptr(), tuple(b4.shape), tuple(b4.stride()), L, S, rows)
    hit = _WINDOWS.get(key[0])
    if hit is not None and hit[0]() is bias and hit[1] == key:
        return hit[2]
    res = None
    if _probe_has_neginf(b4, probe):
        with torch.no_grad():
            fin = (b4.amax(dim=(0, 1)) if b4.shape[0] * b4.shape[1] > 1 else b4[0, 0]) > float("-inf")  # (Lb, Sb)
        causal = fin.shape[0] > 1 and fin.shape[1] > 1 and not bool(fin.triu(1).any())
        fin = fin.expand(L, fin.shape[1]) if fin.shape[0] == 1 else fin
        nb = -(-L // rows)
        fin = torch.nn.functional.pad(fin, (0, 0, 0, nb * rows - L)).view(nb, rows, -1).any(1)  # (nb, Sb)
        if fin.shape[1] == 1:
            lo, hi = torch.zeros(nb, dtype=torch.long), torch.where(fin[:, 0].cpu(), S, 0)
        else:
            idx = torch.arange(S, device=fin.device)
            lo = torch.where(fin, idx, S).amin(-1).cpu()
            hi = torch.where(fin, idx + 1, 0).amax(-1).cpu()
        res = (torch.where(hi > lo, lo, 0), torch.where(hi > lo, hi, 0), causal)
    if len(_WINDOWS) >= _WINDOWS_MAX:
        _WINDOWS.pop(next(iter(_WINDOWS)))
    _WINDOWS[key[0]] = (weakref.ref(bias), key, res)
    return res


def _mask_windows(m, B, H, L, S, rows, kv_tile, device):
    """Per row block: the key window of the mask's non-empty tiles and whether the tiles in it are all full."""
    bm = BlockMask.from_mask(m, B, H, L, S, q_block=rows, kv_block=kv_tile, device=device)
    ne = (bm.classes != EMPTY).flatten(0, 1).any(0)  # (nb, nk)
    nk = ne.shape[1]
    idx = torch.arange(nk, device=ne.device)
    lo_t = torch.where(ne, idx, nk).amin(-1)
    hi_t = torch.where(ne, idx + 1, 0).amax(-1)
    full = []
    for i in range(ne.shape[0]):
        a, b = int(lo_t[i]), int(hi_t[i])
        full.append(b > a and bool((bm.classes[:, :, i, a:b] == FULL).all()))
    lo = (lo_t * kv_tile).clamp(max=S).cpu()
    hi = (hi_t * kv_tile).clamp(max=S).cpu()
    return lo, hi, full


def _is_causal(m, L: int, S: int) -> bool:
    """True when the mask is exactly top-left causal for these lengths (the kernel's ``is_causal`` applies it)."""
    from .. import structure as st

    s = st.of_mask(m)
    if not isinstance(s, st.Band):
        return False
    s = s.at(L, S)
    return s.lo == -float("inf") and s.hi == 0


@dataclass(frozen=True)
class _Block:
    r0: int
    r1: int
    lo: int
    hi: int
    masked: bool  # the mask must be evaluated on this block's window


def _blocks(bias, b4, m, B, H, L, S, cfg: BiasConfig, device):
    """``(blocks, skipped, causal, tile_blocks)``: the fused calls' row blocks (one block covering everything,
    with the kernel's ``is_causal`` when the bias is causal, unless windows save clearly more), the share of
    score elements skipped, and the windowed row blocks (for the tiled dbias backward)."""
    whole = [_Block(0, L, 0, S, False)]
    win = key_windows(bias, b4, L, S, cfg.rows, cfg.probe)
    if win is None and m is None:  # nothing to skip: one call over everything
        return whole, 0.0, False, whole
    nb = -(-L // cfg.rows)
    lo = torch.zeros(nb, dtype=torch.long) if win is None else win[0]
    hi = torch.full((nb,), S, dtype=torch.long) if win is None else win[1]
    full = [True] * nb
    if m is not None:
        mlo, mhi, full = _mask_windows(m, B, H, L, S, cfg.rows, cfg.kv_tile, device)
        lo, hi = torch.maximum(lo, mlo), torch.minimum(hi, mhi)
    blocks, computed = [], 0
    for i in range(nb):
        r0, r1 = i * cfg.rows, min(L, (i + 1) * cfg.rows)
        a, b = int(lo[i]), int(hi[i])
        if b > a:
            blocks.append(_Block(r0, r1, a, b, not full[i]))
            computed += (r1 - r0) * (b - a)
    skipped = 1 - computed / max(1, L * S)
    causal_work = sum(min(i + 1, S) for i in range(L))
    causal = (m is None and win is not None and win[2]) or (m is not None and _is_causal(m, L, S))
    if causal and computed >= 0.8 * causal_work:
        return whole, round(1 - causal_work / max(1, L * S), 4), True, blocks
    if skipped < cfg.min_skip and all(not blk.masked for blk in blocks):
        return whole, 0.0, False, whole
    return blocks, skipped, False, blocks


# ---------------------------------------------------------------------------------------------- executor


def _kernel_bias(b4: torch.Tensor, q_dtype: torch.dtype) -> torch.Tensor:
    """The bias in a dtype the fused kernel takes: q's dtype, or float32 with bfloat16/float16 inputs."""
    if b4.dtype == q_dtype or (b4.dtype == torch.float32 and q_dtype in (torch.bfloat16, torch.float16)):
        return b4
    return b4.to(torch.float32 if q_dtype in (torch.bfloat16, torch.float16) else q_dtype)


class BiasExecutor:
    """Runs ``softmax(scale * q @ k^T + bias, mask) @ v`` over precomputed row blocks (see the module docs).

    The executor protocol of :mod:`salience.kernels.executors`: ``forward``, ``backward``, ``grad_tensors``
    (the bias when it gets a gradient), ``autograd = False``, ``describe()``."""

    autograd = False

    def __init__(self, bias, b4, m, layout, scale: float, shape, need_bias_grad: bool, cfg: BiasConfig):
        self.bias, self.b4, self.mask, self.scale = bias, b4, m, float(scale)
        self.blocks, _, self.causal, self.tile_blocks = layout
        self.B, self.H, self.L, self.S = shape
        self.cfg = cfg
        self.grad_tensors = (bias,) if need_bias_grad else ()

    def describe(self):
        n = len(self.blocks)
        fwd = "torch's fused CPU flash kernel with the bias as attn_mask" + (
            " and is_causal (the bias is -inf above the diagonal)" if self.causal else "") + (
            "" if self._whole() else f", {n} row blocks over the keys the bias and mask leave finite")
        bwd = ("tiled recompute of dS (dq, dk, dv and dbias), memory linear in L" if self.grad_tensors else
               "torch's fused CPU flash backward with the bias" + ("" if self._whole() else ", per row block"))
        return fwd, bwd

    # -- pieces ----------------------------------------------------------------------------------------
    def _slice(self, blk: _Block, kb: torch.Tensor, r0=None, r1=None) -> torch.Tensor:
        """The bias of rows [r0, r1) (default the block's) and the block's keys, with the mask applied."""
        r0 = blk.r0 if r0 is None else r0
        r1 = blk.r1 if r1 is None else r1
        t = kb[:, :, r0:r1] if kb.shape[2] > 1 else kb
        t = t[..., blk.lo:blk.hi] if kb.shape[3] > 1 else t
        if blk.masked:
            dev = kb.device
            b = torch.arange(self.B, device=dev).view(-1, 1, 1, 1)
            h = torch.arange(self.H, device=dev).view(1, -1, 1, 1)
            qi = torch.arange(r0, r1, device=dev).view(1, 1, -1, 1)
            ki = torch.arange(blk.lo, blk.hi, device=dev).view(1, 1, 1, -1)
            vis = check_mask_output(self.mask(b, h, qi, ki), self.mask, (self.B, self.H, r1 - r0, blk.hi - blk.lo))
            t = t.masked_fill(~vis, float("-inf"))
        return t

    def _whole(self) -> bool:
        return len(self.blocks) == 1 and self.blocks[0] == _Block(0, self.L, 0, self.S, False)

    def _finite(self, k, v) -> bool:
        """The guard's remembered check (:func:`salience.kernels.guard.finite_pair`): through the dispatcher, k and
        v were checked (or zeroed) just before, and the backward reads the forward's finding (same tensors, same
        versions), so a training step makes one summing pass over k and v, not three."""
        key = (id(k), guard._version(k), id(v), guard._version(v))
        if getattr(self, "_finite_key", None) == key and None not in key:
            return True
        fin = guard.finite_pair(k, v)
        self._finite_key = key if fin else None
        return fin

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, q, k, v):
        if self._finite(k, v):
            return self._forward(q, k, v)
        kc, vc, bad = guard.cleaned_and_bad(k, v)  # run directly with NaN/inf keys: the dispatcher's guard, here
        res = AttentionResult(*self._forward(q, kc, vc))
        sc = guard.Scoring(mask=self.mask, bias=self.b4, scale=self.scale, L=self.L, S=self.S)
        res = guard.patch_rows(res, q, k, v, kc, vc, sc, bad=bad)
        return res.out, res.lse

    def _forward(self, q, k, v):
        kb = _kernel_bias(self.b4, q.dtype)
        if self._whole():
            out, lse = fused.forward(q, k, v, scale=self.scale, bias=kb, causal=self.causal)
            return out, _empty_rows(lse, kb)
        B, H, L = q.shape[:3]
        out = q.new_zeros(B, H, L, v.shape[-1])
        lse = torch.full((B, H, L), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
        for blk in self.blocks:
            t = self._slice(blk, kb)
            o, lo = fused.forward(q[:, :, blk.r0:blk.r1], k[:, :, blk.lo:blk.hi], v[:, :, blk.lo:blk.hi],
                                  scale=self.scale, bias=t)
            out[:, :, blk.r0:blk.r1] = o
            lse[:, :, blk.r0:blk.r1] = _empty_rows(lo, t)
        return out, lse

    # -- backward --------------------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, dout, dlse):
        if not self._finite(k, v):  # run directly with NaN/inf keys: the kernels read the zeroed copies
            k, v = guard.cleaned(k, v)
        if self.grad_tensors:
            return self._backward_tiled(q, k, v, out, lse, dout, dlse)
        kb = _kernel_bias(self.b4, q.dtype)
        if self._whole():
            return (*fused.backward(dout, q, k, v, out, lse, scale=self.scale, bias=kb, dlse=dlse, causal=self.causal),
                    [])
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for blk in self.blocks:
            rs, ks = slice(blk.r0, blk.r1), slice(blk.lo, blk.hi)
            g = fused.backward(dout[:, :, rs], q[:, :, rs], k[:, :, ks], v[:, :, ks], out[:, :, rs], lse[:, :, rs],
                               scale=self.scale, bias=self._slice(blk, kb),
                               dlse=None if dlse is None else dlse[:, :, rs])
            dq[:, :, rs] = g[0]
            dk[:, :, ks] += g[1]
            dv[:, :, ks] += g[2]
        return dq, dk.to(k.dtype), dv.to(v.dtype), []

    def _backward_tiled(self, q, k, v, out, lse, dout, dlse):
        """dq, dk, dv and dbias from ``dS = P * (dP - rowsum(dout * out) + dlse)``, one row tile at a time."""
        acc = _acc_dtype(q.dtype)
        kb = self.b4 if self.b4.dtype == acc else self.b4.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        db = torch.zeros(self.b4.shape, dtype=acc, device=q.device)
        for blk in self.tile_blocks:
            step = self.cfg.grad_rows or max(16, self.cfg.grad_elements // max(1, self.B * self.H * (blk.hi - blk.lo)))
            for r0 in range(blk.r0, blk.r1, step):
                r1 = min(blk.r1, r0 + step)
                t = self._slice(blk, kb, r0, r1)
                g = _grad_tile(q, k, v, out, lse, dout, dlse, r0, r1, blk.lo, blk.hi, t, self.scale)
                dq[:, :, r0:r1] = g[0]
                dk[:, :, blk.lo:blk.hi] += g[1]
                dv[:, :, blk.lo:blk.hi] += g[2]
                _add_reduced(db, g[3], r0, r1, blk.lo, blk.hi)
        dbias = db.to(self.bias.dtype).reshape(self.bias.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), [dbias]


def _empty_rows(lse: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """lse with -inf for rows whose bias slice ``t`` is all -inf (the kernel gives them out 0 and lse 0)."""
    if not bool((lse == 0).any()):
        return lse
    empty = torch.isneginf(t).all(-1)
    return lse.masked_fill(empty.expand_as(lse), float("-inf"))


def _grad_tile(q, k, v, out, lse, dout, dlse, r0, r1, lo, hi, t, scale):
    """(dq rows, dk keys, dv keys, dS) of query rows [r0, r1) against keys [lo, hi) with the bias slice ``t``."""
    acc = _acc_dtype(q.dtype)
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    qb = q[:, :, r0:r1].to(acc)
    ke = expand_kv(k[:, :, lo:hi], H).to(acc)
    ve = expand_kv(v[:, :, lo:hi], H).to(acc)
    do = dout[:, :, r0:r1].to(acc)
    ls = lse[:, :, r0:r1].to(acc).unsqueeze(-1)
    ls = torch.where(torch.isneginf(ls), torch.zeros((), dtype=acc, device=ls.device), ls)
    p = torch.matmul(qb, ke.transpose(-1, -2)).mul_(scale).add_(t).sub_(ls).exp_()  # in place: few passes
    delta = (do * out[:, :, r0:r1].to(acc)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse[:, :, r0:r1].to(acc).unsqueeze(-1)
    ds = torch.matmul(do, ve.transpose(-1, -2)).sub_(delta).mul_(p)
    dq = torch.matmul(ds, ke).mul_(scale)
    dk = (torch.matmul(ds.transpose(-1, -2), qb) * scale).view(B, Hkv, H // Hkv, hi - lo, -1).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), do).view(B, Hkv, H // Hkv, hi - lo, -1).sum(2)
    return dq, dk, dv, ds


def _add_reduced(db: torch.Tensor, ds: torch.Tensor, r0: int, r1: int, lo: int, hi: int) -> None:
    """db (1|B, 1|H, 1|L, 1|S) += dS of rows [r0, r1) and keys [lo, hi), summed over db's broadcast axes."""
    dims = [i for i in range(4) if db.shape[i] == 1 and ds.shape[i] != 1]
    red = ds.sum(dim=dims, keepdim=True) if dims else ds
    tgt = db[:, :, r0:r1] if db.shape[2] > 1 else db
    tgt = tgt[..., lo:hi] if db.shape[3] > 1 else tgt
    tgt += red


def executor(q, k, v, bias, *, mask=None, scale: float, need_grad: bool, config: BiasConfig = DEFAULT):
    """``(BiasExecutor, details)`` for attention with the float ``bias`` (and an optional bound ``mask``), or
    None when the fused CPU kernels cannot run these inputs (device, dtype).

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv), with B already broadcast.
        bias: float tensor broadcastable to (B, H, L, S) (checked by :func:`check_bias`); it gets a gradient
            when it requires grad and ``need_grad``.
        mask: a :class:`salience.masks.MaskMod` or None. scale: multiplier of q @ k^T.
        config: a :class:`BiasConfig`.

    ``details`` holds ``skipped`` (share of score elements not computed), ``blocks`` and the backward used.
    """
    if not fused.available(q) or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    B, H, L, _ = q.shape
    S = k.shape[2]
    b4 = check_bias(bias, B, H, L, S, q.device)
    m = None if mask is None else mask.bind(L, S, q.device)
    if m is not None and getattr(m, "name", None) == "full()":
        m = None
    layout = _blocks(bias, b4, m, B, H, L, S, config, q.device)
    blocks, skipped, causal = layout[:3]
    grad = bool(need_grad and bias.requires_grad)
    ex = BiasExecutor(bias, b4, m, layout, scale, (B, H, L, S), grad, config)
    details = {"skipped": round(skipped, 4), "blocks": len(blocks), "is_causal": causal,
               "backward": "tiled dS recompute with dbias" if grad else "fused flash backward with the bias"}
    if causal:
        details["structure"] = "-inf above the diagonal: the kernel's is_causal skipping"
    elif skipped > 0:
        details["structure"] = f"-inf key windows per {config.rows}-row block"
    return ex, details
