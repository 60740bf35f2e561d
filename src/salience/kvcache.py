"""Attention against a key/value cache: :func:`attention_with_kvcache`, in the shape of flash-attention's
``flash_attn_with_kvcache``, laid out (B, H, L, D) like the rest of salience.

A cache is either

* **contiguous**: ``k_cache`` (B, Hkv, S_max, D), ``v_cache`` (B, Hkv, S_max, Dv), sequence ``b`` in row ``b``;
* **paged**: a pool of blocks ``k_cache`` (num_blocks, Hkv, block_size, D), ``v_cache`` (num_blocks, Hkv,
  block_size, Dv) and a ``block_table`` (B, max_blocks) of block indices (vLLM's and FlashInfer's layout):
  logical key ``j`` of sequence ``b`` lives in block ``block_table[b, j // block_size]`` at slot
  ``j % block_size``, so sequences of very different lengths share one pool without copying.

``cache_seqlens[b]`` keys of sequence ``b`` are cached. New keys and values ``k``, ``v`` (B, Hkv, L_new, D) are
written in place at positions ``cache_seqlens[b] .. cache_seqlens[b] + L_new - 1``, then the L queries attend to
that sequence's ``S_b = cache_seqlens[b] + L_new`` keys; cache slots past ``S_b`` are never read.

**Coordinates.** Each sequence is its own problem of L queries and S_b keys: masks are bound to ``(L, S_b)``
and mask_mods / score_mods see ``q_idx`` in ``[0, L)`` and ``kv_idx`` in ``[0, S_b)``, so the result equals
``salience.attention(q[b:b+1], K_b, V_b, mask=mask, score_mod=score_mod)`` on the gathered keys (with ``b`` the
sequence's batch index inside the mods). ``masks.causal(align="bottom_right")`` lets query ``i`` see keys
``j <= cache_seqlens[b] + i`` (the decoding convention), ``masks.sliding_window(w, align="bottom_right")`` the
last ``w + 1`` of those. ``scores.alibi(slopes, offset=o)`` adds ``-slope * |i + o - j|``; under a bottom-right
causal mask every ``o >= S_b - L`` (``cache_seqlens[b]`` when the queries are the appended tokens) gives
flash-attention's bottom-right ALiBi output (only the logsumexp moves, by ``slope * (o - S_b + L)``), so pass
``offset`` = the cache capacity for it.

**Paths.** Masks with one visible key interval per row (no mask, causal in either alignment, sliding windows,
padding, prefix-LM, packed documents and their ``&``) and the score_mods temperature, softcap and per-head ALiBi
(with ``compose`` in the order ``temperature* >> softcap? >> alibi?``, ``temperature`` also after ``alibi``) and
sinks run on the decode kernel (:mod:`salience.kernels.decode`), which reads each sequence's visible keys in
place (no gather). Everything else, and any call whose inputs require grad (decoding is forward only), runs the
exact fallback: each sequence's keys are gathered and :func:`salience.attention` runs on them; so do blocks of
more than :data:`MAX_DECODE_ROWS` queries (a prefill through the cache). :func:`plan` says which path a call takes
and why.

**Allocating caches.** :func:`zeros` (``salience.kvcache.zeros(B, Hkv, S_max, D, dtype=...)``) is ``torch.zeros``
in 2 MiB-aligned memory advised as transparent huge pages where Linux offers them: a decoding step reads its cache
end to end, and with 4 KiB pages every 16 bfloat16 keys of 128 values are a new page (a TLB miss, and a stop for
the hardware prefetchers). ``MultiHeadAttention``'s ``KVCache`` allocates its CPU buffers this way.

Example:
    >>> import torch, salience
    >>> from salience import masks
    >>> k_cache, v_cache = torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8)
    >>> q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    >>> lens = torch.tensor([3, 7])
    >>> out = salience.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
    ...                                       mask=masks.causal(align="bottom_right"))
    >>> out.shape, bool(torch.equal(k_cache[1, :, 7], k[1, :, 0]))
    (torch.Size([2, 4, 1, 8]), True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import masks as M
from ._layout import check_scale
from ._memory import zeros
from ._result import AttentionResult
from .kernels import ops as _ops
from .kernels.decode import kernel_mods
from .kernels.dispatch import _opaque_to_compile
from .kernels.merge import check_sinks
from .reference import _acc_dtype

__all__ = ["attention_with_kvcache", "plan", "KVCachePlan", "gather", "append_checked", "zeros"]

_FLOAT = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: at most this many query rows per sequence go to the decode kernel (decoding and speculative decoding); longer
#: query blocks (a prefill through the cache) run salience.attention's kernels on the cached keys
MAX_DECODE_ROWS = 16


@dataclass
class KVCachePlan:
    """What :func:`attention_with_kvcache` does for given inputs.

    Attributes:
        path: ``"decode"`` (the decode kernel reads the cache in place) or ``"fallback"`` (each sequence's keys
            gathered, then :func:`salience.attention`).
        reason: why.
        details: the cache kind, per-sequence key counts, keys read, the mods as the kernel takes them, and
            ``backward``: decoding is forward only.
    """

    path: str
    reason: str
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.details.items())
        return f"KVCachePlan(path={self.path!r}: {self.reason}{extra})"


# ------------------------------------------------------------------------------------------------ checks


@dataclass
class _Geom:
    B: int
    H: int
    L: int
    D: int
    Hkv: int
    Dv: int
    L_new: int
    paged: bool
    capacity: int  # keys one sequence can hold
    block_size: int
    lens: list  # B ints: cached keys before the append
    totals: list  # B ints: S_b after the append

    @functools.cached_property
    def seqlens(self) -> torch.Tensor:
        """(B,) int64 on the CPU: cached keys before the append (made only where a path needs a tensor)."""
        return torch.tensor(self.lens, dtype=torch.long).view(self.B)

    @functools.cached_property
    def total(self) -> torch.Tensor:
        """(B,) int64 on the CPU: S_b after the append."""
        return torch.tensor(self.totals, dtype=torch.long).view(self.B)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_tensor(t, name: str, what: str):
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor {what}; got {_shape(t)}.")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16; got {t.dtype}.")


def _seqlens(cache_seqlens, B: int) -> list:
    """The cached lengths as B Python ints (one host read of a tensor; no torch op per check)."""
    if isinstance(cache_seqlens, bool) or cache_seqlens is None:
        raise TypeError(f"cache_seqlens must be an int or an integer tensor (B,) = ({B},); got {cache_seqlens!r}.")
    if isinstance(cache_seqlens, int):
        lens = [cache_seqlens] * B
    else:
        lens = _seqlens_tensor(cache_seqlens, B).tolist()
    if B and min(lens) < 0:
        raise ValueError(f"cache_seqlens must be >= 0; got {lens}.")
    return lens


def _seqlens_tensor(cache_seqlens, B: int) -> torch.Tensor:
    """``cache_seqlens`` (a tensor, 0-d or (B,), or a sequence of ints) as a (B,) integer tensor; its values are
    not read (the compiled path checks them when the graph runs)."""
    t = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else torch.as_tensor(cache_seqlens)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"cache_seqlens must hold integers; got {t.dtype}.")
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"cache_seqlens must be an int or a tensor (B,) = ({B},), one length per sequence; "
                         f"got shape {tuple(t.shape)}.")
    return t


def _check(q, k_cache, v_cache, k, v, cache_seqlens, block_table) -> _Geom:
    """Every argument check: shapes, dtypes and devices (:func:`_check_shapes`), then the lengths' and the block
    table's values."""
    g = _check_shapes(q, k_cache, v_cache, k, v, block_table)
    g.lens = lens = _seqlens(cache_seqlens, g.B)
    g.totals = totals = [n + g.L_new for n in lens]
    if g.B and max(totals) > g.capacity:
        b = next(i for i, n in enumerate(totals) if n > g.capacity)
        where = (f"max_blocks * block_size = {block_table.shape[1]} * {g.block_size} = {g.capacity}" if g.paged
                 else f"S_max = {g.capacity}")
        raise ValueError(f"sequence {b} needs cache_seqlens + L_new = {lens[b]} + {g.L_new} = {totals[b]} "
                         f"keys but the cache holds {where}; grow the cache (or the block table) or start a new "
                         "sequence.")
    if g.paged:
        _check_blocks(block_table, g, k_cache.shape[0])
    return g


