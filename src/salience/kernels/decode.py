"""Decoding attention: a few query rows per sequence against a long, possibly paged, key/value cache.

:func:`forward` is the executor under ``salience.attention_with_kvcache``: exact attention of ``L`` (1..16)
query rows per sequence against a contiguous cache ``(B, Hkv, S, D)`` or a paged pool ``(num_blocks, Hkv,
block_size, D)`` with a ``(B, max_blocks)`` block table (vLLM / FlashInfer layout), where query row ``i`` of
sequence ``b`` sees the logical keys ``[lo[b, i], hi[b, i])``. That one interval per row expresses
bottom-right causal masks, sliding windows and per-sequence cache lengths.

The scores of a visible key ``p`` for query row ``i`` of head ``h`` are, in this order::

    s = scale * (q . k_p)                      # float32 (float64 for float64 inputs)
    s = softcap * tanh(s / softcap)            # if softcap is given
    s = s - slope[h] * |q_pos[b, i] - p|       # if slopes are given (ALiBi)

that is ``scores.compose(scores.softcap(c), scores.alibi(...))`` (softcap first, then the bias), and the
optional per-head ``sinks`` logits join every row's softmax as a virtual key of value 0
(:func:`salience.kernels.merge.with_sinks`). The returned logsumexp includes the sink. A row with no visible
key gets output 0 and logsumexp -inf (or the sink's logit when sinks are given), never NaN. Keys outside a
row's interval are never read into its result: NaN or garbage stored there changes nothing.

Two implementations, one signature and one result (the tests check both against the float64 reference):

* the compiled kernel ``decode.cpp`` (built on first use like the interval kernels of :mod:`.native`: same
  compiler, cache, manifest and ``SALIENCE_NATIVE=0`` switch): grouped-query aware (each key/value head's
  keys and values are read once for all the query heads and rows that share it), bfloat16/float16 caches
  read as stored and converted in registers (bfloat16 q.k by ``vdpbf16ps`` where the CPU has AVX512-BF16)
  with float32 accumulation, online softmax, paged caches read block by block in place (with software
  prefetch through the block table), the key axis split into pieces so that every thread has work
  (flash-decoding; the pieces are merged by logsumexp in C), and only the keys in ``[lo, hi)`` are read.
  AVX-512, AVX2 (+FMA, F16C) or scalar code is chosen at compile time by ``-march=native``; calls that read
  fewer than 2048 (key, kv head) pairs run on one thread;
* a torch fallback (per sequence: gather the visible keys, float32 accumulation) used when the kernel cannot
  be built, for float64 inputs, for tensors not on the CPU, or when :data:`FORCE_TORCH` is set.

Forward only: there is no backward (decoding needs none); inputs that require grad are refused.

Example:
    >>> import torch
    >>> from salience.kernels import decode
    >>> q = torch.randn(2, 8, 1, 64)                      # B=2 sequences, 8 query heads, one new token each
    >>> k, v = torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)  # 2 kv heads, cache capacity 100
    >>> lens = torch.tensor([[37], [100]])               # per-sequence cache lengths
    >>> out, lse = decode.forward(q, k, v, lo=torch.zeros_like(lens), hi=lens, scale=64 ** -0.5)
    >>> out.shape, lse.shape
    (torch.Size([2, 8, 1, 64]), torch.Size([2, 8, 1]))
"""

from __future__ import annotations

import array
import ctypes
import math
import numbers
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..reference import _acc_dtype, softmax_from_scores
from . import native
from .merge import check_sinks

__all__ = ["forward", "band_rows", "band_bounds", "bounds_tensors", "band_intervals", "band_of", "kernel_mods", "available", "status", "build", "FORCE_TORCH"]

