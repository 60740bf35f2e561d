"""Decoding under torch.compile(fullgraph=True) and torch.export: the custom ops salience::decode_forward and
salience::kvcache_append (kernels/ops.py) against eager attention_with_kvcache / salience.attention and the float64
reference; in-place cache writes visible after the compiled call; no recompiles when the lengths change."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import salience
from salience import kvcache, masks, scores
from salience.kernels import ops
from salience.testing import assert_rel_close

B, H, HKV, D, CAP = 3, 8, 2, 16, 48


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh (functions defined in a test share code objects across parameters)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = {
    "window": (masks.sliding_window(7, align="bottom_right"), None),
    "alibi": (masks.causal(align="bottom_right"), scores.alibi(H, offset=CAP)),
    "softcap": (masks.causal(align="bottom_right"), scores.softcap(2.0)),
    "none_temperature": (None, scores.temperature(1.5)),
}


def _has(targets, op: str) -> bool:
    """True when an FX graph's call targets include the custom op ``op`` (packet or overload)."""
    return any(t == op or t.startswith(op + ".") for t in targets)


def _caches(dtype, paged, block_size=4):
    """NaN-filled caches (a slot read by mistake poisons the result); paged: a shuffled pool with spare blocks."""
    if not paged:
        kc = torch.full((B, HKV, CAP, D), float("nan"), dtype=dtype)
        return kc, kc.clone(), None
    nb = CAP // block_size
    perm = torch.randperm(B * nb + 5)[: B * nb].view(B, nb)
    kc = torch.full((B * nb + 5, HKV, block_size, D), float("nan"), dtype=dtype)
    return kc, kc.clone(), perm


def _prefill(kc, vc, bt, lens, dtype):
    k = torch.randn(B, HKV, max(lens), D).to(dtype)
    v = torch.randn(B, HKV, max(lens), D).to(dtype)
    for b, n in enumerate(lens):
        kvcache.append_checked(kc[b:b + 1] if bt is None else kc, vc[b:b + 1] if bt is None else vc,
                               k[b:b + 1, :, :n], v[b:b + 1, :, :n], torch.tensor([0]),
                               None if bt is None else bt[b:b + 1])


def _reference(q, kc, vc, bt, total, mask, mod, res):
    for b in range(q.shape[0]):
        S = int(total[b])
        kb, vb = kvcache.gather(kc, b, S, bt), kvcache.gather(vc, b, S, bt)
        qb = q[b:b + 1]
        r64 = salience.reference.attention(qb.double(), kb.double(), vb.double(), mask=mask, score_mod=mod)
        rt = salience.reference.attention(qb, kb, vb, mask=mask, score_mod=mod)
        assert_rel_close(res.out[b:b + 1], rt.out, r64.out, what=f"compiled decode, sequence {b} (S={S})")
        assert_rel_close(res.lse[b:b + 1], rt.lse, r64.lse, what=f"compiled decode lse, sequence {b}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_step_equals_eager_and_reference(case, paged, dtype):
    mask, mod = CASES[case]
    torch.manual_seed(0)
    kc, vc, bt = _caches(dtype, paged)
    lens = [5, 0, 30]
    _prefill(kc, vc, bt, lens, dtype)
    kc_e, vc_e = kc.clone(), vc.clone()

    def step(q, kc, vc, k, v, seqlens, bt):
        return kvcache.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=bt, mask=mask,
                                              score_mod=mod, return_lse=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    seqlens = torch.tensor(lens)
    for _ in range(3):  # three decoding steps: the lengths (a tensor) change, the graph does not
        q = torch.randn(B, H, 1, D).to(dtype)
        k, v = torch.randn(B, HKV, 1, D).to(dtype), torch.randn(B, HKV, 1, D).to(dtype)
        with torch.no_grad():
            got = compiled(q, kc, vc, k, v, seqlens, bt)
            want = step(q, kc_e, vc_e, k, v, seqlens, bt)
        # the compiled call wrote the new token into the caller's cache, exactly as eager did
        assert torch.equal(kc.nan_to_num(7.0), kc_e.nan_to_num(7.0))
        assert torch.equal(vc.nan_to_num(7.0), vc_e.nan_to_num(7.0))
        for b, n in enumerate(seqlens.tolist()):
            assert torch.equal(kvcache.gather(kc, b, n + 1, bt)[0, :, n], k[b, :, 0])
        torch.testing.assert_close(got.out, want.out, rtol=0, atol=0)
        torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=0)
        _reference(q, kc, vc, bt, seqlens + 1, mask, mod, got)
        seqlens = seqlens + 1
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for changing cache_seqlens"


