"""salience.interpret.methods: hand-computed cases, invariants and input errors."""

import math

import pytest
import torch

from salience.interpret import methods as M

# two layers, one head, two tokens; computed by hand below
A0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
A1 = torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
TWO = torch.stack([A0, A1]).unsqueeze(1)  # (layers=2, H=1, 2, 2)


def close(t, want, abs=1e-7, rel=1e-6):
    t = torch.as_tensor(t).double()
    torch.testing.assert_close(t, torch.as_tensor(want, dtype=torch.float64).reshape(t.shape), atol=abs, rtol=rel)


def rand_maps(n=3, H=2, L=6, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, H, L, L, generator=g, dtype=torch.float64) * sharp, -1)


# ------------------------------------------------------------------------------------- raw / fusion


def test_raw_selects_layers_and_heads():
    a = rand_maps(3, 4, 5)
    r = M.raw(a, layers=[2, 0], heads=[-1])
    assert r.shape == (2, 1, 5, 5)
    assert torch.equal(r[0, 0], a[2, 3]) and torch.equal(r[1, 0], a[0, 3])


def test_fuse_heads_by_hand():
    a = torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])
    close(M.fuse_heads(a, "mean"), [[[0.4, 0.6]]])
    close(M.fuse_heads(a, "max"), [[[0.6, 0.8]]])
    close(M.fuse_heads(a, "min"), [[[0.2, 0.4]]])


# ------------------------------------------------------------------------------------------ rollout


def test_rollout_two_layers_by_hand():
    # residual 0: R = A1 @ A0 = [[.5*1 + .5*.5, .5*.5], [.5, .5]]
    r = M.rollout(TWO, residual=0.0)
    close(r, [[0.75, 0.25], [0.5, 0.5]])
    # residual 0.5: A~ = (I + A) / 2 per layer
    a0 = (torch.eye(2) + A0) / 2
    a1 = (torch.eye(2) + A1) / 2
    close(M.rollout(TWO), (a1 @ a0).tolist())


def test_rollout_invariants():
    a = rand_maps(4, 3, 7)
    for fusion in M.FUSIONS:
        r = M.rollout(a, head_fusion=fusion)
        assert torch.allclose(r.sum(-1), torch.ones(7, dtype=torch.float64))  # rows stay stochastic
        assert (r >= 0).all()
    assert torch.allclose(M.rollout(a, residual=1.0), torch.eye(7, dtype=torch.float64))  # all residual: identity
    one = M.rollout(a, start_layer=2, end_layer=3, residual=0.0)
    assert torch.allclose(one, a[2].mean(0))  # a single layer with no residual is its fused map
    assert torch.allclose(M.rollout(a, start_layer=1), M.rollout(a[1:]))


def test_rollout_max_fusion_renormalises_rows():
    a = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]).expand(1, 2, 2, 2).contiguous()
    r = M.rollout(a, residual=0.0, head_fusion="max")
    close(r, [[0.5, 0.5], [0.5, 0.5]])


# --------------------------------------------------------------------------------------------- flow


def test_flow_two_layers_by_hand():
    # max-flow from top token i to input token j through A1 then A0 (residual 0), worked out by hand
    for solver in ("scipy", "networkx"):
        f = M.flow(TWO, residual=0.0, solver=solver)
        close(f, [[1.0, 0.5], [0.5, 0.5]], abs=1e-7)
    # rollout spreads the same graph differently: flow is not rollout
    assert not torch.allclose(M.flow(TWO, residual=0.0), M.rollout(TWO, residual=0.0))


def test_flow_invariants():
    a = rand_maps(3, 2, 6, seed=1)
    f = M.flow(a, solver="networkx")
    assert f.shape == (6, 6)
    assert (f >= -1e-12).all() and (f <= 1 + 1e-9).all()
    aug = M._augmented(a, 0.5, "mean", None, None)
    # a flow into input token j cannot exceed the capacity entering j from the layer above
    assert (f <= aug[0].sum(0).unsqueeze(0) + 1e-9).all()
    # nor what leaves the source
    assert (f.sum(-1) >= f.max(-1).values - 1e-12).all()
    # one layer: the only path is the direct edge
    assert torch.allclose(M.flow(a[:1], solver="networkx"), aug[0], atol=1e-9)
    # the two solvers agree (scipy scales capacities to integers)
    assert torch.allclose(M.flow(a, solver="scipy"), f, atol=1e-6)
    assert torch.allclose(M.flow(a, sources=[2, 0], solver="scipy"), f[[2, 0]], atol=1e-6)


