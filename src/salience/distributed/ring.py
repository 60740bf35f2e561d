"""Ring attention over ``torch.distributed``: exact attention over a sequence split across processes.

Each of the W ranks of a process group holds a shard of the queries, keys and values along the sequence
(layout ``(B, H, n, D)`` with ``n = N / W``). The key/value shards travel around the ring (rank r sends to
r + 1 and receives from r - 1) with point-to-point ``isend``/``irecv`` that overlap the computation of the
current block; after W steps every rank has seen every key shard, and the partial results are combined
with their logsumexps (:func:`salience.merge`). The backward runs the ring again: key/value shards travel
as in the forward and their gradients dK and dV travel with them, arriving back at their owner after the
last step.

Masks and score_mods see *global* positions, so any :mod:`salience.masks` mask or score_mod works:
sliding windows that cross shard boundaries and documents that span shards are exact. Blocks whose keys
are all hidden from this rank's queries are skipped; the others are computed by the kernels' public block
functions (:func:`salience.kernels.partial.block_forward` / ``block_backward``), which take global
offsets and use the fastest exact path (torch's fused CPU kernel for full blocks and causal diagonals).

Tested with gloo (CPU); written for NCCL (GPU) too, but not run on one yet. Every rank must call
:func:`ring_attention` (and the backward) the same number of times with the same mask, score_mod and
layout, like any collective.

Example (in each of W processes after ``torch.distributed.init_process_group("gloo")``)::

    from salience import masks
    from salience.distributed import ring_attention, shard
    rank, W = dist.get_rank(), dist.get_world_size()
    q, k, v = (shard(t, rank, W, layout="zigzag") for t in (Q, K, V))   # global (B, H, N, D) -> local
    out = ring_attention(q, k, v, mask=masks.causal(), layout="zigzag")  # local (B, H, N / W, D)
    out.sum().backward()

Run ``torchrun --standalone --nproc-per-node 2 -m salience.distributed --seq 8192 --mask causal --layout zigzag``
for a checked demo (:mod:`salience.distributed.launch`).
"""

from __future__ import annotations

import datetime
import math
import time

import torch
import torch.distributed as dist

from .._layout import check_qkv, check_scale
from .._result import AttentionResult
from ..kernels import guard
from ..kernels.dispatch import AttentionFunction
from ..kernels.merge import merge
from ..masks import as_mask_mod
from ..scores import as_score_mod
from . import _block
from .sharding import check_layout, segments

__all__ = ["ring_attention", "gather", "RingError", "STATS", "reset_stats"]

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


#: communication counters of this process, summed over calls: seconds spent waiting for exchanges to
#: finish (communication not hidden behind compute), bytes sent, exchanges. Reset with :func:`reset_stats`.
STATS = {"wait_s": 0.0, "sent_bytes": 0, "exchanges": 0}


def reset_stats() -> dict:
    """Return a copy of :data:`STATS` and zero them."""
    old = dict(STATS)
    STATS.update(wait_s=0.0, sent_bytes=0, exchanges=0)
    return old


class RingError(RuntimeError):
    """A peer of the ring died, stalled past the timeout, or disagreed on shapes: raised on the ranks that
    notice, with the step, the peer and the original error."""


# ------------------------------------------------------------------------------------------ the ring


class _Ring:
    """Point-to-point exchange with the ring neighbours of ``group`` (next = rank + 1, prev = rank - 1)."""

    def __init__(self, group, timeout: datetime.timedelta | None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.timeout = timeout
        self.next = self._global((self.rank + 1) % self.world)
        self.prev = self._global((self.rank - 1) % self.world)

    def _global(self, r: int) -> int:
        if self.group is None or self.group is dist.GroupMember.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    def exchange(self, send: tuple, what: str, tag: int = 0):
        """Start sending the (contiguous) tensors ``send`` to the next rank and receiving tensors like them
        from the previous one; message i uses tag ``tag + i``. Returns a handle for :meth:`wait`."""
        recv = tuple(torch.empty_like(t) for t in send)
        try:
            ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(send)]
            ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recv)]
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:  # a peer already gone
            raise self._error(what, e) from e
        return works, recv, send, what

    def wait(self, handle) -> tuple:
        """Wait for an exchange (within the timeout) and return the received tensors."""
        works, recv, _send, what = handle
        t0 = time.perf_counter()
        try:
            for w in works:
                if self.timeout is None:
                    w.wait()
                else:
                    w.wait(self.timeout)
        except RuntimeError as e:
            raise self._error(what, e) from e
        STATS["wait_s"] += time.perf_counter() - t0
        STATS["sent_bytes"] += sum(t.numel() * t.element_size() for t in _send)
        STATS["exchanges"] += 1
        return recv

    def _error(self, what: str, e: Exception, peers: str | None = None) -> RingError:
        t = f"{self.timeout.total_seconds():g} s" if self.timeout is not None else "the process group's timeout"
        if peers is None:
            peers = (f"receiving from rank {(self.rank - 1) % self.world} and sending to rank "
                     f"{(self.rank + 1) % self.world}")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return RingError(
            f"ring_attention: rank {self.rank} of {self.world} failed in {what}, {peers} (timeout {t}): a peer "
            f"has died, stalled, or did not call ring_attention/backward as often as this rank. Check the other "
            f"ranks' logs; exit this process (torch's gloo teardown may wait for the process group's timeout). "
            f"Original error: {first}"
        )


