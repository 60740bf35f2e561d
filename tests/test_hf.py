"""The Hugging Face integration: registration, mask translation, parity with eager/SDPA, capture events.

Small randomly initialised Llama-style and Mistral-style (sliding window) models are built locally: no
downloads. MiniLM parity lives in test_hf_minilm.py.
"""

import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402

import salience  # noqa: E402
import salience.integrations.hf as shf  # noqa: E402
from salience import _hooks, reference  # noqa: E402
from salience import masks as M  # noqa: E402
from salience.blocks import BlockMask  # noqa: E402
from salience.testing import assert_rel_close  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# ------------------------------------------------------------------------------------------ import hygiene


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_salience_does_not_import_transformers():
    r = _run(
        "import sys, salience, salience.models, salience.integrations\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "print('ok')"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_missing_transformers_names_the_extra():
    r = _run("import sys; sys.modules['transformers'] = None\nimport salience.integrations.hf")
    assert r.returncode != 0
    assert "pip install 'salience[hf]'" in r.stderr


def test_registered_under_salience():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert shf.is_registered()
    assert ALL_ATTENTION_FUNCTIONS["salience"] is shf.attention_forward
    assert mu.ALL_MASK_ATTENTION_FUNCTIONS["salience"] is shf.mask_function


# ------------------------------------------------------------------------------------------ mask translation


_NEW_SIGNATURE = "q_length" in inspect.signature(mu.sdpa_mask).parameters


def _hf_dense(B, L, S, qo, ko, fn, pad):
    """What transformers gives SDPA: a (B, 1, L, S) bool mask (the ground truth)."""
    where = dict(q_length=L, q_offset=qo) if _NEW_SIGNATURE else dict(cache_position=torch.arange(qo, qo + L))
    m = mu.sdpa_mask(batch_size=B, kv_length=S, kv_offset=ko, mask_function=fn, attention_mask=pad,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **where)
    return m.expand(B, 1, L, S)


def _hf_mask(B, L, S, qo=0, ko=0, **kw):
    """Call the registered mask function the way this transformers version's models do."""
    where = dict(q_length=L, q_offset=qo) if _NEW_SIGNATURE else dict(cache_position=torch.arange(qo, qo + L))
    return shf.mask_function(batch_size=B, kv_length=S, kv_offset=ko, **where, **kw)


def _ours_dense(hm, B, L, S):
    if hm.mask is None:
        return torch.ones(B, 1, L, S, dtype=torch.bool)
    return hm.mask.to_dense(B, 1, L, S)


def _pad(kind, B, N, g):
    if kind is None:
        return None
    keep = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(0, N + 1, (1,), generator=g))
        if kind == "right":
            keep[b, n:] = False
        elif kind == "left":
            keep[b, : N - n] = False
        else:
            keep[b] = torch.rand(N, generator=g) > 0.3
    keep[0] = True  # one full row
    return keep.long()


FUNCS = {
    "causal": lambda: mu.causal_mask_function,
    "bidirectional": lambda: mu.bidirectional_mask_function,
    "sliding_causal": lambda: mu.sliding_window_causal_mask_function(5),
}
if hasattr(mu, "sliding_window_bidirectional_mask_function"):  # newer transformers
    FUNCS["sliding_bidirectional"] = lambda: mu.sliding_window_bidirectional_mask_function(3)


@pytest.mark.parametrize("fn_name", sorted(FUNCS))
@pytest.mark.parametrize("pad", [None, "right", "left", "holes"])
@pytest.mark.parametrize("L,S,qo,ko", [(9, 9, 0, 0), (1, 12, 11, 0), (3, 10, 7, 0), (4, 8, 10, 6), (6, 6, 3, 3)])
def test_translation_equals_transformers_dense_mask(fn_name, pad, L, S, qo, ko):
    g = torch.Generator().manual_seed(L * 100 + S + qo)
    B = 3
    fn = FUNCS[fn_name]()
    keep = _pad(pad, B, ko + S, g)
    hm = _hf_mask(B, L, S, qo, ko, mask_function=fn, attention_mask=None if keep is None else keep.bool())
    assert isinstance(hm, shf.HFMask) and not hm.dense, hm  # structured, no L x S tensor
    expected = _hf_dense(B, L, S, qo, ko, fn, None if keep is None else keep.bool())
    assert torch.equal(_ours_dense(hm, B, L, S), expected), (hm, expected[:, 0].int())


