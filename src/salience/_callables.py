"""Evaluate user mask_mods and score_mods with FlexAttention's semantics.

FlexAttention calls ``mask_mod(b, h, q_idx, kv_idx)`` and ``score_mod(score, b, h, q_idx, kv_idx)`` under
``torch.vmap``: every call sees 0-d tensors, so a callable may index with chains (``bias[b][q_idx]``), unpack
a gathered row, call ``torch.dot``, reduce (``s.sum()`` is ``s``) and so on. salience's kernels call a mask or
score_mod *once* on broadcastable index grids (b ``(B,1,1,1)``, h ``(1,H,1,1)``, q_idx ``(1,1,n,1)``,
kv_idx ``(1,1,1,m)``), which is much faster but means something else for such callables: some raise, some
return the wrong shape, and some (``bias[b][q_idx]``) silently index other elements.

:class:`FlexCallable` wraps a user callable (salience's own factories are never wrapped and keep calling
their functions directly). On its first evaluation it runs a *probe*: the callable is evaluated both ways on
a small sub-grid of the call's own indices (at most 2 x 3 x 5 x 7 points, with pseudo-random scores for a
score_mod) and

* broadcast and vmap agree -> every later call is one broadcast call (checked for type and shape);
* broadcast raises, returns a wrong shape or type, or disagrees -> every later call is evaluated the way
  FlexAttention does it: nested ``torch.vmap`` over the index axes with 0-d index tensors (in chunks, so
  that at most :data:`VMAP_CHUNK_ELEMENTS` results are produced per vmap call);
* vmap fails but broadcast works -> broadcast (a callable written for salience only);
* both fail -> one :class:`CallableError` that says what a mask_mod / score_mod must be and shows what each
  evaluation raised or returned.

The decision is cached per user callable (weakly), so passing the same function to many calls probes once.
A broadcast decision is probed again when a call spans more positions along an axis than the probe saw
(e.g. the first call had one batch row), and a broadcast call that fails later (other sizes) falls back to
vmap for that call and from then on; vmap decisions are final (vmap is FlexAttention's own semantics).

Example:
    >>> import torch
    >>> doc = torch.tensor([[0, 0, 1, 1]])
    >>> m = FlexCallable(lambda b, h, q, kv: doc[b][q] == doc[b][kv], "mask")
    >>> b, h, q, kv = (torch.arange(1).view(1, 1, 1, 1), torch.arange(1).view(1, 1, 1, 1),
    ...                torch.arange(4).view(1, 1, 4, 1), torch.arange(4).view(1, 1, 1, 4))
    >>> m(b, h, q, kv)[0, 0].int().tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    >>> m.mode
    'vmap'
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["CallableError", "FlexCallable", "vmap_eval", "mode_of", "wrap"]

BROADCAST = "broadcast"
VMAP = "vmap"

#: positions taken along each index axis (b, h, q_idx, kv_idx) for the probe; distinct sizes so that a
#: callable confusing two axes shows up as a wrong shape
PROBE_SIZES = (2, 3, 5, 7)
#: result elements produced per nested-vmap call; larger grids are evaluated in chunks along their longest axis
VMAP_CHUNK_ELEMENTS = 1 << 20

_decisions: dict[str, weakref.WeakKeyDictionary] = {"mask": weakref.WeakKeyDictionary(),
                                                   "score": weakref.WeakKeyDictionary()}


class CallableError(TypeError, ValueError):
    """A mask_mod or score_mod that salience cannot evaluate either way (broadcast or FlexAttention's vmap)."""


# ------------------------------------------------------------------------------------------------ vmap


def _pad(a, nd: int):
    if isinstance(a, torch.Tensor) and a.dim() < nd:
        return a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
    return a


def _broadcast(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` in plain Python (that one costs about a millisecond per call)."""
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        off = nd - len(s)
        for i, n in enumerate(s):
            j = off + i
            if n != 1:
                if out[j] != 1 and out[j] != n:
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[j] = n
    return torch.Size(out)


def _shape_of(args) -> torch.Size:
    return _broadcast(*(a.shape for a in args if isinstance(a, torch.Tensor)))


def _vmap_block(fn, args, shape):
    """fn evaluated elementwise over ``shape`` (args already padded to len(shape) dims)."""
    nd = len(shape)
    axes = [i for i in range(nd) if shape[i] > 1]
    squeezed = []
    for a in args:
        if isinstance(a, torch.Tensor):
            squeezed.append(a.reshape(tuple(a.shape[i] for i in axes if a.shape[i] > 1)))
        else:
            squeezed.append(a)
    f = fn
    for ax in reversed(axes):  # the innermost vmap maps the last axis, like FlexAttention's kv_idx
        dims = tuple(0 if isinstance(a, torch.Tensor) and a.shape[ax] > 1 else None for a in args)
        f = torch.vmap(f, in_dims=dims, out_dims=0)
    out = f(*squeezed)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"returned {type(out).__name__}, not a tensor")
    lead = tuple(shape[i] for i in axes)
    if tuple(out.shape) != lead:
        extra = tuple(out.shape[len(lead):])
        raise ValueError(f"returned a tensor of shape {extra} per (b, h, q_idx, kv_idx) element, not a scalar")
    return out.reshape(tuple(shape))


def vmap_eval(fn, *args) -> torch.Tensor:
    """``fn(*args)`` with FlexAttention's scalar semantics: each call sees 0-d tensors.

    The tensor arguments broadcast against each other (index grids, and the scores for a score_mod); the
    result has their broadcast shape. Nested ``torch.vmap`` maps only the axes along which some argument
    varies, in chunks of at most :data:`VMAP_CHUNK_ELEMENTS` results along the longest axis.

    Example:
        >>> bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> vmap_eval(lambda b, q: bias[b][q], torch.arange(2).view(2, 1), torch.arange(2).view(1, 2)).tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    shape = _shape_of(args)
    nd = len(shape)
    padded = [_pad(a, nd) for a in args]
    n = shape.numel()
    if n == 0:
        raise ValueError(f"cannot evaluate on an empty grid of shape {tuple(shape)}")
    if n <= VMAP_CHUNK_ELEMENTS or nd == 0:
        return _vmap_block(fn, padded, shape)
    ax = max(range(nd), key=lambda i: shape[i])
    step = max(1, VMAP_CHUNK_ELEMENTS // (n // shape[ax]))
    outs = []
    for s0 in range(0, shape[ax], step):
        s1 = min(shape[ax], s0 + step)
        part = [a.narrow(ax, s0, s1 - s0) if isinstance(a, torch.Tensor) and a.shape[ax] > 1 else a for a in padded]
        sub = list(shape)
        sub[ax] = s1 - s0
        outs.append(_vmap_block(fn, part, torch.Size(sub)))
    return torch.cat(outs, dim=ax)


# ------------------------------------------------------------------------------------------ the wrapper


def _probe_counts(shape) -> tuple:
    """Positions the probe takes along each axis of ``shape`` (see :data:`PROBE_SIZES`)."""
    nd = len(shape)
    k = len(PROBE_SIZES)
    return tuple(min(n, PROBE_SIZES[i - nd + k] if nd - i <= k else 2) for i, n in enumerate(shape))


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def mode_of(fn) -> str | None:
    """The cached evaluation mode (``"broadcast"`` or ``"vmap"``) of a user callable, or None if not probed."""
    for d in _decisions.values():
        try:
            if fn in d:
                return d[fn][0]
        except TypeError:
            pass
    return None


class FlexCallable:
    """A user mask_mod (``kind="mask"``) or score_mod (``kind="score"``) evaluated with FlexAttention's semantics.

    Calling it with broadcastable arguments returns, for a mask, a bool tensor that broadcasts to their shape;
    for a score_mod, a floating tensor of the score's shape. See the module docstring for how the evaluation
    is chosen.
    """

    def __init__(self, fn, kind: str):
        if kind not in ("mask", "score"):
            raise ValueError(f"kind must be 'mask' or 'score'; got {kind!r}.")
        self.fn = fn
        self.kind = kind
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__wrapped__ = fn
        self._mode = None
        self._cover = ()  # positions probed per axis (trailing-aligned), for a broadcast decision

    def __repr__(self) -> str:
        return f"FlexCallable({self.__name__}, {self.kind})"

    # -- the decision --------------------------------------------------------------------------------
    @property
    def mode(self) -> str | None:
        if self._mode is None:
            try:
                got = _decisions[self.kind].get(self.fn)
            except TypeError:  # not weakly referenceable / hashable
                got = None
            if got is not None:
                self._mode, self._cover = got
        return self._mode

    def _set_mode(self, mode: str, cover=None) -> None:
        self._mode = mode
        if cover is not None:
            n = max(len(cover), len(self._cover))
            a = (1,) * (n - len(cover)) + tuple(cover)
            b = (1,) * (n - len(self._cover)) + tuple(self._cover)
            self._cover = tuple(max(x, y) for x, y in zip(a, b))
        try:
            _decisions[self.kind][self.fn] = (mode, self._cover)
        except TypeError:
            pass

    def _covered(self, shape) -> bool:
        """True when the probe already saw at least as many positions along every axis as this call would."""
        cover = _probe_counts(shape)
        if len(cover) > len(self._cover):
            return False
        return all(c <= p for c, p in zip(cover, self._cover[len(self._cover) - len(cover):]))

    # -- checks --------------------------------------------------------------------------------------
    def _check(self, out, args, shape):
        """``(result, None)`` normalised, or ``(None, why)``."""
        if self.kind == "mask":
            if isinstance(out, bool):
                out = torch.tensor(out, device=_device_of(args))
            if not isinstance(out, torch.Tensor):
                return None, f"returned {type(out).__name__}, not a bool tensor"
            if out.dtype != torch.bool:
                return None, f"returned {out.dtype}, not a bool tensor"
            try:
                ok = _broadcast(out.shape, shape) == shape
            except RuntimeError:
                ok = False
            if not ok:
                return None, f"returned shape {tuple(out.shape)}, which does not broadcast to {tuple(shape)}"
            return out, None
        score = args[0]
        if not isinstance(out, torch.Tensor):
            return None, f"returned {type(out).__name__}, not a tensor"
        if not out.is_floating_point():
            return None, f"returned {out.dtype}, not a floating-point score"
        sshape = score.shape if isinstance(score, torch.Tensor) else shape
        if out.shape != sshape:  # (vmap results always have the grid's shape)
            return None, f"returned shape {tuple(out.shape)} for scores of shape {tuple(sshape)}"
        return out, None

    def _try(self, how, args, shape):
        try:
            out = self.fn(*args) if how == BROADCAST else vmap_eval(self.fn, *args)
        except Exception as e:  # noqa: BLE001 - reported below with what a mod must be
            return None, f"raised {_short(e)}", e
        res, why = self._check(out, args, shape)
        if why is None and how == VMAP and self.kind == "mask":
            res = _compact(res)
        return res, why, None

    def _fail(self, bc_why, vm_why, exc, shape, probe_shape=None):
        name = self.__name__
        if self.kind == "mask":
            what = (
                "A mask_mod is mask_mod(b, h, q_idx, kv_idx) -> bool tensor (True = the query may attend to the "
                "key). salience calls it on broadcastable int64 index tensors b (B,1,1,1), h (1,H,1,1), q_idx "
                "(1,1,L,1), kv_idx (1,1,1,S) and, where that fails or disagrees, the way FlexAttention does: under "
                "torch.vmap with 0-d index tensors. Return a bool tensor (e.g. q_idx >= kv_idx); for an additive "
                "bias use score_mod=."
            )
            head = f"mask {name}"
        else:
            what = (
                "A score_mod is score_mod(score, b, h, q_idx, kv_idx) -> score: a floating-point tensor like score "
                "(use torch.where(cond, score, -float('inf')) to hide keys, or mask=). salience calls it on the "
                "score tensor with broadcastable int64 index tensors and, where that fails or disagrees, the way "
                "FlexAttention does: under torch.vmap with 0-d tensors."
            )
            head = f"score_mod {name}"
        parts = []
        if bc_why is not None:
            parts.append(f"called on index grids it {bc_why}")
        if vm_why is not None:
            parts.append(f"under torch.vmap (FlexAttention's semantics) it {vm_why}")
        where = f"index grids of shape {tuple(shape)}"
        if probe_shape is not None and tuple(probe_shape) != tuple(shape):
            where += f" (probed on a {tuple(probe_shape)} sub-grid)"
        msg = f"{head} cannot be evaluated on {where}: " + "; ".join(parts) + ". " + what
        if self.kind == "score" and any(w is not None and "not a floating-point score" in w for w in (bc_why, vm_why)):
            msg = (f"{head} returned a non-floating result: " + "; ".join(parts) + ". A score_mod must return the "
                   "modified floating-point score, never bool or int (no silent cast): score_mod(score, b, h, q_idx, kv_idx) "
                   "-> score. A predicate belongs in mask=.")
        return CallableError(msg) if exc is None else _chain(CallableError(msg), exc)

    # -- evaluation ----------------------------------------------------------------------------------
    def _probe(self, args, shape):
        """Evaluate both ways on a small sub-grid of the call's indices and decide."""
        nd = len(shape)
        padded = [_pad(a, nd) for a in args]
        sel = []
        for n, k in zip(shape, _probe_counts(shape)):
            sel.append(torch.linspace(0, n - 1, k).round().long().unique() if n > 1 else None)
        pargs = []
        for a in padded:
            if isinstance(a, torch.Tensor):
                for i, pos in enumerate(sel):
                    if pos is not None and a.shape[i] > 1:
                        a = a.index_select(i, pos.to(a.device))
            pargs.append(a)
        if self.kind == "score" and isinstance(pargs[0], torch.Tensor):
            s = pargs[0]
            g = torch.Generator().manual_seed(1234)
            pargs[0] = (torch.randn(s.shape, generator=g, dtype=torch.float64) * 3).to(s.dtype).to(s.device)
        pshape = _shape_of(pargs)
        with torch.no_grad():
            bc, bc_why, bc_exc = self._try(BROADCAST, pargs, pshape)
            vm, vm_why, vm_exc = self._try(VMAP, pargs, pshape)
        if bc_why is None and vm_why is None:
            return BROADCAST if _same(bc, vm, pshape) else VMAP
        if bc_why is None:
            return BROADCAST
        if vm_why is None:
            return VMAP
        raise self._fail(bc_why, vm_why, vm_exc or bc_exc, shape, pshape)

    def __call__(self, *args):
        shape = _shape_of(args)
        if shape.numel() == 0:  # nothing to evaluate
            if self.kind == "mask":
                return torch.zeros(shape, dtype=torch.bool, device=_device_of(args))
            return args[0]
        mode = self.mode
        if mode is None or (mode == BROADCAST and not self._covered(shape)):
            # first evaluation, or a broadcast decision taken on a grid with fewer positions along some axis
            # (e.g. one batch row): probe (again) so that axis is compared too; vmap decisions are final
            mode = self._probe(args, shape)
            self._set_mode(mode, _probe_counts(shape))
        if mode == BROADCAST:
            res, bc_why, bc_exc = self._try(BROADCAST, args, shape)
            if bc_why is None:
                return res
            res, vm_why, vm_exc = self._try(VMAP, args, shape)
            if vm_why is None:
                self._set_mode(VMAP)
                return res
            raise self._fail(bc_why, vm_why, vm_exc or bc_exc, shape)
        res, vm_why, vm_exc = self._try(VMAP, args, shape)
        if vm_why is None:
            return res
        raise self._fail(None, vm_why, vm_exc, shape)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Size 1 along the axes vmap only expanded (stride 0): a mask that ignores b and h stays (1, 1, n, m), so
    tile classification reduces over the axes the mask depends on, as it does for broadcast results."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def _chain(err: Exception, cause: Exception) -> Exception:
    err.__cause__ = cause
    return err


def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _same(a: torch.Tensor, b: torch.Tensor, shape) -> bool:
    try:
        a, b = a.expand(shape), b.expand(shape)
    except RuntimeError:
        return False
    if a.dtype == torch.bool or b.dtype == torch.bool:
        return a.dtype == b.dtype and torch.equal(a, b)
    if a.dtype != b.dtype:
        b = b.to(a.dtype)
    eps = torch.finfo(a.dtype).eps if a.is_floating_point() else 1e-6
    return bool(torch.allclose(a, b, rtol=64 * eps, atol=64 * eps, equal_nan=True))


def wrap(fn, kind: str) -> FlexCallable:
    """``fn`` as a :class:`FlexCallable` of ``kind`` (``"mask"`` or ``"score"``); already wrapped -> itself."""
    if isinstance(fn, FlexCallable) and fn.kind == kind:
        return fn
    return FlexCallable(fn, kind)
