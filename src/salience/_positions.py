"""Position arithmetic shared by masks, score_mods and their structure: T5's relative buckets and the block hash
of ``masks.random_blocks``. Pure tensor functions (they work under vmap); no salience imports, so
:mod:`salience.masks`, :mod:`salience.scores` and :mod:`salience.structure` can all use them without a cycle.

Example:
    >>> import torch
    >>> from salience._positions import t5_bucket
    >>> t5_bucket(torch.tensor([-3, 0, 3]), num_buckets=8, max_distance=16).tolist()
    [2, 0, 6]
"""

from __future__ import annotations

import math

import torch

__all__ = ["t5_bucket", "check_buckets", "hash_uniform"]


def check_buckets(num_buckets, max_distance, bidirectional) -> None:
    """T5's bucketing (transformers' ``T5Attention._relative_position_bucket``) is defined when
    ``max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2 >= 1`` and ``max_distance > max_exact``;
    otherwise its log-spaced buckets divide by zero or run negative."""
    for argname, val in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{argname} must be an int; got {type(val).__name__} {val!r}.")
    if bidirectional and num_buckets % 2:
        raise ValueError(f"num_buckets must be even when bidirectional; got {num_buckets}.")
    least = 4 if bidirectional else 2
    if num_buckets < least:
        raise ValueError(
            f"num_buckets must be >= {least} with bidirectional={bidirectional} (T5 keeps half the buckets of each "
            f"direction for exact distances, which needs at least one); got {num_buckets}."
        )
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= exact:
        raise ValueError(
            f"max_distance={max_distance} must exceed the {exact} exact-distance buckets of num_buckets={num_buckets} "
            f"(bidirectional={bidirectional}): T5's log-spaced buckets run from distance {exact} to max_distance and "
            f"would give negative bucket ids. Use max_distance >= {exact + 1} (T5: num_buckets=32, max_distance=128), "
            f"or fewer buckets."
        )


def t5_bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128,
              bidirectional: bool = True) -> torch.Tensor:
    """T5's relative-position buckets for ``relative_position = kv_idx - q_idx`` (Raffel et al. 2020).

    Half the buckets (per direction) hold exact small distances; the rest grow logarithmically up to
    ``max_distance``, beyond which all distances share the last bucket. Returns int64 bucket ids.

    Example:
        >>> t5_bucket(torch.tensor([-3, 0, 3]), num_buckets=8, max_distance=16).tolist()
        [2, 0, 6]
    """
    check_buckets(num_buckets, max_distance, bidirectional)
    rel = relative_position.long()
    n = num_buckets
    ret = torch.zeros_like(rel)
    if bidirectional:
        n = n // 2
        ret = ret + (rel > 0).long() * n
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n // 2
    small = dist < exact
    safe = dist.clamp(min=1).double()
    large = exact + (torch.log(safe / exact) / math.log(max_distance / exact) * (n - exact)).long()
    large = large.clamp(max=n - 1)
    return ret + torch.where(small, dist, large)


def hash_uniform(qb: torch.Tensor, kb: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic hash of (qb, kb, seed) to [0, 1); pure tensor arithmetic (works under vmap)."""
    m32 = 0xFFFFFFFF
    x = (qb * 0x2545F491 + kb * 0x4F1BBCDD + (seed * 0x1B873593 & m32)) & m32
    for mul in (0x7FEB352D, 0x46B42B5B):
        x = x ^ torch.bitwise_right_shift(x, 16)
        x = (x * mul) & m32
    x = x ^ torch.bitwise_right_shift(x, 15)
    return (x & 0xFFFFFF).to(torch.float64) / float(1 << 24)
