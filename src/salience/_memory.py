"""CPU tensors in transparent huge pages, for key/value caches that every decoding step reads end to end.

A decoding step reads the whole cache once, so it runs at the speed memory delivers it. With the kernel's default
4 KiB pages, every 4 KiB of a cache (16 bfloat16 keys of 128 values) is a new page: a TLB miss, and a place where
the hardware prefetchers stop. Memory advised as huge pages (2 MiB, ``madvise(MADV_HUGEPAGE)`` before the first
touch) removes both. ``benchmarks/decode_bench.py`` reports both allocations: on the machine it ran on, a paged
bfloat16 pool (blocks of 16 keys) was read at 63-75% of copy bandwidth in huge pages against 49-50% in 4 KiB pages,
while single contiguous caches gained little.

:func:`zeros` is ``torch.zeros`` for such memory. It falls back to ``torch.zeros`` (the same values, ordinary
pages) for tensors under 2 MiB, off Linux, or where Python's ``mmap`` has no ``MADV_HUGEPAGE``; whether the kernel
then hands out huge pages depends on ``/sys/kernel/mm/transparent_hugepage/enabled`` (``always`` or ``madvise``:
yes; ``never``: no). The tensor owns its mapping: it is released when the last tensor viewing it is freed.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from pathlib import Path

import torch

__all__ = ["zeros", "huge_pages_offered"]

HUGE_PAGE = 2 << 20


def huge_pages_offered() -> bool:
    """Whether this process can ask Linux for transparent huge pages (``madvise`` or ``always`` mode)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def zeros(*shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled CPU tensor of ``shape`` and ``dtype``, 2 MiB-aligned in memory advised as huge pages where
    Linux offers them (else ``torch.zeros``). Contiguous and writable like any tensor.

    Example:
        >>> import torch
        >>> from salience import _memory
        >>> k_cache = _memory.zeros(1, 8, 4096, 128, dtype=torch.bfloat16)   # (B, Hkv, S_max, D), 8 MiB
        >>> k_cache.shape, k_cache.dtype, bool((k_cache == 0).all()), k_cache.is_contiguous()
        (torch.Size([1, 8, 4096, 128]), torch.bfloat16, True, True)
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"zeros: the shape must be non-negative ints; got {shape!r}.")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"zeros: dtype must be a torch.dtype; got {dtype!r}.")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not huge_pages_offered():
        return torch.zeros(shape, dtype=dtype)
    # private anonymous memory (a shared mapping would be shmem, which has its own huge-page switch); one extra
    # huge page of room so that the tensor can start on a 2 MiB boundary
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the pages are allocated huge when first written
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = (-start) % HUGE_PAGE
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)  # keeps buf alive
    return flat.view(dtype).view(shape)
