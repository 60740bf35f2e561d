"""Tile sizes and thresholds of every kernel, in one object.

The defaults are what the benchmarks measured fastest on the machines salience runs on (see docs/kernels.md).
Tests pass a smaller :class:`KernelConfig` explicitly (``dispatch.choose(..., config=...)``) so that small
inputs cross many tiles; nothing patches module globals.

Example:
    >>> from salience.kernels.config import DEFAULT, KernelConfig
    >>> small = DEFAULT.replace(q_tile=32, kv_tile=16)
    >>> small.q_tile, DEFAULT.q_tile
    (32, 128)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field

import torch

__all__ = ["KernelConfig", "BiasConfig", "DEFAULT", "current", "use"]


def _per_dtype(f32: int, f64: int, bf16: int, f16: int):
    return field(default_factory=lambda: {torch.float32: f32, torch.float64: f64, torch.bfloat16: bf16,
                                          torch.float16: f16})


@dataclass(frozen=True)
class BiasConfig:
    """Tile sizes and thresholds of the bias executor (a part of :class:`KernelConfig`).

    rows: query rows per block of the forward/backward calls; kv_tile: key tile of a mask's classification;
    min_skip: the row-block path is taken when it skips at least this share of the score elements;
    probe: sampled rows and columns per axis when looking for -inf; grad_rows: query rows per dbias tile (0:
    as many as keep a tile's score block within ``grad_elements`` elements)."""

    rows: int = 256
    kv_tile: int = 64
    min_skip: float = 0.1
    probe: int = 64
    grad_rows: int = 0
    grad_elements: int = 1 << 22


@dataclass(frozen=True)
class KernelConfig:
    """Every tunable number of the kernels.

    Dispatch: ``tiny`` (problems with at most this many score elements that need a mask or score_mod run in one
    dense pass), ``min_span_efficiency`` (the span path is used when at least this share of the score elements
    it computes is visible), ``reference_chunk`` (query rows per chunk of the textbook path), ``decode_max_rows``
    and ``decode_min_keys`` (the decode path serves at most this many query rows per kv head group against at
    least this many keys), ``decode_min_split`` (fewest keys per piece when the decode kernel splits a sequence's
    keys across threads; was ``decode.MIN_SPLIT``).

    Span plans (:mod:`salience.kernels.span_plan`): ``band_q_block``/``band_q_block_bwd`` (rows per block on
    sliding-window runs, by dtype), ``generic_q_block`` (rows per block of irregular rows), ``min_run`` (runs
    shorter than this are irregular), ``max_rows_per_call``/``max_rows_per_call_bwd`` (query rows per fused
    call on band runs).

    Toeplitz-bias plans (:mod:`salience.kernels.toeplitz`): ``bias_q_block`` (rows per call, by dtype) and
    ``bias_window_q_block`` (rows per block when the band is a window: each block's key range is its rows plus
    the window, so short blocks waste little; window 256 + ALiBi at N=16384 took 96 ms with 32-row blocks and
    194 ms with 1024).

    Blockwise (:mod:`salience.kernels.blockwise`): ``q_tile``/``kv_tile``. Bias tensors
    (:mod:`salience.kernels.bias`): ``bias`` (a :class:`BiasConfig`).
    """

    tiny: int = 1 << 15
    min_span_efficiency: float = 0.2
    reference_chunk: int = 512
    decode_max_rows: int = 16
    decode_min_keys: int = 1024
    decode_min_split: int = 256
    band_q_block: dict = _per_dtype(32, 32, 32, 32)
    band_q_block_bwd: dict = _per_dtype(192, 192, 256, 256)
    generic_q_block: int = 64
    min_run: int = 16
    max_rows_per_call: int = 8192
    max_rows_per_call_bwd: int = 512
    bias_q_block: dict = _per_dtype(1024, 512, 1024, 1024)
    bias_window_q_block: int = 32
    q_tile: int = 128
    kv_tile: int = 128
    bias: BiasConfig = field(default_factory=BiasConfig)

    def replace(self, **changes) -> KernelConfig:
        """A copy with some fields changed; a per-dtype field may be given as one int for every dtype."""
        for name, value in list(changes.items()):
            if isinstance(getattr(self, name, None), dict) and isinstance(value, int):
                changes[name] = {dt: value for dt in getattr(self, name)}
        return dataclasses.replace(self, **changes)


#: the configuration every call uses unless one is passed explicitly
DEFAULT = KernelConfig()


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("salience_kernel_config", default=DEFAULT)


def current() -> KernelConfig:
    """The configuration in force: :data:`DEFAULT` unless :func:`use` set another."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(config: KernelConfig):
    """Run the calls inside the ``with`` block with ``config`` (scoped to this thread/task; tests use it to make
    small inputs cross many tiles).

    Example:
        >>> import torch, salience
        >>> from salience.kernels import config
        >>> q = torch.randn(1, 1, 64, 8)
        >>> with config.use(config.DEFAULT.replace(q_tile=16, kv_tile=16, tiny=0)):
        ...     out = salience.attention(q, q, q, mask=lambda b, h, i, j: (i - j) % 3 == 0)
        >>> out.shape
        torch.Size([1, 1, 64, 8])
    """
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig (salience.kernels.config.DEFAULT.replace(...)); got "
                        f"{type(config).__name__}.")
    token = _CURRENT.set(config)
    try:
        yield config
    finally:
        _CURRENT.reset(token)
