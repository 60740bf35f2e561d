"""The fast exact kernels against the float64 reference, forward and backward (relative-error rule).

Tile, block and chunk sizes are shrunk so that small problems cross many tiles, chunks and band blocks:
every online-softmax merge, partial tile and batched call is exercised at sizes that run in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

import salience
from salience import masks as M
from salience import reference, structure
from salience import scores as Sc
from salience.blocks import EMPTY, FULL, PARTIAL
from salience.kernels import blockwise, native
from salience.kernels import config as kconfig
from salience.kernels.blockwise import classify
from salience.kernels.executors import TorchSdpaExec
from salience.kernels.partial import block_backward, block_forward
from salience.testing import assert_rel_close

L0 = 150  # query length of most cases; S differs where noted


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: small tiles and blocks so that these small inputs cross many of them (passed explicitly, no patched globals)
SMALL = kconfig.DEFAULT.replace(
    q_tile=32, kv_tile=16, band_q_block=16, band_q_block_bwd=48,  # re-blocked backward
    bias_q_block=32, bias_window_q_block=16, min_run=4, generic_q_block=16,
    max_rows_per_call=48,  # band runs split over several calls
    max_rows_per_call_bwd=96, tiny=0)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 2 * 4 * 32 * 48)  # 3 key tiles per chunk: online merges
    with kconfig.use(SMALL):
        yield


def _inputs(B=2, H=4, Hkv=2, L=L0, S=L0, D=16, Dv=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    dl = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    return q, k, v, do, dl


def _finite(lse):
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _run(fn, ins, dtype, do, dl):
    xs = [t.to(dtype).requires_grad_() for t in ins]
    out, lse = fn(*xs)
    loss = (out.double() * do).sum()
    if dl is not None:
        loss = loss + (_finite(lse).double() * dl).sum()
    loss.backward()
    return out, lse, [x.grad for x in xs]


def check_against_reference(mask=None, mod=None, dtype=torch.float32, backend=None, expect=None, lse_grad=False,
                            **shape):
    """Forward (out, lse) and backward (dq, dk, dv) of salience.attention in ``dtype`` against the float64
    reference with the relative-error rule; optionally the backend the dispatcher must pick."""
    q, k, v, do, dl = _inputs(**shape)
    if expect is not None:
        plan = salience.plan(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask, score_mod=mod, backend=backend)
        assert plan.backend == expect, plan
    dl = dl if lse_grad else None

    def fast(a, b, c):
        r = salience.attention(a, b, c, mask=mask, score_mod=mod, backend=backend, return_lse=True)
        return r.out, r.lse

    def ref(a, b, c):
        r = reference.attention(a, b, c, mask=mask, score_mod=mod)
        return r.out, r.lse

    out, lse, g = _run(fast, (q, k, v), dtype, do, dl)
    out_t, lse_t, g_t = _run(ref, (q, k, v), dtype, do, dl)
    out_64, lse_64, g_64 = _run(ref, (q, k, v), torch.float64, do, dl)
    what = f"{mask!r} {mod!r} {dtype} backend={backend}"
    assert out.dtype == dtype and out.shape == out_64.shape
    assert_rel_close(out, out_t, out_64, what="out " + what)
    assert_rel_close(lse, lse_t, lse_64, what="lse " + what)
    for name, a, b, c in zip("qkv", g, g_t, g_64):
        assert a.dtype == dtype
        assert_rel_close(a, b, c, what=f"d{name} " + what)


# ----------------------------------------------------------------------------------------------- masks

IDS = torch.tensor([0] * 40 + [1] * 3 + [2] * 61 + [3] * 46)  # includes a 3-token document
IDS2 = torch.stack([IDS, torch.tensor([0] * 100 + [1] * 50)])

# (id, mask, default backend, shape overrides)
MASK_CASES = [
    ("none", None, "sdpa", {}),
    ("causal", M.causal(), "sdpa", {}),
    ("causal_bottom_right_L<S", M.causal(align="bottom_right"), "spans", dict(S=190)),
    ("causal_bottom_right_L>S", M.causal(align="bottom_right"), "spans", dict(S=110)),
    ("window", M.sliding_window(37), "spans", {}),
    ("window_two_sided", M.sliding_window(20, 9), "spans", {}),
    ("window_and_causal", M.sliding_window(30, 30) & M.causal(), "spans", {}),
    ("prefix_lm", M.prefix_lm(50), "spans", {}),
    ("padding", M.padding(q_lengths=[120, 150], kv_lengths=[90, 0]), "spans", {}),
    ("padding_causal", M.padding(q_lengths=[150, 70], kv_lengths=[150, 80]) & M.causal(), "spans", {}),
    ("documents", M.document(IDS), "spans", {}),
    ("documents_2d_causal", M.document(IDS2) & M.causal(), "spans", {}),
    ("documents_window", M.document(IDS) & M.sliding_window(16), "spans", {}),
    ("block_diagonal", M.block_diagonal(16), "spans", {}),
    ("window_or_causal", M.causal() | M.sliding_window(3, 3), "spans", {}),
    ("dilated", M.dilated(3), "blockwise", {}),
    ("global_or_window", M.global_tokens([0, 77]) | M.sliding_window(8, 8), "blockwise", {}),
    ("random_blocks", M.random_blocks(0.4, block=8, seed=3), "blockwise", {}),
    ("lambda", lambda b, h, q, kv: (q + 2 * kv) % 5 != 1, "blockwise", {}),
    ("dense_tensor", torch.rand(L0, L0, generator=torch.Generator().manual_seed(1)) < 0.3, "blockwise", {}),
    ("not_window", ~M.sliding_window(10, 10), "blockwise", {}),
    ("head_dependent", lambda b, h, q, kv: (kv <= q) | (h == 1), "spans", {}),  # derived per-head intervals
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_default_path_matches_reference(case, dtype):
    _, mask, expect, shape = case
    check_against_reference(mask, dtype=dtype, expect=expect, **shape)


@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_blockwise_matches_reference_for_every_mask(case):
    _, mask, _, shape = case
    check_against_reference(mask, dtype=torch.float32, backend="blockwise", expect="blockwise", **shape)


@pytest.mark.parametrize("case", [c for c in MASK_CASES if c[2] == "spans"], ids=lambda c: c[0])
def test_forced_sdpa_with_dense_mask_matches_reference(case):
    _, mask, _, shape = case
    check_against_reference(mask, dtype=torch.float32, backend="sdpa", expect="sdpa", **shape)


def test_float64_and_gqa_and_value_dim_on_every_backend():
    for backend, mask in (("sdpa", M.causal()), ("spans", M.sliding_window(19)), ("blockwise", M.dilated(2))):
        check_against_reference(mask, dtype=torch.float64, backend=backend, H=6, Hkv=3, D=8, Dv=20)
        check_against_reference(mask, dtype=torch.float32, backend=backend, H=4, Hkv=1, D=24, Dv=8, B=1)


# ------------------------------------------------------------------------------------------ score mods

TABLE = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
MODS = [
    ("alibi", Sc.alibi(4)),
    ("softcap", Sc.softcap(1.5)),
    ("temperature", Sc.temperature(0.7)),
    ("relative_bias", Sc.relative_bias(TABLE, 16, 32, True)),
    ("temperature_alibi_temperature", Sc.compose(Sc.temperature(2.0), Sc.alibi(4), Sc.temperature(0.5))),
    ("alibi_softcap", Sc.compose(Sc.alibi(4), Sc.softcap(3.0))),
    ("lambda", lambda s, b, h, q, kv: s + 0.1 * torch.cos((q - kv).to(s.dtype)) * (h + 1)),
]
SPLIT_IDS = torch.tensor([0] * 50 + [1] * 40 + [0] * 60)  # document 0 in two runs: not block-diagonal
MOD_MASKS = [("causal", M.causal()), ("window", M.sliding_window(33)), ("none", None),
             ("documents_causal", M.document(IDS) & M.causal()), ("documents", M.document(IDS)),
             ("window_documents", M.sliding_window(16) & M.document(IDS)),
             ("documents_2d_causal", M.document(IDS2) & M.causal()),
             ("documents_split_causal", M.document(SPLIT_IDS) & M.causal()),
             ("padding_causal", M.padding(q_lengths=[150, 70], kv_lengths=[150, 80]) & M.causal()),
             ("padding_empty_rows", M.padding(q_lengths=[120, 150], kv_lengths=[90, 0])), ("dilated", M.dilated(3))]


def _expected_mod_backend(mod_id, mask_id):
    linear = mod_id in ("alibi", "relative_bias", "temperature_alibi_temperature")
    if mod_id == "temperature":
        return {"causal": "sdpa", "none": "sdpa", "dilated": "blockwise",
                "documents_split_causal": "blockwise"}.get(mask_id, "spans")
    # packed documents (1-d ids, one run per document) with a relative bias: one band problem per document
    if linear and mask_id in ("causal", "window", "none", "documents_causal", "documents", "window_documents",
                              "padding_causal", "padding_empty_rows"):
        return "spans"
    # other interval masks (per-batch document ids) run on the compiled interval kernel when it is built
    if linear and mask_id == "documents_2d_causal" and native.available(torch.zeros(1)):
        return "spans"
    return "blockwise"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask_case", MOD_MASKS, ids=[m[0] for m in MOD_MASKS])
@pytest.mark.parametrize("mod_case", MODS, ids=[m[0] for m in MODS])
def test_score_mods_match_reference(mod_case, mask_case, dtype):
    mod_id, mod = mod_case
    mask_id, mask = mask_case
    check_against_reference(mask, mod, dtype=dtype, expect=_expected_mod_backend(mod_id, mask_id))


def test_packed_documents_with_relative_bias_float64_grouped_heads_and_plan():
    mask, mod = M.document(IDS) & M.causal(), Sc.alibi(6)
    check_against_reference(mask, mod, dtype=torch.float64, expect="spans", H=6, Hkv=3, D=8, Dv=20)
    q = torch.randn(1, 6, L0, 8, dtype=torch.bfloat16)  # float32 takes the compiled kernels when they are built
    p = salience.plan(q, q, q, mask=mask, score_mod=mod)
    assert "packed documents" in p.reason and p.details["pieces"] == 4
    # each document is its own problem: the skipped share is what the block-diagonal causal mask hides
    lengths = torch.bincount(IDS).tolist()
    assert p.details["skipped"] <= 1 - sum(n * (n + 1) // 2 for n in lengths) / L0 ** 2 + 1e-9
    assert structure.independent_pieces(M.document(SPLIT_IDS).bind(L0, L0, None), 1, L0, L0) is None
    # right padding: one rectangle per batch row (equal neighbours merged), keys past kv_length never read
    pad = M.padding(q_lengths=[150, 150, 70], kv_lengths=[150, 150, 80]) & M.sliding_window(9)
    pieces, band = structure.independent_pieces(pad.bind(L0, L0, None), 3, L0, L0)
    assert pieces == [(0, 2, 0, 150, 0, 150), (2, 3, 0, 70, 0, 80)] and band == (-9, 0)


@pytest.mark.parametrize("seed", range(4))
def test_random_documents_and_padding_with_relative_bias(seed):
    """Random packings (documents of 1+ tokens) and random right padding (including empty sequences), with
    ALiBi or T5 buckets and an optional window: the per-rectangle span path against the reference."""
    g = torch.Generator().manual_seed(seed)
    L = 97
    cuts = sorted(torch.randperm(L - 1, generator=g)[: 2 + seed].add(1).tolist())
    ids = torch.zeros(L, dtype=torch.long)
    for c in cuts:
        ids[c:] += 1
    lengths = torch.randint(0, L + 1, (3,), generator=g).tolist()
    band = [None, M.causal(), M.sliding_window(int(torch.randint(1, 40, (1,), generator=g)))][seed % 3]
    mod = Sc.alibi(4) if seed % 2 else Sc.relative_bias(TABLE, 16, 32, True)
    for struct in (M.document(ids), M.padding(q_lengths=lengths, kv_lengths=lengths[::-1])):
        mask = struct if band is None else struct & band
        check_against_reference(mask, mod, dtype=torch.float32, expect="spans", B=3, L=L, S=L, lse_grad=True)


@pytest.mark.parametrize("mod_case", MODS[:5], ids=[m[0] for m in MODS[:5]])
def test_score_mods_on_forced_blockwise(mod_case):
    check_against_reference(M.sliding_window(40, 3), mod_case[1], dtype=torch.float32, backend="blockwise")


@pytest.mark.parametrize("backend,mask,mod", [
    ("sdpa", M.causal(), None), ("spans", M.sliding_window(25), None), ("spans", M.document(IDS), None),
    ("spans", M.causal(), Sc.alibi(4)), ("blockwise", M.causal(), Sc.softcap(2.0)),
    ("blockwise", M.dilated(2), Sc.alibi(4)), ("sdpa", M.prefix_lm(9), None),
    ("spans", M.document(IDS) & M.causal(), Sc.alibi(4)),
])
def test_gradient_through_logsumexp(backend, mask, mod):
    check_against_reference(mask, mod, dtype=torch.float32, backend=backend, lse_grad=True)
    mod2 = Sc.alibi(2) if getattr(mod, "slopes", None) is not None else mod  # one slope per head: H=2 here
    check_against_reference(mask, mod2, dtype=torch.float64, backend=backend, lse_grad=True, B=1, H=2, Hkv=1)


def test_trainable_relative_bias_table_gets_its_gradient():
    q, k, v, do, _ = _inputs(Hkv=4)
    grads = {}
    for name in ("fast", "ref"):
        table = TABLE.clone().requires_grad_()
        mod = Sc.relative_bias(table, 16, 32, True)
        qq = q.clone().requires_grad_()
        if name == "fast":
            assert salience.plan(q, k, v, mask=M.causal(), score_mod=mod).backend == "blockwise"
            out = salience.attention(qq, k, v, mask=M.causal(), score_mod=mod)
        else:
            out = reference.attention(qq, k, v, mask=M.causal(), score_mod=mod).out
        (out * do).sum().backward()
        grads[name] = (table.grad, qq.grad)
    assert torch.allclose(grads["fast"][0], grads["ref"][0], atol=1e-10, rtol=1e-10)
    assert torch.allclose(grads["fast"][1], grads["ref"][1], atol=1e-10)


_HIDDEN = {}


def test_score_mod_with_undiscoverable_trainable_tensor_falls_back_exactly():
    q, k, v, do, _ = _inputs(Hkv=4)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    _HIDDEN["w"] = w

    def mod(s, b, h, qi, kv):  # reads a global: invisible to closure inspection
        return s * _HIDDEN["w"]

    plan = salience.plan(q, k, v, mask=M.causal(), score_mod=mod)
    assert plan.backend == "reference" and "requiring grad" in plan.reason
    out = salience.attention(q, k, v, mask=M.causal(), score_mod=mod)
    (out * do).sum().backward()
    g_fast = w.grad.clone()
    w.grad = None
    (reference.attention(q, k, v, mask=M.causal(), score_mod=mod).out * do).sum().backward()
    assert torch.allclose(g_fast, w.grad, atol=1e-10)
    with pytest.raises(ValueError, match="requiring grad"):
        salience.attention(q, k, v, mask=M.causal(), score_mod=mod, backend="blockwise")


def test_score_mod_with_bad_output_names_the_mod():
    q, k, v, _, _ = _inputs()
    with pytest.raises(ValueError, match="score_mod .* returned"):
        salience.attention(q, k, v, mask=M.dilated(2), score_mod=lambda s, b, h, qi, kv: s[..., :1], backend="blockwise")


# --------------------------------------------------------------------------------- fully masked rows

EMPTY_ROW_CASES = [
    ("sdpa_dense", M.padding(q_lengths=[100, 150], kv_lengths=[150, 0]), None, "sdpa", {}),
    ("spans_padding", M.padding(q_lengths=[100, 150], kv_lengths=[150, 0]) & M.causal(), None, "spans", {}),
    ("spans_bottom_right", M.causal(align="bottom_right"), None, "spans", dict(S=100)),
    ("spans_doc_absent_in_keys", M.document(IDS, kv_ids=torch.tensor([0] * 70 + [2] * 80)), None, "spans", {}),
    ("spans_bias", M.causal(align="bottom_right"), Sc.alibi(4), "spans", dict(S=100)),
    ("blockwise_lambda", lambda b, h, q, kv: (q % 7 != 3) & (kv <= q), Sc.softcap(2.0), "blockwise", {}),
    ("blockwise_padding", M.padding(q_lengths=[60, 150], kv_lengths=[150, 0]), Sc.alibi(4), "blockwise", {}),
    ("spans_padding_bias", M.padding(q_lengths=[60, 150], kv_lengths=[150, 0]), Sc.alibi(4), "spans", {}),
    ("spans_padding_causal_bias", M.padding(q_lengths=[60, 150], kv_lengths=[40, 0]) & M.causal(), Sc.alibi(4),
     "spans", {}),
]


@pytest.mark.parametrize("case", EMPTY_ROW_CASES, ids=[c[0] for c in EMPTY_ROW_CASES])
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradients(case):
    _, mask, mod, backend, shape = case
    q, k, v, do, dl = _inputs(**shape)
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    dense = M.as_mask_mod(mask).to_dense(B, 1, L, S).any(-1)  # (B, 1, L): row sees something
    assert not bool(dense.all()), "the case must have fully masked rows"
    qs, ks, vs = (t.float().requires_grad_() for t in (q, k, v))
    res = salience.attention(qs, ks, vs, mask=mask, score_mod=mod, backend=backend, return_lse=True)
    empty = ~dense.expand(B, H, L)
    assert torch.isfinite(res.out).all()
    assert torch.equal(res.out[empty], torch.zeros_like(res.out[empty]))
    assert bool(torch.isneginf(res.lse[empty]).all()) and bool(torch.isfinite(res.lse[~empty]).all())
    ((res.out.double() * do).sum() + (_finite(res.lse).double() * dl).sum()).backward()
    for t in (qs, ks, vs):
        assert torch.isfinite(t.grad).all()
    assert float(qs.grad[empty].abs().max()) == 0.0
    check_against_reference(mask, mod, dtype=torch.float32, backend=backend, lse_grad=True, **shape)


# ------------------------------------------------------------------------------ partial-tile traps


def test_tile_with_one_visible_key_is_partial_not_empty():
    def one_hole(b, h, q, kv):  # causal, plus one far-future key for query 37: that tile is not empty
        return (kv <= q) | ((q == 37) & (kv == 140))

    bm = classify(one_hole, 1, 1, L0, L0, q_block=32, kv_block=16)
    assert int(bm.classes[0, 0, 37 // 32, 140 // 16]) == PARTIAL
    assert int(bm.classes[0, 0, 0, 140 // 16]) == EMPTY
    check_against_reference(one_hole, dtype=torch.float32, expect="blockwise")


def test_tile_with_one_hidden_key_is_partial_not_full():
    def one_hidden(b, h, q, kv):  # causal minus one key deep inside a full tile
        return (kv <= q) & ~((q == 100) & (kv == 3))

    bm = classify(one_hidden, 1, 1, L0, L0, q_block=32, kv_block=16)
    assert int(bm.classes[0, 0, 100 // 32, 0]) == PARTIAL
    assert int(bm.classes[0, 0, 130 // 32, 0]) == FULL
    check_against_reference(one_hidden, dtype=torch.float32, expect="blockwise")
    check_against_reference(one_hidden, Sc.softcap(2.0), dtype=torch.bfloat16, expect="blockwise")


@pytest.mark.parametrize("left,right", [(15, 0), (16, 0), (17, 0), (31, 32), (1, 1)])
def test_windows_at_tile_edges(left, right):
    """Window edges exactly on, one before and one after tile boundaries (tiles of 16)."""
    m = M.sliding_window(left, right)
    for backend in ("blockwise", "spans"):
        check_against_reference(m, dtype=torch.float32, backend=backend)


def test_mask_cache_is_keyed_by_tile_offset_only_for_relative_masks():
    q, k, v, _, _ = _inputs(B=1, H=1, Hkv=1)
    rel = blockwise.TileKernel(1, 1, L0, L0, mask=M.sliding_window(20), scale=0.25)
    rel.forward(q, k, v)
    assert rel.relative and all(len(key) == 4 for key in rel._cache)  # (offset, rows, keys, reversed)
    nonrel = blockwise.TileKernel(1, 1, L0, L0, mask=M.prefix_lm(40) & M.dilated(2), scale=0.25)
    nonrel.forward(q, k, v)
    assert not nonrel.relative and all(len(key) == 5 for key in nonrel._cache)  # (row, key, rows, keys, reversed)


# ------------------------------------------------------------------------------------- block API


RING_CASES = [(M.causal(), None), (M.sliding_window(20), None), (M.causal(), Sc.alibi(2)),
              (M.causal(), Sc.softcap(2.0)), (M.document(torch.arange(96) // 30) & M.causal(), None),
              (lambda b, h, q, kv: (q - kv) % 4 != 2, None), (None, Sc.temperature(3.0))]


@pytest.mark.parametrize("mask,mod", RING_CASES)
def test_ring_decomposition_with_block_forward_and_block_backward(mask, mod):
    N, P = 96, 3
    n = N // P
    q, k, v, do, _ = _inputs(B=1, H=2, Hkv=1, L=N, S=N, D=8, Dv=8)
    kw = dict(mask=mask, score_mod=mod, q_len=N, kv_len=N)
    outs, lses = [], []
    for i in range(P):
        acc = None
        for j in range(P):
            r = block_forward(q[:, :, i * n:(i + 1) * n], k[:, :, j * n:(j + 1) * n], v[:, :, j * n:(j + 1) * n],
                              q_offset=i * n, kv_offset=j * n, **kw)
            acc = r if acc is None else salience.merge(acc.out, acc.lse, r.out, r.lse)
        outs.append(acc.out)
        lses.append(acc.lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference.attention(qq, kk, vv, mask=mask, score_mod=mod)
    ref.out.backward(do)
    assert torch.allclose(out, ref.out, atol=1e-12) and torch.allclose(_finite(lse), _finite(ref.lse), atol=1e-12)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(P):
        for j in range(P):
            rs, cs = slice(i * n, (i + 1) * n), slice(j * n, (j + 1) * n)
            g = block_backward(q[:, :, rs], k[:, :, cs], v[:, :, cs], out[:, :, rs], lse[:, :, rs], do[:, :, rs],
                               q_offset=i * n, kv_offset=j * n, **kw)
            dq[:, :, rs] += g.dq
            dk[:, :, cs] += g.dk
            dv[:, :, cs] += g.dv
    for a, b in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        assert torch.allclose(a, b, atol=1e-11)


def test_autograd_through_block_forward_and_merge():
    q, k, v, do, _ = _inputs(B=1, H=2, Hkv=2, L=64, S=64, D=8, Dv=8)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    a = block_forward(xs[0], xs[1][:, :, :40], xs[2][:, :, :40], mask=M.causal(), kv_len=64)
    b = block_forward(xs[0], xs[1][:, :, 40:], xs[2][:, :, 40:], mask=M.causal(), kv_offset=40)
    (salience.merge(a.out, a.lse, b.out, b.lse).out * do).sum().backward()
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    (reference.attention(*ys, mask=M.causal()).out * do).sum().backward()
    for x, y in zip(xs, ys):
        assert torch.allclose(x.grad, y.grad, atol=1e-11)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_offset=-1), "q_offset must be an int >= 0"),
    (dict(kv_offset=1.5), "kv_offset must be an int >= 0"),
    (dict(q_len=4), "q_len is the global length"),
    (dict(kv_offset=3, kv_len=8), "kv_len is the global length"),
    (dict(backend="reference"), "backend='reference' does not take block offsets"),
])
def test_block_api_errors(kwargs, match):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=match):
        block_forward(q, q, q, **kwargs)


def test_block_backward_shape_errors():
    q = torch.randn(1, 1, 8, 4)
    res = block_forward(q, q, q)
    with pytest.raises(ValueError, match="dout must have shape"):
        block_backward(q, q, q, res.out, res.lse, torch.zeros(1, 1, 7, 4))


# ------------------------------------------------------------------------------- plan and dispatch


def test_plan_reports_path_and_skipped_share():
    q = torch.randn(1, 2, 1024, 16)
    p = salience.plan(q, q, q, mask=M.sliding_window(64))
    assert p.backend == "spans" and p.details["skipped"] > 0.85 and p.details["fused_calls"] >= 2
    assert "skipped" in str(p)
    p = salience.plan(q, q, q, mask=M.dilated(3), score_mod=Sc.softcap(5.0))
    assert p.backend == "blockwise" and set(p.details["tiles"]) == {"empty", "partial", "full"}
    assert salience.plan(q, q, q, mask=M.causal()).details["skipped"] > 0.49
    assert salience.plan(q, q, q, mask=M.causal(), score_mod=Sc.alibi(2)).backend == "spans"
    assert salience.plan(q, q, q, mask=M.causal(), score_mod=Sc.softcap(3.0)).backend == "blockwise"
    p = salience.plan(q, q, q, mask=M.dilated(2), score_mod=Sc.alibi(2))  # bias as a Toeplitz view, not evaluated
    assert p.backend == "blockwise" and p.executor.kernel.g is not None and p.executor.kernel.g.shape == (2, 2047)
    assert salience.plan(q, q, q, compatibility=Sc.Additive(16)).backend == "reference"


def test_tiny_problems_take_one_dense_pass():
    q = torch.randn(1, 2, 16, 8)
    with kconfig.use(SMALL.replace(tiny=1 << 15)):
        assert salience.plan(q, q, q, mask=M.dilated(2)).backend == "reference"
        assert salience.plan(q, q, q, mask=M.causal()).backend == "sdpa"


@pytest.mark.parametrize("backend,kwargs,match", [
    ("spans", dict(mask=M.dilated(2)), "backend='spans' needs a mask"),
    ("spans", dict(mask=M.causal(), score_mod=Sc.softcap(2.0)), "backend='spans' needs"),
    ("sdpa", dict(mask=M.causal(), score_mod=Sc.softcap(2.0)), "backend='sdpa' cannot apply a score_mod"),
    ("flash", {}, "backend must be one of"),
    ("blockwise", dict(compatibility=Sc.Additive(8)), "cannot apply the compatibility"),
    ("blockwise", dict(dropout_p=0.1), "dropout_p > 0 runs on backend"),
])
def test_impossible_forced_backends_raise(backend, kwargs, match):
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match=match):
        salience.attention(q, q, q, backend=backend, **kwargs)


def test_dot_reducible_compatibility_runs_on_the_fast_path():
    q, k, v, do, _ = _inputs(Hkv=4, D=12, Dv=12)
    cos = Sc.Cosine(0.5)
    assert salience.plan(q, k, v, mask=M.sliding_window(9), compatibility=cos).backend == "spans"
    out = salience.attention(q, k, v, mask=M.sliding_window(9), compatibility=cos)
    ref = reference.attention(q, k, v, mask=M.sliding_window(9), compatibility=cos).out
    assert torch.allclose(out, ref, atol=1e-12)


def test_attention_under_torch_compile():
    q, k, v, do, _ = _inputs(B=1, H=2, Hkv=2, D=8, Dv=8)
    xs = [t.float().requires_grad_() for t in (q, k, v)]

    def f(a, b, c):
        out = salience.attention(a * 1.0, b, c, mask=M.sliding_window(20), score_mod=None)
        out2 = salience.attention(a, b, c, mask=M.dilated(2), score_mod=Sc.softcap(3.0))
        return out + 0.5 * out2

    compiled = torch.compile(f, backend="aot_eager")
    got = compiled(*xs)
    (got.double() * do).sum().backward()
    ys = [t.float().requires_grad_() for t in (q, k, v)]
    want = f(*ys)
    (want.double() * do).sum().backward()
    assert torch.allclose(got, want, atol=1e-6)
    for x, y in zip(xs, ys):
        assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_no_graph_is_kept_without_grad():
    q = torch.randn(1, 2, 128, 8, requires_grad=True)
    with torch.no_grad():
        out = salience.attention(q, q, q, mask=M.sliding_window(9))
    assert out.grad_fn is None
    out = salience.attention(q, q, q, mask=M.sliding_window(9))
    assert isinstance(out.grad_fn, torch.autograd.graph.Node) and "AttentionFunction" in type(out.grad_fn).__name__


def test_attention_weights_from_lse_match_reference_rows():
    q, k, v, _, _ = _inputs(H=4, Hkv=4)
    m, mod = M.document(IDS) & M.causal(), Sc.alibi(4)
    res = salience.attention(q, k, v, mask=m, score_mod=mod, return_lse=True)
    w = salience.attention_weights(q, k, mask=m, score_mod=mod, heads=[2], rows=[5, 149], lse=res.lse)
    full = reference.attention(q, k, v, mask=m, score_mod=mod).weights
    assert torch.allclose(w, full[:, [2]][:, :, [5, 149]], atol=1e-12)
    assert math.isclose(float(w[0, 0, 1].sum()), 1.0, rel_tol=1e-12)


def test_without_the_fused_kernel_everything_still_runs(monkeypatch):
    """Devices without torch's CPU flash kernel: torch SDPA for plain cases, the blockwise kernel otherwise."""
    from salience.kernels import fused

    monkeypatch.setattr(fused, "available", lambda q: False)
    q, k, v, _, _ = _inputs(Hkv=4)
    p = salience.plan(q, k, v, mask=M.causal())
    assert p.backend == "sdpa" and isinstance(p.executor, TorchSdpaExec) and "torch SDPA" in p.forward
    assert torch.allclose(salience.attention(q, k, v, mask=M.causal()), reference.attention(q, k, v, mask=M.causal()).out,
                          atol=1e-12)
    assert salience.plan(q, k, v, mask=M.causal(), return_lse=True).backend == "blockwise"
    assert salience.plan(q, k, v, mask=M.sliding_window(9)).backend == "blockwise"
    check_against_reference(M.sliding_window(9), Sc.alibi(4), dtype=torch.float32, expect="blockwise")


