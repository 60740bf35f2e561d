"""score_mods and compatibility functions against direct computations, and FlexAttention parity."""

import math
import warnings

import pytest
import torch

import salience
from salience import scores as Sc

B, H, L, S, D = 2, 4, 7, 9, 5


def idx():
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(L).view(1, 1, L, 1), torch.arange(S).view(1, 1, 1, S))


def apply(mod, s):
    return mod(s, *idx())


def test_alibi_direct():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    s = torch.randn(B, H, L, S, dtype=torch.float64)
    out = apply(Sc.alibi(slopes), s)
    for h in range(H):
        for i in range(L):
            for j in range(S):
                assert math.isclose(out[1, h, i, j].item(), s[1, h, i, j].item() - slopes[h].item() * abs(i - j))


def test_alibi_slope_schedule():
    assert torch.allclose(Sc.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4-head schedule, then every other slope of the 8-head schedule
    want = [2.0 ** (-2 * (i + 1)) for i in range(4)] + [2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(Sc.alibi_slopes(6), torch.tensor(want))
    for n in (1, 3, 5, 12, 16, 40):
        sl = Sc.alibi_slopes(n)
        assert sl.shape == (n,) and bool((sl > 0).all()) and bool((sl < 1).all())
    with pytest.raises(ValueError, match="num_heads"):
        Sc.alibi_slopes(0)


def test_softcap_and_temperature_direct():
    s = torch.randn(B, H, L, S, dtype=torch.float64) * 30
    assert torch.allclose(apply(Sc.softcap(5.0), s), 5.0 * torch.tanh(s / 5.0))
    assert torch.allclose(apply(Sc.temperature(2.5), s), s / 2.5)
    comp = Sc.compose(Sc.temperature(2.0), Sc.softcap(3.0))
    assert torch.allclose(apply(comp, s), 3.0 * torch.tanh(s / 2.0 / 3.0))
    assert torch.allclose(apply(Sc.temperature(2.0) >> Sc.softcap(3.0), s), apply(comp, s))
    assert repr(comp) == "temperature(2) >> softcap(3)"
    assert comp.pointwise


def test_relative_bias_direct():
    table = torch.randn(32, H, dtype=torch.float64)
    s = torch.zeros(B, H, L, S, dtype=torch.float64)
    for bidir in (True, False):
        out = apply(Sc.relative_bias(table, 32, 128, bidirectional=bidir), s)
        for i in range(L):
            for j in range(S):
                bucket = int(Sc.t5_bucket(torch.tensor(j - i), 32, 128, bidir))
                assert torch.equal(out[0, :, i, j], table[bucket])


def test_t5_bucket_matches_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300)
    for bidir in (True, False):
        for nb, md in ((32, 128), (16, 64), (8, 20)):
            want = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            assert torch.equal(Sc.t5_bucket(rel, nb, md, bidir), want)


def test_t5_bucket_properties():
    rel = torch.arange(-1000, 1000)
    b = Sc.t5_bucket(rel, 32, 128, True)
    assert int(b.min()) >= 0 and int(b.max()) <= 31
    assert torch.equal(b[1000 - torch.arange(8)], torch.arange(8))  # small distances (keys behind) exact
    assert torch.equal(b[1001:1008], 16 + torch.arange(1, 8))  # keys ahead use the upper half
    b2 = Sc.t5_bucket(rel, 32, 128, False)
    assert bool((b2[1000:] == 0).all())  # causal: future keys share bucket 0


def test_relative_bias_trains():
    table = torch.zeros(8, 2, requires_grad=True)
    q = torch.randn(1, 2, 5, 4)
    out = salience.attention(q, q, q, score_mod=Sc.relative_bias(table, 8, 16))
    out.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: Sc.softcap(0), ValueError, "cap"),
        (lambda: Sc.temperature(-1.0), ValueError, "t must"),
        (lambda: Sc.alibi(torch.ones(2, 2, 2)), ValueError, "slopes"),
        (lambda: Sc.relative_bias(torch.ones(4, 2), num_buckets=8), ValueError, "num_buckets"),
        (lambda: Sc.relative_bias(torch.ones(3, 2), num_buckets=3), ValueError, "even"),
        (lambda: Sc.compose(), ValueError, "at least one"),
        (lambda: Sc.as_score_mod(lambda b, h, q, kv: q > kv), TypeError, "mask"),
        (lambda: Sc.as_score_mod("alibi"), TypeError, "callable"),
        (lambda: Sc.compatibility("nope"), ValueError, "unknown compatibility"),
    ],
)
def test_score_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------- compatibility functions