def test_translation_names_the_usual_structures():
    tm = shf.translate_mask
    assert tm(1, 8, 8, mask_function=mu.causal_mask_function).mask.name == "causal()"
    assert tm(1, 8, 8, mask_function=mu.bidirectional_mask_function).mask is None
    assert tm(1, 1, 20, 19, 0, mu.causal_mask_function).mask is None  # decoding: every cached key is visible
    assert tm(1, 4, 20, 16, 0, mu.causal_mask_function).mask.name == "causal(align='bottom_right')"
    sw = tm(2, 64, 64, mask_function=mu.sliding_window_causal_mask_function(16)).mask
    assert sw.kind == ("sliding_window", 15, 0)
    pad = torch.tensor([[1] * 8, [1] * 5 + [0] * 3]).bool()
    hm = tm(2, 8, 8, mask_function=mu.causal_mask_function, attention_mask=pad)
    assert hm.structure == "causal() & padding(kv_lengths=[8, 5])"
    left = torch.tensor([[1] * 8, [0] * 3 + [1] * 5]).bool()
    hm = tm(2, 8, 8, mask_function=mu.bidirectional_mask_function, attention_mask=left)
    assert hm.structure == "left_padding(kv_starts=[0, 3])"
    assert torch.equal(hm.mask.to_dense(2, 1, 8, 8)[:, 0, 0], left)
    holes = torch.tensor([[1] * 8, [1, 0, 1, 1, 0, 1, 1, 1]]).bool()
    hm = tm(2, 8, 8, mask_function=mu.causal_mask_function, attention_mask=holes)
    assert hm.structure.startswith("causal() & key_mask(")
    assert torch.equal(hm.mask.to_dense(2, 1, 8, 8)[:, 0, -1], holes)


def test_translated_masks_have_analytic_tiles():
    pad = torch.ones(2, 300, dtype=torch.bool)
    pad[1, :40] = False
    pad[1, 200:] = False
    for fn in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(32), mu.bidirectional_mask_function):
        hm = shf.translate_mask(2, 300, 300, mask_function=fn, attention_mask=pad)
        bm = BlockMask.from_mask(hm.mask, 2, 1, 300, 300, q_block=32, kv_block=32)
        assert bm.analytic
        bound = hm.mask.bind(300, 300)
        evaluated = BlockMask.from_mask(lambda b, h, q, kv, m=bound: m(b, h, q, kv), 2, 1, 300, 300, 32, 32)
        assert not evaluated.analytic
        assert torch.equal(bm.classes.expand_as(evaluated.classes), evaluated.classes), hm


def test_packed_sequences_become_a_document_mask():
    B, L = 2, 10
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    packed = mu.find_packed_sequence_indices(pos)
    causal = mu.causal_mask_function
    if hasattr(mu, "remap_positions_for_packed_sequence"):  # newer transformers remap positions per sequence
        causal = mu.remap_positions_for_packed_sequence(causal, pos)
    fn = mu.and_masks(causal, mu.packed_sequence_mask_function(packed))
    hm = _hf_mask(B, L, L, mask_function=fn)
    assert not hm.dense and "document(" in hm.structure
    assert torch.equal(_ours_dense(hm, B, L, L), _hf_dense(B, L, L, 0, 0, fn, None))


def test_unreadable_mask_falls_back_to_the_dense_sdpa_mask():
    def custom(b, h, q, kv):  # an or_mask_function overlay, e.g. image tokens
        return kv < 2

    fn = mu.or_masks(mu.causal_mask_function, custom)
    hm = _hf_mask(2, 6, 6, mask_function=fn, use_vmap=True)
    assert hm.dense
    assert torch.equal(_ours_dense(hm, 2, 6, 6), _hf_dense(2, 6, 6, 0, 0, fn, None))


def test_cache_position_signature_of_transformers_4():
    hm = shf.mask_function(batch_size=1, cache_position=torch.arange(3, 7), kv_length=7,
                           mask_function=mu.causal_mask_function)
    assert (hm.q_length, hm.kv_length) == (4, 7)
    assert torch.equal(_ours_dense(hm, 1, 4, 7), _hf_dense(1, 4, 7, 3, 0, mu.causal_mask_function, None))


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 12), extra=st.integers(0, 12), ko=st.integers(0, 4), w=st.integers(1, 8),
       kind=st.sampled_from([*sorted(FUNCS), "sliding_causal_w"]), pad=st.sampled_from([None, "right", "left", "holes"]),
       seed=st.integers(0, 10**6))
