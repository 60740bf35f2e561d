"""Arguments at the edges (issue 14): each is accepted with a defined result, or refused with one error that
names the argument, what was seen and the fix, the same on every path (sdpa, spans, blockwise, reference,
salience.reference.attention, plan, attention_weights). See docs/edges.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import salience
from salience import masks as M
from salience import reference
from salience import scores as Sc

BACKENDS = ("sdpa", "spans", "blockwise", "reference")


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype)


def qkv(B=2, H=4, Hkv=2, L=12, S=12, D=8, Dv=8, dtype=torch.float64):
    return rand(B, H, L, D, dtype=dtype), rand(B, Hkv, S, D, dtype=dtype, seed=1), rand(B, Hkv, S, Dv, dtype=dtype, seed=2)


def entry_points(q, k, v, **kw):
    """Every public way in, each forcing one path: attention(backend=...) for each backend, plan, the weights
    and the reference."""
    calls = {f"attention[{b}]": (lambda b=b: salience.attention(q, k, v, backend=b, **kw)) for b in BACKENDS}
    calls["attention[None]"] = lambda: salience.attention(q, k, v, **kw)
    calls["plan"] = lambda: salience.plan(q, k, v, **kw)
    calls["attention_weights"] = lambda: salience.attention_weights(q, k, **kw)
    calls["reference.attention"] = lambda: reference.attention(q, k, v, **kw)
    return calls


def same_error(q, k, v, exc, match, **kw) -> str:
    """Assert every entry point raises ``exc`` with one identical message matching ``match``; return it."""
    msgs = {}
    for name, call in entry_points(q, k, v, **kw).items():
        with pytest.raises(exc, match=match) as info:
            call()
        msgs[name] = str(info.value)
    assert len(set(msgs.values())) == 1, msgs
    return next(iter(msgs.values()))


def on_every_path(q, k, v, **kw):
    """Outputs of every backend (a backend that cannot serve these inputs at all is skipped)."""
    outs = {}
    for b in BACKENDS + (None,):
        try:
            outs[b] = salience.attention(q, k, v, backend=b, **kw)
        except ValueError as e:  # e.g. backend='spans' with a mask that is no interval per row
            if not str(e).startswith(f"backend={b!r}"):
                raise
    assert "reference" in outs and None in outs
    return outs


# -------------------------------------------------------------------------- 1. per-head score_mods know H


def test_alibi_with_more_slopes_than_heads_is_refused_everywhere():
    q, k, v = qkv(H=4)
    msg = same_error(q, k, v, ValueError, r"alibi\(<8 slopes>\) carries 8 slopes .* H=4", score_mod=Sc.alibi(8))
    assert "alibi(4)" in msg  # the fix


def test_alibi_with_fewer_slopes_than_heads_is_a_clear_error_not_an_index_error():
    q, k, v = qkv(H=4)
    same_error(q, k, v, ValueError, r"carries 2 slopes .* H=4 .*alibi\(4\)", score_mod=Sc.alibi(2))
    # composed mods are checked part by part
    same_error(q, k, v, ValueError, "carries 2 slopes", score_mod=Sc.compose(Sc.softcap(5.0), Sc.alibi(2)))


def test_relative_bias_table_columns_are_checked_against_heads():
    q, k, v = qkv(H=4)
    table = torch.randn(32, 2, dtype=torch.float64)
    msg = same_error(q, k, v, ValueError, r"carries 2 table columns .* H=4", score_mod=Sc.relative_bias(table))
    assert "(32, 4)" in msg


def test_per_head_mods_with_exactly_H_entries_stay_valid():
    q, k, v = qkv(H=4)
    for mod in (Sc.alibi(4), Sc.relative_bias(torch.randn(32, 4, dtype=torch.float64))):
        ref = reference.attention(q, k, v, mask=M.causal(), score_mod=mod).out
        for b in ("spans", "blockwise", "reference", None):
            out = salience.attention(q, k, v, mask=M.causal(), score_mod=mod, backend=b)
            assert torch.allclose(out, ref, atol=1e-12), b


def test_check_hook_is_generic_and_sees_B_H_L_S():
    seen = []

    def check(B, H, L, S):
        seen.append((B, H, L, S))
        if H != 3:
            raise ValueError(f"my_mod needs H=3; got H={H}")

    mod = Sc.ScoreMod(lambda s, b, h, qi, kv: s, "my_mod")
    mod._check = check
    mask = M.MaskMod(lambda b, h, qi, kv: qi >= kv, "my_mask")
    mask._check = lambda B, H, L, S: seen.append(("mask", B, H, L, S))
    q, k, v = qkv(B=2, H=4, L=5, S=7)
    same_error(q, k, v, ValueError, "my_mod needs H=3", score_mod=mod, mask=mask)
    assert (2, 4, 5, 7) in seen and ("mask", 2, 4, 5, 7) in seen
    # combinators and shift pass the hook on
    with pytest.raises(ValueError, match="holds 3 lengths"):
        salience.attention(q, k, v, mask=M.causal() & ~M.padding(kv_lengths=[1, 2, 3]))
    with pytest.raises(ValueError, match="holds 3 lengths"):
        salience.attention(q, k, v, mask=M.shift(M.padding(kv_lengths=[1, 2, 3]), 0, 0, 5, 7))


def test_layers_shifted_score_mods_keep_the_check():
    from salience.layers._util import shift_score_mod

    q, k, v = qkv(H=4)
    same_error(q, k, v, ValueError, "carries 2 slopes", score_mod=shift_score_mod(Sc.alibi(2), 3))


# ------------------------------------------------------------------------------- 2. T5 bucket parameters


@pytest.mark.parametrize("nb,md,bi", [(32, 4, True), (32, 8, True), (8, 2, True), (16, 8, False), (2, 8, True),
                                      (1, 8, False)])
def test_relative_bias_rejects_bucket_settings_that_give_invalid_ids(nb, md, bi):
    with pytest.raises(ValueError, match="max_distance|num_buckets must be >="):
        Sc.relative_bias(torch.zeros(nb, 2), num_buckets=nb, max_distance=md, bidirectional=bi)
    with pytest.raises(ValueError, match="max_distance|num_buckets must be >="):
        Sc.t5_bucket(torch.arange(-20, 20), num_buckets=nb, max_distance=md, bidirectional=bi)


def test_relative_bias_error_names_the_fix():
    with pytest.raises(ValueError) as info:
        Sc.relative_bias(torch.zeros(32, 2), num_buckets=32, max_distance=4)
    msg = str(info.value)
    assert "max_distance=4" in msg and "8 exact-distance buckets" in msg and "max_distance >= 9" in msg


@pytest.mark.parametrize("nb,md,bi", [(32, 128, True), (32, 9, True), (8, 16, True), (4, 2, True), (32, 17, False),
                                      (2, 2, False)])
def test_valid_bucket_settings_match_transformers_t5(nb, md, bi):
    rel = torch.arange(-300, 300)
    ids = Sc.t5_bucket(rel, nb, md, bi)
    assert int(ids.min()) >= 0 and int(ids.max()) < nb
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    want = t5.T5Attention._relative_position_bucket(rel, bidirectional=bi, num_buckets=nb, max_distance=md)
    assert torch.equal(ids, want.long())


# ------------------------------------------------------------------------------------ 3. padding lengths


@pytest.mark.parametrize("kw,match", [
    (dict(kv_lengths=[3, 4, 5]), r"kv_lengths holds 3 lengths but the batch has B=2"),
    (dict(kv_lengths=[3]), r"kv_lengths holds 1 lengths but the batch has B=2"),
    (dict(q_lengths=[3, 4, 5]), r"q_lengths holds 3 lengths but the batch has B=2"),
    (dict(kv_lengths=[3, 13]), r"kv_lengths \[3, 13\] exceed S=12"),
    (dict(q_lengths=[11, 2]), r"q_lengths \[11, 2\] exceed L=10"),
])
def test_padding_lengths_are_checked_against_the_batch_and_lengths(kw, match):
    q, k, v = qkv(B=2, L=10, S=12)
    same_error(q, k, v, ValueError, match, mask=M.padding(**kw))


def test_negative_padding_lengths_are_refused():
    with pytest.raises(ValueError, match="kv_lengths must be >= 0"):
        M.padding(kv_lengths=[3, -1])


def test_valid_padding_agrees_on_every_path():
    q, k, v = qkv(B=2, L=10, S=12)
    m = M.padding(q_lengths=[10, 4], kv_lengths=[12, 0])
    ref = reference.attention(q, k, v, mask=m).out
    for b, out in on_every_path(q, k, v, mask=m).items():
        assert torch.allclose(out, ref, atol=1e-12), b


# ------------------------------------------------------------------------------------------ 4. mask tensors


def test_3d_mask_tensor_is_refused_with_the_explicit_axis_fix():
    q, k, v = qkv(B=4, H=4, Hkv=4)  # B == H: the shape cannot tell a per-batch mask from a per-head one
    m3 = torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    msg = same_error(q, k, v, ValueError, "got 3 dimensions", mask=m3)
    assert "mask[:, None]" in msg and "mask[None]" in msg and "(H, L, S)" in msg and "torch SDPA" in msg


def test_torch_sdpa_reads_a_3d_mask_as_heads_which_is_why_we_refuse_it():
    q, k, v = qkv(B=4, H=4, Hkv=4)
    m3 = torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    m3[..., 0] = True
    t = F.scaled_dot_product_attention(q, k, v, attn_mask=m3)
    assert torch.allclose(t, reference.attention(q, k, v, mask=m3[None]).out, atol=1e-12)


def test_explicit_4d_and_2d_mask_tensors_mean_what_they_say():
    q, k, v = qkv(B=4, H=4, Hkv=4)
    m3 = torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    m3[..., 0] = True
    for mask4, dense in ((m3[:, None], m3[:, None].expand(4, 4, 12, 12)), (m3[None], m3[None].expand(4, 4, 12, 12)),
                         (m3[0], m3[0].expand(4, 4, 12, 12))):
        want = reference.attention(q, k, v, mask=lambda b, h, qi, kv, d=dense: d[b, h, qi, kv]).out
        for b, out in on_every_path(q, k, v, mask=mask4).items():
            assert torch.allclose(out, want, atol=1e-12), (b, tuple(mask4.shape))


@pytest.mark.parametrize("shape", [(12,), (), (1, 1, 1, 1, 12)])
def test_other_mask_ranks_are_refused(shape):
    q, k, v = qkv()
    same_error(q, k, v, ValueError, r"mask tensor must have shape \(L, S\) or \(B\|1, H\|1, L, S\)",
               mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("shape,match", [((3, 1, 12, 12), r"B: 3 \(needs 1 or 2\)"),
                                         ((1, 3, 12, 12), r"H: 3 \(needs 1 or 4\)"),
                                         ((2, 4, 5, 12), r"L: 5 \(needs 1 or 12\)"),
                                         ((12, 11), r"S: 11 \(needs 1 or 12\)")])
def test_mask_tensor_shape_is_checked_against_B_H_L_S(shape, match):
    q, k, v = qkv(B=2, H=4)
    same_error(q, k, v, ValueError, match, mask=torch.ones(shape, dtype=torch.bool))


def test_float_mask_tensor_is_refused_with_the_score_mod_fix():
    q, k, v = qkv()
    same_error(q, k, v, TypeError, "torch.bool .*score_mod", mask=torch.zeros(12, 12))


# ----------------------------------------------------------------------------- 5. empty and meta problems


@pytest.mark.parametrize("B,L,S", [(0, 12, 12), (2, 0, 12), (0, 0, 0), (2, 12, 0)])
def test_empty_problems_give_the_same_result_on_every_path(B, L, S):
    mask = M.causal() & M.padding(kv_lengths=torch.full((B,), S, dtype=torch.long))
    q, k, v = qkv(B=B, L=L, S=S, Dv=6)
    want_out = torch.zeros(B, 4, L, 6, dtype=torch.float64)
    want_lse = torch.full((B, 4, L), -math.inf, dtype=torch.float64)
    for b in BACKENDS + (None,):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        res = salience.attention(*ins, mask=mask, score_mod=Sc.alibi(4), backend=b, return_lse=True)
        assert res.out.shape == (B, 4, L, 6) and res.lse.shape == (B, 4, L), b
        assert torch.equal(res.out, want_out) and torch.equal(res.lse, want_lse), b
        res.out.sum().backward()
        for t in ins:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()
    assert salience.plan(q, k, v, mask=mask).backend == "reference"
    assert "empty problem" in salience.plan(q, k, v).reason
    assert salience.attention_weights(q, k, mask=mask).shape == (B, 4, L, S)
    r = reference.attention(q, k, v, mask=mask)
    assert torch.equal(r.out, want_out) and torch.equal(r.lse, want_lse)


def test_key_length_zero_matches_torch_sdpa():
    q, k, v = qkv(S=0)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert torch.equal(salience.attention(q, k, v), want)


def test_meta_tensors_give_meta_outputs_of_the_right_shape_on_every_path():
    q, k, v = (t.to("meta") for t in qkv(B=2, H=4, Hkv=2, L=9, S=11, Dv=6, dtype=torch.float32))
    for b in BACKENDS + (None,):
        res = salience.attention(q, k, v, mask=M.causal(), score_mod=Sc.alibi(4), backend=b, return_lse=True)
        assert res.out.device.type == "meta" and res.out.shape == (2, 4, 9, 6) and res.out.dtype == torch.float32
        assert res.lse.device.type == "meta" and res.lse.shape == (2, 4, 9)
    out = salience.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BLHD")
    assert out.shape == (2, 9, 4, 6) and out.device.type == "meta"
    assert "meta tensors" in salience.plan(q, k, v).reason
    assert salience.attention_weights(q, k, heads=[1], rows=[0, 3]).shape == (2, 1, 2, 11)
    # the checks still run on meta inputs
    same_error(q, k, v, ValueError, "carries 2 slopes", score_mod=Sc.alibi(2))


def test_invalid_backend_name_is_refused_for_empty_problems_too():
    for B in (0, 2):
        q, k, v = qkv(B=B)
        with pytest.raises(ValueError, match=r"backend must be one of \('sdpa', 'spans', 'blockwise', 'decode', 'bias', 'reference'\)"):
            salience.attention(q, k, v, backend="flash")


# ---------------------------------------------------------------------------------------------- 6. scale


@pytest.mark.parametrize("scale", [np.float32(0.25), np.float64(0.25), np.array(0.25), np.array(0.25, np.float32),
                                   torch.tensor(0.25), torch.tensor([0.25])])
def test_numpy_and_tensor_scales_are_accepted(scale):
    q, k, v = qkv()
    want = reference.attention(q, k, v, mask=M.causal(), scale=0.25).out
    for b, out in on_every_path(q, k, v, mask=M.causal(), scale=scale).items():
        assert torch.allclose(out, want, atol=1e-12), b
    assert torch.allclose(reference.attention(q, k, v, mask=M.causal(), scale=scale).out, want, atol=1e-15)


@pytest.mark.parametrize("scale,exc,match", [("0.5", TypeError, "scale must be a positive finite real number"),
                                             (np.array([0.5, 0.5]), TypeError, "got ndarray"),
                                             (np.float32("nan"), ValueError, "positive and finite"),
                                             (True, TypeError, "got bool")])
def test_bad_scales_are_refused_everywhere(scale, exc, match):
    q, k, v = qkv()
    same_error(q, k, v, exc, match, scale=scale)


def test_numpy_dropout_p_is_accepted():
    q, k, v = qkv()
    assert torch.equal(salience.attention(q, k, v, dropout_p=np.float64(0.0)), salience.attention(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS + (None,))
def test_tensor_scale_requiring_grad_gets_its_gradient(backend):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Hkv=1, L=5, S=6, D=3, Dv=2))
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    mask = M.causal(align="bottom_right") if backend != "sdpa" else None

    def f(a, b, c, s):
        return salience.attention(a, b, c, mask=mask, scale=s, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, scale))
    (f(q, k, v, scale) ** 2).sum().backward()
    s2 = scale.detach().clone().requires_grad_()
    (reference.attention(q.detach(), k.detach(), v.detach(), mask=mask, scale=s2).out ** 2).sum().backward()
    assert torch.allclose(scale.grad, s2.grad, atol=1e-12)


def test_tensor_scale_gradient_with_compatibility_functions():
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=1, Hkv=1, L=4, S=5, D=3, Dv=2))
    s = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    for compat in (Sc.General(3, 3).double(), Sc.Cosine(0.5).double(), Sc.Additive(3, 3, hidden=4).double()):
        assert torch.autograd.gradcheck(lambda a, b, c, t, compat=compat: salience.attention(a, b, c, scale=t, compatibility=compat),
                                        (q, k, v, s))
        want = reference.attention(q, k, v, scale=0.6, compatibility=compat).out
        assert torch.allclose(salience.attention(q, k, v, scale=s, compatibility=compat), want, atol=1e-12)


# ------------------------------------------------------------------------------ 7. k, v with batch size 1


@pytest.mark.parametrize("backend", BACKENDS + (None,))
@pytest.mark.parametrize("mod", [None, "alibi"])
def test_kv_batch_one_broadcasts_over_the_query_batch(backend, mod):
    q = rand(3, 4, 20, 8).requires_grad_()
    k, v = rand(1, 2, 20, 8, seed=1).requires_grad_(), rand(1, 2, 20, 6, seed=2).requires_grad_()
    sm = Sc.alibi(4) if mod else None
    mask = M.causal() if (backend != "sdpa" or mod is None) else None
    if backend == "sdpa" and mod:
        pytest.skip("sdpa applies no score_mod")
    out = salience.attention(q, k, v, mask=mask, score_mod=sm, backend=backend)
    ke, ve = k.detach().repeat(3, 1, 1, 1).requires_grad_(), v.detach().repeat(3, 1, 1, 1).requires_grad_()
    q2 = q.detach().clone().requires_grad_()
    want = reference.attention(q2, ke, ve, mask=mask, score_mod=sm).out
    assert torch.allclose(out, want, atol=1e-12)
    g = rand(*out.shape, seed=5)
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert torch.allclose(q.grad, q2.grad, atol=1e-12)
    assert torch.allclose(k.grad, ke.grad.sum(0, keepdim=True), atol=1e-12)
    assert torch.allclose(v.grad, ve.grad.sum(0, keepdim=True), atol=1e-12)


def test_kv_batch_broadcast_is_not_a_copy_and_other_mismatches_still_fail(monkeypatch):
    from salience.kernels import dispatch

    q, k, v = rand(3, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    seen = {}
    orig = dispatch.attend

    def spy(q_, k_, v_, **kw):
        seen["k"] = k_
        return orig(q_, k_, v_, **kw)

    monkeypatch.setattr(dispatch, "attend", spy)
    salience.attention(q, k, v, mask=M.causal())
    assert seen["k"].stride(0) == 0 and seen["k"].data_ptr() == k.data_ptr()
    msg = same_error(rand(3, 2, 4, 8), rand(2, 2, 4, 8), rand(2, 2, 4, 8), ValueError, "k has batch size 2 but q has 3")
    assert "(or 1, broadcast over the query batch)" in msg


# ------------------------------------------------------------------------------------------------ 8. layout


def test_blhd_layout_on_attention_weights_and_plan():
    q, k, v = qkv(B=2, H=4, Hkv=2, L=10, S=12, Dv=6)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    mask, mod = M.sliding_window(3), Sc.alibi(4)
    want = reference.attention(q, k, v, mask=mask, score_mod=mod)
    for b in ("spans", "blockwise", "reference", None):
        res = salience.attention(qt, kt, vt, mask=mask, score_mod=mod, backend=b, layout="BLHD", return_lse=True)
        assert res.out.shape == (2, 10, 4, 6) and res.lse.shape == (2, 4, 10)
        assert torch.allclose(res.out, want.out.transpose(1, 2), atol=1e-12), b
        assert torch.allclose(res.lse, want.lse, atol=1e-12), b
    w = salience.attention_weights(qt, kt, mask=mask, score_mod=mod, heads=[2], rows=[1, 9], layout="BLHD")
    assert torch.allclose(w, want.weights[:, [2]][:, :, [1, 9]], atol=1e-12)
    pl = salience.plan(qt, kt, vt, mask=mask, layout="BLHD")
    assert pl == salience.plan(q, k, v, mask=mask)


def test_blhd_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Hkv=1, L=5, S=6, D=3, Dv=2))
    f = lambda a, b, c: salience.attention(a, b, c, mask=M.causal(), layout="BLHD")  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)))


@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("kw", [dict(q=torch.randn(2, 3, 4)), dict(k=torch.randn(3, 2, 3, 4)),
                                dict(k=torch.randn(2, 3, 2, 5)), dict(v=torch.randn(2, 5, 3, 4)),
                                dict(k=torch.randn(2, 3, 3, 4), v=torch.randn(2, 3, 3, 4)),
                                dict(q=torch.randn(2, 3, 0, 4))])
def test_every_shape_error_names_the_layout_and_the_option(layout, kw):
    # shapes written for BLHD (B=2, L=3, H=2, D=4); for BHLD they read as (B=2, H=3, L=2, D=4)
    args = dict(q=torch.randn(2, 3, 2, 4), k=torch.randn(2, 3, 2, 4), v=torch.randn(2, 3, 2, 4))
    args.update(kw)
    try:
        salience.attention(args["q"], args["k"], args["v"], layout=layout)
    except ValueError as e:
        msg = str(e)
    else:
        pytest.skip("valid in this layout")
    assert "layout='BLHD'" in msg and ("(B, H, L, D)" in msg or "(B, L, H, D)" in msg)


def test_bad_layout_value():
    q, k, v = qkv()
    for call in (salience.attention, salience.plan):
        with pytest.raises(ValueError, match=r"layout must be 'BHLD'.*got 'BSHD'"):
            call(q, k, v, layout="BSHD")
    with pytest.raises(ValueError, match=r"layout must be 'BHLD'.*got 'bhld'"):
        salience.attention_weights(q, k, layout="bhld")


# ------------------------------------------------------------------------------------- 9. mask types


@pytest.mark.parametrize("mask", [[[True, False]], "causal", 1, np.ones((12, 12), dtype=bool), {"causal": True},
                                  Sc.alibi(4)])
def test_masks_of_wrong_types_are_refused_everywhere(mask):
    q, k, v = qkv()
    msg = same_error(q, k, v, TypeError, "mask must be", mask=mask)
    assert "salience.masks" in msg or "score_mod=" in msg


@pytest.mark.parametrize("mod", ["alibi", 2.0, M.causal(), torch.zeros(12, 12)])
def test_score_mods_of_wrong_types_are_refused_everywhere(mod):
    q, k, v = qkv()
    same_error(q, k, v, TypeError, "score_mod must be", score_mod=mod)