def qk(Dq=D, Dk=D):
    return torch.randn(B, H, L, Dq, dtype=torch.float64), torch.randn(B, H, S, Dk, dtype=torch.float64)


def test_dot_and_scaled_dot_direct():
    q, k = qk()
    direct = torch.einsum("bhld,bhsd->bhls", q, k)
    assert torch.allclose(Sc.Dot()(q, k), direct)
    assert torch.allclose(Sc.ScaledDot()(q, k), direct / math.sqrt(D))
    assert torch.allclose(Sc.ScaledDot(0.3)(q, k), direct * 0.3)


def test_general_direct():
    q, k = qk(5, 3)
    g = Sc.General(5, 3).double()
    want = torch.einsum("bhld,de,bhse->bhls", q, g.weight, k)
    assert torch.allclose(g(q, k), want)
    assert torch.allclose(Sc.General(5).double()(q, q[:, :, :S]), torch.einsum("bhld,bhsd->bhls", q, q[:, :, :S]))


def test_additive_direct():
    q, k = qk(5, 3)
    a = Sc.Additive(5, 3, hidden=6).double()
    want = torch.zeros(B, H, L, S, dtype=torch.float64)
    for i in range(L):
        for j in range(S):
            e = torch.tanh(q[:, :, i] @ a.w_q.weight.T + k[:, :, j] @ a.w_k.weight.T + a.w_k.bias)
            want[:, :, i, j] = (e @ a.v.weight.T).squeeze(-1)
    assert torch.allclose(a(q, k), want)
    assert torch.allclose(a.scores_from_projected(q, a.project_keys(k), chunk=2), want)


def test_cosine_direct():
    q, k = qk()
    c = Sc.Cosine(0.2).double()
    want = torch.nn.functional.cosine_similarity(q.unsqueeze(3), k.unsqueeze(2), dim=-1) / 0.2
    assert torch.allclose(c(q, k), want)
    cl = Sc.Cosine(0.2, learnable=True).double()
    cl(q, k).sum().backward()
    assert cl.log_temperature.grad is not None


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "general", "additive", "cosine"])
def test_attention_with_compatibility_equals_reference(name):
    q, k = qk()
    v = torch.randn(B, H, S, 3, dtype=torch.float64)
    args = (D,) if name in ("general", "additive") else ()
    comp = Sc.compatibility(name, *args).double()
    with torch.no_grad():
        if name == "general":
            comp.weight.normal_()
    ref = salience.reference.attention(q, k, v, compatibility=comp, mask=salience.masks.causal())
    s = comp(q, k).masked_fill(~salience.masks.causal().to_dense(B, H, L, S), float("-inf"))
    assert torch.allclose(ref.weights, torch.softmax(s, -1))
    fast = salience.attention(q, k, v, compatibility=comp, mask=salience.masks.causal())
    assert torch.allclose(fast, ref.out, atol=1e-12)


MODS = [
    Sc.alibi(4),
    Sc.softcap(2.0),
    Sc.temperature(0.5),
    Sc.relative_bias(torch.randn(32, 4, dtype=torch.float64), 32, 64, True),
    Sc.compose(Sc.alibi(4), Sc.softcap(3.0)),
]


@pytest.mark.parametrize("mod", MODS, ids=repr)
def test_flex_attention_score_mod_parity(mod):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (torch.randn(2, 4, 32, 8, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_flex = flex.flex_attention(q, k, v, score_mod=mod)
    ref = salience.reference.attention(q, k, v, score_mod=mod).out
    assert torch.allclose(out_flex, ref, atol=1e-12)
    assert torch.allclose(salience.attention(q, k, v, score_mod=mod), ref, atol=1e-12)
