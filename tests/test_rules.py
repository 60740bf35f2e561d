"""The dispatch rule table (kernels v2): one Problem per call, ordered rules naming the executor of both
directions, forced backends refused with the reason, one config object passed explicitly."""

import pytest
import torch

import salience
from salience import masks as M
from salience import reference
from salience import scores as Sc
from salience.kernels import config as kconfig
from salience.kernels import decode as kdecode
from salience.kernels import dispatch, rules
from salience.kernels.executors import DecodeExec, KeySliceExec, ReferenceExec
from salience.kernels.problem import build
from salience.testing import assert_rel_close


def qkv(B=1, H=4, Hkv=2, L=256, S=256, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype),
            torch.randn(B, Hkv, S, D, generator=g).to(dtype))


def test_every_rule_names_its_backends_and_the_last_always_applies():
    assert rules.RULES[-1] is rules.no_kernel
    for rule in rules.RULES:
        assert set(rules.backends_of(rule)) <= set(rules.BACKENDS), rule
        assert rule.__doc__ or rule is rules.dropout_elsewhere or rule is rules.tiny, rule
    q, k, v = qkv(L=4, S=4)
    assert rules.no_kernel(build(q, k, v)).backend == "reference"


@pytest.mark.parametrize("mask,mod,backend,fwd,bwd", [
    (None, None, "sdpa", "fused CPU flash kernel", "fused CPU flash backward"),
    (M.sliding_window(16), None, "spans", "key interval", "backward"),
    (M.dilated(2), Sc.softcap(4.0), "blockwise", "online softmax", "recomputed tiles"),
])
def test_plan_prints_what_runs_in_both_directions(mask, mod, backend, fwd, bwd):
    q, k, v = qkv(L=512, S=512)
    p = salience.plan(q, k, v, mask=mask, score_mod=mod)
    assert p.backend == backend and fwd in p.forward and bwd in p.backward, p
    assert f"forward: {p.forward}" in str(p) and f"backward: {p.backward}" in str(p)


def test_a_forced_backend_that_cannot_take_the_problem_is_refused_with_the_reason():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='spans' needs a mask whose visible keys form one interval"):
        salience.attention(q, k, v, mask=M.dilated(2), backend="spans")
    with pytest.raises(ValueError, match="backend='decode' cannot take this problem"):
        salience.attention(q, k, v, mask=M.causal(), backend="decode")
    with pytest.raises(ValueError, match="backend='bias' cannot take this problem"):
        salience.attention(q, k, v, mask=M.causal(), backend="bias")
    with pytest.raises(ValueError, match="backend must be one of"):
        salience.attention(q, k, v, backend="flash")


def test_forced_backends_compute_the_same_answer():
    q, k, v = qkv()
    want = reference.attention(q, k, v, mask=M.sliding_window(9)).out
    for backend in ("sdpa", "spans", "blockwise", "reference"):
        got = salience.attention(q, k, v, mask=M.sliding_window(9), backend=backend)
        assert (got - want).abs().max().item() < 1e-12, backend


def test_config_is_passed_explicitly_and_scoped():
    q, k, v = qkv(L=16, S=16)
    assert salience.plan(q, k, v, mask=M.dilated(2)).backend == "reference"  # tiny: one dense pass
    with kconfig.use(kconfig.DEFAULT.replace(tiny=0, q_tile=8, kv_tile=8)):
        p = salience.plan(q, k, v, mask=M.dilated(2))
        assert p.backend == "blockwise" and p.executor.kernel.q_tile == 8
    assert salience.plan(q, k, v, mask=M.dilated(2)).backend == "reference"
    assert kconfig.current() is kconfig.DEFAULT
    with pytest.raises(TypeError, match="KernelConfig"):
        with kconfig.use({"tiny": 0}):
            pass


def test_the_per_dtype_fields_take_one_int_for_every_dtype():
    c = kconfig.DEFAULT.replace(band_q_block=8)
    assert set(c.band_q_block.values()) == {8} and kconfig.DEFAULT.band_q_block[torch.float32] == 32