# ----------------------------------------------------------------------------------------- autograd


class _Runner:
    """Everything the forward and backward share: the ring, the block spec and the shard segments."""

    def __init__(self, ring: _Ring, spec: _block.Spec, layout: str, L: int, S: int):
        self.ring = ring
        self.spec = spec
        self.W, self.rank = ring.world, ring.rank
        self.q_segs = _local(segments(L, self.rank, self.W, layout))
        self.kv_segs = [_local(segments(S, j, self.W, layout)) for j in range(self.W)]

    def blocks(self, src: int):
        """(q local offset, q global start, nq, kv local offset, kv global start, nk) for keys of rank src."""
        for qo, q0, nq in self.q_segs:
            for ko, k0, nk in self.kv_segs[src]:
                yield qo, q0, nq, ko, k0, nk

    def forward(self, q, k, v):
        W, rank, spec = self.W, self.rank, self.spec
        acc = _block.acc_dtype(q.dtype)
        parts: dict[int, AttentionResult] = {}
        self.hits: dict[int, torch.Tensor] = {}  # per query segment: rows that see a key holding NaN/inf
        qs = self._split(q)
        kc, vc = k.contiguous(), v.contiguous()
        for s in range(W):
            src = (rank - s) % W
            h = self.ring.exchange((kc, vc), f"forward step {s + 1}/{W}") if s < W - 1 else None
            held = _Held(kc, vc, spec)
            for qo, q0, _nq, ko, k0, nk in self.blocks(src):
                r, hit = held.forward(spec, qs[qo], ko, nk, q0, k0)
                if hit is not None:  # rows that see a bad key: the backward gives them their textbook share
                    self.hits[qo] = hit if qo not in self.hits else self.hits[qo] | hit
                if r is None:
                    continue
                prev = parts.get(qo)
                parts[qo] = r if prev is None else merge(prev.out, prev.lse, r.out, r.lse)
            if h is not None:
                kc, vc = self.ring.wait(h)
        outs, lses = [], []
        B, H, Dv = q.shape[0], q.shape[1], v.shape[-1]
        for qo, _q0, nq in self.q_segs:
            p = parts.get(qo)
            if p is None:
                p = AttentionResult(
                    torch.zeros(B, H, nq, Dv, dtype=acc, device=q.device),
                    torch.full((B, H, nq), float("-inf"), dtype=acc, device=q.device),
                )
            outs.append(p.out)
            lses.append(p.lse)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
        return out.to(q.dtype), lse

    def _split(self, t):
        """{local offset: contiguous rows of that query segment} (views when there is one segment)."""
        if t is None:
            return {qo: None for qo, _, _ in self.q_segs}
        if len(self.q_segs) == 1:
            return {0: t.contiguous()}
        return {qo: t[:, :, qo : qo + nq].contiguous() for qo, _q0, nq in self.q_segs}

    def backward(self, q, k, v, out, lse, dout, dlse):
        W, rank, spec = self.W, self.rank, self.spec
        acc = _block.acc_dtype(q.dtype)
        # per query segment, contiguous once (the kernels would otherwise copy these for every block)
        qs, os_, ls, dos, dls = (self._split(t) for t in (q, out, lse, dout, dlse))
        dqs: dict[int, torch.Tensor] = {}
        kc, vc = k.contiguous(), v.contiguous()
        hd = None
        for s in range(W):
            src = (rank - s) % W
            h = self.ring.exchange((kc, vc), f"backward step {s + 1}/{W}") if s < W - 1 else None
            held = _Held(kc, vc, spec)
            # this step's dK, dV for the held shard, to travel with it; each key segment is written by its
            # first block and accumulated by the next, and zeroed only if no block saw it
            dk_loc = torch.empty(k.shape, dtype=acc, device=q.device)
            dv_loc = torch.empty(v.shape, dtype=acc, device=q.device)
            written = set()
            for qo, q0, _nq, ko, k0, nk in self.blocks(src):
                ks = slice(ko, ko + nk)
                g = held.backward(spec, qs[qo], ko, nk, os_[qo], ls[qo], dos[qo], dls[qo], q0, k0, self.hits.get(qo))
                if g is None:
                    continue
                dqs[qo] = g[0] if qo not in dqs else dqs[qo].add_(g[0])
                if ko in written:
                    dk_loc[:, :, ks] += g[1]
                    dv_loc[:, :, ks] += g[2]
                else:
                    dk_loc[:, :, ks] = g[1]
                    dv_loc[:, :, ks] = g[2]
                    written.add(ko)
            for ko, _k0, nk in self.kv_segs[src]:
                if ko not in written:
                    dk_loc[:, :, ko : ko + nk] = 0
                    dv_loc[:, :, ko : ko + nk] = 0
            if hd is None:
                dk, dv = dk_loc, dv_loc
            else:
                dk, dv = self.ring.wait(hd)
                dk.add_(dk_loc)
                dv.add_(dv_loc)
            if W > 1:
                hd = self.ring.exchange((dk, dv), f"backward gradient step {s + 1}/{W}", tag=2)
            if h is not None:
                kc, vc = self.ring.wait(h)
        if hd is not None:
            dk, dv = self.ring.wait(hd)
        parts = [dqs[qo] if qo in dqs else torch.zeros(q.shape[0], q.shape[1], nq, q.shape[3], dtype=acc, device=q.device)
                 for qo, _q0, nq in self.q_segs]
        dq = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), []  # no extra tensors receive gradients


