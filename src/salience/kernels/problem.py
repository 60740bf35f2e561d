"""One attention call, described once: shapes, dtypes, the bound mask and score_mod, what gradients it needs.

:func:`build` makes a :class:`Problem` from validated inputs; every dispatch rule reads it (never the raw
arguments), and the quantities several rules need (the row intervals of the mask, the linear form of the
score_mod, the tensors a score_mod closes over) are computed on first use and kept.

Example:
    >>> import torch, salience
    >>> from salience.kernels.problem import build
    >>> q = torch.randn(1, 2, 64, 16)
    >>> p = build(q, q, q, mask=salience.masks.sliding_window(8).bind(64, 64))
    >>> p.B, p.H, p.L, p.S, p.intervals is not None
    (1, 2, 64, 64, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..reference import _acc_dtype
from ..structure import is_full, linear_form, row_intervals
from . import fused, native
from .config import KernelConfig, current

__all__ = ["Problem", "build", "grad_tensors", "grads_complete", "bias_fn"]


@dataclass(eq=False)
class Problem:
    """Everything a dispatch rule may read about one call (``mask`` is bound to the global lengths, None for
    ``full()``; ``Lg``/``Sg`` are the global lengths when the inputs are a block of a larger problem placed at
    ``q_offset``/``kv_offset``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object
    score_mod: object
    compatibility: object
    scale: float
    dropout_p: float
    need_lse: bool
    backend: str | None
    q_offset: int
    kv_offset: int
    Lg: int
    Sg: int
    allow_reference: bool
    bias: torch.Tensor | None
    config: KernelConfig
    scale_arg: object = None  # the scale as given (None, a float or a tensor that may require grad)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def H(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def L(self) -> int:
        return self.q.shape[2]

    @property
    def S(self) -> int:
        return self.k.shape[2]

    @property
    def device(self):
        return self.q.device

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def whole(self) -> bool:
        """True when the inputs are the whole problem (no block offsets)."""
        return (self.q_offset, self.kv_offset, self.Lg, self.Sg) == (0, 0, self.L, self.S)

    @property
    def score_elements(self) -> int:
        return self.B * self.H * self.L * self.S

    # -- derived, computed once ----------------------------------------------------------------------
    @cached_property
    def needs_grad(self) -> bool:
        """Whether autograd will ask for a backward (inputs or a score_mod's tensors require grad)."""
        return torch.is_grad_enabled() and (any(t.requires_grad for t in (self.q, self.k, self.v))
                                           or (self.bias is not None and self.bias.requires_grad)
                                           or bool(self.grad_tensors))

    @cached_property
    def fused_ok(self) -> bool:
        return fused.available(self.q)

    @cached_property
    def native_ok(self) -> bool:
        return native.available(self.q)

    @cached_property
    def linear(self):
        """:func:`salience.structure.linear_form` of the score_mod's structure."""
        return linear_form(self.score_mod)

    @property
    def alpha(self) -> float:
        return 1.0 if self.linear is None else self.linear[0]

    @property
    def biases(self):
        """The additive relative biases of the score_mod's linear form ([] for none, None when not linear)."""
        return None if self.linear is None else self.linear[1]

    @property
    def eff_scale(self) -> float:
        """The scale with a temperature folded in."""
        return self.scale * self.alpha

    @property
    def mod_rest(self):
        """The score_mod left once a temperature is folded into the scale (None when nothing is left)."""
        return None if (self.linear is not None and not self.linear[1]) else self.score_mod

    @cached_property
    def grad_tensors(self) -> list:
        return grad_tensors(self.score_mod) if self.score_mod is not None else []

    @cached_property
    def intervals(self):
        """``(lo, hi)`` (1 or B, L): each query row's visible key interval in local key coordinates, or None when
        the mask is not an interval mask."""
        return row_intervals(self.mask, self.B, self.L, self.S, q_offset=self.q_offset, kv_offset=self.kv_offset,
                             q_len=self.Lg, kv_len=self.Sg, device=self.device)

    @cached_property
    def few_row_bounds(self):
        """``(los, his)`` flat Python lists (row i of sequence b at ``b * L + i``) of each row's visible keys for
        no mask or a band mask when the problem is whole and its rows few (a decoding step:
        :func:`salience.kernels.decode.band_bounds`, no structure pass, no tensor); else None."""
        from .decode import band_bounds

        return band_bounds(self.mask, [self.S] * self.B, self.L) if self.whole else None

    @cached_property
    def few_row_intervals(self):
        """:attr:`intervals`, made from :attr:`few_row_bounds` when there are (one small tensor)."""
        from .decode import bounds_tensors

        bounds = self.few_row_bounds
        return self.intervals if bounds is None else bounds_tensors(bounds, self.B, self.L)

    def bias_fn(self):
        """``d -> (H, n)``: the summed relative biases of the score_mod at offsets ``d = kv_idx - q_idx``."""
        return bias_fn(self.biases, self.H, self.device, _acc_dtype(self.dtype))


def build(q, k, v, *, mask=None, score_mod=None, compatibility=None, scale=None, dropout_p: float = 0.0,
          need_lse: bool = True, backend: str | None = None, q_offset: int = 0, kv_offset: int = 0,
          q_len: int | None = None, kv_len: int | None = None, allow_reference: bool = True, bias=None,
          config: KernelConfig | None = None) -> Problem:
    """A :class:`Problem` for validated inputs (``mask`` a MaskMod or None, ``score_mod`` a ScoreMod or None)."""
    Lg = q_offset + q.shape[2] if q_len is None else q_len
    Sg = kv_offset + k.shape[2] if kv_len is None else kv_len
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    m = None if mask is None else mask.bind(Lg, Sg, q.device)
    if m is not None and is_full(m):
        m = None
    return Problem(q, k, v, m, score_mod, compatibility, sc, float(dropout_p), need_lse, backend, q_offset,
                   kv_offset, Lg, Sg, allow_reference, bias, current() if config is None else config, scale)


# ----------------------------------------------------------------------------------------- score mods


def _visit_children(obj, visit, depth):
    if isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            visit(p, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            visit(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            visit(x, depth + 1)
    elif callable(obj) or hasattr(obj, "__dict__"):
        for attr in ("table", "slopes", "fn", "__self__", "__func__"):
            if hasattr(obj, attr):
                visit(getattr(obj, attr), depth + 1)
        for c in getattr(obj, "__closure__", None) or ():
            try:
                visit(c.cell_contents, depth + 1)
            except ValueError:
                pass
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict) and not isinstance(obj, type):
            for key, x in d.items():
                if key not in ("fn", "table", "slopes"):
                    visit(x, depth + 1)


def grad_tensors(mod) -> list:
    """Tensors requiring grad that a score_mod closes over (found in attributes, closures, modules)."""
    found, seen = [], set()

    def visit(obj, depth):
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad and all(obj is not f for f in found):
                found.append(obj)
            return
        _visit_children(obj, visit, depth)

    visit(mod, 0)
    return found


def grads_complete(mod, found, H, device) -> bool:
    """True when every tensor the score_mod's output depends on (for grads) is in ``found``."""
    s = torch.zeros(1, H, 2, 2, device=device)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    qi = torch.arange(2, device=device).view(1, 1, -1, 1)
    ki = torch.arange(2, device=device).view(1, 1, 1, -1)
    with torch.enable_grad():
        try:
            out = mod(s, b, h, qi, ki)
        except Exception:  # noqa: BLE001 - the probe cannot tell; the real call reports a broken mod itself
            return True
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return True
    stop = {id(t.grad_fn) for t in found if t.grad_fn is not None}
    leaves = {id(t) for t in found}
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in leaves:
            return False
        stack.extend(n for n, _ in node.next_functions)
    return True


def bias_fn(biases, H, device, dtype):
    """d -> (H, n): the sum of the additive relative ``biases`` ``[(Alibi or RelativeBias structure, weight), ...]``
    at offsets ``d = kv_idx - q_idx``."""

    def fn(d):
        total = torch.zeros(H, d.numel(), dtype=dtype, device=device)
        for node, w in biases:
            total += w * node.values(d.to(device), dtype=dtype).to(dtype).expand(H, -1)
        return total

    return fn
