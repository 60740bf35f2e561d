"""salience._memory.zeros: key/value cache tensors in transparent huge pages."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from salience import _memory


def _anon_huge_kib() -> int:
    for line in open(f"/proc/{os.getpid()}/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_zeros_is_torch_zeros(dtype):
    for shape in [(3, 5), (2, 4, 1024, 128), (1, 8, 4096, 64), (0, 4)]:
        t = _memory.zeros(*shape, dtype=dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
        assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    assert _memory.zeros((2, 3), dtype=dtype).shape == (2, 3)


def test_big_tensors_are_aligned_writable_and_outlive_their_mapping_object():
    t = _memory.zeros(4, 1024, 1024, dtype=torch.bfloat16)  # 8 MiB
    if not _memory.huge_pages_offered():
        pytest.skip("this Linux offers no transparent huge pages (or this is not Linux)")
    assert t.data_ptr() % _memory.HUGE_PAGE == 0
    gc.collect()  # the mmap object is referenced only by the tensor's storage
    t[1, 2, 3] = 7.0
    t[-1, -1, -1] = -2.0
    assert float(t.sum()) == 5.0
    view = t[2:]
    del t
    gc.collect()
    view.fill_(1.0)
    assert float(view.sum()) == 2 * 1024 * 1024


def test_pages_are_huge_when_linux_offers_them():
    if not _memory.huge_pages_offered() or not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"):
        pytest.skip("no transparent huge pages here")
    before = _anon_huge_kib()
    t = _memory.zeros(16, 1024, 1024, dtype=torch.float32)  # 64 MiB
    t.fill_(1.0)  # first touch
    gained = _anon_huge_kib() - before
    # the kernel may decline some pages under memory pressure or fragmentation; most of them must be huge
    assert gained >= 32 * 1024, f"only {gained} KiB of the 64 MiB tensor is in huge pages"


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-negative ints"):
        _memory.zeros(2, -1)
    with pytest.raises(ValueError, match="non-negative ints"):
        _memory.zeros(2.0, 3)
    with pytest.raises(TypeError, match="torch.dtype"):
        _memory.zeros(2, 3, dtype="float32")


def test_kvcache_zeros_is_exported_and_the_layer_cache_uses_huge_pages():
    """salience.kvcache.zeros is the same allocator; MultiHeadAttention's KVCache puts CPU buffers of 2 MiB or
    more on 2 MiB boundaries (huge pages where offered) and keeps appending correctly."""
    from salience import kvcache
    from salience.layers import KVCache

    assert kvcache.zeros is _memory.zeros
    c = KVCache(max_length=4096)
    k, v = torch.randn(1, 2, 5, 128), torch.randn(1, 2, 5, 128)
    ka, va = c.append(k, v)
    kb, vb = c.buffers
    assert kb.shape == (1, 2, 4096, 128) and torch.equal(ka, k) and torch.equal(va, v)
    if _memory.huge_pages_offered():
        assert kb.data_ptr() % _memory.HUGE_PAGE == 0 and vb.data_ptr() % _memory.HUGE_PAGE == 0
    k2 = torch.randn(1, 2, 3, 128)
    ka, _ = c.append(k2, k2)
    assert torch.equal(ka, torch.cat([k, k2], dim=2))