def _check_shapes(q, k_cache, v_cache, k, v, block_table) -> _Geom:
    """The checks that read no tensor's values (they run at trace time under torch.compile); ``lens`` and
    ``totals`` are left empty."""
    _check_tensor(q, "q", "(B, H, L, D)")
    B, H, L, D = q.shape
    paged = block_table is not None
    kind = "(num_blocks, Hkv, block_size, D) (a paged pool)" if paged else "(B, Hkv, S_max, D)"
    _check_tensor(k_cache, "k_cache", kind)
    _check_tensor(v_cache, "v_cache", kind.replace(", D)", ", Dv)"))
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise ValueError(f"{given} was given without {missing}: new keys and values are appended together; pass both "
                         "(or neither to attend to the cache as it is).")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)) + ((("k", k), ("v", v)) if k is not None else ()):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: the cache, the new keys/values and the "
                            f"queries must share one dtype. Cast q (q.to({t.dtype})) or store the cache in {q.dtype}.")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q on {q.device}; put them on one device.")
    Hkv, Dk, Dv = k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]
    if Dk != D:
        raise ValueError(f"k_cache has head dim {Dk} but q has D={D}; they must match.")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)} must agree on all but the last "
                         f"dim {kind}.")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q has H={H} heads but the cache has Hkv={Hkv}; H must be a multiple of Hkv (query head i "
                         "reads kv head i // (H // Hkv)).")
    if paged:
        bt = block_table
        if not isinstance(bt, torch.Tensor) or bt.dim() != 2 or bt.shape[0] != B or bt.dtype not in (
                torch.int32, torch.int64):
            seen = f"{bt.dtype} {_shape(bt)}" if isinstance(bt, torch.Tensor) else type(bt).__name__
            raise ValueError(f"block_table must be an int32/int64 tensor (B, max_blocks) = ({B}, max_blocks); got "
                             f"{seen}.")
        block_size = k_cache.shape[2]
        capacity = bt.shape[1] * block_size
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has {k_cache.shape[0]} sequences but q has B={B}; a contiguous cache is "
                             "(B, Hkv, S_max, D), one row per sequence (for a shared pool pass block_table=).")
        block_size, capacity = 0, k_cache.shape[2]
    L_new = 0
    if k is not None:
        _check_tensor(k, "k", "(B, Hkv, L_new, D)")
        _check_tensor(v, "v", "(B, Hkv, L_new, Dv)")
        if k.shape[0] != B or k.shape[1] != Hkv or k.shape[3] != D or v.shape[:3] != k.shape[:3] or v.shape[3] != Dv:
            raise ValueError(f"k {_shape(k)} and v {_shape(v)} must be (B, Hkv, L_new, D) = ({B}, {Hkv}, L_new, {D}) "
                             f"and (B, Hkv, L_new, Dv) = ({B}, {Hkv}, L_new, {Dv}) to append to this cache.")
        L_new = k.shape[2]
    return _Geom(B, H, L, D, Hkv, Dv, L_new, paged, capacity, block_size, [], [])