def test_flow_refuses_long_inputs_with_reason():
    a = rand_maps(6, 1, 40)
    with pytest.raises(ValueError, match=r"flow refused.*max_seconds"):
        M.flow(a, max_seconds=0.01)
    assert M.flow_cost(6, 40, 40) > M.flow_cost(6, 40, 1)


# ------------------------------------------------------------------------------ gradient x attention


def test_gradient_x_attention_by_hand():
    g = torch.stack([torch.ones(2, 2), -torch.ones(2, 2)]).unsqueeze(1).double()
    # layer 0: R = I + A0 (grad 1); layer 1: grad negative -> clamped to 0, R unchanged
    r = M.gradient_x_attention(TWO, g)
    close(r, [[2.0, 0.0], [0.5, 1.5]])
    # two layers with positive gradients: R = (I + A1)(I + A0)
    r2 = M.gradient_x_attention(TWO, torch.ones_like(TWO))
    want = (torch.eye(2) + A1) @ (torch.eye(2) + A0)
    close(r2, want.tolist())


def test_gradient_x_attention_averages_clamped_heads():
    a = torch.tensor([[[[0.5, 0.5]] * 2, [[1.0, 0.0]] * 2]], dtype=torch.float64)  # 1 layer, 2 heads, 2x2
    g = torch.tensor([[[[2.0, -2.0]] * 2, [[1.0, 1.0]] * 2]], dtype=torch.float64)
    # head 0: max(g*a, 0) = [[1, 0]]; head 1: [[1, 0]]; mean = [[1, 0], [1, 0]]
    close(M.gradient_x_attention(a, g), [[2.0, 0.0], [1.0, 1.0]])


def test_gradient_x_attention_without_identity_by_hand():
    # TWO with gradient 1 on layer 0 and 2 on layer 1 (one head, so no head mean):
    # A_bar0 = A0 = [[1, 0], [.5, .5]], A_bar1 = 2 * A1 = [[1, 1], [0, 2]]
    # d0 = A_bar0;  d1 = d0 + A_bar1 + A_bar1 @ d0 = [[1,0],[.5,.5]] + [[1,1],[0,2]] + [[1.5,.5],[1,1]]
    g = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)]).unsqueeze(1).double()
    d = M.gradient_x_attention(TWO, g, include_identity=False)
    close(d, [[3.5, 1.5], [1.5, 3.5]])
    close(M.gradient_x_attention(TWO, g), [[4.5, 1.5], [1.5, 4.5]])  # Chefer's R = I + d
    # token importance of a mean-pooled output: mean over rows of R - I = [2.5, 2.5]; query 0: [3.5, 1.5]
    close(M.token_importance(d, "mean"), [2.5, 2.5])
    close(M.token_importance(d, 0), [3.5, 1.5])
    # zero or negative gradients: attention adds nothing, every token gets 0 (not the identity's 1/L)
    close(M.gradient_x_attention(TWO, -g, include_identity=False), torch.zeros(2, 2).tolist())
    with pytest.raises(TypeError, match="include_identity"):
        M.gradient_x_attention(TWO, g, include_identity="no")


