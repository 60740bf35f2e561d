"""salience.attention / attention_weights / reference: correctness, property tests, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import salience
from salience import masks as M
from salience import scores as Sc
from salience.testing import assert_rel_close

ref_attn = salience.reference.attention


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------- reference


def test_reference_against_loops():
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 2)
    r = ref_attn(q, k, v, scale=0.7)
    for h in range(2):
        for i in range(3):
            s = [0.7 * float(q[0, h, i] @ k[0, h, j]) for j in range(5)]
            m = max(s)
            z = sum(math.exp(x - m) for x in s)
            w = [math.exp(x - m) / z for x in s]
            assert math.isclose(r.lse[0, h, i].item(), m + math.log(z), rel_tol=1e-12)
            for j in range(5):
                assert math.isclose(r.weights[0, h, i, j].item(), w[j], rel_tol=1e-12)
            o = sum(w[j] * v[0, h, j] for j in range(5))
            assert torch.allclose(r.out[0, h, i], o, atol=1e-14)


def test_reference_matches_sdpa():
    q, k, v = rand(2, 4, 10, 8), rand(2, 4, 12, 8), rand(2, 4, 12, 8)
    assert torch.allclose(ref_attn(q, k, v).out, F.scaled_dot_product_attention(q, k, v), atol=1e-12)
    qc = rand(2, 4, 12, 8)
    assert torch.allclose(
        ref_attn(qc, k, v, mask=M.causal()).out, F.scaled_dot_product_attention(qc, k, v, is_causal=True), atol=1e-12
    )
    dm = torch.rand(2, 1, 10, 12) > 0.3
    dm[..., 0] = True
    assert torch.allclose(
        ref_attn(q, k, v, mask=dm).out, F.scaled_dot_product_attention(q, k, v, attn_mask=dm), atol=1e-12
    )


def test_gqa_equals_repeated_heads():
    q, k, v = rand(2, 6, 7, 4), rand(2, 2, 9, 4), rand(2, 2, 9, 3)
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    a = salience.attention(q, k, v, mask=M.sliding_window(2))
    b = ref_attn(q, kr, vr, mask=M.sliding_window(2)).out
    assert torch.allclose(a, b, atol=1e-12)
    # query head i uses kv head i // 3
    assert torch.allclose(a[:, 4], ref_attn(q[:, 4:5], k[:, 1:2], v[:, 1:2], mask=M.sliding_window(2)).out[:, 0])
    mqa = salience.attention(q, k[:, :1], v[:, :1])
    assert torch.allclose(mqa, F.scaled_dot_product_attention(q, k[:, :1].expand(-1, 6, -1, -1),
                                                              v[:, :1].expand(-1, 6, -1, -1)), atol=1e-12)


def test_matches_nn_multihead_attention_core():
    """torch.nn.functional SDPA parity for every dtype it supports here."""
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(1, 2, 16, 8).to(dt) for _ in range(3))
        assert_rel_close(salience.attention(q, k, v, mask=M.causal()),
                         ref_attn(q, k, v, mask=M.causal()).out,
                         ref_attn(q.double(), k.double(), v.double(), mask=M.causal()).out)


# ---------------------------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("backend", [None, "reference"])
def test_fully_masked_rows_zero_not_nan(backend):
    q, k, v = (rand(2, 2, 6, 4).requires_grad_() for _ in range(3))
    m = M.padding(q_lengths=[3, 6], kv_lengths=[4, 0])
    res = salience.attention(q, k, v, mask=m, return_lse=True, backend=backend)
    assert torch.isfinite(res.out).all()
    assert torch.equal(res.out[0, :, 3:], torch.zeros_like(res.out[0, :, 3:]))
    assert torch.equal(res.out[1], torch.zeros_like(res.out[1]))
    assert bool(torch.isneginf(res.lse[0, :, 3:]).all()) and bool(torch.isneginf(res.lse[1]).all())
    assert bool(torch.isfinite(res.lse[0, :, :3]).all())
    res.out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(q.grad[0, :, 3:], torch.zeros_like(q.grad[0, :, 3:]))
    assert torch.equal(k.grad[0, :, 4:], torch.zeros_like(k.grad[0, :, 4:]))
    w = salience.attention_weights(q, k, mask=m)
    assert torch.isfinite(w).all() and float(w[1].detach().abs().sum()) == 0.0


def test_fully_masked_bottom_right_rows():
    q, k, v = rand(1, 1, 5, 4), rand(1, 1, 3, 4), rand(1, 1, 3, 4)
    out = salience.attention(q, k, v, mask=M.causal(align="bottom_right"))
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.allclose(out[0, 0, 2:], ref_attn(q[:, :, 2:], k, v, mask=M.causal()).out[0, 0])


# ------------------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("mask,mod", [(None, None), (M.causal(), None), (M.sliding_window(2) & M.causal(), Sc.alibi(2)),
                                      (M.document([0, 0, 1, 1, 1]), Sc.softcap(2.0))])
def test_gradcheck(mask, mod):
    q, k, v = (rand(1, 2, 5, 3).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: salience.attention(a, b, c, mask=mask, score_mod=mod), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ref_attn(a, b, c, mask=mask, score_mod=mod).out, (q, k, v))


# ----------------------------------------------------------------------------------------- property tests

MASKS = [None, M.causal(), M.causal(align="bottom_right"), M.sliding_window(3), M.sliding_window(2, 5),
         M.prefix_lm(3), M.global_tokens([0, 5]), M.dilated(2), M.block_diagonal(4),
         M.random_blocks(0.5, block=4, seed=1), M.causal() & M.dilated(3), ~M.sliding_window(1, 1),
         lambda b, h, q_idx, kv_idx: (q_idx + kv_idx) % 3 != 1]
_REL_TABLE = torch.randn(16, 8)
# per-head mods carry one slope / table column per query head (checked against H), so they are built per H
MODS = [None, lambda H: Sc.alibi(H), Sc.softcap(1.5), Sc.temperature(2.0),
        lambda H: Sc.compose(Sc.alibi(H), Sc.softcap(4.0)),
        lambda H: Sc.relative_bias(_REL_TABLE[:, :H], 16, 32, True)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@st.composite
def problems(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    return dict(
        B=draw(st.integers(1, 2)), H=H, Hkv=Hkv, L=draw(st.integers(1, 24)), S=draw(st.integers(1, 24)),
        D=draw(st.sampled_from([4, 8])), Dv=draw(st.sampled_from([4, 6])),
        mask=draw(st.sampled_from(range(len(MASKS)))), mod=draw(st.sampled_from(range(len(MODS)))),
        dtype=draw(st.sampled_from(DTYPES)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_attention_matches_reference_property(p):
    g = torch.Generator().manual_seed(p["L"] * 1000 + p["S"])
    q = torch.randn(p["B"], p["H"], p["L"], p["D"], generator=g, dtype=torch.float64)
    k = torch.randn(p["B"], p["Hkv"], p["S"], p["D"], generator=g, dtype=torch.float64)
    v = torch.randn(p["B"], p["Hkv"], p["S"], p["Dv"], generator=g, dtype=torch.float64)
    do = torch.randn(p["B"], p["H"], p["L"], p["Dv"], generator=g, dtype=torch.float64)
    mask, mod, dt = MASKS[p["mask"]], MODS[p["mod"]], p["dtype"]
    mod = mod(p["H"]) if callable(mod) and not isinstance(mod, Sc.ScoreMod) else mod

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        (out.double() * do).sum().backward()
        return out, [t.grad for t in ins]

    fast, gf = run(lambda a, b, c: salience.attention(a, b, c, mask=mask, score_mod=mod), dt)
    ref_t, gt = run(lambda a, b, c: ref_attn(a, b, c, mask=mask, score_mod=mod).out, dt)
    ref64, g64 = run(lambda a, b, c: ref_attn(a, b, c, mask=mask, score_mod=mod).out, torch.float64)
    assert fast.dtype == dt
    assert_rel_close(fast, ref_t, ref64, what=f"out {mask!r} {mod!r}")
    for name, a, b, c in zip("qkv", gf, gt, g64):
        assert_rel_close(a, b, c, what=f"d{name} {mask!r} {mod!r}")


# ------------------------------------------------------------------------------------------- weights


def test_attention_weights_heads_rows_and_lse():
    q, k = rand(2, 4, 20, 8), rand(2, 2, 20, 8)
    m, mod = M.causal() & M.sliding_window(5), Sc.alibi(4)
    full = ref_attn(q, k, k, mask=m, score_mod=mod).weights
    w = salience.attention_weights(q, k, mask=m, score_mod=mod, heads=[3, 0], rows=[19, 2, 7])
    assert torch.allclose(w, full[:, [3, 0]][:, :, [19, 2, 7]], atol=1e-14)
    res = salience.attention(q, k, k, mask=m, score_mod=mod, return_lse=True)
    w2 = salience.attention_weights(q, k, mask=m, score_mod=mod, heads=[1], rows=slice(10, 20), lse=res.lse)
    assert torch.allclose(w2, full[:, [1], 10:20], atol=1e-12)
    assert torch.allclose(salience.attention_weights(q, k, mask=m, score_mod=mod), full, atol=1e-14)


def test_merge_of_key_splits_is_exact():
    q, k, v = rand(1, 2, 9, 4), rand(1, 2, 11, 4), rand(1, 2, 11, 3)
    a = salience.attention(q, k[:, :, :5], v[:, :, :5], return_lse=True)
    b = salience.attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True)
    whole = ref_attn(q, k, v)
    merged = salience.merge(a.out, a.lse, b.out, b.lse)
    assert torch.allclose(merged.out, whole.out, atol=1e-12) and torch.allclose(merged.lse, whole.lse, atol=1e-12)
    empty = salience.merge(torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), -math.inf),
                           torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), -math.inf))
    assert torch.equal(empty.out, torch.zeros(1, 1, 2, 3)) and bool(torch.isneginf(empty.lse).all())


def test_dropout_keeps_expectation_and_is_off_at_zero():
    q, k, v = rand(1, 1, 4, 4), rand(1, 1, 64, 4), torch.ones(1, 1, 64, 2, dtype=torch.float64)
    torch.manual_seed(1)
    outs = torch.stack([salience.attention(q, k, v, dropout_p=0.5) for _ in range(400)])
    assert abs(float(outs.mean()) - 1.0) < 0.05  # weights sum to one, dropout rescales by 1/(1-p)
    assert float(outs.std()) > 0.01
    assert torch.equal(salience.attention(q, k, v, dropout_p=0.0), salience.attention(q, k, v))


def test_return_lse_is_a_dataclass():
    q = rand(1, 1, 3, 4)
    res = salience.attention(q, q, q, return_lse=True)
    assert isinstance(res, salience.AttentionResult)
    out, lse = res
    assert out.shape == (1, 1, 3, 4) and lse.shape == (1, 1, 3)


def test_plan_describes_path():
    q = rand(1, 2, 8, 4)
    assert salience.plan(q, q, q).backend == "sdpa"
    assert "backend" in str(salience.plan(q, q, q, mask=M.document([0] * 4 + [1] * 4)))
    with pytest.raises(ValueError, match="backend"):
        salience.attention(q, q, q, backend="warp-drive")


# ------------------------------------------------------------------------------------------------ errors

q4 = torch.randn(1, 2, 3, 4)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q=torch.randn(2, 3, 4)), ValueError, "q must have 4 dimensions"),
        (dict(k=torch.randn(2, 2, 3, 4)), ValueError, "batch size"),
        (dict(k=torch.randn(1, 2, 3, 5)), ValueError, "head dim"),
        (dict(k=torch.randn(1, 3, 3, 4), v=torch.randn(1, 3, 3, 4)), ValueError, "multiple"),
        (dict(v=torch.randn(1, 2, 5, 4)), ValueError, "v must have k's heads"),
        (dict(k=torch.randn(1, 2, 3, 4, dtype=torch.float64)), TypeError, "dtype"),
        (dict(k=torch.randn(1, 2, 3, 4, device="meta")), ValueError, "device"),
        (dict(q=torch.ones(1, 2, 3, 4, dtype=torch.long)), TypeError, "floating-point"),
        (dict(scale=float("nan")), ValueError, "scale must be positive and finite"),
        (dict(scale=-1.0), ValueError, "scale must be positive"),
        (dict(scale=0.0), ValueError, "scale must be positive"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(mask="causal"), TypeError, "mask must be"),
        (dict(mask=lambda s, b, h, q, kv: s), TypeError, "score_mod"),
        (dict(mask=torch.ones(3, 3)), TypeError, "torch.bool"),
        (dict(score_mod=lambda b, h, q, kv: q > kv), TypeError, "mask"),
        # s.sum() is the identity under FlexAttention's scalar semantics (salience evaluates callables that way)
        (dict(score_mod=lambda s, b, h, q, kv: torch.stack([s, s])), ValueError, "score_mod .* returned"),
        (dict(q=torch.randn(1, 0, 3, 4)), ValueError, "head counts must be >= 1"),
        (dict(mask=lambda b, h, q, kv: (q - kv).float()), TypeError, "bool"),
        (dict(compatibility="dot"), TypeError, "compatibility"),
    ],
)
def test_bad_input_errors(kwargs, exc, match):
    args = dict(q=q4, k=torch.randn(1, 2, 3, 4), v=torch.randn(1, 2, 3, 4))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        salience.attention(q, k, v, **args)


def test_weights_selection_errors():
    with pytest.raises(ValueError, match="heads"):
        salience.attention_weights(q4, q4, heads=[5])
    with pytest.raises(TypeError, match="rows"):
        salience.attention_weights(q4, q4, rows=[0.5])
    with pytest.raises(ValueError, match="lse must have shape"):
        salience.attention_weights(q4, q4, lse=torch.zeros(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_takes_one_fused_call_and_matches_reference(dtype, causal):
    lens = [40, 17, 64]
    m = M.padding(kv_lengths=lens)
    m = M.causal() & m if causal else m
    q, k, v, do = (torch.randn(3, 4, 64, 16, dtype=torch.float64) for _ in range(4))
    pl = salience.plan(q.to(dtype), k.to(dtype), v.to(dtype), mask=m)
    assert pl.backend == "sdpa" and "key padding" in pl.reason

    def run(fn, dt):
        ins = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        (out.double() * do).sum().backward()
        return [out] + [t.grad for t in ins]

    fast = run(lambda a, b, c: salience.attention(a, b, c, mask=m), dtype)
    ref_t = run(lambda a, b, c: ref_attn(a, b, c, mask=m).out, dtype)
    ref64 = run(lambda a, b, c: ref_attn(a, b, c, mask=m).out, torch.float64)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), fast, ref_t, ref64):
        assert_rel_close(a, b, c, what=name)
    res = salience.attention(q, k, v, mask=m, return_lse=True)
    assert torch.allclose(res.lse, ref_attn(q, k, v, mask=m).lse, atol=1e-10)