def _check_blocks(bt, g: _Geom, num_blocks: int) -> None:
    """Every block a sequence uses (its first ceil(S_b / block_size) entries) indexes the pool; no two new keys
    land in one slot."""
    used = torch.arange(bt.shape[1]).view(1, -1) < ((g.total + g.block_size - 1) // g.block_size).view(-1, 1)
    btc = bt.detach().cpu().long()
    bad = used & ((btc < 0) | (btc >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(btc[b, j])} is outside the pool of {num_blocks} blocks "
                         f"(sequence {b} uses its first {int(used[b].sum())} entries for {int(g.total[b])} keys); "
                         f"entries must lie in [0, {num_blocks}).")
    if g.B * g.L_new > 1:
        slots = _slots(btc, g).view(-1)
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("two sequences would write their new keys into the same cache slot (block_table maps "
                             "them to one block); give each sequence its own blocks for the positions it appends.")


def _slots(btc, g: _Geom) -> torch.Tensor:
    """Physical slot (block * block_size + offset) of each new key, (B, L_new)."""
    pos = g.seqlens.view(-1, 1) + torch.arange(g.L_new).view(1, -1)
    blk = torch.gather(btc, 1, torch.div(pos, g.block_size, rounding_mode="floor"))
    return blk * g.block_size + pos % g.block_size


#: appends of at most this many (sequence, position) pairs are written by plain slicing, one copy each (cheaper
#: than building index tensors for advanced indexing)
_FEW_WRITES = 8


def _append(k_cache, v_cache, k, v, block_table, g: _Geom) -> None:
    """Write the new keys/values in place at each sequence's own length."""
    with torch.no_grad():
        if not g.paged and len(set(g.lens)) == 1:  # one length: one copy per cache
            k_cache.narrow(2, g.lens[0], g.L_new).copy_(k)
            v_cache.narrow(2, g.lens[0], g.L_new).copy_(v)
            return
        if not g.paged and g.B <= _FEW_WRITES:
            for b, n in enumerate(g.lens):
                k_cache[b].narrow(1, n, g.L_new).copy_(k[b])
                v_cache[b].narrow(1, n, g.L_new).copy_(v[b])
            return
        dev = k_cache.device
        pos = (g.seqlens.view(-1, 1) + torch.arange(g.L_new).view(1, -1)).to(dev)  # (B, L_new)
        if not g.paged:
            b = torch.arange(g.B, device=dev).view(-1, 1).expand_as(pos)
            k_cache[b, :, pos] = k.transpose(1, 2)  # (B, L_new, Hkv, D): the order advanced indexing yields
            v_cache[b, :, pos] = v.transpose(1, 2)
            return
        blk = torch.gather(block_table.to(dev).long(), 1, torch.div(pos, g.block_size, rounding_mode="floor"))
        off = pos % g.block_size
        if g.B * g.L_new <= _FEW_WRITES:
            for (b, j), (x, o) in zip(((b, j) for b in range(g.B) for j in range(g.L_new)),
                                      zip(blk.view(-1).tolist(), off.view(-1).tolist())):
                k_cache[x, :, o] = k[b, :, j]
                v_cache[x, :, o] = v[b, :, j]
            return
        k_cache[blk, :, off] = k.transpose(1, 2)
        v_cache[blk, :, off] = v.transpose(1, 2)


def gather(cache: torch.Tensor, b: int, length: int, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` cached rows of sequence ``b`` as a (1, Hkv, length, D) tensor.

    Contiguous caches give a view (no copy); paged pools copy the sequence's blocks out in order.

    Example:
        >>> pool = torch.arange(3 * 1 * 2 * 1.).view(3, 1, 2, 1)  # 3 blocks of 2 slots
        >>> gather(pool, 0, 3, torch.tensor([[2, 0]])).view(-1).tolist()
        [4.0, 5.0, 0.0]
    """
    if block_table is None:
        return cache[b : b + 1, :, :length]
    bs = cache.shape[2]
    n = (length + bs - 1) // bs
    blocks = cache[block_table[b, :n].to(cache.device).long()]  # (n, Hkv, bs, D)
    return blocks.permute(1, 0, 2, 3).reshape(1, cache.shape[1], n * bs, cache.shape[3])[:, :, :length]


# ------------------------------------------------------------------------------------------- mask, mods


def _tensor_mask(mask, g: _Geom):
    """A bool tensor mask as (Bm, Hm, Lm, Sm) with Sm 1 or >= every S_b (sequence b reads its first S_b columns)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"a tensor mask must be bool (True = visible); got {mask.dtype}. For an additive bias use a "
                        "score_mod.")
    if mask.dim() == 2:
        mask = mask.view(1, 1, *mask.shape)
    if mask.dim() != 4:
        raise ValueError(f"a tensor mask must be (L, S) or (B|1, H|1, L|1, S); got {_shape(mask)}.")
    smax = max(g.totals) if g.B else 0
    Bm, Hm, Lm, Sm = mask.shape
    if Bm not in (1, g.B) or Hm not in (1, g.H) or Lm not in (1, g.L) or (Sm != 1 and Sm < smax):
        raise ValueError(f"mask tensor {_shape(mask)} must broadcast to (B, H, L, S) = ({g.B}, {g.H}, {g.L}, S) with "
                         f"S at least the longest sequence, {smax} keys (e.g. the cache capacity {g.capacity}); "
                         "sequence b reads its first cache_seqlens[b] + L_new columns.")
    return mask


def _intervals(mask, g: _Geom):
    """Per-row visible key intervals ``(lo, hi)`` (B, L) int64 in each sequence's own coordinates, or None when
    some sequence's mask is not an interval mask."""
    from .kernels.decode import band_intervals, band_of, band_rows
    from .structure import row_intervals

    rows = band_rows(mask, g.totals, g.L)  # few rows (decoding steps): plain integers, one tensor made
    if rows is not None:
        return rows
    band = band_of(mask)
    if band is not None:  # all sequences at once (no per-length binding)
        return band_intervals(band, g.total, g.L)
    lo = torch.zeros(g.B, g.L, dtype=torch.long)
    hi = g.total.view(-1, 1).expand(g.B, g.L).clone()
    for S in torch.unique(g.total).tolist():
        rows = torch.nonzero(g.total == S).view(-1)
        got = row_intervals(mask, g.B, g.L, S)
        if got is None:
            return None
        l_, h_ = got
        lo[rows] = l_[rows] if l_.shape[0] == g.B else l_.expand(rows.numel(), -1)
        hi[rows] = h_[rows] if h_.shape[0] == g.B else h_.expand(rows.numel(), -1)
    return lo, hi


def _as_mask(mask, g: _Geom):
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        return _tensor_mask(mask, g)
    m = M.as_mask_mod(mask, "mask")
    if g.B:
        m.check(g.B, g.H, g.L, max(g.totals))
    return m


def _as_mod(score_mod, g: _Geom):
    if score_mod is None:
        return None
    from .scores import as_score_mod

    sm = as_score_mod(score_mod)
    if g.B:
        sm.check(g.B, g.H, g.L, max(g.totals))
    return sm


# ------------------------------------------------------------------------------------------------- the plan


def _decide(q, k_cache, v_cache, k, v, m, sm, sinks, g: _Geom):
    """``(path, reason, intervals or None, kernel mods or None)``; no strings or details built (the hot path)."""
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v, sinks))
    if grad:
        return "fallback", "inputs require grad and the decode kernel is forward only", None, None
    if isinstance(m, torch.Tensor):
        return "fallback", "a tensor mask (no interval structure to read)", None, None
    if g.L > MAX_DECODE_ROWS:
        return ("fallback", f"L={g.L} query rows (a prefill; the decode kernel takes up to {MAX_DECODE_ROWS}): "
                "salience.attention on the cached keys", None, None)
    mods, why = kernel_mods(sm)
    if mods is None:
        return "fallback", why, None, None
    spans = _intervals(m, g)
    if spans is None:
        return "fallback", f"mask {m.name} has no single key interval per row", None, None
    return "decode", "interval mask and kernel mods: the decode kernel reads the visible keys in place", spans, mods


def _details(k_cache, m, sm, spans, g: _Geom) -> dict:
    cache = (f"paged (num_blocks={k_cache.shape[0]}, block_size={g.block_size}, max_blocks={g.capacity // g.block_size})"
             if g.paged else f"contiguous (S_max={g.capacity})")
    lens = g.totals
    det = {"cache": cache, "keys_per_sequence": lens if g.B <= 8 else f"<{g.B} lengths, {min(lens)}..{max(lens)}>",
           "appended": g.L_new, "backward": "none: decoding is forward only (inputs that require grad take the "
           "fallback, which has salience.attention's backward)"}
    if spans is not None:
        lo, hi = spans
        det["keys_read"] = int((hi - lo).clamp(min=0).max(1).values.sum()) if g.L else 0
    if m is not None and not isinstance(m, torch.Tensor):
        det["mask"] = m.name
    if sm is not None:
        det["score_mod"] = sm.name
    return det


def plan(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, mask=None, score_mod=None,
         scale=None, sinks=None) -> KVCachePlan:
    """Describe what :func:`attention_with_kvcache` would do for these arguments, without writing or computing.

    Arguments as for :func:`attention_with_kvcache` (checked the same way).

    Example:
        >>> import torch, salience
        >>> kc = torch.zeros(1, 2, 64, 16)
        >>> plan(torch.randn(1, 4, 1, 16), kc, kc, cache_seqlens=10,
        ...      mask=salience.masks.causal(align="bottom_right")).path
        'decode'
    """
    g = _check(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    check_scale(scale, g.D)
    if sinks is not None:
        check_sinks(sinks, g.B, g.H)
    m, sm = _as_mask(mask, g), _as_mod(score_mod, g)
    path, reason, spans, _ = _decide(q, k_cache, v_cache, k, v, m, sm, sinks, g)
    return KVCachePlan(path, reason, _details(k_cache, m, sm, spans, g))


# ------------------------------------------------------------------------------------------------- running


def _run_decode(q, k_cache, v_cache, block_table, spans, mods, scale, sinks, g: _Geom):
    """The decode kernel on arguments :func:`_check` validated (no second pass of decode.forward's shape checks;
    the bounds and the block indices the rows read are checked again by the kernel's own check)."""
    from .kernels import decode

    dev = q.device
    lo, hi = (t.to(dev) for t in spans)
    slopes = q_pos = None
    if mods["slopes"] is not None:
        slopes = mods["slopes"].to(dev)
        q_pos = (torch.arange(g.L, device=dev) + mods["offset"]).view(1, -1).expand(g.B, -1).contiguous()
    bt = None if block_table is None else block_table.to(dev)
    if g.paged and (g.block_size < 1 or k_cache.shape[0] < 1):  # degenerate pools: decode.forward words it
        out, lse = decode.forward(q, k_cache, v_cache, lo=lo, hi=hi, scale=scale * mods["scale_mult"], block_table=bt,
                                  slopes=slopes, q_pos=q_pos, softcap=mods["softcap"], sinks=sinks)
        return AttentionResult(out=out, lse=lse)
    p = decode._Problem(g.B, g.H, g.Hkv, g.L, g.D, g.Dv, g.paged, g.block_size if g.paged else g.capacity,
                        g.capacity)
    q_pos, slopes, sinks, sc, cap = decode._check_extras(p, dev, scale * mods["scale_mult"], slopes, q_pos,
                                                         mods["softcap"], sinks)
    # any strides: the kernel reads the cache by stride arithmetic (a (B, S, Hkv, D) buffer seen through
    # .transpose(1, 2) is read in place, not copied)
    out, lse = decode._run(q, k_cache, v_cache, p, lo, hi, sc, bt, slopes, q_pos, cap, sinks)
    return AttentionResult(out=out, lse=lse)


def _batch_free(m) -> bool:
    """True when a mask or a score_mod does not depend on the batch index (bands, position-only masks, pointwise
    and per-head relative mods), so a one-sequence call can take it as it is (else it is re-indexed)."""
    from . import structure as St

    if m is None:
        return True
    st = St.of_mod(m) if not isinstance(m, M.MaskMod) else St.of_mask(m)
    free = (St.Full, St.Band, St.PrefixLM, St.BlockDiagonal, St.Dilated, St.Temperature, St.Softcap, St.RelativeBias)

    def ok(x) -> bool:
        if isinstance(x, (St.And, St.Or, St.Compose)):
            return all(ok(p) for p in x.parts)
        if isinstance(x, St.Not):
            return ok(x.part)
        if isinstance(x, St.Alibi):
            return x.per_head
        return isinstance(x, free)

    return ok(st)


def _one_sequence_mask(m, b: int, L: int, S: int, device):
    """The mask of sequence ``b`` as a one-row problem of L queries and S keys."""
    if m is None:
        return None
    if isinstance(m, torch.Tensor):
        t = m[b if m.shape[0] > 1 else 0 : (b if m.shape[0] > 1 else 0) + 1]
        return M.dense(t if t.shape[-1] == 1 else t[..., :S])
    bound = m.bind(L, S, device)
    if _batch_free(bound):
        return bound
    return M.MaskMod(lambda b_, h, qi, kv: bound(b_ + b, h, qi, kv), f"{m.name} [sequence {b}]")


def _one_sequence_mod(sm, b: int):
    if sm is None or _batch_free(sm):
        return sm
    from .scores import ScoreMod

    return ScoreMod(lambda s, b_, h, qi, kv: sm(s, b_ + b, h, qi, kv), f"{sm.name} [sequence {b}]")


def _run_fallback(q, k_cache, v_cache, k, v, block_table, m, sm, scale, sinks, g: _Geom):
    """Exact: each sequence's keys gathered, then :func:`salience.attention` (with its backward). New keys that
    require grad are taken from ``k``/``v`` themselves (the in-place cache write is not differentiable)."""
    from .functional import attention

    acc = _acc_dtype(q.dtype)
    graph = k is not None and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    if not graph and block_table is None and len(set(g.totals)) == 1:
        # one length for all: the batch is one problem of L x S keys (views of the cache, b indexes the batch)
        S = g.totals[0]
        mm = m[..., :S] if isinstance(m, torch.Tensor) and m.shape[-1] > 1 else m
        r = attention(q, k_cache[:, :, :S], v_cache[:, :, :S], mask=mm, score_mod=sm, scale=scale, return_lse=True,
                      sinks=sinks)
        return AttentionResult(out=r.out, lse=r.lse.to(acc))
    outs, lses = [], []
    for b in range(g.B):
        S = g.totals[b]
        if graph:
            n = g.lens[b]
            kb = torch.cat((gather(k_cache, b, n, block_table), k[b : b + 1]), 2)
            vb = torch.cat((gather(v_cache, b, n, block_table), v[b : b + 1]), 2)
        else:
            kb, vb = gather(k_cache, b, S, block_table), gather(v_cache, b, S, block_table)
        sk = None if sinks is None else (sinks if sinks.dim() == 1 else sinks[b if sinks.shape[0] > 1 else 0])
        r = attention(q[b : b + 1], kb, vb, mask=_one_sequence_mask(m, b, g.L, S, q.device),
                      score_mod=_one_sequence_mod(sm, b), scale=scale, return_lse=True, sinks=sk)
        outs.append(r.out)
        lses.append(r.lse.to(acc))
    return AttentionResult(out=torch.cat(outs), lse=torch.cat(lses))


def append_checked(k_cache, v_cache, k, v, cache_seqlens, block_table=None) -> None:
    """Write ``k``, ``v`` (B, Hkv, L_new, D/Dv) into the cache at each sequence's length, after the checks of
    :func:`attention_with_kvcache` (shapes, dtypes, lengths within the cache, block indices in the pool, no two
    writes into one slot). The implementation of the ``salience::kvcache_append`` custom op.

    Example:
        >>> kc, vc = torch.zeros(2, 1, 8, 4), torch.zeros(2, 1, 8, 4)
        >>> append_checked(kc, vc, torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), torch.tensor([0, 5]))
        >>> kc[:, 0, :, 0].tolist()
        [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    """
    q = k.new_empty((k.shape[0], k.shape[1], 0, k.shape[3])) if isinstance(k, torch.Tensor) and k.dim() == 4 else k
    g = _check(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    if g.L_new:
        _append(k_cache, v_cache, k, v, block_table, g)


_ops.implement_kvcache_append(append_checked)


def _compiled_route(q, k_cache, v_cache, k, v, cache_seqlens, block_table, mask, score_mod, sinks):
    """The decode route key (>= 0) when a traced call can run on the custom ops, else None."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.SymInt, torch.Tensor)) or not isinstance(
            q, torch.Tensor) or q.dim() != 4:
        return None
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not statically_known_true(q.shape[2] <= MAX_DECODE_ROWS):  # no guard on a symbolic L
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v, sinks)):
        return None
    key = _ops.decode_route_key(mask, score_mod)
    return key if key >= 0 else None


def _attend_compiled(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, sinks, key: int):
    """A decode step inside torch.compile / torch.export: the shape checks here (at trace time), then the custom
    ops ``salience::kvcache_append`` (checks the lengths and the block table when the graph runs, then writes in
    place) and ``salience::decode_forward`` over row intervals computed in the graph from ``cache_seqlens``."""
    g = _check_shapes(q, k_cache, v_cache, k, v, block_table)
    scale = check_scale(scale, g.D)
    if sinks is not None:
        check_sinks(sinks, g.B, g.H)
    route = _ops.decode_route_of(key)
    if isinstance(cache_seqlens, (int, torch.SymInt)):  # a Python int (or dynamo's symbolic one)
        lens = torch.full((g.B,), cache_seqlens, dtype=torch.long, device=q.device)
    else:
        lens = _seqlens_tensor(cache_seqlens, g.B).to(q.device, torch.long)
    total = lens + g.L_new
    torch._assert_async(((lens >= 0) & (total <= g.capacity)).all(),
                        "salience.attention_with_kvcache: cache_seqlens must be >= 0 and cache_seqlens + L_new at most "
                        "the cache capacity (S_max, or max_blocks * block_size)")
    if k is not None and g.L_new:
        torch.ops.salience.kvcache_append(k_cache, v_cache, k, v, lens, block_table)
    lo, hi = _ops.band_intervals(route, total, g.L)
    q_pos = None
    if route.slopes is not None:
        q_pos = (torch.arange(g.L, device=q.device) + route.offset).view(1, -1).expand(g.B, g.L).contiguous()
    out, lse = torch.ops.salience.decode_forward(q, k_cache, v_cache, lo, hi, block_table, route.slopes, q_pos,
                                                 sinks, scale * route.scale_mult, route.softcap)
    return AttentionResult(out=out, lse=lse)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, mask=None,
                           score_mod=None, scale=None, return_lse: bool = False, sinks=None):
    """Append new keys/values to a KV cache in place, then attend (flash-attention's ``flash_attn_with_kvcache``).

    Args:
        q: queries (B, H, L, D), typically L = 1 (or a few, speculative decoding).
        k_cache, v_cache: contiguous (B, Hkv, S_max, D) / (B, Hkv, S_max, Dv), or with ``block_table`` a paged
            pool (num_blocks, Hkv, block_size, D) / (num_blocks, Hkv, block_size, Dv). H % Hkv == 0. Same dtype as q.
        k, v: optional new keys/values (B, Hkv, L_new, D) / (B, Hkv, L_new, Dv), written in place at positions
            ``cache_seqlens[b] ..`` of each sequence (both or neither).
        cache_seqlens: keys already cached per sequence: an int or an integer tensor (B,).
        block_table: (B, max_blocks) int32/int64 block indices for a paged pool, else None.
        mask: a :mod:`salience.masks` mask, a mask_mod callable or a bool tensor (B|1, H|1, L|1, S) with S at least
            the longest sequence; bound per sequence to (L, S_b), S_b = cache_seqlens[b] + L_new (module docs).
        score_mod: a score_mod in each sequence's coordinates (temperature, softcap, alibi run on the kernel).
        scale: multiplier of q @ k^T, default 1/sqrt(D).
        return_lse: also return the logsumexp (B, H, L) (float32; float64 for float64 inputs).
        sinks: attention sink logits (H,) or (B, H), as in :func:`salience.attention`.

    Returns:
        The output (B, H, L, Dv), or an :class:`~salience.AttentionResult` ``(out, lse)`` with ``return_lse``.
        Rows that see no key give 0 (lse -inf, or the sink).

    Decoding is forward only: inputs that require grad take the exact fallback (see :func:`plan`), whose gradients
    reach q, the sinks and new ``k``/``v`` (read from the arguments, not from the cache slots they were copied to).

    Example:
        >>> import torch, salience
        >>> pool = torch.zeros(8, 2, 4, 16)  # 8 blocks of 4 slots, 2 kv heads
        >>> table = torch.tensor([[5, 1, 7], [0, 3, 2]])
        >>> q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
        >>> r = salience.attention_with_kvcache(q, pool, pool.clone(), k, v, cache_seqlens=torch.tensor([9, 2]),
        ...                                     block_table=table, return_lse=True)
        >>> r.out.shape, bool(torch.equal(pool[7, :, 1], k[0, :, 0]))  # position 9 of sequence 0: block 7, slot 1
        (torch.Size([2, 4, 1, 16]), True)
    """
    if torch.compiler.is_compiling():
        key = _compiled_route(q, k_cache, v_cache, k, v, cache_seqlens, block_table, mask, score_mod, sinks)
        if key is not None:
            res = _attend_compiled(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, sinks, key)
            return res if return_lse else res.out
        torch._dynamo.graph_break(msg=_NOT_COMPILED)
        return _eager_opaque(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                             mask=mask, score_mod=score_mod, scale=scale, return_lse=return_lse, sinks=sinks)
    return _eager(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table, mask=mask,
                  score_mod=score_mod, scale=scale, return_lse=return_lse, sinks=sinks)


_NOT_COMPILED = ("salience.attention_with_kvcache: this call runs eagerly behind a graph break: inside torch.compile "
                 "the custom ops take no mask or a band mask (causal, sliding windows) built outside the compiled "
                 "function, temperature / softcap / one constant per-head ALiBi score_mods, at most "
                 f"{MAX_DECODE_ROWS} query rows, cache_seqlens as an int or a tensor, and no input requiring grad")


def _eager(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, mask=None, score_mod=None,
           scale=None, return_lse: bool = False, sinks=None):
    g = _check(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    scale = check_scale(scale, g.D)
    if sinks is not None:
        check_sinks(sinks, g.B, g.H)
    m, sm = _as_mask(mask, g), _as_mod(score_mod, g)
    if k is not None and g.L_new:
        _append(k_cache, v_cache, k, v, block_table, g)
    if g.B == 0 or g.L == 0:
        out = q.new_zeros(g.B, g.H, g.L, g.Dv)
        res = AttentionResult(out=out, lse=torch.full((g.B, g.H, g.L), float("-inf"), dtype=_acc_dtype(q.dtype)))
        return res if return_lse else res.out
    path, _, spans, mods = _decide(q, k_cache, v_cache, k, v, m, sm, sinks, g)
    if path == "decode":
        res = _run_decode(q, k_cache, v_cache, block_table, spans, mods, scale, sinks, g)
    else:
        res = _run_fallback(q, k_cache, v_cache, k, v, block_table, m, sm, scale, sinks, g)
    return res if return_lse else res.out


# the eager path behind a graph break (torch.compiler.disable, applied when torch._dynamo is first loaded)
_eager_opaque = _opaque_to_compile(_eager)
