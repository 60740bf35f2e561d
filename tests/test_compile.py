"""torch.compile(fullgraph=True) and torch.export of models calling salience.attention (kernels/ops.py).

Each test compiles a small 2-block model with the "aot_eager" backend (dynamo + AOT autograd, the same graphs
inductor gets, without inductor's C++ compile) and checks the compiled forward and gradients against eager
salience and the float64 reference; one slow test uses inductor.
"""

from __future__ import annotations

import pytest
import torch

import salience
from salience import masks, scores
from salience.kernels import config, ops
from salience.testing import assert_rel_close

torch._dynamo = pytest.importorskip("torch._dynamo")

D, H, HKV = 32, 4, 2
KERNELS = config.DEFAULT.replace(tiny=0)  # small shapes, but the kernels (not the one-pass reference) run


class Block(torch.nn.Module):
    """Pre-norm attention block (GQA: H query heads over HKV kv heads) calling salience.attention."""

    def __init__(self, mask=None, score_mod=None, bias=None):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.q = torch.nn.Linear(D, D)
        self.kv = torch.nn.Linear(D, 2 * D * HKV // H)
        self.o = torch.nn.Linear(D, D)
        self.mask, self.score_mod, self.bias = mask, score_mod, bias

    def forward(self, x):
        B, L, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, L, H, D // H).transpose(1, 2)
        k, v = self.kv(h).view(B, L, 2, HKV, D // H).permute(2, 0, 3, 1, 4)
        kw = {} if self.bias is None else {"bias": self.bias}
        o = salience.attention(q, k, v, mask=self.mask, score_mod=self.score_mod, **kw)
        return x + self.o(o.transpose(1, 2).reshape(B, L, D))


def model(**kw):
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(**kw), Block(**kw)).double()


def _checkerboard(b, h, q_idx, kv_idx):  # a user callable with no interval structure
    return (q_idx >= kv_idx) & ((q_idx // 8 + kv_idx // 8) % 2 == 0)


L = 40
IDS = torch.tensor([0] * 11 + [1] * 17 + [2] * (L - 28))
CASES = {
    "causal": lambda: dict(mask=masks.causal()),
    "window": lambda: dict(mask=masks.causal() & masks.sliding_window(6)),
    "documents": lambda: dict(mask=masks.document(IDS) & masks.causal()),
    "callable": lambda: dict(mask=_checkerboard),
    "bias": lambda: dict(bias=torch.nn.Parameter(torch.randn(1, H, L, L, dtype=torch.float64).masked_fill(
        torch.rand(L, L) < 0.2, float("-inf")))),
    "relative_bias": lambda: dict(mask=masks.causal(),
                                  score_mod=scores.relative_bias(torch.nn.Parameter(0.1 * torch.randn(32, H)))),
}


def _run(m, x):
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()], allow_unused=True)
    return y, grads


def _trainables(kw):
    sm = kw.get("score_mod")
    return [sm.table] if sm is not None else []


@pytest.mark.parametrize("case", sorted(CASES))
def test_fullgraph_equals_eager(case):
    """fullgraph compile (aot_eager; fullgraph raises on any graph break): forward and every gradient equal eager."""
    kw = CASES[case]()
    m = model(**kw)
    x = torch.randn(2, L, D, dtype=torch.float64, requires_grad=True)
    with config.use(KERNELS):
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        inputs = [x, *m.parameters(), *_trainables(kw)]
        y = compiled(x)
        got = torch.autograd.grad(y.square().sum(), inputs, allow_unused=True)
        y0 = m(x)
        want = torch.autograd.grad(y0.square().sum(), inputs, allow_unused=True)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"gradient {i}: compiled {a is None}, eager {b is None}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient {i}")
    if kw.get("score_mod") is not None or kw.get("bias") is not None:
        assert got[-1].abs().sum() > 0  # the score_mod's table / the bias really got a gradient


