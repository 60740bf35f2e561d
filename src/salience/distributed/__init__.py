"""Attention over a sequence split across processes: ring attention on ``torch.distributed``.

* :func:`ring_attention` exact attention (forward and backward) over sequence shards, any mask/score_mod;
* :func:`shard`, :func:`unshard`, :func:`positions`, :func:`segments`: split a global sequence for W ranks
  (``"contiguous"`` or the causal-balancing ``"zigzag"`` layout) and put it back; global positions for
  RoPE and masks;
* :func:`gather`: all-gather shards into the global tensor (for checks);
* ``torchrun --nproc-per-node N -m salience.distributed`` runs long-sequence attention across ranks and
  checks it against single-process attention (see :mod:`salience.distributed.launch`).

Layout (B, H, L, D); see :mod:`salience._layout`.

Example:
    >>> import torch
    >>> from salience.distributed import shard, positions
    >>> shard(torch.arange(8), 1, 2, layout="zigzag", dim=0).tolist()
    [2, 3, 4, 5]
"""

from .ring import RingError, gather, ring_attention
from .sharding import LAYOUTS, positions, segments, shard, unshard

__all__ = ["ring_attention", "gather", "RingError", "shard", "unshard", "positions", "segments", "LAYOUTS"]