class _Held:
    """A key/value shard as held at one step, checked once for NaN/inf (:mod:`salience.kernels.guard`): a key
    that a row cannot see never changes that row, even when it lives in another rank's shard. With bad keys (and
    a mask or score_mod that hides some), the blocks run on copies with those entries zeroed and the rows that do
    see one get the textbook result over the block. In the backward, such rows (``hit``, gathered by the forward
    over every block) get nothing from the kernel and their textbook share from every block they touch, so their
    NaN reaches only the keys they see. Finite shards (one summing pass each) run as they are."""

    def __init__(self, k, v, spec: _block.Spec):
        self.raw, self.k, self.v, self.bad = (k, v), k, v, None
        if (spec.mask is not None or spec.score_mod is not None) and not guard.finite_pair(k, v):
            self.k, self.v, self.bad = guard.cleaned_and_bad(k, v)  # one finiteness map for both

    @staticmethod
    def _scoring(spec, q0, k0):
        return guard.Scoring(mask=spec.mask, score_mod=spec.score_mod, scale=spec.scale, q_offset=q0, kv_offset=k0,
                             L=spec.L, S=spec.S)

    def forward(self, spec, q, ko, nk, q0, k0):
        """``(result or None, hit (B, H, nq) bool or None)`` of the block's keys ``[ko, ko + nk)``."""
        ks = slice(ko, ko + nk)
        kc, vc = self.k[:, :, ks], self.v[:, :, ks]
        r = _block.block_forward(spec, q, kc, vc, q0, k0)
        if r is None or self.bad is None or not bool(self.bad[:, :, ks].any()):
            return r, None
        sc = self._scoring(spec, q0, k0)
        hit = guard.rows_seeing(sc, q, kc, self.bad[:, :, ks])
        return guard.patch_rows(r, q, self.raw[0][:, :, ks], self.raw[1][:, :, ks], kc, vc, sc, hit=hit), hit

    def backward(self, spec, q, ko, nk, out, lse, dout, dlse, q0, k0, hit):
        ks = slice(ko, ko + nk)
        kc, vc = self.k[:, :, ks], self.v[:, :, ks]
        if hit is None or not bool(hit.any()):
            return _block.block_backward(spec, q, kc, vc, out, lse, dout, dlse, q0, k0)
        m = hit.unsqueeze(-1)  # rows that see a bad key: nothing from the kernel (lse -inf), the textbook share
        g = _block.block_backward(spec, q, kc, vc, out.masked_fill(m, 0), lse.masked_fill(hit, float("-inf")),
                                  dout.masked_fill(m, 0), None if dlse is None else dlse.masked_fill(hit, 0), q0, k0)
        if g is None:  # no row sees any key of this block
            return None
        dq, dk, dv = (t.clone() for t in g)
        k, v = self.raw[0][:, :, ks], self.raw[1][:, :, ks]
        bad = self.bad[:, :, ks] if self.bad is not None else torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device)
        sc, grp = self._scoring(spec, q0, k0), q.shape[1] // k.shape[1]
        for b, h in hit.any(2).nonzero().tolist():
            r = hit[b, h].nonzero().flatten()
            tq, tk, tv = guard.textbook_grads(q, k, v, sc, b, h, r, bad[b, h // grp], out[b, h, r], lse[b, h, r],
                                              dout[b, h, r], None if dlse is None else dlse[b, h, r])
            dq[b, h, r] += tq.to(dq.dtype)
            dk[b, h // grp] += tk.to(dk.dtype)
            dv[b, h // grp] += tv.to(dv.dtype)
        return dq, dk, dv


def _local(segs):
    """Add local offsets: [(local offset, global start, length)]."""
    out, o = [], 0
    for s, n in segs:
        out.append((o, s, n))
        o += n
    return out


# -------------------------------------------------------------------------------------------- public


def _as_timeout(timeout) -> datetime.timedelta | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        sec = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        sec = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds (a number), a datetime.timedelta or None; got {type(timeout).__name__}.")
    if not math.isfinite(sec) or sec <= 0:
        raise ValueError(f"timeout must be positive and finite; got {sec} s. Use None for the process group's timeout.")
    return datetime.timedelta(seconds=sec)


def _check_group(group):
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch; ring_attention needs it.")
    if not dist.is_initialized():
        raise RuntimeError(
            "ring_attention needs an initialised process group: call torch.distributed.init_process_group("
            "'gloo') (CPU) or ('nccl') (GPU) in every process first, e.g. under "
            "`torchrun --nproc-per-node N your_script.py`."
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None (the default group); got {type(group).__name__}.")
    if dist.get_rank(group) < 0:
        raise ValueError("group does not contain this process (dist.get_rank(group) == -1); call ring_attention "
                         "only on the members of group.")


def _agree(ring: _Ring, meta: list[int], device) -> None:
    """All-gather the local shapes so that a mismatch is a clear error on every rank, not a hang."""
    W = ring.world
    if W == 1:
        return
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    allm = [torch.empty_like(mine) for _ in range(W)]
    try:
        work = dist.all_gather(allm, mine, group=ring.group, async_op=True)
        if ring.timeout is None:
            work.wait()
        else:
            work.wait(ring.timeout)
    except RuntimeError as e:
        raise ring._error("the shape check before the ring", e, "waiting for every rank of the group") from e
    names = ("B", "H", "Hkv", "L/W", "S/W", "D", "Dv", "dtype", "layout")
    for r, m in enumerate(allm):
        if not torch.equal(m, allm[0]):
            a, b = allm[0].tolist(), m.tolist()
            diff = ", ".join(f"{n}: {x} vs {y}" for n, x, y in zip(names, a, b) if x != y)
            raise ValueError(
                f"ring_attention: rank {r} disagrees with rank 0 on the local shards ({diff}). Every rank must pass "
                "q, k, v shards of one shape and dtype and the same layout; split the sequence with "
                "salience.distributed.shard (pad it to a multiple of the world size first)."
            )


def _check_no_learned_tensors(sm) -> None:
    """The ring's backward gives gradients for q, k and v only; refuse a score_mod whose known tensors
    (a relative-bias table, ALiBi slopes) would need one instead of silently returning none."""
    if not torch.is_grad_enabled():
        return
    for attr in ("table", "slopes"):
        t = getattr(sm, attr, None)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise NotImplementedError(
                f"score_mod {sm.name} holds a {attr} that requires grad, but ring_attention's backward computes "
                f"gradients for q, k and v only (learned score_mod tensors are not reduced across the ring). "
                f"Pass the {attr} detached (e.g. relative_bias(table.detach(), ...)) or train it with "
                "salience.attention on one process."
            )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    mask=None,
    score_mod=None,
    scale: float | None = None,
    layout: str = "contiguous",
    return_lse: bool = False,
    timeout=None,
):
    """Exact attention over a sequence sharded across the ranks of ``group``, forward and backward.

    Args:
        q: this rank's queries ``(B, H, L / W, D)``.
        k: this rank's keys ``(B, Hkv, S / W, D)``, ``H % Hkv == 0`` (grouped-query attention).
        v: this rank's values ``(B, Hkv, S / W, Dv)``.
        group: the process group (None: the default group). Its rank order is the ring order.
        mask: a :mod:`salience.masks` mask, a mask_mod ``(b, h, q_idx, kv_idx) -> bool`` or a bool tensor
            over the *global* ``(B, H, L, S)``; it is evaluated at global positions.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` at global positions. Gradients flow to q, k, v;
            tensors captured by the score_mod (e.g. a relative-bias table) are treated as constants.
        scale: multiplier of q @ k^T; default 1/sqrt(D).
        layout: how the sequence was split: ``"contiguous"`` (rank r holds the r-th block) or ``"zigzag"``
            (rank r holds chunks r and 2W-1-r of 2W; balances causal masks). Use
            :func:`salience.distributed.shard` to split and :func:`salience.distributed.positions` for the
            global positions of a shard.
        return_lse: also return the logsumexp ``(B, H, L / W)`` (differentiable, like the output).
        timeout: seconds (or a timedelta) to wait for a peer before raising :class:`RingError`; None uses
            the process group's timeout.

    Returns:
        The local output ``(B, H, L / W, Dv)`` in q's dtype, or an :class:`salience.AttentionResult`
        ``(out, lse)`` with ``return_lse=True``. Query rows that see no key give 0 and lse -inf.

    Example:
        >>> import torch, torch.distributed as dist, salience
        >>> from salience.distributed import ring_attention
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a 1-process ring
        >>> q = torch.randn(1, 2, 16, 8)
        >>> out = ring_attention(q, q, q, mask=salience.masks.causal())
        >>> bool(torch.allclose(out, salience.attention(q, q, q, mask=salience.masks.causal()), atol=1e-6))
        True
        >>> dist.destroy_process_group()
    """
    shp = check_qkv(q, k, v)
    if q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must be one of {_DTYPES}; got {q.dtype}.")
    check_layout(layout)
    scale = check_scale(scale, shp.D)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {type(return_lse).__name__}.")
    to = _as_timeout(timeout)
    if layout == "zigzag":
        for name, n in (("q", shp.L), ("k and v", shp.S)):
            if n % 2:
                raise ValueError(
                    f"layout='zigzag' holds two equal chunks per rank, so the local length of {name} must be even; "
                    f"got {n}. Pad the global sequence to a multiple of 2 * world size and shard it with "
                    "salience.distributed.shard(x, rank, world, layout='zigzag')."
                )
    mm = None if mask is None else as_mask_mod(mask)
    sm = None if score_mod is None else as_score_mod(score_mod)
    if sm is not None:
        _check_no_learned_tensors(sm)
        sm = sm.to(q.device)
    _check_group(group)
    ring = _Ring(group, to)
    W = ring.world
    code = {d: i for i, d in enumerate(_DTYPES)}[q.dtype]
    _agree(ring, [shp.B, shp.H, shp.Hkv, shp.L, shp.S, shp.D, shp.Dv, code, ("contiguous", "zigzag").index(layout)],
           q.device)
    L, S = shp.L * W, shp.S * W
    m = None if mm is None else mm.bind(L, S, q.device)
    spec = _block.Spec(mask=m, score_mod=sm, scale=scale, L=L, S=S, B=shp.B, H=shp.H)
    runner = _Runner(ring, spec, layout, L, S)
    out, lse = AttentionFunction.apply(runner, q, k, v)
    return AttentionResult(out=out, lse=lse) if return_lse else out


def gather(x: torch.Tensor, *, layout: str = "contiguous", group=None, dim: int = 2) -> torch.Tensor:
    """All-gather every rank's shard of ``x`` along ``dim`` and return the global tensor on every rank.

    For checks and outputs; it is not differentiable. The inverse of
    :func:`salience.distributed.shard` across a process group.

    Example (in each process)::

        full_out = gather(ring_attention(q, k, v, layout="zigzag"), layout="zigzag")
    """
    from .sharding import unshard

    _check_group(group)
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}.")
    W = dist.get_world_size(group)
    xs = x.detach().contiguous()
    parts = [torch.empty_like(xs) for _ in range(W)]
    dist.all_gather(parts, xs, group=group)
    return unshard(parts, layout=layout, dim=dim)
