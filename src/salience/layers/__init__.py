"""Attention layers: thin ``nn.Module`` objects over the functional core (:func:`salience.attention`).

* :mod:`~salience.layers.multihead`: :class:`MultiHeadAttention` (self/cross, MHA/GQA/MQA, masks, RoPE/ALiBi/T5,
  KV cache, per-head weights), :class:`KVCache`, :class:`StaticKVCache`.
* :mod:`~salience.layers.classic`: :class:`AdditiveAttention` (Bahdanau), :class:`LuongAttention`,
  :class:`LuongLocalAttention` (local-p), :class:`AttentionPooling`, :class:`HierarchicalAttention`.
* :mod:`~salience.layers.positional`: :class:`RotaryEmbedding`, :class:`ALiBi`, :class:`T5RelativeBias`,
  :class:`SinusoidalPositionalEncoding`.
* :mod:`~salience.layers.efficient`: :class:`LinearAttention`, :class:`PerformerAttention`,
  :class:`NystromAttention`, :class:`LinformerAttention`, :class:`LocalAttention`.
* :mod:`~salience.layers.variants`: :func:`sparsemax`, :func:`entmax15`, :class:`SparsemaxAttention`,
  :class:`Entmax15Attention`, :class:`HardAttention`, :class:`SigmoidAttention`, :class:`DifferentialAttention`.
* :mod:`~salience.layers.transformer`: a small pre-norm Transformer encoder and decoder.

Module inputs are batch first ``(B, L, E)``; head-level modules take ``(B, H, L, D)`` like salience.attention.

Example:
    >>> import torch
    >>> from salience.layers import MultiHeadAttention
    >>> MultiHeadAttention(16, 4)(torch.randn(2, 5, 16)).output.shape
    torch.Size([2, 5, 16])
"""

from .classic import (
    AdditiveAttention,
    AttentionOutput,
    AttentionPooling,
    HierarchicalAttention,
    HierarchicalOutput,
    LuongAttention,
    LuongLocalAttention,
)
from .efficient import (
    LinearAttention,
    LinformerAttention,
    LocalAttention,
    NystromAttention,
    PerformerAttention,
    elu_feature_map,
    orthogonal_random_features,
)
from .multihead import KVCache, MultiHeadAttention, MultiHeadOutput, StaticKVCache
from .positional import ALiBi, RotaryEmbedding, SinusoidalPositionalEncoding, T5RelativeBias
from .transformer import (
    DecoderLayerCache,
    FeedForward,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .variants import (
    DifferentialAttention,
    Entmax15Attention,
    HardAttention,
    SigmoidAttention,
    SparsemaxAttention,
    differential_lambda_init,
    entmax15,
    sparsemax,
)

__all__ = [
    "ALiBi",
    "AdditiveAttention",
    "AttentionOutput",
    "AttentionPooling",
    "DecoderLayerCache",
    "DifferentialAttention",
    "Entmax15Attention",
    "FeedForward",
    "HardAttention",
    "HierarchicalAttention",
    "HierarchicalOutput",
    "KVCache",
    "LinearAttention",
    "LinformerAttention",
    "LocalAttention",
    "LuongAttention",
    "LuongLocalAttention",
    "MultiHeadAttention",
    "MultiHeadOutput",
    "NystromAttention",
    "PerformerAttention",
    "RotaryEmbedding",
    "SigmoidAttention",
    "SinusoidalPositionalEncoding",
    "SparsemaxAttention",
    "StaticKVCache",
    "T5RelativeBias",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "differential_lambda_init",
    "elu_feature_map",
    "entmax15",
    "orthogonal_random_features",
    "sparsemax",
]
