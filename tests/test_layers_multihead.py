"""MultiHeadAttention: torch parity, the float64 reference, GQA/MQA, KV caches, weights, hooks, errors."""

import copy

import pytest
import torch
from torch import nn

import salience
from salience import _hooks
from salience import masks as M
from salience.layers import (
    ALiBi,
    KVCache,
    LocalAttention,
    MultiHeadAttention,
    MultiHeadOutput,
    PerformerAttention,
    RotaryEmbedding,
    StaticKVCache,
    T5RelativeBias,
)
from salience.testing import assert_rel_close

E, H = 16, 4


def ref_mha(layer, query, key=None, *, mask=None, key_lengths=None, dtype=torch.float64):
    """The layer's computation with salience.reference in ``dtype`` (projections, RoPE, score_mods as built)."""
    lay = copy.deepcopy(layer).to(dtype)
    x = query.to(dtype)
    y = x if key is None else key.to(dtype)
    B, L, _ = x.shape
    S = y.shape[1]
    hd = lay.head_dim
    q = lay.q_proj(x).view(B, L, lay.num_heads, hd).transpose(1, 2)
    k = lay.k_proj(y).view(B, S, lay.num_kv_heads, hd).transpose(1, 2)
    v = lay.v_proj(y).view(B, S, lay.num_kv_heads, hd).transpose(1, 2)
    sm = None
    if isinstance(lay.positional, RotaryEmbedding):
        q, k = lay.positional(q), lay.positional(k)
    elif lay.positional is not None:
        sm = lay.positional.score_mod()
    m = lay.mask
    if mask is not None:
        m = mask if m is None else m & mask
    if key_lengths is not None:
        pm = M.padding(kv_lengths=key_lengths)
        m = pm if m is None else m & pm
    r = salience.reference.attention(q, k, v, mask=m, score_mod=sm)
    out = lay.out_proj(r.out.transpose(1, 2).reshape(B, L, -1))
    return out, r.weights


# ----------------------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("bias", [True, False])
def test_parity_with_torch_self_attention_outputs_and_gradients(bias):
    t = nn.MultiheadAttention(E, H, bias=bias, batch_first=True).double()
    m = MultiHeadAttention.from_torch(t)
    x = torch.randn(3, 7, E, dtype=torch.float64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 2:] = True
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, w = t(x1, x1, x1, key_padding_mask=kpm, average_attn_weights=False)
    o = m(x2, key_padding_mask=kpm, need_weights=True)
    assert torch.allclose(a, o.output, atol=1e-12)
    assert torch.allclose(w, o.weights, atol=1e-12)
    g = torch.randn_like(a)
    a.backward(g)
    o.output.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)
    tw = dict(t.named_parameters())
    wq, wk, wv = tw["in_proj_weight"].grad.chunk(3)
    assert torch.allclose(wq, m.q_proj.weight.grad, atol=1e-12)
    assert torch.allclose(wk, m.k_proj.weight.grad, atol=1e-12)
    assert torch.allclose(wv, m.v_proj.weight.grad, atol=1e-12)
    assert torch.allclose(tw["out_proj.weight"].grad, m.out_proj.weight.grad, atol=1e-12)