def test_translation_property(L, extra, ko, w, kind, pad, seed):
    S = L + extra
    qo = ko + extra  # queries are the last L of the S keys (prefill / decoding with a cache)
    fn = mu.sliding_window_causal_mask_function(w) if kind == "sliding_causal_w" else FUNCS[kind]()
    keep = _pad(pad, 2, ko + S, torch.Generator().manual_seed(seed))
    keep = None if keep is None else keep.bool()
    hm = _hf_mask(2, L, S, qo, ko, mask_function=fn, attention_mask=keep)
    assert not hm.dense
    assert torch.equal(_ours_dense(hm, 2, L, S), _hf_dense(2, L, S, qo, ko, fn, keep))


# ------------------------------------------------------------------------------ the attention function alone


class _Mod(torch.nn.Module):
    def __init__(self, is_causal=False, layer_idx=0):
        super().__init__()
        self.is_causal = is_causal
        self.layer_idx = layer_idx


def _qkv(B=2, H=4, Hkv=2, L=12, S=12, D=8, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.mark.parametrize("fn_name", ["causal", "sliding_causal", "bidirectional"])
def test_attention_forward_matches_reference_forward_and_backward(fn_name):
    B, L = 2, 12
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, 9:] = False
    hm = _hf_mask(B, L, L, mask_function=FUNCS[fn_name](), attention_mask=pad)
    q64, k64, v64 = _qkv(grad=True)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q64, k64, v64))
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q64, k64, v64))
    out, w = shf.attention_forward(_Mod(), q32, k32, v32, hm, scaling=0.3)
    assert w is None
    ref64 = reference.attention(q64, k64, v64, mask=hm.mask, scale=0.3).out
    ref32 = reference.attention(qr, kr, vr, mask=hm.mask, scale=0.3).out
    assert_rel_close(out, ref32.transpose(1, 2), ref64.transpose(1, 2), what="out")
    gout = torch.randn_like(ref64)
    out.backward(gout.transpose(1, 2).float())
    ref64.backward(gout)
    ref32.backward(gout.float())
    for name, a, r32, r64 in (("dq", q32, qr, q64), ("dk", k32, kr, k64), ("dv", v32, vr, v64)):
        assert_rel_close(a.grad, r32.grad, r64.grad, what=name)


def test_softcap_and_position_bias_follow_eager_order():
    q, k, v = _qkv(H=2, Hkv=2)
    bias = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    hm = shf.translate_mask(2, 12, 12, mask_function=mu.causal_mask_function)
    out, w = shf.attention_forward(_Mod(), q, k, v, hm, scaling=0.5, softcap=2.0, position_bias=bias,
                                   output_attentions=True)
    s = torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 2.0) * 2.0 + bias
    s = s.masked_fill(~M.causal().to_dense(1, 1, 12, 12), float("-inf"))
    p = torch.softmax(s, -1)
    torch.testing.assert_close(w, p)
    torch.testing.assert_close(out, (p @ v).transpose(1, 2))


def test_none_mask_uses_is_causal_like_sdpa():
    q, k, v = _qkv(H=2, Hkv=2)
    out_c, _ = shf.attention_forward(_Mod(is_causal=True), q, k, v, None)
    out_b, _ = shf.attention_forward(_Mod(is_causal=True), q, k, v, None, is_causal=False)
    torch.testing.assert_close(out_c, reference.attention(q, k, v, mask=M.causal()).out.transpose(1, 2))
    torch.testing.assert_close(out_b, reference.attention(q, k, v).out.transpose(1, 2))


def test_tensor_masks_bool_and_additive():
    q, k, v = _qkv(H=2, Hkv=2)
    vis = torch.rand(2, 1, 12, 12) > 0.3
    vis[..., 0] = True
    out, _ = shf.attention_forward(_Mod(), q, k, v, vis)
    torch.testing.assert_close(out, reference.attention(q, k, v, mask=vis).out.transpose(1, 2))
    add = torch.where(vis, torch.randn(2, 1, 12, 12, dtype=torch.float64), torch.finfo(torch.float64).min)
    out, _ = shf.attention_forward(_Mod(), q, k, v, add)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + add, -1)
    torch.testing.assert_close(out, (p @ v).transpose(1, 2))


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = _qkv(H=2, Hkv=2, dtype=torch.float32, grad=True)
    left = torch.ones(2, 12, dtype=torch.bool)
    left[1, :4] = False  # with causal: queries 0-3 of row 1 see nothing
    hm = shf.translate_mask(2, 12, 12, mask_function=mu.causal_mask_function, attention_mask=left)
    out, w = shf.attention_forward(_Mod(), q, k, v, hm, output_attentions=True)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert torch.equal(out[1, :4], torch.zeros_like(out[1, :4]))
    assert torch.equal(w[1, :, :4], torch.zeros_like(w[1, :, :4]))
    out.sum().backward()
    assert not torch.isnan(q.grad).any()
    assert torch.equal(q.grad[1, :, :4], torch.zeros_like(q.grad[1, :, :4]))