@pytest.mark.parametrize("backend,mask,mod", [
    ("sdpa", M.causal(), None), ("spans", M.sliding_window(21), None), ("spans", M.causal(), Sc.alibi(4)),
    ("blockwise", M.dilated(2), Sc.softcap(3.0)),
])
def test_float16(backend, mask, mod):
    check_against_reference(mask, mod, dtype=torch.float16, backend=backend)


@pytest.mark.parametrize("backend,mask,mod", [
    ("sdpa", M.causal(), None), ("spans", M.sliding_window(21), None), ("spans", M.document(IDS), None),
    ("spans", M.sliding_window(40), Sc.alibi(4)), ("blockwise", M.dilated(2), None),
])
def test_inputs_in_transposed_memory_layout(backend, mask, mod):
    """q, k, v as views of (B, L, H, D) tensors (what a model's projections give): same results and grads."""
    q, k, v, do, _ = _inputs(Hkv=2, D=16, Dv=16)
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    strided = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]  # (B, L, H, D) leaves
    out_a = salience.attention(*dense, mask=mask, score_mod=mod, backend=backend)
    out_b = salience.attention(*(t.transpose(1, 2) for t in strided), mask=mask, score_mod=mod, backend=backend)
    assert not strided[0].transpose(1, 2).is_contiguous()
    assert torch.allclose(out_a, out_b, atol=1e-12)
    (out_a * do).sum().backward()
    (out_b * do).sum().backward()
    for a, b in zip(dense, strided):
        assert torch.allclose(a.grad, b.grad.transpose(1, 2), atol=1e-12)