def _recording_backend():
    """``(seen, backend)``: a torch.compile backend that runs the graph as traced and records its call targets."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    return seen, backend


def test_compiled_decode_uses_the_custom_ops():
    """The traced graph holds salience::kvcache_append and salience::decode_forward, not the generic op."""
    seen, backend = _recording_backend()

    mask = masks.causal(align="bottom_right")
    f = torch.compile(lambda q, kc, vc, k, v, n: salience.attention_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=n, mask=mask), backend=backend, fullgraph=True)
    kc, vc = torch.randn(1, HKV, CAP, D), torch.randn(1, HKV, CAP, D)
    f(torch.randn(1, H, 1, D), kc, vc, torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D), torch.tensor([3]))
    assert _has(seen, "salience.kvcache_append") and _has(seen, "salience.decode_forward"), seen
    assert not _has(seen, "salience.attention")


def test_inductor_step_writes_the_cache_in_place():
    """Under inductor the append stays in place on the caller's cache (no copy of the cache per step)."""
    mask = masks.sliding_window(5, align="bottom_right")
    torch.manual_seed(1)

    def step(q, kc, vc, k, v, n):
        return salience.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=n, mask=mask)

    compiled = torch.compile(step, fullgraph=True)
    kc, vc = torch.randn(2, HKV, CAP, D), torch.randn(2, HKV, CAP, D)
    kc_e, vc_e = kc.clone(), vc.clone()
    ptr = kc.data_ptr()
    for n in ([3, 9], [4, 10]):
        q, k, v = torch.randn(2, H, 1, D), torch.randn(2, HKV, 1, D), torch.randn(2, HKV, 1, D)
        got = compiled(q, kc, vc, k, v, torch.tensor(n))
        want = step(q, kc_e, vc_e, k, v, torch.tensor(n))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert kc.data_ptr() == ptr and torch.equal(kc, kc_e) and torch.equal(vc, vc_e)


def test_compiled_salience_attention_takes_the_decode_op():
    """salience.attention with a few rows against >= decode_min_keys keys compiles to salience::decode_forward
    (the eager dispatcher's decode rule) and equals eager and the reference."""
    seen, backend = _recording_backend()

    mask, mod = masks.causal(align="bottom_right"), scores.alibi(H, offset=0)
    f = torch.compile(lambda q, k, v: salience.attention(q, k, v, mask=mask, score_mod=mod, return_lse=True),
                      backend=backend, fullgraph=True)
    q, k, v = torch.randn(2, H, 2, D), torch.randn(2, HKV, 1100, D), torch.randn(2, HKV, 1100, D)
    assert salience.plan(q, k, v, mask=mask, score_mod=mod).backend == "decode"
    got, want = f(q, k, v), salience.attention(q, k, v, mask=mask, score_mod=mod, return_lse=True)
    assert _has(seen, "salience.decode_forward") and not _has(seen, "salience.attention"), seen
    torch.testing.assert_close(got.out, want.out, rtol=0, atol=0)
    r64 = salience.reference.attention(q.double(), k.double(), v.double(), mask=mask, score_mod=mod)
    rt = salience.reference.attention(q, k, v, mask=mask, score_mod=mod)
    assert_rel_close(got.out, rt.out, r64.out, what="compiled salience.attention decode")
    assert_rel_close(got.lse, rt.lse, r64.lse, what="compiled salience.attention decode lse")


def test_compiled_salience_attention_short_cache_keeps_generic_op():
    """Below decode_min_keys (or with a gradient) the generic op is used, as eager dispatch would."""
    seen, backend = _recording_backend()

    mask = masks.causal(align="bottom_right")
    f = torch.compile(lambda q, k, v: salience.attention(q, k, v, mask=mask), backend=backend, fullgraph=True)
    q, k, v = torch.randn(1, H, 1, D), torch.randn(1, HKV, 64, D), torch.randn(1, HKV, 64, D)
    torch.testing.assert_close(f(q, k, v), salience.attention(q, k, v, mask=mask))
    assert _has(seen, "salience.attention") and not _has(seen, "salience.decode_forward"), seen