# ------------------------------------------------------------------------------------------------ errors


def test_error_wrong_mask_type_names_argument():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="attention_mask must be a salience HFMask"):
        shf.attention_forward(_Mod(), q, k, v, [[1, 0]])


def test_error_mask_built_for_other_lengths():
    q, k, v = _qkv()
    hm = shf.translate_mask(2, 5, 5, mask_function=mu.causal_mask_function)
    with pytest.raises(ValueError, match="built for L=5, S=5"):
        shf.attention_forward(_Mod(), q, k, v, hm)


def test_error_tensor_mask_shape_and_dtype():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must broadcast to \\(B, 1, L=12, S=12\\)"):
        shf.attention_forward(_Mod(), q, k, v, torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool .* or float"):
        shf.attention_forward(_Mod(), q, k, v, torch.ones(2, 1, 12, 12, dtype=torch.long))


def test_error_qkv_not_4d():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query must be a 4-D tensor"):
        shf.attention_forward(_Mod(), q[0], k, v, None)


def test_attention_sinks_follow_gpt_oss_eager():
    """s_aux (gpt-oss's sinks, one logit per head) as a virtual key of value 0: output, weights and gradients
    equal gpt-oss's eager formula in float64; a query row that sees no key gives 0."""
    q, k, v = _qkv(grad=True)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    left = torch.ones(2, 12, dtype=torch.bool)
    left[1, :4] = False  # with causal: queries 0-3 of row 1 see nothing
    hm = shf.translate_mask(2, 12, 12, mask_function=mu.causal_mask_function, attention_mask=left)
    out, w = shf.attention_forward(_Mod(), q, k, v, hm, scaling=0.3, s_aux=sinks, output_attentions=True)
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    s = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~hm.mask.to_dense(2, 1, 12, 12), float("-inf"))
    p = torch.softmax(torch.cat([s, sinks.view(1, 4, 1, 1).expand(2, 4, 12, 1)], -1), -1)[..., :-1]
    ref = (p @ vv).transpose(1, 2)
    torch.testing.assert_close(w, p)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[1, :4], torch.zeros_like(out[1, :4]))
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, sinks), g)
    want = torch.autograd.grad(ref, (q, k, v, sinks), g)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        torch.testing.assert_close(a, b, msg=name)


def test_error_mask_function_without_lengths():
    with pytest.raises(ValueError, match="needs q_length and kv_length"):
        shf.mask_function(batch_size=1, mask_function=mu.causal_mask_function)


def test_error_enable_on_non_model():
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        shf.enable(torch.nn.Linear(2, 2))


# -------------------------------------------------------------------------------- small causal LMs, no downloads

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0)


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()


def _mistral(window=16):
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=window, **COMMON)).eval()


def _batch(B=3, L=40):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (B, L), generator=g)
    am = torch.ones_like(ids)
    am[1, L - 9 :] = 0  # right padding
    am[2, :6] = 0  # left padding
    return ids, am


def _logits(model, impl, ids, am, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=am, **kw)


@pytest.mark.parametrize("make", [_llama, _mistral], ids=["llama", "mistral_sliding"])
def test_causal_lm_logits_equal_eager_and_sdpa(make):
    model = make()
    ids, am = _batch()
    real = am.bool()
    ours = _logits(model, "salience", ids, am).logits
    for impl in ("eager", "sdpa"):
        theirs = _logits(model, impl, ids, am).logits
        assert (ours - theirs)[real].abs().max() <= 1e-5, impl
    nopad = _logits(model, "salience", ids, None).logits
    assert (nopad - _logits(model, "sdpa", ids, None).logits).abs().max() <= 1e-5


def test_causal_lm_attentions_equal_eager():
    """output_attentions=True as a call argument; the config routes are in test_hf_generate.py."""
    model = _mistral(window=8)
    ids, am = _batch(L=24)
    ours = _logits(model, "salience", ids, am, output_attentions=True).attentions
    eager = _logits(model, "eager", ids, am, output_attentions=True).attentions
    real_q = am.bool()[:, None, :, None]
    assert len(ours) == len(eager) == 2
    for a, b in zip(ours, eager):
        assert a.shape == b.shape
        assert (a - b).masked_fill(~real_q, 0).abs().max() <= 1e-6