def test_gradient_x_attention_tiny_model_by_hand():
    """One attention layer, F = w . mean_i (A V)_i: dF/dA_ij = (w . V_j) / L, by autograd through the maps.

    Three tokens, two heads; the token importance (mean over rows of R - I) is then
    mean_i mean_h max(A_hij (w . V_j) / L, 0), computed here by hand from the numbers."""
    A = torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]],
                      [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.25, 0.25, 0.5]]], dtype=torch.float64)
    V = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [0.5, 0.5]], dtype=torch.float64)  # w . V = [3, -2, 1]
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    a = A.clone().requires_grad_(True)
    F = ((a @ V).mean(1) @ w).mean()  # mean over heads of each head's mean-pooled output, projected on w
    (g,) = torch.autograd.grad(F, a)
    # dF/dA_hij = (w . V_j) / (L * H) = [3, -2, 1] / 6 for every head and row
    close(g, torch.tensor([0.5, -1 / 3, 1 / 6]).expand(2, 3, 3).tolist())
    imp = M.token_importance(M.gradient_x_attention(A.unsqueeze(0), g.unsqueeze(0), include_identity=False))
    # token 0: mean_i mean_h A_hi0 * 0.5 = 0.5 * (0.2 + 0.1 + 0.6 + 1.0 + 0 + 0.25) / 6 = 0.5 * 2.15 / 6
    # token 1: gradient negative -> 0;  token 2: (1/6) * (0.3 + 0.8 + 0.2 + 0 + 0.5 + 0.5) / 6 = 2.3 / 36
    close(imp, [0.5 * 2.15 / 6, 0.0, 2.3 / 36])
    # the identity adds 1/3 to every token: the old, flat reading
    close(M.token_importance(M.gradient_x_attention(A.unsqueeze(0), g.unsqueeze(0))), (imp + 1 / 3).tolist())


def test_token_importance():
    m = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    close(M.token_importance(m, "mean"), [0.25, 0.75])
    close(M.token_importance(m, 1), [0.0, 1.0])
    close(M.token_importance(m, 0, exclude_self=True), [0.0, 0.5])


# ------------------------------------------------------------------------- entropy, confidence, roles