def test_problem_is_built_once_and_derives_what_rules_share():
    q, k, v = qkv(L=64, S=64)
    p = build(q, k, v, mask=M.causal() & M.sliding_window(8), score_mod=Sc.temperature(2.0))
    assert (p.B, p.H, p.Hkv, p.L, p.S) == (1, 4, 2, 64, 64) and p.whole
    lo, hi = p.intervals
    assert lo[0, 20].item() == 12 and hi[0, 20].item() == 21
    assert p.alpha == 0.5 and p.mod_rest is None and p.eff_scale == pytest.approx(0.125)
    assert p.intervals is p.intervals  # cached


@pytest.mark.skipif(not kdecode.available(torch.zeros(1)), reason=f"decode kernel: {kdecode.status()}")
@pytest.mark.parametrize("mask,mod", [
    (M.causal(align="bottom_right"), None),
    (M.sliding_window(300, align="bottom_right"), Sc.alibi(8, offset=2046)),
    (M.causal(align="bottom_right") & M.padding(kv_lengths=[2048, 1100]), Sc.softcap(5.0)),
    (None, Sc.temperature(2.0)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_queries_against_a_long_cache_take_the_decode_kernel(mask, mod, dtype):
    q, k, v = qkv(B=2, H=8, Hkv=2, L=2, S=2048, dtype=dtype)
    p = salience.plan(q, k, v, mask=mask, score_mod=mod)
    assert p.backend == "decode" and isinstance(p.executor, DecodeExec) and "forward only" in p.backward, p
    got = salience.attention(q, k, v, mask=mask, score_mod=mod)
    want = reference.attention(q.double(), k.double(), v.double(), mask=mask, score_mod=mod).out
    same_dtype = reference.attention(q, k, v, mask=mask, score_mod=mod).out
    assert_rel_close(got, same_dtype, want)


def test_decode_is_not_chosen_when_a_gradient_is_needed():
    q, k, v = qkv(B=1, H=8, Hkv=2, L=1, S=2048, dtype=torch.float32)
    q.requires_grad_()
    p = salience.plan(q, k, v, mask=M.causal(align="bottom_right"))
    assert p.backend != "decode"
    salience.attention(q, k, v, mask=M.causal(align="bottom_right")).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_bias_tensors_take_their_rules():
    q, k, v = qkv(L=300, S=300)
    bias = torch.randn(1, 4, 300, 300, dtype=torch.float64)
    assert salience.plan(q, k, v, bias=bias).backend == "bias"
    p = salience.plan(q, k, v, bias=bias, score_mod=Sc.softcap(3.0))
    assert p.backend == "blockwise" and "bias" in p.reason
    got = salience.attention(q, k, v, bias=bias, score_mod=Sc.softcap(3.0), mask=M.causal())
    want = reference.attention(q, k, v, bias=bias, score_mod=Sc.softcap(3.0), mask=M.causal()).out
    assert (got - want).abs().max().item() < 1e-12


def test_a_user_callable_runs_on_its_derived_structure():
    q, k, v = qkv(L=512, S=512)
    p = salience.plan(q, k, v, mask=lambda b, h, i, j: (i >= j) & (i - j <= 32))
    assert p.backend == "spans" and "derived" in p.reason, p
    p = salience.plan(q, k, v, mask=lambda b, h, i, j: ((i // 64 + j // 64) % 2 == 0) & (i >= j))
    assert p.backend == "blockwise" and "derived" in p.reason and p.details["structure"] == "block map", p


def test_non_dot_products_and_dropout_fall_to_the_textbook_path():
    q, k, v = qkv(L=128, S=128)
    p = salience.plan(q, k, v, compatibility=Sc.Additive(16))
    assert p.backend == "reference" and isinstance(p.executor, ReferenceExec)
    p = dispatch.choose(q, k, v, mask=M.dilated(2).bind(128, 128), score_mod=None, compatibility=None,
                        need_lse=True, backend=None, dropout_p=0.1)
    assert p.backend == "reference" and "dropout" in p.reason


def test_the_rule_table_in_the_docs_is_the_one_in_the_code():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "kernels.md").read_text()
    table = doc[doc.index("| # | rule | backend | when |"):]
    table = table[:table.index("\n\n")]
    named = [n for row in table.splitlines()[2:] for n in re.findall(r"`(\w+)`", row.split("|")[2])]
    assert named == [r.__name__ for r in rules.RULES]


@pytest.mark.skipif(not kdecode.available(torch.zeros(1)), reason=f"decode kernel: {kdecode.status()}")
def test_decode_skips_the_cache_wide_guard_and_hidden_nan_stays_out(monkeypatch):
    from salience.kernels import guard

    q, k, v = qkv(B=2, H=8, Hkv=2, L=1, S=2048, dtype=torch.float32)
    k[0, :, 1500:], v[1, :, 1000:] = float("nan"), float("inf")  # beyond each sequence's length
    mask = M.causal(align="bottom_right") & M.padding(kv_lengths=[1500, 1000])
    calls = []
    monkeypatch.setattr(guard, "all_finite", lambda t: calls.append(1) or True)
    assert salience.plan(q, k, v, mask=mask).backend == "decode"
    out = salience.attention(q, k, v, mask=mask)
    assert calls == [] and torch.isfinite(out).all()
    want = reference.attention(q.double(), k[:, :, :1000].double(), v[:, :, :1000].double()).out[1]
    assert (out[1].double() - want).abs().max().item() < 1e-5


def test_no_function_in_kernels_is_longer_than_sixty_lines():
    """Kernels v2 keeps kernels/ readable: each function does one step (docstring included)."""
    import ast
    from pathlib import Path

    root = Path(salience.__file__).resolve().parent / "kernels"
    long = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], long


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("case", ["causal_br", "window_br", "causal_br_and_lengths"])
def test_a_decoding_step_on_a_short_cache_takes_the_fused_kernel(case, L, dtype):
    """Below decode_min_keys, a few rows per sequence that see one key interval run torch's fused kernel (over a
    slice of the keys when the interval is the same for every sequence, else with a compact key mask) instead of the textbook path, with the reference's
    answers forward and backward (relative-error rule against float64)."""
    B, H, Hkv, S = 2, 8, 2, 300
    lengths = torch.tensor([300, 170])
    mask = {"causal_br": M.causal(align="bottom_right"),
            "window_br": M.sliding_window(40, align="bottom_right"),
            "causal_br_and_lengths": M.causal(align="bottom_right") & M.padding(kv_lengths=lengths)}[case]
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, L=L, S=S, dtype=torch.float64, seed=L)
    plan = salience.plan(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask)
    if L == 1:
        assert plan.backend == "sdpa" and "query row(s)" in plan.reason, plan
        # one interval for every sequence: a slice of the keys, no mask; lengths per sequence: a compact key mask
        assert ("no mask" in plan.reason) == (case != "causal_br_and_lengths"), plan
        if case != "causal_br_and_lengths":
            ex = rules.choose(build(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask)).executor
            assert (ex.a, ex.z) == ((0, S) if case == "causal_br" else (S - 41, S)), (ex.a, ex.z)
    else:  # the rows' intervals differ: another rule
        assert "query row(s)" not in plan.reason, plan
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    qt, kt, vt = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out = salience.attention(qt, kt, vt, mask=mask)
    ref = reference.attention(qr, kr, vr, mask=mask).out
    ref64 = reference.attention(q64, k64, v64, mask=mask).out
    assert_rel_close(out, ref, ref64, what="out")
    g = torch.randn_like(ref64)
    out.backward(g.to(dtype))
    ref.backward(g.to(dtype))
    ref64.backward(g)
    for a, b, c, name in ((qt, qr, q64, "dq"), (kt, kr, k64, "dk"), (vt, vr, v64, "dv")):
        assert_rel_close(a.grad, b.grad, c.grad, what=name)


def test_shared_interval_rule_leaves_rows_that_see_nothing():
    """A sequence whose rows see no key must give zeros, which the fused kernel does not: the rule declines."""
    q, k, v = qkv(B=2, L=1, S=300)
    mask = M.padding(kv_lengths=torch.tensor([300, 0])) & M.causal(align="bottom_right")
    assert rules.shared_interval_sdpa(build(q, k, v, mask=mask)) is None
    out = salience.attention(q, k, v, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not torch.isnan(out).any()


@pytest.mark.parametrize("case", ["window_br", "causal_br_and_lengths"])
def test_shared_interval_rule_keeps_hidden_nan_out(case):
    """NaN/inf stored at keys outside the shared interval (before a window, past a sequence's length) leaves the
    rows that cannot see them bit-for-bit as with finite values there."""
    lengths = torch.tensor([300, 170])
    mask = {"window_br": M.sliding_window(40, align="bottom_right"),
            "causal_br_and_lengths": M.causal(align="bottom_right") & M.padding(kv_lengths=lengths)}[case]
    q, k, v = qkv(B=2, H=8, Hkv=2, L=1, S=300, dtype=torch.float32, seed=7)
    assert rules.shared_interval_sdpa(build(q, k, v, mask=mask)) is not None
    clean = salience.attention(q, k, v, mask=mask)
    k2, v2 = k.clone(), v.clone()
    hidden = 250 if case == "window_br" else 200  # before the window of row 299; past sequence 1's 170 keys
    k2[:, :, hidden], v2[:, :, hidden] = float("nan"), float("inf")
    b = slice(None) if case == "window_br" else slice(1, 2)
    out = salience.attention(q, k2, v2, mask=mask)
    assert torch.equal(out[b], clean[b])


def test_a_shared_key_slice_skips_the_guard_and_keys_outside_get_zero_gradients(monkeypatch):
    """A decoding step under a window on a short cache runs torch's fused kernel on k[:, :, a:z] (a view): no
    cache-wide finiteness pass, NaN before the window never read, and the keys outside the slice get zero
    gradients while those inside match the float64 reference's."""
    from salience.kernels import guard

    S, w = 300, 40
    mask = M.sliding_window(w, align="bottom_right")
    q, k, v = qkv(B=2, H=8, Hkv=2, L=1, S=S, dtype=torch.float64, seed=3)
    calls = []
    monkeypatch.setattr(guard, "all_finite", lambda t: calls.append(1) or True)
    ex = rules.choose(build(q.float(), k.float(), v.float(), mask=mask)).executor
    assert isinstance(ex, KeySliceExec) and (ex.a, ex.z) == (S - w - 1, S)
    k_nan = k.float().clone()
    k_nan[:, :, : S - w - 1] = float("nan")
    clean = salience.attention(q.float(), k.float(), v.float(), mask=mask)
    assert torch.equal(salience.attention(q.float(), k_nan, v.float(), mask=mask), clean) and calls == []
    qt, kt, vt = (t.float().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 8, 1, 16, dtype=torch.float64)
    salience.attention(qt, kt, vt, mask=mask).backward(g.float())
    reference.attention(qr, kr, vr, mask=mask).out.backward(g.float())
    reference.attention(q64, k64, v64, mask=mask).out.backward(g)
    assert not kt.grad[:, :, : S - w - 1].any() and not vt.grad[:, :, : S - w - 1].any()
    for a, b, c, name in ((qt, qr, q64, "dq"), (kt, kr, k64, "dk"), (vt, vr, v64, "dv")):
        assert_rel_close(a.grad, b.grad, c.grad, what=name)


@pytest.mark.parametrize("S", [300, 2048])  # the fused kernel over a slice; the decode kernel
def test_a_decoding_step_under_no_grad_takes_tensors_that_require_grad(S):
    """Leaf tensors with requires_grad=True under torch.no_grad(): the decode and slice plans run (no backward is
    asked for) and match the float64 reference. The decode path used to refuse them."""
    q, k, v = qkv(B=2, H=8, Hkv=2, L=1, S=S, dtype=torch.float64, seed=5)
    mask = M.causal(align="bottom_right")
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        want = "decode" if S >= 1024 and kdecode.available(q32) else "sdpa"
        assert salience.plan(q32, k32, v32, mask=mask).backend == want
        out = salience.attention(q32, k32, v32, mask=mask)
        ref = reference.attention(q.float(), k.float(), v.float(), mask=mask).out
    assert_rel_close(out, ref, reference.attention(q, k, v, mask=mask).out)
