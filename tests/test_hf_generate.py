"""generate() on attn_implementation="salience": static and dynamic KV caches, greedy and seeded sampling,
padded batches, token-for-token against "eager" and "sdpa", on tiny random configs of 13 architectures
(decoder-only and encoder-decoder), plus gpt-oss (attention sinks) against eager. Also: models that do not
dispatch through AttentionInterface are refused with one clear error, and the documented output_attentions
routes work.

No downloads: every model is built from a tiny random config (2 layers, width 32, vocabulary 100).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import salience.integrations.hf as shf  # noqa: E402

T = transformers
V = 100  # vocabulary
NEW = 6  # tokens generated per test
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, **IDS)


def _build(config_cls, model_cls, **kw):
    def make():
        torch.manual_seed(0)
        return model_cls(config_cls(**kw)).eval()

    make.model_cls = model_cls
    return make


DECODERS = {
    "llama": _build(T.LlamaConfig, T.LlamaForCausalLM, **LLAMA_LIKE),
    # window 8 < prompt 7 + 6 new tokens: the (static or dynamic) cache slides during generation
    "mistral": _build(T.MistralConfig, T.MistralForCausalLM, sliding_window=8, **LLAMA_LIKE),
    "gemma": _build(T.GemmaConfig, T.GemmaForCausalLM, head_dim=8, **LLAMA_LIKE),
    "phi3": _build(T.Phi3Config, T.Phi3ForCausalLM, **LLAMA_LIKE),
    "granite": _build(T.GraniteConfig, T.GraniteForCausalLM, **LLAMA_LIKE),
    "starcoder2": _build(T.Starcoder2Config, T.Starcoder2ForCausalLM, sliding_window=8, **LLAMA_LIKE),
    "gpt2": _build(T.GPT2Config, T.GPT2LMHeadModel, vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                   initializer_range=0.2, **IDS),
    "gpt_bigcode": _build(T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                          n_positions=128, initializer_range=0.2, **IDS),
    "gpt_neox": _build(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, vocab_size=V, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2,
                       **IDS),
    "opt": _build(T.OPTConfig, T.OPTForCausalLM, vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, init_std=0.2, **IDS),
}

_ENC_DEC = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, init_std=0.2, **IDS)
ENCODER_DECODERS = {
    "t5": _build(T.T5Config, T.T5ForConditionalGeneration, vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                 num_decoder_layers=2, num_heads=4, initializer_factor=2.0, decoder_start_token_id=0, **IDS),
    "bart": _build(T.BartConfig, T.BartForConditionalGeneration, max_position_embeddings=128, decoder_start_token_id=2,
                   forced_eos_token_id=None, **{**_ENC_DEC, "init_std": 0.5}),
    "whisper": _build(T.WhisperConfig, T.WhisperForConditionalGeneration, num_mel_bins=8, max_source_positions=16,
                      max_target_positions=64, decoder_start_token_id=3, suppress_tokens=None,
                      begin_suppress_tokens=None, **_ENC_DEC),
}
ARCHS = {**DECODERS, **ENCODER_DECODERS}


def _inputs(name, B=3):
    """A batch for ``name``: a left-padded prompt for decoders, a right-padded source for encoder-decoders,
    log-mel features (B, mels, 2 x max_source_positions) for Whisper."""
    g = torch.Generator().manual_seed(1)
    if name == "whisper":
        return dict(input_features=torch.randn(B, 8, 32, generator=g))
    ids = torch.randint(3, V, (B, 7), generator=g)
    am = torch.ones_like(ids)
    if name in DECODERS:
        am[1, :3] = 0  # left padding, as generate() wants for decoder-only models
        am[2, :1] = 0
    else:
        am[1, 5:] = 0  # the encoder's padding
        am[2, 4:] = 0
    return dict(input_ids=ids.masked_fill(am == 0, 0), attention_mask=am)


def _generate(model, impl, inputs, cache, seed=None, **kw):
    model.set_attn_implementation(impl)
    if cache == "static":
        kw["cache_implementation"] = "static"
    if seed is not None:
        torch.manual_seed(seed)
        kw.update(do_sample=True, top_k=0, temperature=1.0)
    else:
        kw.update(do_sample=False)
    return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, output_logits=True,
                          return_dict_in_generate=True, **kw)


def _assert_same(ours, theirs, what):
    assert torch.equal(ours.sequences, theirs.sequences), (what, ours.sequences, theirs.sequences)
    assert len(ours.logits) == len(theirs.logits) == NEW
    for a, b in zip(ours.logits, theirs.logits):
        assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max()), what


@pytest.fixture(scope="module")
def models():
    """One model per architecture, built once (the tests switch its attention implementation)."""
    return {}


def _model(models, name):
    if name not in models:
        models[name] = ARCHS[name]()
    return models[name]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_greedy_generate_equals_eager_and_sdpa(models, name, cache, monkeypatch):
    model = _model(models, name)
    inputs = _inputs(name)
    handed_back = []
    real = shf._handed_back
    monkeypatch.setattr(shf, "_handed_back", lambda *a: handed_back.append(a[0]) or real(*a))
    ours = _generate(model, "salience", inputs, cache)
    if cache == "static":  # generate() built the mask ahead of each step and the model handed it back
        assert len(handed_back) == NEW and all(isinstance(h, shf.HFMask) for h in handed_back)
    for impl in ("eager", "sdpa"):
        _assert_same(ours, _generate(model, impl, inputs, cache), f"{name} {cache} vs {impl}")
    assert ours.sequences[:, -NEW:].unique().numel() > 2  # not a degenerate repeat of one token


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_sampled_generate_equals_eager_with_the_same_seed(models, name, cache):
    model = _model(models, name)
    inputs = _inputs(name)
    ours = _generate(model, "salience", inputs, cache, seed=7)
    _assert_same(ours, _generate(model, "eager", inputs, cache, seed=7), f"{name} {cache} sampled")


def test_sampling_is_really_on(models):
    model = _model(models, "llama")
    inputs = _inputs("llama")
    a, b = (_generate(model, "salience", inputs, "static", seed=s).sequences for s in (7, 8))
    assert not torch.equal(a, b)


def test_static_cache_masks_are_structured():
    """The masks generate() builds ahead of each step are the structured ones (no dense fallback)."""
    model = DECODERS["mistral"]()
    seen = []
    shf_mask = shf.mask_function

    def spy(*a, **kw):
        hm = shf_mask(*a, **kw)
        seen.append(hm)
        return hm

    transformers.masking_utils.AttentionMaskInterface.register(shf.IMPLEMENTATION, spy)
    try:
        _generate(model, "salience", _inputs("mistral"), "static")
    finally:
        shf.register()
    assert seen and not any(h.dense for h in seen)
    assert any("left_padding" in h.structure for h in seen)


def test_handed_back_mask_of_other_sizes_is_refused():
    hm = shf.translate_mask(2, 5, 5, mask_function=transformers.masking_utils.causal_mask_function)
    assert hm.ndim == 4 and hm.shape == (2, 1, 5, 5)
    assert shf.mask_function(batch_size=2, q_length=5, kv_length=5, attention_mask=hm) is hm
    with pytest.raises(ValueError, match="built for B=2, L=5, S=5, but this call needs B=2, L=1, S=6"):
        shf.mask_function(batch_size=2, q_length=1, kv_length=6, attention_mask=hm)


# ------------------------------------------------------------------- models that bypass AttentionInterface

REFUSED = {
    "falcon": (T.FalconConfig, T.FalconForCausalLM,
               dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
    "mpt": (T.MptConfig, T.MptForCausalLM, dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
    "gpt_neo": (T.GPTNeoConfig, T.GPTNeoForCausalLM, dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                                          attention_types=[[["global", "local"], 1]])),
    "xglm": (T.XGLMConfig, T.XGLMForCausalLM, dict(vocab_size=V, d_model=32, num_layers=2, attention_heads=4,
                                                   ffn_dim=64)),
}
REFUSAL = "does not dispatch its attention through transformers' AttentionInterface"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_without_attention_interface_are_refused_clearly(name):
    config_cls, model_cls, kw = REFUSED[name]
    ids = torch.randint(3, V, (1, 5))
    # construction with attn_implementation="salience" (what from_pretrained does): refused at load (Falcon,
    # GPT-Neo: they look their attention class up by name) or at the first forward (Bloom, MPT, XGLM), never
    # a KeyError, TypeError or AttributeError from inside the model
    with pytest.raises(ValueError, match=REFUSAL) as err:
        model = model_cls._from_config(config_cls(**kw), attn_implementation="salience")
        model(ids)
    assert model_cls.__name__.replace("ForCausalLM", "Model") in str(err.value)
    assert "attn_implementation='sdpa' or 'eager'" in str(err.value)
    # enable() on a loaded model: the same error, and the model keeps working with its own attention
    model = model_cls(config_cls(**kw)).eval()
    with pytest.raises(ValueError, match=REFUSAL):
        shf.enable(model)
    assert model.config._attn_implementation != "salience"
    model(ids)


# --------------------------------------------------------------------------------- output_attentions routes


def _llama_model(**kw):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**LLAMA_LIKE, **kw})).eval()


def _ids():
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(2))
    return ids, torch.tensor([[1] * 6, [0, 0] + [1] * 4])


def test_output_attentions_as_call_argument():
    model = _llama_model()
    ids, am = _ids()
    with torch.no_grad():
        ours = shf.enable(model)(ids, attention_mask=am, output_attentions=True).attentions
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=am, output_attentions=True).attentions
    assert len(ours) == 2
    real_q = am.bool()[:, None, :, None]
    for a, b in zip(ours, eager):
        assert (a - b).masked_fill(~real_q, 0).abs().max() <= 1e-6


def test_output_attentions_in_the_config_at_construction(tmp_path):
    """The flag in a config built before the implementation is chosen: every forward returns the maps."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM._from_config(T.LlamaConfig(**LLAMA_LIKE, output_attentions=True),
                                            attn_implementation="salience").eval()
    assert model.config._attn_implementation == "salience"
    ids, am = _ids()
    with torch.no_grad():
        out = model(ids, attention_mask=am)
        call = model(ids, attention_mask=am, output_attentions=True)
    assert len(out.attentions) == 2
    assert torch.equal(out.attentions[0], call.attentions[0])
    # the same through from_pretrained: a config loaded with the flag, then the implementation
    with pytest.raises(Exception, match="output_attentions"):  # transformers validates the config on saving
        model.save_pretrained(tmp_path)
    model.config.output_attentions = False  # switching it off is allowed
    model.save_pretrained(tmp_path)
    cfg = T.AutoConfig.from_pretrained(tmp_path, output_attentions=True)
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path, config=cfg, attn_implementation="salience").eval()
    assert loaded.config._attn_implementation == "salience"
    with torch.no_grad():
        again = loaded(ids, attention_mask=am).attentions
    assert len(again) == 2 and torch.equal(again[1], out.attentions[1])