def test_entropy_and_confidence_by_hand():
    a = torch.tensor([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    # rows: ln 2 and 0; the fully masked third row is left out
    assert M.entropy(a).item() == pytest.approx(math.log(2) / 2)
    assert M.entropy(a, normalize=True).item() == pytest.approx(0.5)
    assert M.confidence(a).item() == pytest.approx(0.75)
    u = torch.full((1, 1, 4, 4), 0.25)
    assert M.entropy(u).item() == pytest.approx(math.log(4))
    assert M.entropy(u, normalize=True).item() == pytest.approx(1.0)


def test_head_roles_by_hand():
    L = 5
    prev = torch.zeros(L, L)
    prev[0, 0] = 1
    for i in range(1, L):
        prev[i, i - 1] = 1
    first = torch.zeros(L, L)
    first[:, 0] = 1
    self_ = torch.eye(L)
    nxt = torch.zeros(L, L)
    for i in range(L):
        nxt[i, min(i + 1, L - 1)] = 1
    a = torch.stack([prev, first, self_, nxt]).unsqueeze(0)  # (1 layer, 4 heads, L, L)
    roles = M.head_roles(a, offsets=(1,))
    s = roles.scores
    close(s["previous_token"][0], [1.0, 0.25, 0.0, 0.0])
    close(s["first_token"][0], [0.4, 1.0, 0.2, 0.0])
    close(s["self"][0], [0.2, 0.2, 1.0, 0.2])
    close(s["offset+1"][0], [0.0, 0.0, 0.0, 1.0])
    best = {(la, h): role for la, h, role, _ in roles.best(0.9)}
    assert best == {(0, 0): "previous_token", (0, 1): "first_token", (0, 2): "self", (0, 3): "offset+1"}
    assert "previous_token" in roles.table(0.9)
    # row subsets: positions given explicitly
    sub = M.head_roles(a[:, :, 3:], row_index=[3, 4], offsets=())
    assert sub.scores["previous_token"][0, 0].item() == pytest.approx(1.0)
    # ignoring row 0 (e.g. [CLS])
    assert M.head_roles(a, ignore_rows=[0]).scores["first_token"][0, 2].item() == pytest.approx(0.0)


# ------------------------------------------------------------------------------------ head importance


class TwoHeadModel(torch.nn.Module):
    """y = out_proj(concat(head0, head1)): linear in each head's gate, so importance = |L(1) - L(gate 0)|."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(3, 4)
        self.out_proj = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out_proj(self.inp(x))


def test_head_importance_equals_exact_ablation_for_a_linear_loss():
    torch.manual_seed(0)
    model = TwoHeadModel()
    site = M.HeadSite("out_proj", model.out_proj, num_heads=2, layer=0)
    batch = torch.randn(5, 7, 3)
    loss = lambda m, b: m(b).sum(dim=(1, 2))  # noqa: E731 - per-example losses, linear in every gate
    imp = M.head_importance(model, [batch], loss, sites=[site], normalize_layers=False)
    # ablation by hand, per example: zero head h's half of the input of out_proj
    with torch.no_grad():
        h_in = model.inp(batch)
        full = model.out_proj(h_in).sum(dim=(1, 2))
        want = []
        for h in range(2):
            z = h_in.clone()
            z[..., 2 * h : 2 * h + 2] = 0
            want.append((full - model.out_proj(z).sum(dim=(1, 2))).abs().mean().item())
    close(imp.scores[0], want, rel=1e-5)
    assert imp.examples == 5
    normed = M.head_importance(model, [batch], loss, sites=[site])
    assert normed.scores[0].norm().item() == pytest.approx(1.0)
    assert imp.ranking()[0][2] == pytest.approx(max(want), rel=1e-5)
    assert not model.out_proj._forward_pre_hooks  # hooks removed


def test_find_head_sites_on_salience_layers_and_bert():
    from salience.layers import MultiHeadAttention

    stack = torch.nn.Sequential(MultiHeadAttention(8, 2), MultiHeadAttention(8, 4))
    sites = M.find_head_sites(stack)
    assert [s.num_heads for s in sites] == [2, 4] and [s.layer for s in sites] == [0, 1]
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)
    bert = BertModel(cfg, add_pooling_layer=False)
    sites = M.find_head_sites(bert)
    assert [s.name for s in sites] == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    ids = torch.tensor([[1, 5, 6, 2]])
    imp = M.head_importance(bert, [ids], lambda m, b: m(b).last_hidden_state.pow(2).sum())
    assert imp.scores.shape == (2, 4) and torch.isfinite(imp.scores).all() and (imp.scores > 0).any()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: M.rollout(torch.rand(2, 3, 3)), ValueError, "attn must have 4 dimensions"),
        (lambda: M.rollout(torch.rand(1, 1, 2, 3)), ValueError, "L == S"),
        (lambda: M.rollout(torch.ones(1, 1, 2, 2, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: M.rollout(torch.full((1, 1, 2, 2), float("nan"))), ValueError, "NaN"),
        (lambda: M.rollout(TWO, residual=1.5), ValueError, "residual must be in"),
        (lambda: M.rollout(TWO, residual="0.5"), TypeError, "residual must be a float"),
        (lambda: M.rollout(TWO, head_fusion="median"), ValueError, "head_fusion must be one of"),
        (lambda: M.rollout(TWO, start_layer=2), ValueError, "start_layer=2"),
        (lambda: M.rollout([]), ValueError, "empty list"),
        (lambda: M.rollout([torch.rand(1, 2, 2), torch.rand(1, 3, 3)]), ValueError, "different shapes"),
        (lambda: M.flow(TWO, sources=[5]), ValueError, "sources must be"),
        (lambda: M.flow(TWO, solver="fast"), ValueError, "solver must be one of"),
        (lambda: M.gradient_x_attention(TWO, torch.ones(1, 1, 2, 2)), ValueError, "grads must have the shape"),
        (lambda: M.raw(TWO, layers=[3]), ValueError, "layers \\[3\\] out of range"),
        (lambda: M.raw(TWO, heads=["a"]), TypeError, "heads must be"),
        (lambda: M.token_importance(torch.rand(2, 2), "cls"), ValueError, "query must be"),
        (lambda: M.token_importance(torch.rand(2), 0), ValueError, "2-D"),
        (lambda: M.head_roles(TWO, offsets=(0,)), ValueError, "offsets must be non-zero"),
        (lambda: M.head_roles(TWO, row_index=[0]), ValueError, "row_index must list"),
        (lambda: M.head_importance("model", [], lambda m, b: 0), TypeError, "model must be"),
        (lambda: M.head_importance(torch.nn.Linear(2, 2), [], "loss"), TypeError, "loss_fn must be callable"),
        (lambda: M.head_importance(torch.nn.Linear(2, 2), [torch.ones(1, 2)], lambda m, b: m(b).sum()),
         ValueError, "no head output projection"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_head_importance_empty_batches():
    site = M.HeadSite("p", torch.nn.Linear(4, 1), 2, 0)
    with pytest.raises(ValueError, match="batches was empty"):
        M.head_importance(site.module, [], lambda m, b: m(b).sum(), [site])
