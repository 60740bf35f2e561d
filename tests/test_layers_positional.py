"""Positional schemes: RoPE against Hugging Face and the complex-number definition, ALiBi, T5 buckets, sinusoidal."""

import math

import pytest
import torch

import salience
from salience.layers import ALiBi, RotaryEmbedding, SinusoidalPositionalEncoding, T5RelativeBias
from salience.layers.positional import positions_for


def test_rope_matches_hugging_face_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=10000.0)
    hf = LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    cos, sin = hf(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = RotaryEmbedding(8)(x, positions=pos)
    assert torch.allclose(got, want, atol=1e-6)  # HF computes its frequencies in float32


def test_rope_interleaved_equals_complex_multiplication():
    D = 6
    x = torch.randn(1, 2, 5, D, dtype=torch.float64)
    got = RotaryEmbedding(D, base=100.0, interleaved=True)(x, offset=3)
    for p in range(5):
        for i in range(D // 2):
            theta = (p + 3) * 100.0 ** (-2 * i / D)
            z = complex(x[0, 1, p, 2 * i].item(), x[0, 1, p, 2 * i + 1].item()) * complex(math.cos(theta), math.sin(theta))
            assert math.isclose(got[0, 1, p, 2 * i].item(), z.real, abs_tol=1e-12)
            assert math.isclose(got[0, 1, p, 2 * i + 1].item(), z.imag, abs_tol=1e-12)


def test_rope_scores_depend_only_on_relative_position_and_norms_are_kept():
    rope = RotaryEmbedding(16, rotary_dim=8)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    dots = [(rope(q, offset=p + 5) * rope(k, offset=p)).sum().item() for p in (0, 17, 1000, 123456)]
    assert max(dots) - min(dots) < 1e-8
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    y = rope(x, offset=9)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(y[..., 8:], x[..., 8:])  # channels beyond rotary_dim pass through


def test_rope_per_row_offsets_and_float32_accuracy_at_long_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 1, 3, 8, dtype=torch.float64)
    got = rope(x, offset=torch.tensor([0, 100]))
    assert torch.allclose(got[1:], rope(x[1:], offset=100))
    assert torch.allclose(got[:1], rope(x[:1]))
    big = rope(x.float(), offset=200_000)
    assert (big.double() - rope(x, offset=200_000)).abs().max() < 1e-5


def test_positions_for():
    assert positions_for(3, 2).tolist() == [2, 3, 4]
    assert positions_for(2, torch.tensor([1, 5])).tolist() == [[1, 2], [5, 6]]
    assert positions_for(2, positions=[4, 9]).tolist() == [4, 9]
    with pytest.raises(ValueError, match="covers 3 tokens"):
        positions_for(2, positions=[1, 2, 3])
    with pytest.raises(ValueError, match="offset must be >= 0"):
        positions_for(2, -1)
    with pytest.raises(TypeError, match="offset must be an int"):
        positions_for(2, 1.5)
    with pytest.raises(ValueError, match="integer tensor"):
        positions_for(2, positions=torch.tensor([0.5, 1.5]))


def test_alibi_module_uses_slopes_for_any_head_count():
    for h in (1, 3, 6, 8, 12):
        a = ALiBi(h)
        assert torch.equal(a.slopes, salience.scores.alibi_slopes(h))
        b = a.bias(4, 6)
        assert b.shape == (h, 4, 6)
        assert math.isclose(b[h - 1, 3, 0].item(), -3 * a.slopes[h - 1].item(), rel_tol=1e-6)
    q = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    a = ALiBi(3)
    r = salience.reference.attention(q, q, q, score_mod=a.score_mod())
    direct = salience.reference.softmax_from_scores(q @ q.transpose(-1, -2) / 2 + a.bias(5).double())[0]
    assert torch.allclose(r.weights, direct, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_matches_hugging_face(bidirectional):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = T5Config(d_model=16, num_heads=2, d_kv=8, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, is_decoder=not bidirectional)
    hf = T5Attention(cfg, has_relative_attention_bias=True)
    ours = T5RelativeBias(2, num_buckets=8, max_distance=20, bidirectional=bidirectional)
    ours.embedding.weight.data.copy_(hf.relative_attention_bias.weight.data)
    want = hf.compute_bias(9, 30)[0]
    assert torch.allclose(ours.bias(9, 30), want)
    # and through salience.attention's score_mod
    q = torch.zeros(1, 2, 9, 4)
    w = salience.attention_weights(q, torch.zeros(1, 2, 30, 4), score_mod=ours.score_mod())
    assert torch.allclose(w, torch.softmax(want, -1).unsqueeze(0), atol=1e-6)


def test_sinusoidal_against_formula():
    pe = SinusoidalPositionalEncoding(7)
    t = pe.encoding(torch.arange(50), torch.float64)
    for p in (0, 1, 13, 49):
        for c in range(7):
            ang = p / 10000 ** ((c - c % 2) / 7)
            assert math.isclose(t[p, c].item(), math.sin(ang) if c % 2 == 0 else math.cos(ang), abs_tol=1e-12)
    x = torch.randn(2, 4, 7)
    assert torch.allclose(pe(x, offset=3), x + pe.encoding(torch.arange(3, 7)))
    assert torch.allclose(SinusoidalPositionalEncoding(7, scale_input=True)(x), x * math.sqrt(7) + t[:4].float())


@pytest.mark.parametrize(
    "fn, exc, match",
    [
        (lambda: RotaryEmbedding(7), ValueError, "rotary_dim must be even"),
        (lambda: RotaryEmbedding(8, rotary_dim=10), ValueError, "rotary_dim must be even and <= head_dim"),
        (lambda: RotaryEmbedding(8, base=0), ValueError, "base must be a positive"),
        (lambda: RotaryEmbedding(8, interleaved=1), TypeError, "interleaved must be a bool"),
        (lambda: RotaryEmbedding(8)(torch.randn(2, 3, 8)), ValueError, "\\(B, H, L, D\\)"),
        (lambda: RotaryEmbedding(8)(torch.randn(1, 1, 3, 4)), ValueError, "head_dim=8"),
        (lambda: RotaryEmbedding(8)(torch.randn(2, 1, 3, 8), offset=torch.tensor([0, 1, 2])), ValueError, "batch size 2"),
        (lambda: ALiBi(0), ValueError, "num_heads must be >= 1"),
        (lambda: ALiBi(2, slopes=torch.ones(3)), ValueError, "shape \\(2,\\)"),
        (lambda: T5RelativeBias(2, num_buckets=7), ValueError, "even"),
        (lambda: T5RelativeBias(2, num_buckets=32, max_distance=4), ValueError, "must exceed"),
        (lambda: T5RelativeBias(2, bidirectional="yes"), TypeError, "bidirectional must be a bool"),
        (lambda: SinusoidalPositionalEncoding(0), ValueError, "dim must be >= 1"),
        (lambda: SinusoidalPositionalEncoding(4)(torch.randn(2, 3, 5)), ValueError, "\\(B, L, 4\\)"),
        (lambda: SinusoidalPositionalEncoding(4, scale_input=None), TypeError, "scale_input must be a bool"),
    ],
)
def test_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
