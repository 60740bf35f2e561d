"""How a sequence is split across the ranks of a ring, and how to put it back together.

Two layouts, chosen by name:

* ``"contiguous"`` (default): rank r of W holds positions ``[r * n, (r + 1) * n)`` with ``n = N / W``.
* ``"zigzag"``: the sequence is cut into ``2 W`` equal chunks and rank r holds chunk ``r`` followed by chunk
  ``2 W - 1 - r``. Under a causal mask every rank then has the same amount of visible work (the early
  chunk sees little, the late chunk sees much), which is what load-balances causal ring attention.

A shard is described by its *segments*: the runs of consecutive global positions it holds, in local order
(one segment for contiguous, two for zigzag). Masks, score_mods and position encodings (RoPE) must see the
global positions, which :func:`positions` returns.

Example:
    >>> import torch
    >>> from salience.distributed import shard, unshard, positions
    >>> x = torch.arange(8).view(1, 1, 8, 1)
    >>> positions(8, 0, 2, layout="zigzag").tolist()
    [0, 1, 6, 7]
    >>> parts = [shard(x, r, 2, layout="zigzag") for r in range(2)]
    >>> parts[1].flatten().tolist()
    [2, 3, 4, 5]
    >>> bool((unshard(parts, layout="zigzag") == x).all())
    True
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "segments", "positions", "shard", "unshard", "check_layout"]

#: the sharding layouts understood by :func:`shard` and :func:`salience.distributed.ring_attention`
LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    """Return ``layout`` if it names a known layout, else raise a ValueError listing them."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {LAYOUTS}; got {layout!r}. Use 'zigzag' to balance causal masks, "
            "'contiguous' otherwise."
        )
    return layout


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return value


def _divisor(layout: str, world: int) -> int:
    return world if layout == "contiguous" else 2 * world


def check_length(n: int, world: int, layout: str, what: str = "sequence length") -> None:
    """Raise a ValueError unless a global length ``n`` splits evenly for ``world`` ranks in ``layout``."""
    d = _divisor(layout, world)
    if n % d:
        pad = (-n) % d
        raise ValueError(
            f"{what} {n} does not split evenly over {world} ranks in the {layout!r} layout: it must be a "
            f"multiple of {d}{' (2 chunks per rank)' if layout == 'zigzag' else ''}. Pad it by {pad} "
            f"positions to {n + pad} (and mask the padding, e.g. salience.masks.padding(...))."
        )


def segments(n: int, rank: int, world: int, layout: str = "contiguous") -> list[tuple[int, int]]:
    """The runs ``(start, length)`` of global positions held by ``rank``, in local order.

    Args:
        n: global sequence length (a multiple of ``world``, or of ``2 * world`` for zigzag).
        rank, world: this rank and the number of ranks.
        layout: ``"contiguous"`` or ``"zigzag"``.

    Example:
        >>> segments(12, 1, 3, "zigzag")
        [(2, 2), (8, 2)]
    """
    _check_int(world, "world", 1)
    _check_int(rank, "rank", 0)
    _check_int(n, "n", 1)
    if rank >= world:
        raise ValueError(f"rank must be < world; got rank {rank} with world {world}.")
    check_layout(layout)
    check_length(n, world, layout)
    if layout == "contiguous":
        m = n // world
        return [(rank * m, m)]
    c = n // (2 * world)
    return [(rank * c, c), ((2 * world - 1 - rank) * c, c)]


def positions(n: int, rank: int, world: int, layout: str = "contiguous", device=None) -> torch.Tensor:
    """Global positions (int64, shape ``(n / world,)``) of the tokens ``rank`` holds, in local order.

    Feed them to position encodings (RoPE angles, ALiBi) so that a shard is encoded as in the full sequence.

    Example:
        >>> positions(6, 1, 3).tolist()
        [2, 3]
    """
    segs = segments(n, rank, world, layout)
    return torch.cat([torch.arange(s, s + m, device=device) for s, m in segs])


def _check_dim(x: torch.Tensor, dim: int, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension to shard; got a scalar.")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}; got {dim!r}.")
    return dim % x.dim()


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The part of a global tensor that ``rank`` holds.

    Args:
        x: a global tensor, e.g. q/k/v ``(B, H, N, D)`` (``dim=2``, the default) or document ids ``(N,)``
            (``dim=0``).
        rank, world: this rank and the number of ranks.
        layout: ``"contiguous"`` or ``"zigzag"`` (see the module docstring).
        dim: the sequence dimension.

    Returns:
        ``(..., N / world, ...)``: a view for ``"contiguous"``, a new tensor for ``"zigzag"``.

    Example:
        >>> shard(torch.arange(6), 2, 3, dim=0).tolist()
        [4, 5]
    """
    d = _check_dim(x, dim, "x")
    segs = segments(x.shape[d], rank, world, layout)
    parts = [x.narrow(d, s, m) for s, m in segs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)


def unshard(parts, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """Reassemble the global tensor from every rank's shard (a sequence in rank order).

    The inverse of :func:`shard`: ``unshard([shard(x, r, W, layout) for r in range(W)], layout) == x``.
    Inside a process group, gather the shards first (``torch.distributed.all_gather``) or use
    :func:`salience.distributed.gather`.

    Example:
        >>> unshard([torch.tensor([0, 3]), torch.tensor([1, 2])], layout="zigzag", dim=0).tolist()
        [0, 1, 2, 3]
    """
    if isinstance(parts, torch.Tensor) or not hasattr(parts, "__len__") or len(parts) == 0:
        raise TypeError("parts must be a non-empty list of tensors, one shard per rank in rank order.")
    check_layout(layout)
    d = _check_dim(parts[0], dim, "parts[0]")
    shape0 = tuple(parts[0].shape)
    for i, p in enumerate(parts):
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != shape0:
            seen = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"parts[{i}] has shape {seen} but parts[0] has {shape0}; every shard must have one shape.")
    if layout == "contiguous":
        return torch.cat(list(parts), dim=d)
    n = parts[0].shape[d]
    if n % 2:
        raise ValueError(f"zigzag shards hold two equal chunks, so their length along dim {d} must be even; got {n}.")
    c = n // 2
    first = [p.narrow(d, 0, c) for p in parts]
    second = [p.narrow(d, c, c) for p in parts]
    return torch.cat(first + second[::-1], dim=d)
