"""Choose the compute path for one attention call, and run it with a memory-light backward.

Backends (all exact; each returns the output and the logsumexp):

* ``"sdpa"``: torch's fused CPU flash kernel, for no mask and top-left causal with no score_mod (causal goes
  through ``is_causal``; no mask tensor is built), and key padding with a compact key mask. Forced with a mask,
  it materialises the equivalent dense mask, like calling torch SDPA with a boolean mask (a baseline).
* ``"spans"``: masks whose visible keys form one interval per query row (documents, sliding windows,
  prefix-LM, padding, bottom-right causal and their ``&``): fused calls over just the keys each run of rows
  needs (:mod:`salience.kernels.span_plan`), or with a relative additive score_mod (ALiBi, T5 buckets) a
  strided Toeplitz bias (:mod:`salience.kernels.toeplitz`) or the compiled interval kernels
  (:mod:`salience.kernels.native`), which also run dropout.
* ``"blockwise"``: everything else (any mask_mod, any score_mod such as softcap): online softmax over
  (query tile, key tile) pairs that skips empty tiles (:mod:`salience.kernels.blockwise`).
* ``"decode"``: a few queries against a long key/value cache, forward only (:mod:`salience.kernels.decode`).
* ``"bias"``: a float bias tensor added to the scores (:mod:`salience.kernels.bias`).
* ``"reference"``: the textbook computation chunked over query rows: dropout where the compiled kernels
  cannot take it, non-dot compatibility functions, and tiny problems where one dense pass is fastest.

How the choice is made: :func:`choose` describes the call once as a :class:`~salience.kernels.problem.Problem`
and walks the ordered rule table of :mod:`salience.kernels.rules`; the first rule that applies names the
executor of both directions (:mod:`salience.kernels.executors`). ``backend=`` forces a path and is refused with
the reason when that path cannot take the problem. Tile sizes and thresholds come from
:mod:`salience.kernels.config`.

Training: every executor except ``"reference"`` and torch SDPA runs under one ``autograd.Function`` that
saves only q, k, v, the output and the logsumexp and recomputes the rest in the backward (FlashAttention-2
style), so memory is O(L * D), not O(L * S); fully masked rows get zero gradients.

Example:
    >>> import torch, salience
    >>> q = torch.randn(1, 2, 4096, 16)
    >>> p = salience.plan(q, q, q, mask=salience.masks.sliding_window(128))
    >>> p.backend, p.details["skipped"] > 0.9
    ('spans', True)
"""

from __future__ import annotations

import torch

from . import fused, guard
from .executors import AttentionFunction
from .executors import run as run_executor
from .problem import build, grad_tensors  # noqa: F401 - re-exported for callers of dispatch
from .rules import BACKENDS, Plan, Refused
from .rules import choose as choose_rule

__all__ = ["Plan", "BACKENDS", "choose", "run", "attend", "AttentionFunction", "Refused"]


def choose(q, k, v, *, mask, score_mod, compatibility, need_lse: bool, backend: str | None, scale=None,
           dropout_p: float = 0.0, q_offset: int = 0, kv_offset: int = 0, q_len: int | None = None,
           kv_len: int | None = None, allow_reference: bool = True, bias=None, config=None) -> Plan:
    """Pick the executor for validated inputs (mask a MaskMod or None, score_mod a ScoreMod or None): a
    :class:`Plan` naming the backend, the reason and what runs forward and backward. ``q_offset``/``kv_offset``/
    ``q_len``/``kv_len`` place the inputs in a larger problem (see :func:`salience.kernels.partial.block_forward`);
    ``allow_reference=False`` keeps the choice on the kernels that support them; ``config`` a
    :class:`~salience.kernels.config.KernelConfig` (default: :func:`salience.kernels.config.current`)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}.")
    p = build(q, k, v, mask=mask, score_mod=score_mod, compatibility=compatibility, scale=scale,
              dropout_p=dropout_p, need_lse=need_lse, backend=backend, q_offset=q_offset, kv_offset=kv_offset,
              q_len=q_len, kv_len=kv_len, allow_reference=allow_reference, bias=bias, config=config)
    return choose_rule(p)


def run(plan: Plan, q, k, v):
    """Execute a plan from :func:`choose`: an :class:`AttentionResult` (lse None only for torch SDPA's own
    paths, which do not produce it)."""
    if plan.executor is None:
        raise ValueError("this Plan has no executor; build it with salience.kernels.dispatch.choose.")
    return run_executor(plan.executor, q, k, v)


def _frame_callback():
    """Dynamo's frame-evaluation callback of this thread (None when no compiled function is running in it). On
    torch versions that do not expose it: None until ``torch._dynamo`` is loaded (nothing can be compiling before),
    ``True`` after (then :func:`_opaque_to_compile` always wraps)."""
    get = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback", None)
    if get is not None:
        return get()
    import sys

    return None if "torch._dynamo" not in sys.modules else True


def _opaque_to_compile(fn):
    """``fn`` made opaque to torch.compile: dynamo graph-breaks around it (``_torchdynamo_disable`` on the
    wrapper) and never compiles the frames it runs.

    Those frames need ``torch.compiler.disable(fn)`` only while dynamo's frame callback is set in this thread,
    i.e. when the call comes from a compiled function (after a graph break); then that wrapper is made (once:
    applying it at import would import ``torch._dynamo``, about 2 s) and used. Otherwise ``fn`` runs as is: the
    disable wrapper costs ~100-150 us per call, more than a decoding step's attention on a short cache, and
    ``torch._dynamo`` is loaded in most processes that use transformers."""
    import functools

    disabled = []

    @functools.wraps(fn)
    def opaque(*args, **kwargs):
        if not torch.compiler.is_compiling() and _frame_callback() is None:  # (dynamo tracing this: the wrapper)
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    opaque._torchdynamo_disable = True
    return opaque


@_opaque_to_compile
def attend(q, k, v, *, mask, score_mod, scale, compatibility, dropout_p, need_lse, backend, bias=None) -> tuple:
    """``choose`` then ``run`` (opaque to torch.compile, which graph-breaks around it): ``(plan, result)``.

    Inputs are given a unit last-axis stride once here (the fused and compiled kernels assume it), and keys
    a row cannot see never change that row, even when they hold NaN or inf (see
    :func:`salience.kernels.guard.guarded`)."""
    q, k, v = fused.dense_last(q), fused.dense_last(k), fused.dense_last(v)  # once here, not per kernel call
    pl = choose(q, k, v, mask=mask, score_mod=score_mod, compatibility=compatibility, need_lse=need_lse,
                backend=backend, scale=scale, dropout_p=dropout_p, bias=bias)

    def run_clean(q_, k_, v_):
        return run(pl, q_, k_, v_)

    if not getattr(pl.executor, "reads_hidden_keys", True):  # e.g. decode: only each row's interval is read
        return pl, run(pl, q, k, v)
    sc = guard.Scoring(mask=mask, score_mod=score_mod, bias=bias, scale=scale, compatibility=compatibility,
                       dropout_p=dropout_p)  # what hides keys: the mask, a score_mod's -inf, a bias's -inf
    return pl, guard.guarded(q, k, v, sc, run_clean, guard.textbook_rows)