def test_output_attentions_on_a_loaded_salience_model_is_refused_by_transformers(tmp_path):
    """What docs/hf.md warns about: transformers allows the config flag only with "eager"."""
    model = shf.enable(_llama_model())
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="output_attentions"):
        T.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="salience", output_attentions=True)


def test_output_attentions_in_generate():
    model = shf.enable(_llama_model())
    ids, am = _ids()
    out = model.generate(ids, attention_mask=am, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         output_attentions=True, return_dict_in_generate=True)
    assert len(out.attentions) == 3  # one tuple per step, one map per layer
    assert out.attentions[0][0].shape == (2, 4, 6, 6) and out.attentions[1][0].shape == (2, 4, 1, 7)
    model.generation_config.output_attentions = True  # or in the generation config
    again = model.generate(ids, attention_mask=am, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True)
    assert torch.equal(again.attentions[2][1], out.attentions[2][1])


# --------------------------------------------------------------------------- gpt-oss: attention sinks (s_aux)


def _gpt_oss():
    """Tiny gpt-oss: sliding window 4 on layer 0, full attention on layer 1, 4 experts, sinks of size ~2."""
    torch.manual_seed(0)
    cfg = T.GptOssConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                         max_position_embeddings=128, initializer_range=0.2, **IDS)
    model = T.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(4) * 2)
    return model


