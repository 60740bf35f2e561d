"""salience.interpret.capture: equal to eager output_attentions on MiniLM and to the float64 reference on
salience layers; selection, chunking, precision, pooling, npz round trip, gradients, errors."""

import pytest
import torch

from salience import _hooks, reference
from salience.interpret import AttentionMaps, capture
from salience.interpret.capture import capture_with_grad
from salience.layers import MultiHeadAttention
from salience.testing import assert_rel_close

TEXTS = ["The cat sat on the mat because it was tired.", "Attention is all you need"]


@pytest.fixture(scope="module")
def minilm():
    import salience.models

    model, tok = salience.models.minilm()
    eager, _ = salience.models.minilm("eager")
    return model, eager, tok


@pytest.fixture(scope="module")
def eager_reference(minilm):
    model, eager, tok = minilm
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a32 = eager(**enc, output_attentions=True).attentions
        e64 = type(eager)(eager.config).double().eval()
        e64.load_state_dict(eager.state_dict())
        a64 = e64(**enc, output_attentions=True).attentions
    return enc, a32, a64


def test_capture_equals_eager_output_attentions_on_minilm(minilm, eager_reference):
    model, _, _ = minilm
    enc, a32, a64 = eager_reference
    assert model.config._attn_implementation == "salience"
    with torch.no_grad(), capture(model) as rec:
        model(**enc)
    maps = rec.result()
    assert len(maps.maps) == 6 and maps.layer_names[0].endswith("layer.0.attention.self")
    for layer in range(6):
        assert maps.maps[layer].shape == a64[layer].shape  # (B, 12, L, L), padded example included
        assert_rel_close(maps.maps[layer], a32[layer], a64[layer], what=f"layer {layer}")


def test_capture_selects_layers_heads_rows_and_chunks(minilm, eager_reference):
    model, _, _ = minilm
    enc, a32, a64 = eager_reference
    with torch.no_grad(), capture(model, layers=[1, "layer.4."], heads=[0, 11], rows=[0, -1],
                                  max_chunk_bytes=1) as rec:
        model(**enc)
    maps = rec.result()
    assert [e["layer"] for e in maps.entries] == [1, 4]
    L = a64[0].shape[-1]
    for got, layer in zip(maps.maps, (1, 4)):
        assert got.shape == (2, 2, 2, L)
        sel = lambda a: a[:, [0, 11]][:, :, [0, L - 1]]  # noqa: E731
        assert_rel_close(got, sel(a32[layer]), sel(a64[layer]), what=f"layer {layer}")
    assert maps.entries[0]["rows"] == [0, L - 1] and maps.entries[0]["heads"] == [0, 11]


