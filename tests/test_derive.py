"""kernels.derive: structures of mask callables (row intervals or block maps with bits), their cache, and the
executors built on them, against the callable's dense evaluation and the float64 reference."""

from __future__ import annotations

import gc

import pytest
import torch

from salience import masks as M
from salience import reference
from salience import scores as Sc
from salience.blocks import EMPTY, FULL, PARTIAL
from salience.kernels import derive, fused
from salience.testing import assert_rel_close


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: one thread is faster and immune to a busy machine's thread contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fresh_cache():
    derive.clear_cache()
    yield
    derive.clear_cache()


def dense(fn, B, H, L, S, q_offset=0, kv_offset=0):
    """The callable evaluated on every (b, h, q, kv) at global indices: bool (B, H, L, S)."""
    out = torch.zeros(B, H, L, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            qi = torch.arange(q_offset, q_offset + L).view(-1, 1)
            ki = torch.arange(kv_offset, kv_offset + S).view(1, -1)
            out[b, h] = torch.as_tensor(fn(torch.tensor(b), torch.tensor(h), qi, ki)).expand(L, S)
    return out


LENGTHS = torch.tensor([70, 130])


def window(b, h, q, kv):
    return (q >= kv) & (q - kv <= 40)


def per_head_window(b, h, q, kv):
    return (q >= kv) & (q - kv <= 5 + 17 * h)


def per_batch_padding(b, h, q, kv):
    return (kv < LENGTHS[b]) & (kv <= q)


def checkerboard(b, h, q, kv):
    return ((q // 64 + kv // 64) % 2 == 0) & (q >= kv)


def stripes(b, h, q, kv):
    return (q + kv + h) % 3 == 0


def per_batch_stride(b, h, q, kv):
    return kv % (b + 2) == 0


INTERVAL_MASKS = [(window, (1, 1)), (per_head_window, (1, 3)), (per_batch_padding, (2, 1))]
BLOCK_MASKS = [(checkerboard, (1, 1)), (stripes, (1, 3)), (per_batch_stride, (2, 1))]


# ------------------------------------------------------------------------------------------ derivation


@pytest.mark.parametrize("fn,ext", INTERVAL_MASKS, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("L,S", [(150, 150), (200, 131), (64, 300)])
def test_intervals_equal_dense(fn, ext, L, S):
    st = derive.structure(fn, 2, 3, L, S)
    assert isinstance(st, derive.Intervals)
    assert tuple(st.lo.shape[:2]) == ext  # evaluated only over the extents the mask depends on
    want = dense(fn, 2, 3, L, S)
    assert torch.equal(st.to_dense().expand(2, 3, L, S), want)
    empty = ~want.any(-1)
    assert bool((st.lo[empty.view(st.lo.shape[0], -1, L)[:, : st.lo.shape[1]]] == 0).all())


@pytest.mark.parametrize("fn,ext", BLOCK_MASKS, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("L,S", [(150, 150), (200, 131), (130, 300)])
def test_block_map_equals_dense(fn, ext, L, S):
    st = derive.structure(fn, 2, 3, L, S)
    assert isinstance(st, derive.BlockMap)
    assert tuple(st.classes.shape[:2]) == ext
    want = dense(fn, 2, 3, L, S)
    assert torch.equal(st.to_dense().expand(2, 3, L, S), want)
    # classes agree with the bits they summarise, and only partial tiles carry bits
    t = st.tile
    c = st.classes
    assert int((st.index >= 0).sum()) == st.bits.shape[0] == int((c == PARTIAL).sum())
    for i in range(c.shape[2]):
        for j in range(c.shape[3]):
            tile = want[: c.shape[0], : c.shape[1], i * t:(i + 1) * t, j * t:(j + 1) * t]
            expect = FULL if bool(tile.all()) else (EMPTY if not bool(tile.any()) else PARTIAL)
            assert bool((c[:, :, i, j] == expect).all())


def test_classes_at_coarser_tiles_and_hidden():
    st = derive.structure(checkerboard, 1, 1, 300, 300)
    want = dense(checkerboard, 1, 1, 300, 300)[0, 0]
    c = st.classes_at(128, 128)[0, 0]
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            tile = want[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert int(c[i, j]) == (FULL if bool(tile.all()) else EMPTY if not bool(tile.any()) else PARTIAL)
    assert torch.equal(st.hidden(128, 256, 64, 300)[0, 0], ~want[128:256, 64:300])
    iv = derive.structure(window, 1, 1, 300, 300)
    assert torch.equal(iv.hidden(128, 256, 64, 300)[0, 0], ~dense(window, 1, 1, 300, 300)[0, 0, 128:256, 64:300])
    ci = iv.classes_at(64, 64)[0, 0]
    wd = dense(window, 1, 1, 300, 300)[0, 0]
    for i in range(ci.shape[0]):
        for j in range(ci.shape[1]):
            tile = wd[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64]
            if bool(tile.all()):
                assert int(ci[i, j]) == FULL
            if not bool(tile.any()):
                assert int(ci[i, j]) in (EMPTY, PARTIAL)  # partial for an empty tile only costs work
            else:
                assert int(ci[i, j]) in (FULL, PARTIAL) and (int(ci[i, j]) == PARTIAL) == (not bool(tile.all()))


def test_offsets_evaluate_global_indices():
    st = derive.structure(checkerboard, 1, 1, 100, 90, q_offset=70, kv_offset=30)
    assert torch.equal(st.to_dense()[0, 0], dense(checkerboard, 1, 1, 100, 90, 70, 30)[0, 0])
    iv = derive.structure(window, 1, 1, 100, 90, q_offset=70, kv_offset=30)
    assert torch.equal(iv.to_dense()[0, 0], dense(window, 1, 1, 100, 90, 70, 30)[0, 0])


def test_vmap_only_callable_and_maskmods():
    doc = torch.tensor([[0] * 50 + [1] * 30 + [2] * 70])

    def same_doc(b, h, q, kv):  # chained indexing: only FlexAttention's vmap semantics evaluate it right
        return doc[b][q] == doc[b][kv]

    st = derive.structure(same_doc, 1, 2, 150, 150)
    assert isinstance(st, derive.Intervals)
    want = doc[0].view(-1, 1) == doc[0].view(1, -1)
    assert torch.equal(st.to_dense()[0, 0], want)
    combo = M.causal() & checkerboard
    bm = derive.structure(combo, 1, 1, 150, 150)
    assert torch.equal(bm.to_dense()[0, 0], dense(checkerboard, 1, 1, 150, 150)[0, 0])


def test_bad_callable_is_refused_with_a_reason():
    with pytest.raises((TypeError, ValueError), match="mask"):
        derive.structure(lambda b, h, q, kv: q - kv, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="L must be"):
        derive.structure(window, 1, 1, 0, 16)


# ------------------------------------------------------------------------------------------ the cache


def test_cache_hits_misses_and_keys():
    f = lambda b, h, q, kv: (q >= kv) & (q - kv <= 7)  # noqa: E731
    a = derive.structure(f, 1, 2, 64, 64)
    assert derive.structure(f, 1, 2, 64, 64) is a  # same object: hit
    assert derive.structure(f, 3, 5, 64, 64) is a  # does not depend on b or h: B and H are not in the key
    assert derive.structure(M.as_mask_mod(f), 1, 2, 64, 64) is a  # salience's wrappers key on the user's object
    info = derive.cache_info()
    assert (info["hits"], info["misses"]) == (3, 1)
    g = lambda b, h, q, kv: (q >= kv) & (q - kv <= 7)  # noqa: E731
    assert derive.structure(g, 1, 2, 64, 64) is not a  # new callable
    assert derive.structure(f, 1, 2, 64, 65) is not a  # new shape
    assert derive.structure(f, 1, 2, 64, 64, q_offset=3) is not a  # new offsets
    assert derive.structure(f, 1, 2, 64, 64, device="cpu:0") is not a  # the device is part of the key
    assert derive.cache_info()["misses"] == 5
    hb = derive.structure(per_batch_padding, 2, 1, 64, 64)
    assert derive.structure(per_batch_padding, 2, 4, 64, 64) is hb  # depends on b only: H is not in the key


def test_cache_is_bounded_and_frees_dead_callables():
    old = derive.set_cache_size(3)
    try:
        def make(w):
            return lambda b, h, q, kv: (q - kv <= w) & (q >= kv)

        fns = [make(w) for w in range(5)]
        for f in fns:
            derive.structure(f, 1, 1, 32, 32)
        info = derive.cache_info()
        assert info["size"] == 3 and info["evictions"] == 2
        derive.structure(fns[0], 1, 1, 32, 32)  # evicted: derived again
        assert derive.cache_info()["misses"] == 6
    finally:
        derive.set_cache_size(old)
    derive.clear_cache()
    f = lambda b, h, q, kv: q >= kv  # noqa: E731
    derive.structure(f, 1, 1, 32, 32)
    assert derive.cache_info()["size"] == 1
    del f
    gc.collect()
    assert derive.cache_info()["size"] == 0


def test_stale_closure_is_rederived_and_cache_false_stores_nothing():
    lengths = torch.tensor([40])
    f = lambda b, h, q, kv: kv < lengths[b]  # noqa: E731
    a = derive.structure(f, 1, 1, 64, 64)
    assert int(a.hi[0, 0, 0]) == 40
    lengths[0] = 20  # mutated in place: the version counter changes
    b = derive.structure(f, 1, 1, 64, 64)
    assert int(b.hi[0, 0, 0]) == 20 and derive.cache_info()["stale"] == 1
    before = derive.cache_info()["size"]
    c = derive.structure(lambda b_, h, q, kv: q >= kv, 1, 1, 64, 64, cache=False)
    assert isinstance(c, derive.Intervals) and derive.cache_info()["size"] == before


# ------------------------------------------------------------------------------------------ executors


def _check(fn, *, B=1, H=2, Hkv=2, L=150, S=150, D=16, score_mod=None, q_offset=0, kv_offset=0, expect=None,
           dtype=torch.float32):
    torch.manual_seed(0)
    q64 = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    k64 = torch.randn(B, Hkv, S, D, dtype=torch.float64, requires_grad=True)
    v64 = torch.randn(B, Hkv, S, D, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.detach().to(dtype) for t in (q64, k64, v64))
    mask = fn if (q_offset, kv_offset) == (0, 0) else M.shift(fn, q_offset, kv_offset)
    ex, det = derive.executor(fn, q, k, v, scale=0.3, score_mod=score_mod, q_offset=q_offset, kv_offset=kv_offset)
    if expect is not None:
        assert det["executor"] == expect, det
    out, lse = ex.forward(q, k, v)
    ref64 = reference.attention(q64, k64, v64, mask=mask, score_mod=score_mod, scale=0.3)
    qt, kt, vt = (t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64))
    reft = reference.attention(qt, kt, vt, mask=mask, score_mod=score_mod, scale=0.3)
    assert_rel_close(out, reft.out, ref64.out, what="out")
    assert_rel_close(lse, reft.lse, ref64.lse, what="lse")
    do = torch.randn(out.shape, dtype=torch.float64)
    ref64.out.backward(do)
    reft.out.backward(do.to(dtype))
    dq, dk, dv, _ = ex.backward(q, k, v, out, lse, do.to(dtype), None)
    mag = float(do.abs().max() * v64.detach().abs().max() * k64.detach().abs().max() * 0.3)
    for name, g, gt, g64 in (("dq", dq, qt.grad, q64.grad), ("dk", dk, kt.grad, k64.grad),
                             ("dv", dv, vt.grad, v64.grad)):
        assert_rel_close(g, gt, g64, what=name, magnitude=mag)
    return out, lse, (dq, dk, dv)


@pytest.mark.parametrize("fn,expect", [(window, "Spans"), (per_head_window, "Spans"), (per_batch_padding, "Spans"),
                                       (checkerboard, "BlockMapExecutor"), (stripes, "BlockMapExecutor"),
                                       (per_batch_stride, "BlockMapExecutor")],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_executor_matches_reference(fn, expect):
    _check(fn, B=2, H=4, Hkv=2, L=200, S=333, expect=expect)  # GQA and L != S


@pytest.mark.parametrize("fn", [window, checkerboard], ids=lambda f: f.__name__)
def test_executor_offsets_and_dtypes(fn):
    _check(fn, L=130, S=170, q_offset=64, kv_offset=20)
    _check(fn, L=100, S=100, dtype=torch.float64)
    _check(fn, L=100, S=100, dtype=torch.bfloat16)


@pytest.mark.parametrize("fn", [window, checkerboard, per_batch_stride], ids=lambda f: f.__name__)
def test_executor_with_softcap_runs_the_tile_kernel_on_the_structure(fn):
    _check(fn, B=2, H=4, Hkv=2, L=200, S=260, score_mod=Sc.softcap(4.0), expect="Tiles")


def test_generic_score_mod_gets_its_extra_gradient():
    torch.manual_seed(1)
    table = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def mod(s, b, h, q, kv):
        return s + table[h]

    q, k, v = (torch.randn(1, 4, 130, 8, dtype=torch.float64) for _ in range(3))
    ex, det = derive.executor(checkerboard, q, k, v, scale=0.3, score_mod=mod, grad_tensors=(table,))
    out, lse = ex.forward(q, k, v)
    do = torch.randn_like(out)
    extra = ex.backward(q, k, v, out, lse, do, None)[3]
    ref = reference.attention(q, k, v, mask=checkerboard, score_mod=mod, scale=0.3)
    (g,) = torch.autograd.grad(ref.out, table, do)
    assert torch.allclose(out, ref.out, atol=1e-12) and torch.allclose(extra[0], g, atol=1e-10)


@pytest.mark.parametrize("fn", [
    lambda b, h, q, kv: (q >= 70) & (kv <= q),  # intervals: rows 0..69 see nothing
    lambda b, h, q, kv: ((q // 64 + kv // 64) % 2 == 0) & (q >= 70) & (kv <= q),  # block map
])
def test_fully_masked_rows_are_zero(fn):
    out, lse, grads = _check(fn, L=200, S=200)
    assert bool((out[:, :, :70] == 0).all()) and bool(torch.isneginf(lse[:, :, :70]).all())
    assert bool((grads[0][:, :, :70] == 0).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("fn", [
    lambda b, h, q, kv: (kv // 50) % 3 != 1,  # keys 50..99, 200..249 hidden from every row (block map)
    lambda b, h, q, kv: (kv < 100) & (kv <= q),  # keys >= 100 hidden from every row (intervals)
])
def test_extreme_values_in_hidden_keys_change_nothing(fn):
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 260, 16) for _ in range(3))
    hidden = ~dense(fn, 1, 1, 260, 260)[0, 0].any(0)
    ex, _ = derive.executor(fn, q, k, v, scale=0.25)
    out, lse = ex.forward(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, hidden] = 1e4
    v2[:, :, hidden] = 3e38
    out2, lse2 = ex.forward(q, k2, v2)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    v2[:, :, hidden] = 1e30  # the backward's dP = dout . v must stay finite (3e38 * D overflows in any kernel)
    dq, dk, dv, _ = ex.backward(q, k2, v2, out2, lse2, torch.ones_like(out2), None)
    ref = ex.backward(q, k, v, out, lse, torch.ones_like(out), None)
    assert torch.equal(dq, ref[0]) and torch.equal(dv[:, :, ~hidden], ref[2][:, :, ~hidden])
    assert all(bool(torch.isfinite(g).all()) for g in (dq, dk, dv))


def test_named_masks_are_not_derived():
    q = torch.randn(1, 1, 64, 8)
    for named in (M.causal(), M.causal() & M.sliding_window(8), M.document(torch.tensor([0] * 30 + [1] * 34)),
                  M.shift(M.sliding_window(4), 2, 0)):
        assert derive.executor(named, q, q, q, scale=0.3) is None
    assert derive.executor(None, q, q, q, scale=0.3) is None
    assert derive.executor(M.causal() & checkerboard, q, q, q, scale=0.3) is not None  # a callable inside


def test_reuse_skips_evaluation():
    calls = []

    def counted(b, h, q, kv):
        calls.append(1)
        return ((q // 64 + kv // 64) % 2 == 0) & (q >= kv)

    q = torch.randn(1, 2, 256, 16)
    for _ in range(3):  # three "layers" with one callable
        ex, _ = derive.executor(counted, q, q, q, scale=0.25)
        ex.forward(q, q, q)
    n = len(calls)
    ex, _ = derive.executor(counted, q, q, q, scale=0.25)
    ex.forward(q, q, q)
    assert len(calls) == n and derive.cache_info()["hits"] >= 3


@pytest.mark.skipif(not fused.available(torch.zeros(1)), reason="torch's fused CPU kernel is unavailable")
def test_block_map_executor_groups_full_runs():
    f = lambda b, h, q, kv: (kv <= q) & (kv // 256 != 2)  # noqa: E731  (rows >= 768: two runs of keys)
    q = torch.randn(1, 1, 1024, 8)
    ex, det = derive.executor(f, q, q, q, scale=0.3)
    assert det["executor"] == "BlockMapExecutor"
    assert det["fused_calls"] > det["biased_calls"]  # runs of full tiles go unbiased


def test_block_map_executor_on_intervals_matches_reference():
    """Interval structures whose span plans would waste work run on the row-block plan of the executor."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 300, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    st = derive.structure(per_head_window, 2, 4, 300, 300)
    ex = derive.BlockMapExecutor(st, 2, 4, 300, 300, scale=0.3, dtype=q.dtype, row_block=128)
    out, lse = ex.forward(q, k, v)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = reference.attention(qr, kr, vr, mask=per_head_window, scale=0.3)
    do = torch.randn_like(out)
    ref.out.backward(do)
    dq, dk, dv, _ = ex.backward(q, k, v, out, lse, do, None)
    for got, want in ((out, ref.out), (lse, ref.lse), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("fn", [window, checkerboard], ids=lambda f: f.__name__)
def test_through_the_dispatcher_run_with_autograd(fn):
    """The executor runs under salience's one autograd Function (saving q, k, v, out, lse only)."""
    from salience.kernels import dispatch

    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 200, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ex, det = derive.executor(fn, q, k, v, scale=0.3, need_grad=True)
    assert ex.autograd is False and ex.grad_tensors == () and all(isinstance(w, str) for w in ex.describe())
    res = dispatch.run(dispatch.Plan("blockwise", "derived structure", det, ex), q, k, v)
    do = torch.randn_like(res.out)
    got = torch.autograd.grad(res.out, (q, k, v), do)
    ref = reference.attention(q, k, v, mask=fn, scale=0.3)
    want = torch.autograd.grad(ref.out, (q, k, v), do)
    assert torch.allclose(res.out, ref.out, atol=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)


def test_short_chains_fall_back_to_row_blocks():
    """Query tiles whose full key tiles are not nested (here one scattered tile each) run in blocks of rows."""
    def scattered(b, h, q, kv):
        return (kv // 64 == (q // 64 * 5) % 8) | ((kv % 7 == 0) & (kv <= q))

    out, lse, _ = _check(scattered, L=512, S=512, expect="BlockMapExecutor")
    q = torch.randn(1, 2, 512, 16)
    assert derive.executor(scattered, q, q, q, scale=0.3)[1]["chains"] == 0


def test_combinations_key_on_their_structure():
    """``causal() & fn`` is re-bound by every call (a new object each time): it keys on its typed structure,
    holding ``fn`` weakly."""
    def fn(b, h, q, kv):
        return (q // 64 + kv // 64) % 2 == 0

    combo = M.causal() & fn
    a = derive.structure(combo.bind(150, 150), 1, 1, 150, 150)
    assert derive.structure(combo.bind(150, 150), 1, 1, 150, 150) is a  # another bound copy: hit
    assert derive.structure(M.causal() & fn, 1, 1, 150, 150) is a  # the same structure built again: hit
    assert torch.equal(a.to_dense()[0, 0], dense(checkerboard, 1, 1, 150, 150)[0, 0])
    other = M.sliding_window(8) & fn
    assert derive.structure(other, 1, 1, 150, 150) is not a
    assert derive.cache_info()["size"] == 2
    del fn, combo, other
    gc.collect()
    assert derive.cache_info()["size"] == 0


def _bias_fn(mod, H):
    """d -> (H, n): an additive relative score_mod evaluated at offsets d = kv_idx - q_idx (as the dispatcher does)."""
    def fn(d):
        q0 = max(0, -int(d.min()))
        z = torch.zeros(1, H, 1, d.numel(), dtype=torch.float64)
        b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        h = torch.arange(H).view(1, -1, 1, 1)
        return mod(z, b, h, torch.full((1, 1, 1, 1), q0), (q0 + d).view(1, 1, 1, -1)).view(H, -1)

    return fn


@pytest.mark.parametrize("fn,expect", [(window, ("Interval", "Tiles")), (checkerboard, ("Tiles",))],
                         ids=["window", "checkerboard"])
def test_relative_bias_on_derived_structures(fn, expect):
    torch.manual_seed(5)
    mod = Sc.alibi(4)
    q, k, v = (torch.randn(1, 4, 200, 8, dtype=torch.float64) for _ in range(3))
    ex, det = derive.executor(fn, q, k, v, scale=0.3, relative_bias=_bias_fn(mod, 4))
    assert det["executor"] in expect
    out, lse = ex.forward(q, k, v)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = reference.attention(qr, kr, vr, mask=fn, score_mod=mod, scale=0.3)
    do = torch.randn_like(out)
    ref.out.backward(do)
    dq, dk, dv, _ = ex.backward(q, k, v, out, lse, do, None)
    for got, want in ((out, ref.out), (lse, ref.lse), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert torch.allclose(got, want, atol=1e-9)
    with pytest.raises(ValueError, match="not both"):
        derive.executor(fn, q, k, v, scale=0.3, relative_bias=_bias_fn(mod, 4), score_mod=mod)


@pytest.mark.parametrize("fn", [per_batch_stride, per_head_window, stripes], ids=lambda f: f.__name__)
def test_small_evaluation_budget_chunks_rows_batches_and_heads(fn):
    st = derive.structure(fn, 3, 2, 150, 130, cache=False, eval_elements=1000)
    want = dense(fn, 3, 2, 150, 130)
    assert torch.equal(st.to_dense().expand(3, 2, 150, 130), want)