def test_export_decode_step():
    """torch.export of a decode step with a static cache: the exported program appends and attends like eager."""
    mask = masks.causal(align="bottom_right")

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kc", torch.zeros(2, HKV, CAP, D))
            self.register_buffer("vc", torch.zeros(2, HKV, CAP, D))

        def forward(self, q, k, v, n):
            return salience.attention_with_kvcache(q, self.kc, self.vc, k, v, cache_seqlens=n, mask=mask)

    torch.manual_seed(2)
    m, ref = Step(), Step()
    args = (torch.randn(2, H, 1, D), torch.randn(2, HKV, 1, D), torch.randn(2, HKV, 1, D), torch.tensor([4, 11]))
    ep = torch.export.export(m, args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("decode_forward" in t for t in targets) and any("kvcache_append" in t for t in targets), targets
    mod = ep.module()
    for n in ([4, 11], [5, 12], [20, 0]):
        args = (torch.randn(2, H, 1, D), torch.randn(2, HKV, 1, D), torch.randn(2, HKV, 1, D), torch.tensor(n))
        got, want = mod(*args), ref(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(mod.kc, ref.kc, rtol=0, atol=0)


def test_compiled_bad_lengths_and_tables_raise():
    """Values are checked when the graph runs: lengths past the cache and bad block indices raise."""
    mask = masks.causal(align="bottom_right")
    f = torch.compile(lambda q, kc, vc, k, v, n, bt: salience.attention_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=n, block_table=bt, mask=mask), backend="aot_eager", fullgraph=True)
    pool = torch.zeros(6, HKV, 4, D)
    bt = torch.tensor([[0, 1, 2], [3, 4, 5]])
    q, k, v = torch.randn(2, H, 1, D), torch.randn(2, HKV, 1, D), torch.randn(2, HKV, 1, D)
    f(q, pool, pool.clone(), k, v, torch.tensor([2, 5]), bt)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        f(q, pool, pool.clone(), k, v, torch.tensor([2, 12]), bt)  # 12 + 1 > 3 blocks * 4
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        f(q, pool, pool.clone(), k, v, torch.tensor([-1, 2]), bt)
    with pytest.raises((RuntimeError, ValueError), match="block_table"):
        f(q, pool, pool.clone(), k, v, torch.tensor([2, 5]), torch.tensor([[0, 1, 2], [3, 9, 5]]))


def test_unsupported_call_graph_breaks_with_reason():
    """A mask without one key interval per row has no compiled route: fullgraph=True raises with the reason, plain
    torch.compile runs it eagerly and still equals eager."""
    mask = masks.causal(align="bottom_right") & masks.MaskMod(lambda b, h, i, j: j % 2 == 0, "even")
    fn = lambda q, kc, vc, n: salience.attention_with_kvcache(q, kc, vc, cache_seqlens=n, mask=mask)  # noqa: E731
    q, kc = torch.randn(1, H, 1, D), torch.randn(1, HKV, CAP, D)
    with pytest.raises(Exception, match="band mask"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(q, kc, kc, torch.tensor([9]))
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(q, kc, kc, torch.tensor([9])),
                               fn(q, kc, kc, torch.tensor([9])))


def test_decode_forward_op_fake_shapes_and_checks():
    """The op's fake gives out (B, H, L, Dv) in q's dtype and lse (B, H, L) float32, and refuses bad shapes at
    trace time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 8, 3, 16, dtype=torch.bfloat16), torch.empty(2, 2, 40, 16,
                                                                              dtype=torch.bfloat16), \
            torch.empty(2, 2, 40, 24, dtype=torch.bfloat16)
        lo = hi = torch.empty(2, 3, dtype=torch.long)
        out, lse = torch.ops.salience.decode_forward(q, k, v, lo, hi, None, None, None, None, 0.25, None)
        assert out.shape == (2, 8, 3, 24) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 8, 3) and lse.dtype == torch.float32
        with pytest.raises(ValueError, match="lo"):
            torch.ops.salience.decode_forward(q, k, v, torch.empty(2, 2, dtype=torch.long), hi, None, None, None,
                                              None, 0.25, None)
    assert ops.decode_route_key(masks.causal(align="bottom_right"), None) >= 0


def test_compiled_attend_without_append_with_sinks_and_int_lengths():
    """No new keys (attend to the cache as it is), sinks, a paged pool and cache_seqlens as a Python int that
    changes between calls: no graph break, eager's answer each time, and the reference's."""
    torch.manual_seed(4)
    mask = masks.sliding_window(5, align="bottom_right")
    kc, vc, bt = _caches(torch.float32, True)
    _prefill(kc, vc, bt, [40, 40, 40], torch.float32)
    sinks = torch.randn(H)

    def attend(q, kc, vc, n, bt, sinks):
        return salience.attention_with_kvcache(q, kc, vc, cache_seqlens=n, block_table=bt, mask=mask, sinks=sinks,
                                               return_lse=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    for n in (12, 13, 14, 40):
        q = torch.randn(B, H, 2, D)
        got, want = compiled(q, kc, vc, n, bt, sinks), attend(q, kc, vc, n, bt, sinks)
        torch.testing.assert_close(got.out, want.out, rtol=0, atol=0)
        torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=0)
        for b in range(B):
            kb, vb = kvcache.gather(kc, b, n, bt), kvcache.gather(vc, b, n, bt)
            r64 = salience.reference.attention(q[b:b + 1].double(), kb.double(), vb.double(), mask=mask,
                                               sinks=sinks.double())
            rt = salience.reference.attention(q[b:b + 1], kb, vb, mask=mask, sinks=sinks)
            assert_rel_close(got.out[b:b + 1], rt.out, r64.out, what=f"n={n}, sequence {b}")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 int lengths"