def test_explain_reports_no_graph_break():
    """torch._dynamo.explain of a 2-block model (a named mask, a callable, a bias, a trainable score_mod)."""
    torch.manual_seed(0)
    kw = [CASES["documents"](), CASES["callable"](), CASES["bias"](), CASES["relative_bias"]()]
    m = torch.nn.Sequential(*(Block(**k) for k in kw)).double()
    x = torch.randn(2, L, D, dtype=torch.float64)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1
    ops_in_graph = [n.target for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("salience" in str(t) for t in ops_in_graph) >= 4  # four attention calls, none outside the graph


def test_salience_layers_encoder_fullgraph():
    """salience.layers.TransformerEncoder (2 layers, causal): 5 graph breaks before the custom op, now none;
    compiled forward and gradients equal eager."""
    from salience.layers import TransformerEncoder

    torch.manual_seed(4)
    enc = TransformerEncoder(num_layers=2, d_model=D, num_heads=H, num_kv_heads=HKV, mask=masks.causal()).double()
    x = torch.randn(2, L, D, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(enc)(x).graph_break_count == 0
    with config.use(KERNELS):
        y, g = _run(torch.compile(enc, backend="aot_eager", fullgraph=True), x)
        y0, g0 = _run(enc, x)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_attention_matches_float64_reference():
    """The compiled op in float32 against the float64 reference (the project's error rule), forward and grads."""
    torch.manual_seed(1)
    mask = masks.causal() & masks.sliding_window(5)
    f = torch.compile(lambda q, k, v: salience.attention(q, k, v, mask=mask), backend="aot_eager", fullgraph=True)
    q, k, v = (torch.randn(2, H, 48, 16) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref32 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref64 = [t.double().requires_grad_() for t in (q, k, v)]
    with config.use(KERNELS):
        out = f(*leaves)
    r32 = salience.reference.attention(*ref32, mask=mask).out
    r64 = salience.reference.attention(*ref64, mask=mask).out
    assert_rel_close(out, r32, r64, what="compiled forward")
    g = torch.randn_like(out)
    for a, b, c in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(r32, ref32, g),
                       torch.autograd.grad(r64, ref64, g.double())):
        assert_rel_close(a, b, c, what="compiled gradient")


def test_training_steps_match_eager():
    """Three SGD steps of the compiled model give the parameters eager training gives."""
    torch.manual_seed(2)
    data = [torch.randn(2, L, D, dtype=torch.float64) for _ in range(3)]
    results = []
    for compile_it in (False, True):
        m = model(mask=masks.causal() & masks.sliding_window(8))
        step = torch.compile(m, backend="aot_eager", fullgraph=True) if compile_it else m
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for x in data:
            opt.zero_grad()
            step(x).square().mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lse_output_and_its_gradient():
    """return_lse=True under compile: the lse and the gradient through it (dlse) equal eager, on a kernel path."""
    mask = masks.causal() & masks.sliding_window(5)

    def f(q, k, v):
        r = salience.attention(q, k, v, mask=mask, return_lse=True)
        return r.out.square().sum() + r.lse.sum(), r.lse

    q, k, v = (torch.randn(2, 4, 48, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with config.use(KERNELS):
        loss, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
        got = torch.autograd.grad(loss, (q, k, v))
        loss0, lse0 = f(q, k, v)
        want = torch.autograd.grad(loss0, (q, k, v))
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, lse0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_swapping_the_mask_object_is_never_stale():
    """Dynamo guards on the mask/score_mod objects: replacing them after compiling retraces (no stale spec)."""
    class M(torch.nn.Module):
        def __init__(self, mask, score_mod):
            super().__init__()
            self.mask, self.score_mod = mask, score_mod

        def forward(self, q):
            return salience.attention(q, q, q, mask=self.mask, score_mod=self.score_mod)

    q = torch.randn(1, 2, 24, 8)
    m = M(lambda b, h, i, j: i >= j, scores.softcap(5.0))
    c = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(c(q), m(q))
    for mask, mod in ((lambda b, h, i, j: i <= j, None), (masks.sliding_window(3), scores.softcap(0.5))):
        m.mask, m.score_mod = mask, mod
        torch.testing.assert_close(c(q), m(q))


def test_mask_tensor_is_an_input_not_a_constant():
    """A bool mask tensor passed to the compiled function is read on every call (never baked into the graph)."""
    f = torch.compile(lambda q, k, v, m: salience.attention(q, k, v, mask=m), backend="aot_eager", fullgraph=True)
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(24, 24, generator=g) > 0.3
        torch.testing.assert_close(f(q, k, v, m), salience.attention(q, k, v, mask=m))


def test_tensor_scale_no_graph_break_and_checked():
    """A tensor scale (a buffer) is folded into q in the graph, not read with .item(); a bad value still raises."""
    causal = masks.causal()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(0.3))

        def forward(self, q, k, v):
            return salience.attention(q, k, v, mask=causal, scale=self.scale)

    m = M()
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    torch._dynamo.reset()
    assert torch._dynamo.explain(m)(q, k, v).graph_break_count == 0
    f = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(q, k, v), salience.attention(q, k, v, mask=causal, scale=0.3))
    m.scale.fill_(-1.0)
    with pytest.raises(RuntimeError, match="scale must be positive and finite"):
        f(q, k, v)


def test_hidden_nan_keys_under_compile():
    """The non-finite guard runs inside the op: a NaN key no row can see changes nothing, forward or backward."""
    causal = masks.causal()
    f = torch.compile(lambda q, k, v: salience.attention(q, k, v, mask=causal), backend="aot_eager", fullgraph=True)
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    k[:, :, -1] = float("nan")  # only the last row sees the last key
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    with config.use(KERNELS):
        out = f(*leaves)
        out0 = salience.attention(*eager, mask=causal)
    assert out[:, :, :-1].isfinite().all()
    torch.testing.assert_close(out[:, :, :-1], out0[:, :, :-1])
    ga = torch.autograd.grad(out[:, :, :-1].sum(), leaves)
    gb = torch.autograd.grad(out0[:, :, :-1].sum(), eager)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_executor_backward_used_not_recompute(monkeypatch):
    """On the kernel paths the backward op runs the plan's own backward (no second forward)."""
    def fail(*a, **k):
        raise AssertionError("recomputed the forward under autograd")

    monkeypatch.setattr(ops, "_recompute_grads", fail)
    mask = masks.causal() & masks.sliding_window(6)
    f = torch.compile(lambda q, k, v: salience.attention(q, k, v, mask=mask), backend="aot_eager", fullgraph=True)
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    with config.use(KERNELS):
        out = f(q, k, v)
        got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(salience.attention(q, k, v, mask=mask).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fake_shapes_and_dtypes():
    """The fake implementations: out (B, H, L, Dv) in q's dtype, lse (B, H, L) float32 (float64 for float64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = ops.spec_key(None, None, 0.25, None, None)
    for dtype, lse_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)):
        with FakeTensorMode():
            q = torch.empty(2, 4, 5, 16, dtype=dtype)
            k, v = torch.empty(2, 2, 7, 16, dtype=dtype), torch.empty(2, 2, 7, 24, dtype=dtype)
            out, lse = torch.ops.salience.attention(q, k, v, None, None, [], key)
            assert out.shape == (2, 4, 5, 24) and out.dtype == dtype
            assert lse.shape == (2, 4, 5) and lse.dtype == lse_dtype
        q = torch.randn(2, 4, 5, 16).to(dtype)
        k, v = torch.randn(2, 2, 7, 16).to(dtype), torch.randn(2, 2, 7, 24).to(dtype)
        out, lse = torch.ops.salience.attention(q, k, v, None, None, [], key)  # the real ones agree
        assert out.dtype == dtype and lse.dtype == lse_dtype and out.shape == (2, 4, 5, 24)


def test_opcheck():
    """torch.library.opcheck: schema, fake vs real, autograd registration of salience::attention."""
    mask = masks.causal() & masks.sliding_window(3)
    key = ops.spec_key(mask, None, 0.5, None, None)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.salience.attention.default, (q, k, v, None, None, [], key),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_export_equals_eager():
    """torch.export.export of the model in eval mode (named masks and a bias) runs and equals eager."""
    for case in ("documents", "bias", "callable"):
        m = model(**CASES[case]()).eval()
        x = torch.randn(2, L, D, dtype=torch.float64)
        ep = torch.export.export(m, (x,))
        targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.salience.attention.default) == 2
        x2 = torch.randn(2, L, D, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x2), m(x2), rtol=1e-12, atol=1e-12)


def test_dynamic_lengths_compile_and_export():
    """One graph serves every length: dynamo's automatic dynamic shapes (3 lengths) and export with a Dim."""
    mask = masks.causal() & masks.sliding_window(6)
    f = torch.compile(lambda q, k, v: salience.attention(q, k, v, mask=mask), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    for n in (24, 32, 40):
        q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
        out = f(q, k, v)
        torch.testing.assert_close(out, salience.attention(q, k, v, mask=mask))
        torch.testing.assert_close(torch.autograd.grad(out.sum(), q)[0],
                                   torch.autograd.grad(salience.attention(q, k, v, mask=mask).sum(), q)[0])
    m = model(mask=mask).eval()
    n = torch.export.Dim("n", min=8, max=256)
    ep = torch.export.export(m, (torch.randn(2, L, D, dtype=torch.float64),), dynamic_shapes={"input": {1: n}})
    x = torch.randn(2, 57, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-12, atol=1e-12)


def test_unsupported_calls_break_the_graph_with_the_reason():
    """A mask built inside the compiled function, or dropout, cannot take the custom op: plain torch.compile
    graph-breaks around the eager path (still equal to eager); fullgraph=True raises with the reason."""
    q = torch.randn(1, 2, 24, 8)

    def inline(q):
        return salience.attention(q, q, q, mask=masks.causal() & masks.sliding_window(4))

    torch._dynamo.reset()
    with pytest.raises(Exception, match="built inside the compiled function"):
        torch.compile(inline, backend="aot_eager", fullgraph=True)(q)
    torch._dynamo.reset()  # (dynamo caches per code object)
    torch.testing.assert_close(torch.compile(inline, backend="aot_eager")(q), inline(q))

    def drop(q):
        return salience.attention(q, q, q, dropout_p=0.1)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="dropout_p > 0"):
        torch.compile(drop, backend="aot_eager", fullgraph=True)(q)
    torch._dynamo.reset()
    assert torch.compile(drop, backend="aot_eager")(q).shape == q.shape


@pytest.mark.slow
def test_inductor_fullgraph_train_and_infer():
    """The default inductor backend: forward and gradients equal eager (float32; about a minute on 2 cores)."""
    import torch._functorch.config
    import torch._inductor.config

    torch.manual_seed(3)
    m = torch.nn.Sequential(Block(mask=masks.causal() & masks.sliding_window(8)), Block(mask=_checkerboard))
    x = torch.randn(2, L, D, requires_grad=True)
    # inductor's caches key on the graph, not on a custom op's fake: a cached artifact from an older fake (other
    # output strides) would fail its stride assertion, so this test compiles afresh
    fresh = (torch._inductor.config.patch(fx_graph_cache=False),
             torch._functorch.config.patch(enable_autograd_cache=False))
    with config.use(KERNELS), fresh[0], fresh[1]:
        y, g = _run(torch.compile(m, fullgraph=True), x)
        y0, g0 = _run(m, x)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opaque_wraps_only_under_a_compiled_frame(monkeypatch):
    """dispatch.attend runs as is when no compiled function is running (the torch.compiler.disable wrapper costs
    ~100 us per call and torch._dynamo is loaded wherever transformers is), and through that wrapper when called
    from a compiled function after a graph break, where dynamo must not compile the frames it runs."""
    from salience.kernels import dispatch

    assert dispatch._frame_callback() is None
    calls = []
    real_disable = torch.compiler.disable

    def counting_disable(fn, *a, **kw):
        calls.append(fn)
        return real_disable(fn, *a, **kw)

    monkeypatch.setattr(torch.compiler, "disable", counting_disable)
    seen = []

    def inner(x):
        seen.append(dispatch._frame_callback() is not None)
        return x * 2

    opaque = dispatch._opaque_to_compile(inner)
    x = torch.randn(3)
    assert torch.equal(opaque(x), x * 2) and seen == [False] and calls == []  # eager: no wrapper made or used

    @torch.compile(backend="eager")
    def f(t):
        return opaque(t + 1) - 1

    torch._dynamo.reset()
    assert torch.equal(f(x), x * 2 + 1)
    assert calls == [inner]                     # the wrapper, made once, from inside the compiled function
    assert seen[-1] is False                    # and inside it dynamo's callback is off: inner is not compiled
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    torch._dynamo.reset()
    g = torch.compile(lambda q, k, v: dispatch.attend(q, k, v, mask=masks.causal().bind(5, 5, q.device),
                                                      score_mod=None, scale=None, compatibility=None, dropout_p=0.0,
                                                      need_lse=True, backend=None)[1].out, backend="eager")
    with config.use(KERNELS):
        out = g(q, k, v)
    r32 = salience.reference.attention(q, k, v, mask=masks.causal()).out
    r64 = salience.reference.attention(q.double(), k.double(), v.double(), mask=masks.causal()).out
    assert_rel_close(out, r32, r64, what="attend called from a compiled function")


def test_frame_callback_without_the_torch_function(monkeypatch):
    """Older torch without get_eval_frame_callback: no wrapper needed until torch._dynamo is loaded, then always."""
    import sys

    from salience.kernels import dispatch

    monkeypatch.delattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback")
    assert dispatch._frame_callback() is True  # torch._dynamo is loaded in this test module
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    assert dispatch._frame_callback() is None