#: set to True to run the torch fallback even where the compiled kernel is available (tests, debugging)
FORCE_TORCH = False

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Problem:
    """Sizes read off validated arguments."""

    B: int
    H: int
    Hkv: int
    L: int
    D: int
    Dv: int
    paged: bool
    block_size: int  # the pool's block size; S for a contiguous cache
    capacity: int    # logical keys per sequence: S, or max_blocks * block_size


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _int_table(name: str, t, want: tuple, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
        raise ValueError(f"{name}: expected an integer tensor of shape {what} = {want}; got {_shape(t)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor (int64 or int32); got {t.dtype}; convert it with .long()")
    return t


def _check_cache(q, k, v, block_table) -> _Problem:
    B, H, L, D = q.shape
    paged = block_table is not None
    lay = "(num_blocks, Hkv, block_size, D)" if paged else "(B, Hkv, S, D)"
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-dimensional cache {lay}; got {_shape(t)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: its dtype {t.dtype} differs from q's {q.dtype}; the decode path takes one dtype "
                             f"for q, k and v (cast q with .to({t.dtype}))")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} while q is on {q.device}; move them to one device")
    if k.shape[3] != D:
        raise ValueError(f"k: its head dim {k.shape[3]} differs from q's D={D} (k {tuple(k.shape)}, q {tuple(q.shape)})")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v: expected one {lay[:-3]}...) for both; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k: the query heads H={H} must be a multiple of the key/value heads Hkv={Hkv} (query head i "
                         f"uses kv head i // (H // Hkv)); got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if not paged:
        if k.shape[0] != B:
            raise ValueError(f"k: a contiguous cache (B, Hkv, S, D) needs B={B} sequences like q; got {tuple(k.shape)} "
                             "(for a paged pool pass block_table)")
        return _Problem(B, H, Hkv, L, D, v.shape[3], False, k.shape[2], k.shape[2])
    bs = k.shape[2]
    if bs < 1 or k.shape[0] < 1:
        raise ValueError(f"k: a paged pool {lay} needs num_blocks >= 1 and block_size >= 1; got {tuple(k.shape)}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table: expected (B, max_blocks) = ({B}, max_blocks) int32/int64; got "
                         f"{_shape(block_table)}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table: expected int32 or int64; got {block_table.dtype}")
    return _Problem(B, H, Hkv, L, D, v.shape[3], True, bs, block_table.shape[1] * bs)


def _check_blocks(block_table, lo, hi, p: _Problem, num_blocks: int) -> None:
    """Every pool block that some row reads must exist (entries of unread logical blocks are not looked at,
    so tables padded with -1 are fine)."""
    rows = hi > lo
    if not bool(rows.any()):
        return
    big = p.capacity + 1
    first = torch.where(rows, lo, torch.full_like(lo, big)).amin(1)   # (B,) first key read per sequence
    last = torch.where(rows, hi, torch.zeros_like(hi)).amax(1)        # one past the last
    j = torch.arange(block_table.shape[1], device=lo.device).view(1, -1) * p.block_size
    used = (j + p.block_size > first.view(-1, 1)) & (j < last.view(-1, 1))
    tb = block_table.to(lo.device, torch.int64)
    bad = used & ((tb < 0) | (tb >= num_blocks))
    if bool(bad.any()):
        b, blk = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table: entry [{b}, {blk}] = {int(tb[b, blk])} is not a block of the pool (num_blocks="
                         f"{num_blocks}), but sequence {b} reads logical keys {blk * p.block_size}.."
                         f"{(blk + 1) * p.block_size - 1} through it; give indices in [0, {num_blocks})")


def _check_values(p: _Problem, lo, hi, block_table, num_blocks: int) -> None:
    """The checks that read the index tables: bounds in [0, capacity], and the pool blocks that rows read exist.
    (The compiled path runs the same checks in C first and calls this only to word the error.)"""
    for name, t in (("lo", lo), ("hi", hi)):
        bad = (t < 0) | (t > p.capacity)
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            where = "max_blocks * block_size" if p.paged else "S"
            raise ValueError(f"{name}: [{b}, {i}] = {int(t[b, i])} lies outside [0, {p.capacity}] (the cache holds "
                             f"{where} = {p.capacity} logical keys per sequence); rows see keys [lo, hi) of the cache")
    if p.paged:
        _check_blocks(block_table, lo, hi, p, num_blocks)


def _check(q, k, v, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks):
    """Validate every argument at the boundary (the index tables' values: :func:`_check_values`); returns (problem, lo, hi, q_pos, slopes, sinks, scale, softcap)
    with the index tables as int64 on q's device and slopes / sinks as (B, H) float tables."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected (B, H, L, D); got {_shape(q)}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"q: expected float32, float64, bfloat16 or float16; got {q.dtype}")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        raise ValueError("q, k, v: the decode path is forward only (no backward); call it under torch.no_grad() or "
                         "with detached tensors, or use salience.attention for training")
    p = _check_cache(q, k, v, block_table)
    B, L = p.B, p.L
    lo = _int_table("lo", lo, (B, L), "(B, L)").to(q.device, torch.int64)
    hi = _int_table("hi", hi, (B, L), "(B, L)").to(q.device, torch.int64)
    q_pos, slopes, sinks, scale, softcap = _check_extras(p, q.device, scale, slopes, q_pos, softcap, sinks)
    return p, lo, hi, q_pos, slopes, sinks, scale, softcap


def _check_extras(p: _Problem, device, scale, slopes, q_pos, softcap, sinks):
    """The checks of scale, softcap, ALiBi slopes with their q_pos, and sinks: ``(q_pos, slopes, sinks, scale,
    softcap)`` with slopes / sinks as (B, H) float tables and q_pos as (B, L) int64 on ``device``."""
    B = p.B
    if type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)) or \
            not math.isfinite(float(scale)):
        raise ValueError(f"scale: expected a finite number (e.g. D ** -0.5); got {scale!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (
                math.isfinite(float(softcap)) and float(softcap) > 0):
            raise ValueError(f"softcap: expected a positive finite number or None; got {softcap!r}")
        softcap = float(softcap)
    if slopes is not None:
        if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point() or slopes.dim() not in (1, 2) or \
                slopes.shape[-1] != p.H or (slopes.dim() == 2 and slopes.shape[0] != B):
            raise ValueError(f"slopes: expected a float tensor (H,) = ({p.H},) or (B, H) = ({B}, {p.H}) of ALiBi slopes; "
                             f"got {_shape(slopes)} {getattr(slopes, 'dtype', '')}")
        if q_pos is None:
            raise ValueError("q_pos: ALiBi slopes need the logical position of each query row, (B, L) int64 (for one "
                             "new token per sequence: the cache length before it, i.e. hi - 1)")
        q_pos = _int_table("q_pos", q_pos, (B, p.L), "(B, L)").to(device, torch.int64)
        slopes = slopes.to(device).reshape(-1, p.H).expand(B, p.H)
    if sinks is not None:
        sinks = check_sinks(sinks, B, p.H).to(device).reshape(-1, p.H).expand(B, p.H)
    return q_pos, slopes, sinks, float(scale), softcap


def band_of(mask):
    """``(lo_d, hi_d, bottom_right)`` when ``mask`` is no mask (all None, False) or a band ``lo_d <= kv - q - shift
    <= hi_d`` (None = unbounded; shift = S - L when bottom_right, else 0): causal and sliding windows of either
    alignment, read from its typed structure (:mod:`salience.structure`); else None."""
    if mask is None:
        return None, None, False
    from ..structure import Band, of_mask

    st = of_mask(mask)
    if not isinstance(st, Band):
        return None
    lo_d, hi_d = st.bounds
    return lo_d, hi_d, st.align == "bottom_right"


def kernel_mods(score_mod):
    """``(dict(scale_mult, softcap, slopes, offset), None)`` when the decode kernel takes the score_mod (it
    computes ``cap * tanh(s / cap)`` on the scaled score, then adds ``-slope * |q_pos - kv_pos|``), else
    ``(None, reason)``. Read from the mod's typed structure (:mod:`salience.structure`)."""
    from .. import structure as St

    out = {"scale_mult": 1.0, "softcap": None, "slopes": None, "offset": 0}
    st = St.of_mod(score_mod)
    if st is None:
        return out, None
    for m in st.parts if isinstance(st, St.Compose) else (st,):
        if isinstance(m, St.Temperature):
            if out["softcap"] is not None:
                return None, f"{score_mod.name}: a temperature after softcap (the kernel caps last)"
            out["scale_mult"] /= m.t
            if out["slopes"] is not None:
                out["slopes"] = out["slopes"] / m.t
        elif isinstance(m, St.Softcap):
            if out["softcap"] is not None or out["slopes"] is not None:
                return None, f"{score_mod.name}: softcap after softcap or alibi (the kernel caps the dot product only)"
            out["softcap"] = float(m.cap)
        elif isinstance(m, St.Alibi) and m.per_head and out["slopes"] is None:
            out["slopes"], out["offset"] = m.slopes.float(), int(m.offset)
        else:
            return None, (f"score_mod {getattr(score_mod, 'name', type(score_mod).__name__)} (the kernel takes "
                          "temperature, softcap and one per-head alibi)")
    return out, None


def band_intervals(band, total: torch.Tensor, L: int) -> tuple:
    """``(lo, hi)`` (B, L) int64 contiguous: the keys ``[lo, hi)`` each of L query rows sees under ``band`` =
    ``(lo_d, hi_d, bottom_right)`` (:func:`band_of`), sequence b holding ``total[b]`` keys; empty rows (0, 0).
    Tensor ops only (no host read: it traces into a graph); :func:`band_rows` is the same on Python ints.

    Example:
        >>> lo, hi = band_intervals((-2, 0, True), torch.tensor([10, 1]), 1)
        >>> lo.tolist(), hi.tolist()
        ([[7], [0]], [[10], [1]])
    """
    lo_d, hi_d, bottom_right = band
    rows = torch.arange(L, device=total.device, dtype=torch.long).view(1, -1)
    tot = total.view(-1, 1).to(torch.long)
    diag = rows + (tot - L) if bottom_right else rows.expand(tot.shape[0], L)  # kv index of q's diagonal
    lo = torch.zeros_like(diag) if lo_d is None else torch.clamp(diag + lo_d, min=0)
    hi = tot.expand_as(diag) if hi_d is None else torch.minimum(tot, torch.clamp(diag + hi_d + 1, min=0))
    empty = hi <= lo
    zero = torch.zeros_like(lo)
    return torch.where(empty, zero, lo).contiguous(), torch.where(empty, zero, hi).contiguous()


def band_bounds(mask, totals, L: int, few: int = 256):
    """``(los, his)``: two flat Python lists of ``len(totals) * L`` ints, row i of sequence b at ``b * L + i``
    seeing keys ``[los[j], his[j])`` under no mask or a band mask (:func:`band_of`), sequence b holding
    ``totals[b]`` keys; empty rows (0, 0). None for other masks or more than ``few`` rows. No tensor is made:
    the dispatcher reads a decoding step's few rows from these (:func:`band_rows` is the tensor form).

    Example:
        >>> import salience
        >>> band_bounds(salience.masks.causal(align="bottom_right"), [10, 4], 1)
        ([0, 0], [10, 4])
    """
    band = band_of(mask) if len(totals) * L <= few else None
    if band is None:
        return None
    lo_d, hi_d, br = band
    los, his = [], []
    for S in totals:
        for i in range(L):
            d = i + (S - L if br else 0)  # the key index on the query's diagonal
            a = 0 if lo_d is None else max(0, d + lo_d)
            z = S if hi_d is None else min(S, max(0, d + hi_d + 1))
            los.append(a if z > a else 0)
            his.append(z if z > a else 0)
    return los, his


def band_rows(mask, totals, L: int, few: int = 256):
    """``(lo, hi)`` (B, L) int64: :func:`band_bounds` as two dense tensors (views of one); None when it is None.

    Example:
        >>> import salience
        >>> lo, hi = band_rows(salience.masks.sliding_window(2, align="bottom_right"), [10, 1], 1)
        >>> lo.tolist(), hi.tolist()
        ([[7], [0]], [[10], [1]])
    """
    bounds = band_bounds(mask, totals, L, few)
    return None if bounds is None else bounds_tensors(bounds, len(totals), L)


def bounds_tensors(bounds, B: int, L: int) -> tuple:
    """``(lo, hi)`` (B, L) int64 from :func:`band_bounds`' lists: two dense views of one CPU tensor that shares
    an ``array`` of the ints (no per-element conversion)."""
    flat = bounds[0] + bounds[1]
    both = (torch.frombuffer(array.array("q", flat), dtype=torch.long) if flat else
            torch.zeros(0, dtype=torch.long)).view(2, B, L)
    return both[0], both[1]


def _gather(cache, b: int, pos: torch.Tensor, p: _Problem, block_table) -> torch.Tensor:
    """Logical keys ``pos`` of sequence b: (Hkv, len(pos), D) (a view for a contiguous cache)."""
    if not p.paged:
        return cache[b, :, int(pos[0]):int(pos[-1]) + 1] if pos.numel() else cache[b, :, :0]
    blocks = block_table[b].to(torch.int64)[pos // p.block_size].clamp(0, cache.shape[0] - 1)
    return cache[blocks, :, pos % p.block_size].transpose(0, 1)  # (W, Hkv, D) -> (Hkv, W, D)


def _torch_forward(q, k, v, p: _Problem, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks):
    """The fallback: per sequence, gather the keys of the union of its rows' intervals, compute in float32
    (float64 for float64), mask each row to its own interval (values it cannot see are zeroed, not multiplied)."""
    acc = _acc_dtype(q.dtype)
    B, H, Hkv, L = p.B, p.H, p.Hkv, p.L
    G = H // Hkv
    out = torch.zeros(B, H, L, p.Dv, dtype=acc, device=q.device)
    lse = torch.empty(B, H, L, dtype=acc, device=q.device)
    for b in range(B):
        rows = hi[b] > lo[b]
        a = int(lo[b][rows].min()) if bool(rows.any()) else 0
        z = int(hi[b][rows].max()) if bool(rows.any()) else 0
        pos = torch.arange(a, z, device=q.device)
        kb = _gather(k, b, pos, p, block_table).to(acc)
        vb = _gather(v, b, pos, p, block_table).to(acc)
        qb = q[b].to(acc).reshape(Hkv, G * L, p.D)
        s = (qb @ kb.transpose(-1, -2)) * scale                    # (Hkv, G*L, W)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.view(H, L, -1)
        if slopes is not None:
            dist = (q_pos[b].view(L, 1) - pos.view(1, -1)).abs().to(acc)
            s = s - slopes[b].to(acc).view(H, 1, 1) * dist
        vis = (pos.view(1, -1) >= lo[b].view(L, 1)) & (pos.view(1, -1) < hi[b].view(L, 1))   # (L, W)
        s = s.masked_fill(~vis, float("-inf"))
        w, lse_b = softmax_from_scores(s.unsqueeze(0), sinks=None if sinks is None else sinks[b:b + 1])
        lse[b] = lse_b[0]
        w = w[0].view(Hkv, G, L, -1)
        for i in range(L):
            vi = torch.where(vis[i].view(1, -1, 1), vb, torch.zeros((), dtype=acc, device=q.device))
            out[b, :, i] = (w[:, :, i] @ vi).reshape(H, p.Dv)
    return out.to(q.dtype), lse


_SOURCE = Path(__file__).with_name("decode.cpp")
_ABI = 3
_LOCK = threading.Lock()
_STATE: dict = {}
_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_TLS = threading.local()  # one argument struct per thread (see _args)
_MAX_ROWS: dict = {}


class _Args(ctypes.Structure):
    """Mirror of ``SalienceDecodeArgs`` in decode.cpp (every field 8 bytes: no padding)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "k", "v")] + [
        (n, ctypes.c_int64) for n in ("k_s0", "k_s1", "k_s2", "v_s0", "v_s1", "v_s2")] + [
        ("block_table", ctypes.c_void_p), ("max_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64)] + [
        (n, ctypes.c_void_p) for n in ("lo", "hi", "slopes", "q_pos", "sinks", "out", "lse")] + [
        (n, ctypes.c_int64) for n in ("B", "H", "Hkv", "L", "D", "Dv")] + [
        ("scale", ctypes.c_double), ("softcap", ctypes.c_double), ("nthreads", ctypes.c_int64),
        ("dtype", ctypes.c_int64), ("min_split", ctypes.c_int64), ("num_blocks", ctypes.c_int64),
        ("capacity", ctypes.c_int64), ("q16", ctypes.c_void_p)]


def _setup(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.salience_decode_abi.restype = ctypes.c_int
    lib.salience_decode_args_size.restype = ctypes.c_int64
    lib.salience_decode_lanes.restype = ctypes.c_int
    lib.salience_decode_max_rows.restype = ctypes.c_int64
    if lib.salience_decode_abi() != _ABI or lib.salience_decode_args_size() != ctypes.sizeof(_Args):
        raise native._Unavailable(f"{lib._name} does not match this version of salience (ABI); delete it to rebuild")
    lib.salience_decode_forward.restype = None
    lib.salience_decode_forward.argtypes = [ctypes.POINTER(_Args)]
    lib.salience_decode_check.restype = ctypes.c_int64
    lib.salience_decode_check.argtypes = [ctypes.POINTER(_Args)]
    return lib


def build(extra_flags=()) -> ctypes.CDLL:
    """Build (or load from the cache) the decode library with extra compiler flags, e.g. ``["-mno-avx512f"]`` to
    get the AVX2 code on an AVX-512 machine (tests do). Raises RuntimeError with the reason when it cannot."""
    return _setup(native.build_library(_SOURCE, extra_flags, blas=False))


def _lib():
    """The compiled decode library, built on first use (None when it cannot be: :func:`status` says why)."""
    native.load_once(_STATE, _LOCK, build, "the compiled decode kernel is", "the torch path is")
    return _STATE["lib"]


def available(q: torch.Tensor | None = None) -> bool:
    """True when the compiled decode kernel can run on tensors like ``q`` (a CPU float32, bfloat16 or float16
    tensor; builds the kernel on first call) and :data:`FORCE_TORCH` is not set."""
    if q is not None and (q.device.type != "cpu" or q.dtype not in _KERNEL_DTYPES):
        return False
    return not FORCE_TORCH and _lib() is not None


def status() -> str:
    """Why the compiled decode kernel is or is not in use ("compiled" when it is); builds it if needed."""
    _lib()
    return _STATE["why"]


def _cache_operand(t: torch.Tensor) -> torch.Tensor:
    """The cache as the kernel reads it: any strides over the first three dims, the last one dense and
    element-aligned (copied only when it is not)."""
    st = t.stride()
    if st[-1] != 1 or min(st) < 0 or (t.data_ptr() % t.element_size() and t.numel()):
        t = t.contiguous()
    return t


def _args() -> _Args:
    """This thread's argument struct, zeroed: made once per thread instead of once per call. A struct is never
    shared between threads (two threads decoding at once each fill and pass their own), and the kernel reads it
    only during the call, so reusing it on the next call of the same thread is safe."""
    a = getattr(_TLS, "args", None)
    if a is None:
        a = _TLS.args = _Args()
    else:
        ctypes.memset(ctypes.addressof(a), 0, ctypes.sizeof(_Args))
    return a


def _native_forward(lib, q, k, v, p: _Problem, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks):
    """The compiled kernel; every precondition of decode.cpp is met here (dense float32 q, dense int64 tables,
    (B, H) float32 slopes and sinks, the cache's last dim dense). Copies are made only where an operand is not
    already in that form."""
    from .config import current

    qf = q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous()
    k, v = _cache_operand(k), _cache_operand(v)
    lo, hi = lo.contiguous(), hi.contiguous()
    out = torch.empty(p.B, p.H, p.L, p.Dv, dtype=torch.float32)
    lse = torch.empty(p.B, p.H, p.L, dtype=torch.float32)
    a, keep = _args(), [qf, k, v, lo, hi]  # keep: every operand whose address the struct holds stays alive
    a.q, a.k, a.v, a.lo, a.hi, a.out, a.lse = (qf.data_ptr(), k.data_ptr(), v.data_ptr(), lo.data_ptr(),
                                               hi.data_ptr(), out.data_ptr(), lse.data_ptr())
    a.k_s0, a.k_s1, a.k_s2 = k.stride()[:3]
    a.v_s0, a.v_s1, a.v_s2 = v.stride()[:3]
    a.B, a.H, a.Hkv, a.L, a.D, a.Dv = p.B, p.H, p.Hkv, p.L, p.D, p.Dv
    a.scale, a.softcap, a.nthreads = scale, softcap or 0.0, max(1, torch.get_num_threads())
    a.dtype, a.min_split, a.capacity, a.num_blocks = _KERNEL_DTYPES[q.dtype], current().decode_min_split, \
        p.capacity, k.shape[0]
    if q.dtype == torch.bfloat16:  # the AVX512-BF16 dots read q as given
        keep.append(q.contiguous())
        a.q16 = keep[-1].data_ptr()
    if block_table is not None:
        keep.append(block_table if block_table.dtype == torch.int64 and block_table.is_contiguous()
                    else block_table.to(torch.int64).contiguous())
        a.block_table, a.max_blocks, a.block_size = keep[-1].data_ptr(), keep[-1].shape[1], p.block_size
    if slopes is not None:
        keep += [slopes.float().contiguous(), q_pos.contiguous()]
        a.slopes, a.q_pos = keep[-2].data_ptr(), keep[-1].data_ptr()
    if sinks is not None:
        keep.append(sinks.float().contiguous())
        a.sinks = keep[-1].data_ptr()
    ref = ctypes.byref(a)
    if lib.salience_decode_check(ref):  # a bound or a block index out of range: say which
        _check_values(p, lo, hi, block_table, k.shape[0])
        raise AssertionError("decode.cpp's argument check failed where _check_values found nothing wrong")
    if p.B * p.H * p.L and p.D and p.Dv:
        lib.salience_decode_forward(ref)
    elif p.B * p.H * p.L:  # D = 0 or Dv = 0: scores are 0 over the visible keys
        return _torch_forward(q, k, v, p, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks)
    return (out if q.dtype == torch.float32 else out.to(q.dtype)), lse


def _run(q, k, v, p: _Problem, lo, hi, scale, block_table=None, slopes=None, q_pos=None, softcap=None, sinks=None):
    """The kernel (or the torch fallback) on arguments already validated: by :func:`_check` in :func:`forward`,
    or by the caller's own boundary checks (``salience.attention_with_kvcache`` builds ``p`` and the int64
    (B, L) ``lo``/``hi`` itself). The index tables' values are checked here in every case (in C first)."""
    lib = None if FORCE_TORCH or q.device.type != "cpu" or q.dtype not in _KERNEL_DTYPES else _lib()
    if lib is not None and p.H // p.Hkv * p.L <= _max_rows(lib):
        return _native_forward(lib, q, k, v, p, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks)
    _check_values(p, lo, hi, block_table, k.shape[0])
    return _torch_forward(q, k, v, p, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks)


def _max_rows(lib) -> int:
    """The most query rows per kv head group the library takes (asked once per library object)."""
    rows = _MAX_ROWS.get(lib)
    if rows is None:
        rows = _MAX_ROWS[lib] = int(lib.salience_decode_max_rows())
    return rows


def forward_checked(q, k, v, lo, hi, scale: float, slopes=None, q_pos=None, softcap=None):
    """:func:`forward` on a contiguous cache for a caller that has validated its arguments itself (the
    dispatcher's decode rule): q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) of one dtype on the CPU with
    H % Hkv == 0; lo, hi (B, L) int64; slopes (B, H) float with q_pos (B, L) int64, or None; softcap a positive
    float or None. Skips :func:`forward`'s argument checks (a decoding step's per-call cost); the bounds are
    still checked against S (in C) before the kernel runs. Returns ``(out, lse)`` as :func:`forward`."""
    B, H, L, D = q.shape
    p = _Problem(B, H, k.shape[1], L, D, v.shape[3], False, k.shape[2], k.shape[2])
    return _run(q, k, v, p, lo, hi, float(scale), None, slopes, q_pos, softcap, None)


def forward(q, k, v, *, lo, hi, scale, block_table=None, slopes=None, q_pos=None, softcap=None, sinks=None):
    """Exact attention of a few query rows per sequence against a KV cache: ``(out, lse)``.

    Args:
        q: (B, H, L, D) queries, L small (1..16); float32, bfloat16, float16 (float64 runs the torch path).
        k, v: the cache in q's dtype: contiguous (B, Hkv, S, D) and (B, Hkv, S, Dv), or with ``block_table`` a
            paged pool (num_blocks, Hkv, block_size, D) and (num_blocks, Hkv, block_size, Dv). H % Hkv == 0.
        lo, hi: (B, L) int64: query row i of sequence b sees the logical keys ``[lo[b, i], hi[b, i])``, each
            bound in ``[0, capacity]`` (S, or max_blocks * block_size); ``lo >= hi`` is an empty row.
        scale: the factor on q . k.
        block_table: None, or (B, max_blocks) int32/int64: logical key p of sequence b lives in pool block
            ``block_table[b, p // block_size]``, slot ``p % block_size``. Only entries of blocks that some row
            reads are used (and checked against num_blocks).
        slopes: ALiBi slopes (H,) or (B, H); needs ``q_pos`` (B, L) int64, the logical position of each query
            row: the score gets ``- slope * |q_pos - p|`` (as :func:`salience.scores.alibi` with its offset
            folded into q_pos).
        softcap: c > 0: the scaled score becomes ``c * tanh(score / c)`` before the ALiBi bias is added.
        sinks: (H,) or (B, H) sink logits, a virtual key of value 0 in every row's softmax.

    Returns:
        ``(out, lse)``: out (B, H, L, Dv) in q's dtype; lse (B, H, L) float32 (float64 for float64 inputs),
        including the sink; rows with no visible key: out 0, lse -inf (the sink logit with sinks).

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 1, 10, 16), torch.randn(1, 1, 10, 16)
        >>> lo, hi = torch.tensor([[0]]), torch.tensor([[1]])       # the row sees key 0 only
        >>> out, lse = forward(q, k, v, lo=lo, hi=hi, scale=0.25)
        >>> bool(torch.allclose(out[0, :, 0], v[0, 0, 0].expand(4, 16)))
        True
    """
    p, lo, hi, q_pos, slopes, sinks, scale, softcap = _check(q, k, v, lo, hi, scale, block_table, slopes, q_pos,
                                                               softcap, sinks)
    return _run(q, k, v, p, lo, hi, scale, block_table, slopes, q_pos, softcap, sinks)