def test_capture_reduced_precision_aggregation_and_pooling(minilm, eager_reference):
    model, _, _ = minilm
    enc, _, a64 = eager_reference
    with torch.no_grad(), capture(model, layers=[5]) as rec32:
        model(**enc)
    with torch.no_grad(), capture(model, layers=[5], dtype="float16", aggregate="mean", pool=2) as rec16:
        model(**enc)
    full, small = rec32.result(), rec16.result()
    assert small.maps[0].dtype == torch.float16
    B, H, L, S = full.maps[0].shape
    assert small.maps[0].shape == (B, 1, (L + 1) // 2, (S + 1) // 2)
    assert small.nbytes < full.nbytes / 12
    # pooled rows keep their mass: each sums to 1 (real rows of the unpadded example)
    assert torch.allclose(small.maps[0][0].float().sum(-1), torch.ones(1, (L + 1) // 2), atol=2e-3)
    want = a64[5].mean(1, keepdim=True)
    pooled = torch.nn.functional.pad(want, (0, 1, 0, 1)).view(B, 1, (L + 1) // 2, 2, (S + 1) // 2, 2).sum((3, 5))
    pooled = pooled / torch.tensor([2.0] * (L // 2) + ([1.0] if L % 2 else [])).view(1, 1, -1, 1)
    assert (small.maps[0].double() - pooled).abs().max() < 2e-3  # float16 storage
    assert "full float32 maps would take" in small.summary()


class Stack(torch.nn.Module):
    def __init__(self, n=2, E=16, H=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            MultiHeadAttention(E, H, name=f"block{i}", layer_index=i, mask=None) for i in range(n))

    def forward(self, x, **kw):
        for layer in self.layers:
            x = x + layer(x, **kw).output
        return x


def test_capture_on_salience_layers_matches_float64_reference():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(2, 9, 16)
    events = []
    _hooks.subscribe(events.append)
    try:
        with torch.no_grad(), capture(model) as rec:
            model(x, key_lengths=[9, 6])
    finally:
        _hooks.unsubscribe(events.append)
    maps = rec.result()
    assert [e["name"] for e in maps.entries] == ["block0", "block1"]
    for ev, got in zip(events, maps.maps):
        r64 = reference.attention(ev.q.double(), ev.k.double(), ev.k.double(), mask=ev.mask).weights
        r32 = reference.attention(ev.q, ev.k, ev.k, mask=ev.mask).weights
        assert_rel_close(got, r32, r64)
        assert got[1, :, :, 6:].abs().max() == 0  # padded keys get no weight
    assert maps.stack(batch=1).shape == (2, 4, 9, 9)


def test_npz_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Stack()
    for dtype in ("float32", "bfloat16"):
        with torch.no_grad(), capture(model, dtype=dtype, rows=[0, 3]) as rec:
            model(torch.randn(1, 5, 16))
        maps = rec.result(tokens=["a", "b", "c", "d", "e"])
        path = maps.save(tmp_path / f"maps_{dtype}.npz")
        back = AttentionMaps.load(path)
        assert back.tokens == maps.tokens and back.metadata == maps.metadata
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(maps.maps, back.maps))


def test_capture_records_nothing_outside_the_block_and_unsubscribes():
    model = Stack()
    with torch.no_grad(), capture(model) as rec:
        pass
    model(torch.randn(1, 4, 16))
    assert rec.result().maps == [] and not _hooks.recording()
    assert "no attention recorded" in rec.result().summary()


def test_capture_with_grad_matches_eager_attention_gradients(minilm):
    model, eager, tok = minilm
    enc = tok(TEXTS[:1], return_tensors="pt")
    params = [p for m in (model, eager) for p in m.parameters()]
    for p in params:  # gradients for the attention only (no 30k x 384 embedding gradient)
        p.requires_grad_(False)
    try:
        emb = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
        with capture_with_grad(model) as rec:
            out = model(inputs_embeds=emb, attention_mask=enc["attention_mask"]).last_hidden_state
            out[:, 0].pow(2).sum().backward()
        assert model.config._attn_implementation == "salience"  # restored
        ref = eager(inputs_embeds=emb, attention_mask=enc["attention_mask"], output_attentions=True)
        for a in ref.attentions:
            a.retain_grad()
        ref.last_hidden_state[:, 0].pow(2).sum().backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    grads = rec.grads()
    assert len(grads) == 6
    for g, a in zip(grads, ref.attentions):
        assert (g - a.grad).abs().max() <= 1e-4 * a.grad.abs().max()
    assert torch.allclose(rec.maps(), torch.stack([a.detach()[0] for a in ref.attentions]), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"dtype": "int8"}, ValueError, "dtype must be one of"),
        ({"dtype": torch.int8}, TypeError, "dtype must be one of"),
        ({"aggregate": "sum"}, ValueError, "aggregate must be"),
        ({"pool": 0}, ValueError, "pool must be an int >= 1"),
        ({"max_chunk_bytes": 0}, ValueError, "max_chunk_bytes"),
        ({"heads": "0"}, TypeError, "heads must be"),
        ({"heads": slice(0, 2)}, TypeError, "heads must be"),
        ({"layers": [1.5]}, TypeError, "layers must be"),
        ({"rows": [0.5]}, TypeError, "rows must be"),
    ],
)
def test_capture_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        capture(**kwargs)


def test_capture_rejects_models_without_salience_attention(minilm):
    _, eager, _ = minilm
    with pytest.raises(ValueError, match="enable"):
        capture(eager)
    with pytest.raises(TypeError, match="model must be"):
        capture("bert")
    with pytest.raises(ValueError, match="enable salience attention"):
        capture_with_grad(eager)
    with pytest.raises(NotImplementedError, match="carry no values"):
        capture_with_grad(Stack())


def test_capture_out_of_range_selection_names_the_layer():
    model = Stack()
    with pytest.raises(ValueError, match="heads \\[7\\] out of range for layer 'block0'"):
        with torch.no_grad(), capture(model, heads=[7]):
            model(torch.randn(1, 3, 16))
    assert not _hooks.recording()
    with pytest.raises(ValueError, match="rows \\[5\\] out of range"):
        with torch.no_grad(), capture(model, rows=[5]):
            model(torch.randn(1, 3, 16))


def test_attention_maps_errors(tmp_path):
    m = AttentionMaps(tokens=None, maps=[torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3)],
                      metadata={"entries": [{"name": "a", "call": 0}, {"name": "b", "call": 0}]})
    with pytest.raises(ValueError, match="different map shapes"):
        m.stack()
    with pytest.raises(ValueError, match="no recorded entry for call=3"):
        m.stack(call=3)
    with pytest.raises(ValueError, match="batch 2 out of range"):
        m.stack(batch=2, layers=[0])
    with pytest.raises(ValueError, match="must end in .npz"):
        m.save(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        AttentionMaps.load(tmp_path / "missing.npz")