def _oss_batch(L=12):
    ids = torch.randint(3, V, (3, L), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    am[2, L - 3:] = 0  # right padding
    return ids, am


@pytest.fixture(scope="module")
def gpt_oss():
    return _gpt_oss()


def test_gpt_oss_logits_and_attentions_equal_eager(gpt_oss):
    ids, am = _oss_batch()
    out = {}
    for impl in ("salience", "eager"):
        gpt_oss.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = gpt_oss(ids, attention_mask=am, output_attentions=True)
    real = am.bool()
    assert (out["salience"].logits - out["eager"].logits)[real].abs().max() <= 1e-5
    real_q = real[:, None, :, None]
    for a, b in zip(out["salience"].attentions, out["eager"].attentions):
        assert (a - b).masked_fill(~real_q, 0).abs().max() <= 1e-6
        assert (a.sum(-1)[real[:, None].expand(-1, 4, -1)] < 1 - 1e-3).any()  # the sinks take weight
    from salience.interpret import capture

    shf.enable(gpt_oss)
    with torch.no_grad(), capture(gpt_oss) as rec:  # the maps a recorder recomputes include the sinks too
        quiet = gpt_oss(ids, attention_mask=am).logits  # without output_attentions: the same kernels' output
    assert (quiet - out["salience"].logits)[real].abs().max() <= 1e-6
    maps = rec.result()
    for b in range(3):
        got = maps.stack(batch=b)
        want = torch.stack([a[b] for a in out["eager"].attentions])
        keep = real[b][None, None, :, None]
        assert (got - want).masked_fill(~keep, 0).abs().max() <= 1e-6


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_gpt_oss_generate_equals_eager(gpt_oss, cache):
    ids, am = _oss_batch(L=7)
    inputs = dict(input_ids=ids.masked_fill(am == 0, 0), attention_mask=am)
    inputs["attention_mask"][2] = 1  # generate() wants left padding only
    ours = _generate(gpt_oss, "salience", inputs, cache)
    _assert_same(ours, _generate(gpt_oss, "eager", inputs, cache), f"gpt-oss {cache} greedy")
    ours = _generate(gpt_oss, "salience", inputs, cache, seed=3)
    _assert_same(ours, _generate(gpt_oss, "eager", inputs, cache, seed=3), f"gpt-oss {cache} sampled")


def test_gpt_oss_gradients_equal_eager_including_the_sinks():
    ids, am = _oss_batch()
    proj = torch.randn(3, 12, V, generator=torch.Generator().manual_seed(7))
    real = am.bool().unsqueeze(-1)
    grads = {}
    for impl in ("salience", "eager"):
        model = _gpt_oss()
        model.set_attn_implementation(impl)
        logits = model(ids, attention_mask=am).logits
        (logits * proj).masked_fill(~real, 0).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["salience"].keys() == grads["eager"].keys()
    assert any(n.endswith("self_attn.sinks") for n in grads["eager"])
    for n, b in grads["eager"].items():
        a = grads["salience"][n]
        assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max()), n


def test_gpt_oss_capture_with_grad_keeps_the_sinks(gpt_oss):
    """capture_with_grad recomputes the output as weights @ v: the sinks must take their share there too, so
    the explained model's logits are the model's own and the recorded maps equal eager's."""
    from salience.interpret.capture import capture_with_grad

    ids, am = _oss_batch()
    gpt_oss.set_attn_implementation("eager")
    with torch.no_grad():
        eager = gpt_oss(ids, attention_mask=am, output_attentions=True)
    shf.enable(gpt_oss)
    with capture_with_grad(gpt_oss) as rec:
        logits = gpt_oss(ids, attention_mask=am).logits
        logits[0, -1].max().backward()
    real = am.bool()
    assert (logits.detach() - eager.logits)[real].abs().max() <= 1e-5
    for w, a in zip(rec.weights, eager.attentions):
        keep = real[:, None, :, None]
        assert (w.detach() - a).masked_fill(~keep, 0).abs().max() <= 1e-6
    assert all(g.abs().sum() > 0 for g in rec.grads())