def test_parity_with_torch_cross_attention_kdim_vdim_and_causal_mask():
    t = nn.MultiheadAttention(E, H, kdim=10, vdim=6, batch_first=True).double()
    m = MultiHeadAttention.from_torch(t)
    x, y, z = (torch.randn(2, 5, E, dtype=torch.float64), torch.randn(2, 9, 10, dtype=torch.float64),
               torch.randn(2, 9, 6, dtype=torch.float64))
    a, _ = t(x, y, z)
    assert torch.allclose(a, m(x, y, z).output, atol=1e-12)
    t2 = nn.MultiheadAttention(E, H, batch_first=True).double()
    m2 = MultiHeadAttention.from_torch(t2)
    x = torch.randn(2, 6, E, dtype=torch.float64)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)  # torch: True = not allowed
    a, w = t2(x, x, x, attn_mask=causal, average_attn_weights=False)
    o = m2(x, mask=M.causal(), need_weights=True)
    assert torch.allclose(a, o.output, atol=1e-12)
    assert torch.allclose(w, o.weights, atol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_from_torch_keeps_torchs_layout(batch_first, masked):
    """The same tensors in torch's module and the copy give the same outputs, whatever batch_first says."""
    t = nn.MultiheadAttention(E, H, batch_first=batch_first).double()
    m = MultiHeadAttention.from_torch(t)
    assert m.batch_first is batch_first
    B, L = 3, 6
    x = torch.randn(B, L, E, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()  # (L, B, E), torch's default
    kw_t, kw_s = {}, {}
    if masked:
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[1, 4:] = True
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)  # torch: True = not allowed
        kw_t = dict(attn_mask=causal, key_padding_mask=kpm)
        kw_s = dict(mask=M.causal(), key_padding_mask=kpm)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, w = t(x1, x1, x1, average_attn_weights=False, **kw_t)
    o = m(x2, need_weights=True, **kw_s)
    assert o.output.shape == a.shape == x.shape
    assert torch.allclose(a, o.output, atol=1e-12)
    assert torch.allclose(w, o.weights, atol=1e-12)  # weights are (B, H, L, S) in both
    g = torch.randn_like(a)
    a.backward(g)
    o.output.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
def test_from_torch_cross_attention_layout(batch_first):
    t = nn.MultiheadAttention(E, H, kdim=10, vdim=6, batch_first=batch_first).double()
    m = MultiHeadAttention.from_torch(t)
    x, y, z = (torch.randn(2, 5, E, dtype=torch.float64), torch.randn(2, 9, 10, dtype=torch.float64),
               torch.randn(2, 9, 6, dtype=torch.float64))
    if not batch_first:
        x, y, z = (u.transpose(0, 1) for u in (x, y, z))
    a, _ = t(x, y, z)
    assert torch.allclose(a, m(x, y, z).output, atol=1e-12)


def test_seq_first_layer_errors_name_its_layout():
    m = MultiHeadAttention(E, H, batch_first=False)
    assert "batch_first=False" in repr(m)
    with pytest.raises(ValueError, match=r"\(L, B, 16\) \(batch_first=False"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        MultiHeadAttention(E, H, batch_first=1)
    assert MultiHeadAttention(E, H).batch_first is True  # salience's own default is unchanged


def test_from_torch_rejects_unsupported():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("positional", [None, "rope", "alibi", "t5"])
def test_against_reference_relative_error_rule(kv_heads, positional):
    pos = {None: None, "rope": RotaryEmbedding(E // H), "alibi": ALiBi(H), "t5": T5RelativeBias(H, 8, 16)}[positional]
    layer = MultiHeadAttention(E, H, kv_heads, positional=pos, mask=M.causal())
    x = torch.randn(2, 9, E)
    lengths = [9, 6]
    out = layer(x, key_lengths=lengths, need_weights=True)
    r64, w64 = ref_mha(layer, x, key_lengths=lengths)
    r32, w32 = ref_mha(layer, x, key_lengths=lengths, dtype=torch.float32)
    assert_rel_close(out.output, r32, r64, what="output")
    assert_rel_close(out.weights, w32, w64, what="weights")


def test_gradients_against_reference_relative_error_rule():
    layer = MultiHeadAttention(E, H, 2, positional=RotaryEmbedding(E // H), mask=M.sliding_window(3))
    x = torch.randn(2, 8, E)
    grads = {}
    for name, dt, fn in (("fast", torch.float32, None), ("r32", torch.float32, ref_mha), ("r64", torch.float64, ref_mha)):
        xx = x.detach().to(dt).clone().requires_grad_()
        if fn is None:
            y = layer(xx).output
        else:
            y = fn(layer, xx, dtype=dt)[0]
        (y * torch.linspace(-1, 1, y.numel(), dtype=dt).view_as(y)).sum().backward()
        grads[name] = xx.grad
    assert_rel_close(grads["fast"], grads["r32"], grads["r64"], what="grad x")


def test_gradcheck_small_float64():
    layer = MultiHeadAttention(8, 2, 1, positional=ALiBi(2), mask=M.causal()).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, key_lengths=[3]).output, (x,))


def test_any_salience_mask_and_fully_masked_rows_give_zero_without_nan():
    layer = MultiHeadAttention(E, H, bias=False)
    x = torch.randn(2, 6, E, requires_grad=True)
    hide_row = M.MaskMod(lambda b, h, q, kv: q != 2, "hide_row_2")  # query row 2 sees nothing
    out = layer(x, mask=hide_row & M.document([0, 0, 0, 1, 1, 1]), need_weights=True)
    assert torch.all(out.output[:, 2] == 0)
    assert torch.all(out.weights[:, :, 2] == 0)
    assert torch.all(out.lse[:, :, 2] == float("-inf"))
    assert out.weights[:, :, 0, 3:].abs().sum() == 0  # documents do not see each other
    out.output.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unpacks_like_torch_and_weights_only_on_request():
    layer = MultiHeadAttention(E, H)
    out = layer(torch.randn(1, 3, E))
    assert isinstance(out, MultiHeadOutput) and out.weights is None and out.lse is None
    o, w = layer(torch.randn(1, 3, E), need_weights=True)
    assert o.shape == (1, 3, E) and w.shape == (1, H, 3, 3)
    assert torch.allclose(w.sum(-1), torch.ones(1, H, 3))


def test_dropout_only_in_training():
    layer = MultiHeadAttention(E, H, dropout=0.5)
    x = torch.randn(2, 12, E)
    layer.eval()
    assert torch.equal(layer(x).output, layer(x).output)
    layer.train()
    a, b = layer(x).output, layer(x).output
    assert not torch.allclose(a, b)


# -------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("positional", [None, "rope", "alibi", "t5"])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_kv_cache_equals_full_sequence(positional, kv_heads):
    pos = {None: None, "rope": RotaryEmbedding(E // H), "alibi": ALiBi(H),
           "t5": T5RelativeBias(H, 8, 16, bidirectional=False)}[positional]
    layer = MultiHeadAttention(E, H, kv_heads, positional=pos, mask=M.causal()).double()
    x = torch.randn(2, 11, E, dtype=torch.float64)
    full = layer(x).output
    for pieces in ([1] * 11, [4, 1, 3, 3]):
        cache, outs, i = KVCache(), [], 0
        for n in pieces:
            outs.append(layer(x[:, i : i + n], cache=cache).output)
            i += n
        assert cache.length == 11
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-12)


def test_kv_cache_with_sliding_window_and_padding():
    layer = MultiHeadAttention(E, H, mask=M.causal() & M.sliding_window(2)).double()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 0] = True  # a padded first key
    full = layer(x, key_padding_mask=kpm).output
    cache, outs = KVCache(), []
    for i in range(7):
        outs.append(layer(x[:, i : i + 1], cache=cache, key_padding_mask=kpm[:, : i + 1]).output)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-12)


def test_static_cache_for_cross_attention():
    layer = MultiHeadAttention(E, H).double()
    mem = torch.randn(2, 5, E, dtype=torch.float64)
    x = torch.randn(2, 3, E, dtype=torch.float64)
    cache = StaticKVCache()
    a = layer(x[:, :1], mem, cache=cache, key_lengths=[5, 3]).output
    b = layer(x[:, 1:], cache=cache, key_lengths=[5, 3]).output
    full = layer(x, mem, key_lengths=[5, 3]).output
    assert torch.allclose(torch.cat((a, b), 1), full, atol=1e-12)


def test_rope_positions_for_a_shard_equal_the_full_sequence():
    rope = RotaryEmbedding(E // H)
    layer = MultiHeadAttention(E, H, positional=rope).double()
    x = torch.randn(1, 10, E, dtype=torch.float64)
    full_q = rope(layer.q_proj(x).view(1, 10, H, -1).transpose(1, 2))
    shard_q = rope(layer.q_proj(x[:, 6:]).view(1, 4, H, -1).transpose(1, 2), positions=torch.arange(6, 10))
    assert torch.allclose(full_q[:, :, 6:], shard_q, atol=1e-12)
    # a layer call with explicit positions equals the offset a cache would give
    cache = KVCache()
    layer(x[:, :6], cache=cache)
    a = layer(x[:, 6:], cache=cache).output
    cache2 = KVCache()
    layer(x[:, :6], cache=cache2)
    b = layer(x[:, 6:], cache=cache2, positions=torch.arange(6, 10)).output
    assert torch.allclose(a, b, atol=1e-12)


# ------------------------------------------------------------------------------------------------ hooks


def test_emits_attention_event_only_while_recording():
    layer = MultiHeadAttention(E, H, mask=M.causal(), name="enc.0", layer_index=0)
    x = torch.randn(1, 5, E)
    events = []
    layer(x)  # nobody listens: nothing recorded, no lse computed
    _hooks.subscribe(events.append)
    try:
        out = layer(x)
    finally:
        _hooks.unsubscribe(events.append)
    layer(x)
    assert len(events) == 1
    ev = events[0]
    assert ev.name == "enc.0" and ev.layer_index == 0 and ev.module is layer
    assert ev.q.shape == (1, H, 5, E // H) and ev.lse.shape == (1, H, 5)
    # the event is enough to recompute the maps exactly
    w = salience.attention_weights(ev.q, ev.k, mask=ev.mask, score_mod=ev.score_mod, scale=ev.scale, lse=ev.lse)
    w2 = layer(x, need_weights=True).weights
    assert torch.allclose(w, w2, atol=1e-6)
    assert out.lse is not None


# ------------------------------------------------------------------------------------------------ cores


def test_local_core_equals_exact_windowed_attention():
    exact = MultiHeadAttention(E, H, mask=M.sliding_window(3, 1))
    local = MultiHeadAttention(E, H, core=LocalAttention(3, 1))
    local.load_state_dict(exact.state_dict())
    x = torch.randn(2, 13, E)
    a = exact(x, key_lengths=[13, 9], need_weights=True)
    b = local(x, key_lengths=[13, 9], need_weights=True)
    assert torch.allclose(a.output, b.output, atol=1e-5)
    assert torch.allclose(a.weights, b.weights, atol=1e-6)


def test_core_rejections():
    layer = MultiHeadAttention(E, H, core=PerformerAttention(E // H, 16))
    x = torch.randn(1, 4, E)
    with pytest.raises(ValueError, match="no KV cache"):
        layer(x, cache=KVCache())
    kpm = torch.tensor([[True, False, False, False]])
    with pytest.raises(ValueError, match="right padding"):
        layer(x, key_padding_mask=kpm)
    with pytest.raises(ValueError, match="supports mask=None or salience.masks.causal"):
        layer(x, mask=M.sliding_window(1))


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"embed_dim": 0, "num_heads": 1}, ValueError, "embed_dim must be >= 1"),
        ({"embed_dim": 10, "num_heads": 3}, ValueError, "not divisible by num_heads"),
        ({"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3}, ValueError, "multiple of num_kv_heads"),
        ({"embed_dim": 16, "num_heads": 4.0}, TypeError, "num_heads must be an int"),
        ({"embed_dim": 16, "num_heads": 4, "dropout": 1.0}, ValueError, "dropout must be in"),
        ({"embed_dim": 16, "num_heads": 4, "bias": 1}, TypeError, "bias must be a bool"),
        ({"embed_dim": 16, "num_heads": 4, "positional": "rope"}, TypeError, "positional must be"),
        ({"embed_dim": 16, "num_heads": 4, "positional": RotaryEmbedding(8)}, ValueError, "head_dim=8"),
        ({"embed_dim": 16, "num_heads": 4, "positional": ALiBi(2)}, ValueError, "num_heads=2"),
        ({"embed_dim": 16, "num_heads": 4, "mask": 3}, TypeError, "mask must be"),
        ({"embed_dim": 16, "num_heads": 4, "scale": -1.0}, ValueError, "scale must be positive"),
        ({"embed_dim": 16, "num_heads": 4, "core": 5}, TypeError, "core must be a callable"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiHeadAttention(**kwargs)


def test_call_errors():
    layer = MultiHeadAttention(E, H)
    x = torch.randn(2, 5, E)
    cases = [
        (lambda: layer(torch.randn(5, E)), ValueError, "shape \\(B, L, 16\\)"),
        (lambda: layer(x.double()), TypeError, "dtype torch.float64"),
        (lambda: layer([1.0]), TypeError, "query must be a torch.Tensor"),
        (lambda: layer(x, torch.randn(3, 5, E)), ValueError, "batch size 3"),
        (lambda: layer(x, value=x), ValueError, "value was given without key"),
        (lambda: layer(x, x, torch.randn(2, 4, E)), ValueError, "key has length 5 but value has 4"),
        (lambda: layer(x, key_padding_mask=torch.zeros(2, 5)), TypeError, "bool tensor"),
        (lambda: layer(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "shape \\(B, S\\)"),
        (lambda: layer(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), key_lengths=[5, 5]), ValueError,
         "not both"),
        (lambda: layer(x, key_lengths=[5, 6]), ValueError, "key_lengths must lie in"),
        (lambda: layer(x, key_lengths=[5.0, 4.0]), ValueError, "integer lengths"),
        (lambda: layer(x, need_weights=1), TypeError, "need_weights must be a bool"),
        (lambda: layer(x, cache=[]), TypeError, "cache must be a KVCache"),
        (lambda: layer(x, x, cache=KVCache()), ValueError, "StaticKVCache"),
        (lambda: layer(x, cache=StaticKVCache()), ValueError, "needs key="),
        (lambda: layer(x, positions=torch.arange(5)), ValueError, "positions= sets RoPE"),
        (lambda: layer(x, mask=lambda s, b, h, q, kv: s), TypeError, "score_mod"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    rope_layer = MultiHeadAttention(E, H, positional=RotaryEmbedding(E // H))
    with pytest.raises(ValueError, match="positional encodings apply to self-attention"):
        rope_layer(x, x)
    cache = KVCache()
    layer(x, cache=cache)
    with pytest.raises(ValueError, match="do not continue the cached keys"):
        layer(torch.randn(3, 1, E), cache=cache)


def test_shifted_masks_equal_slices_of_the_global_mask():
    from salience.layers._util import shift_mask

    L, S = 12, 15
    for m in (M.sliding_window(3, 1), M.causal(), M.causal(align="bottom_right"), M.document([0] * 5 + [1] * 7,
                                                                                          [0] * 6 + [1] * 9)):
        full = m.to_dense(1, 1, L, S)
        for qo, ko, ql, kl in ((0, 0, L, S), (4, 2, 5, 9), (11, 0, 1, 15), (3, 7, 6, 8)):
            sh = shift_mask(m, qo, ko, L, S)
            assert torch.equal(sh.to_dense(1, 1, ql, kl), full[:, :, qo : qo + ql, ko : ko + kl])
            band = getattr(m.bind(L, S), "band", None)
            if band is not None:  # the kernels read the shifted band: it must describe the same pattern
                lo, hi = sh.bind(ql, kl).band
                d = torch.arange(kl).view(1, -1) - torch.arange(ql).view(-1, 1)
                want = torch.ones_like(d, dtype=torch.bool)
                if lo is not None:
                    want &= d >= lo
                if hi is not None:
                    want &= d <= hi
                assert torch.equal(want, full[0, 0, qo : qo + ql, ko : ko + kl])


@pytest.mark.parametrize("positional", [None, "rope", "alibi"])
def test_bfloat16_against_reference_relative_error_rule(positional):
    pos = {None: None, "rope": RotaryEmbedding(8), "alibi": ALiBi(4)}[positional]
    layer = MultiHeadAttention(32, 4, 2, positional=pos, mask=M.causal()).to(torch.bfloat16)
    x = torch.randn(2, 40, 32).bfloat16()
    out = layer(x, key_lengths=[40, 30]).output
    ref = layer.float()  # the same bf16-rounded weights, widened
    r64, _ = ref_mha(ref, x.float(), key_lengths=[40, 30])
    r16, _ = ref_mha(ref, x.float(), key_lengths=[40, 30], dtype=torch.bfloat16)
    assert_rel_close(out, r16, r64)