def test_sliding_window_model_takes_the_tile_skipping_path():
    model = _mistral(window=32)
    events = []
    _hooks.subscribe(events.append)
    try:
        shf.enable(model)
        ids = torch.randint(1, 97, (1, 256))
        with torch.no_grad():
            model(ids)
    finally:
        _hooks.unsubscribe(events.append)
    assert len(events) == 2
    ev = events[0]
    assert ev.mask.kind == ("sliding_window", 31, 0)
    bm = BlockMask.from_mask(ev.mask, 1, 1, 256, 256, q_block=32, kv_block=32)
    assert bm.analytic and bm.skipped_fraction() > 0.7
    plan = salience.plan(ev.q, ev.k, ev.k, mask=ev.mask)
    skipping = {"spans", "blockwise"}  # the paths that compute only the visible key spans / tiles
    if not skipping & set(salience.kernels.dispatch.BACKENDS):
        pytest.skip(f"no tile-skipping backend in salience yet (backends {salience.kernels.dispatch.BACKENDS}); "
                    f"the mask handed over is {ev.mask!r}, plan: {plan}")
    assert plan.backend in skipping, plan
    assert plan.details["skipped"] > 0.7, plan


def test_generation_with_cache_equals_eager():
    model = _mistral(window=8)  # the prompt + new tokens exceed the window: the cache slides
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    outs = {}
    for impl in ("salience", "eager"):
        model.set_attn_implementation(impl)
        outs[impl] = model.generate(ids, attention_mask=am, max_new_tokens=10, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(outs["salience"].sequences, outs["eager"].sequences)
    for a, b in zip(outs["salience"].logits, outs["eager"].logits):
        assert (a - b).abs().max() <= 1e-5


def test_gradients_equal_eager():
    ids, am = _batch(L=20)
    proj = torch.randn(3, 20, 97, generator=torch.Generator().manual_seed(7))
    real = am.bool().unsqueeze(-1)  # a loss on real positions only (pad rows follow no common convention)
    grads = {}
    for impl in ("salience", "eager"):
        model = _llama()
        model.set_attn_implementation(impl)
        logits = model(ids, attention_mask=am).logits
        (logits * proj).masked_fill(~real, 0).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["salience"].keys() == grads["eager"].keys()
    for n in grads["eager"]:
        a, b = grads["salience"][n], grads["eager"][n]
        assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max()), n


def test_dropout_is_honoured_in_training_only():
    cfg = transformers.LlamaConfig(**{**COMMON, "attention_dropout": 0.5})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    shf.enable(model)
    ids, am = _batch(L=16)
    model.eval()
    with torch.no_grad():
        e1, e2 = model(ids).logits, model(ids).logits
    assert torch.equal(e1, e2)
    model.train()
    with torch.no_grad():
        t1 = model(ids).logits
    assert (t1 - e1).abs().max() > 1e-3


def test_events_only_while_recording_and_maps_recomputable(monkeypatch):
    model = _llama()
    shf.enable(model)
    ids, am = _batch(L=16)
    calls = []
    real_attention = shf.attention

    def spy(*a, **kw):
        calls.append(kw.get("return_lse", False))
        return real_attention(*a, **kw)

    monkeypatch.setattr(shf, "attention", spy)
    monkeypatch.setattr(shf, "attention_weights", lambda *a, **k: pytest.fail("weights computed unasked"))
    with torch.no_grad():
        model(ids, attention_mask=am)
    assert calls == [False, False]  # no logsumexp, no weights when nobody records
    monkeypatch.undo()
    events = []
    _hooks.subscribe(events.append)
    try:
        with torch.no_grad():
            model(ids, attention_mask=am)
    finally:
        _hooks.unsubscribe(events.append)
    assert [e.name for e in events] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [e.layer_index for e in events] == [0, 1]
    eager = _logits(model, "eager", ids, am, output_attentions=True).attentions
    for ev, ref in zip(events, eager):
        w = salience.attention_weights(ev.q, ev.k, mask=ev.mask, score_mod=ev.score_mod, scale=ev.scale, lse=ev.lse)
        real_q = am.bool()[:, None, :, None]
        assert (w - ref).masked_fill(~real_q, 0).abs().max() <= 1e-6


def test_user_4d_masks_pass_through():
    model = _llama()
    ids, am = _batch(L=12)
    vis = M.causal().to_dense(3, 1, 12, 12) & am.bool()[:, None, None, :]
    vis[..., 0] = True  # no empty rows, so eager/sdpa conventions agree
    ours = _logits(model, "salience", ids, vis).logits
    sdpa = _logits(model, "sdpa", ids, vis).logits
    assert (ours - sdpa).abs().max() <= 1e-5
    add = torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)
    ours = _logits(model, "salience", ids, add).logits
    eager = _logits(model, "eager", ids, add).logits
    assert (ours - eager).abs().max() <= 1e-5
