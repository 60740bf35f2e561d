"""A small pre-norm Transformer encoder and decoder built from :class:`MultiHeadAttention`.

* :class:`TransformerEncoderLayer` / :class:`TransformerEncoder`: bidirectional by default; with
  ``mask=salience.masks.causal()`` the encoder is a decoder-only language model and accepts KV caches.
* :class:`TransformerDecoderLayer` / :class:`TransformerDecoder`: causal self-attention, cross-attention to
  an encoder's memory, feed-forward; incremental decoding with :meth:`TransformerDecoder.new_cache`.

Inputs and outputs are ``(B, L, d_model)``. Each attention layer is named (``layers.3.self_attn``) and numbered
for interpretability recorders.

Example:
    >>> import torch
    >>> from salience.layers import TransformerEncoder, TransformerDecoder
    >>> enc = TransformerEncoder(num_layers=2, d_model=32, num_heads=4)
    >>> dec = TransformerDecoder(num_layers=2, d_model=32, num_heads=4)
    >>> src, tgt = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    >>> memory = enc(src, key_lengths=[9, 6])
    >>> full = dec(tgt, memory, memory_lengths=[9, 6])
    >>> cache = dec.new_cache()
    >>> steps = torch.cat([dec(tgt[:, i : i + 1], memory, memory_lengths=[9, 6], cache=cache) for i in range(5)], 1)
    >>> torch.allclose(full, steps, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..masks import as_mask_mod, causal
from ._util import check_int, check_prob
from .multihead import KVCache, MultiHeadAttention, StaticKVCache

__all__ = [
    "FeedForward",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "DecoderLayerCache",
]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class FeedForward(nn.Module):
    """``Linear(d, f) -> activation -> dropout -> Linear(f, d)``.

    Example:
        >>> import torch
        >>> FeedForward(8, 32)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        check_int(d_model, "d_model")
        check_int(dim_feedforward, "dim_feedforward")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}.")
        self.net = nn.Sequential(nn.Linear(d_model, dim_feedforward), _ACTIVATIONS[activation](),
                                 nn.Dropout(check_prob(dropout)), nn.Linear(dim_feedforward, d_model))

    def forward(self, x):
        return self.net(x)


def _mha(d_model, num_heads, num_kv_heads, dropout, positional, mask, core, name, index):
    return MultiHeadAttention(d_model, num_heads, num_kv_heads, dropout=dropout, positional=positional, mask=mask,
                              core=core, name=name, layer_index=index)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm(x))`` then ``x + ff(norm(x))``.

    Args:
        d_model, num_heads, num_kv_heads: as :class:`MultiHeadAttention`; dim_feedforward: default 4 d_model;
        dropout: on attention weights, after attention and inside/after the feed-forward;
        positional: RotaryEmbedding / ALiBi / T5RelativeBias for the self-attention;
        mask: the self-attention's mask (``causal()`` for a decoder-only model);
        core: an efficient head-level attention (e.g. ``PerformerAttention``) instead of exact attention.

    Call: ``layer(x, *, key_padding_mask=None, key_lengths=None, mask=None, cache=None) -> (B, L, d_model)``.

    Example:
        >>> import torch
        >>> TransformerEncoderLayer(16, 2)(torch.randn(1, 4, 16)).shape
        torch.Size([1, 4, 16])
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int | None = None, dropout: float = 0.0, *,
                 num_kv_heads: int | None = None, positional=None, mask=None, core=None, activation: str = "gelu",
                 name: str = "self_attn", layer_index: int | None = None):
        super().__init__()
        check_int(d_model, "d_model")
        dropout = check_prob(dropout, "dropout")
        self.self_attn = _mha(d_model, num_heads, num_kv_heads, dropout, positional, mask, core, name, layer_index)
        self.ff = FeedForward(d_model, 4 * d_model if dim_feedforward is None else dim_feedforward, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, key_padding_mask=None, key_lengths=None, mask=None, cache: KVCache | None = None):
        a = self.self_attn(self.norm1(x), mask=mask, key_padding_mask=key_padding_mask, key_lengths=key_lengths,
                           cache=cache).output
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` and a final LayerNorm.

    ``positional`` (one module) is shared by all layers. ``new_cache()`` gives one :class:`KVCache` per layer
    for incremental decoding when the stack is causal (``mask=causal()``).

    Example:
        >>> import torch
        >>> from salience import masks
        >>> lm = TransformerEncoder(2, 16, 2, mask=masks.causal())
        >>> x = torch.randn(1, 6, 16)
        >>> cache = lm.new_cache()
        >>> a, b = lm(x[:, :4], cache=cache), lm(x[:, 4:], cache=cache)
        >>> torch.allclose(torch.cat((a, b), 1), lm(x), atol=1e-5)
        True
    """

    def __init__(self, num_layers: int, d_model: int, num_heads: int, dim_feedforward: int | None = None,
                 dropout: float = 0.0, *, num_kv_heads: int | None = None, positional=None, mask=None, core=None,
                 activation: str = "gelu"):
        super().__init__()
        check_int(num_layers, "num_layers")
        if mask is not None:
            mask = as_mask_mod(mask, "mask")
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout, num_kv_heads=num_kv_heads,
                                    positional=positional, mask=mask, core=core, activation=activation,
                                    name=f"layers.{i}.self_attn", layer_index=i)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def new_cache(self) -> list[KVCache]:
        """One empty KVCache per layer."""
        return [KVCache() for _ in self.layers]

    def forward(self, x, *, key_padding_mask=None, key_lengths=None, mask=None, cache: list[KVCache] | None = None):
        if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers)):
            raise ValueError(f"cache must be the list of {len(self.layers)} KVCaches from new_cache(); got {type(cache).__name__}.")
        for i, layer in enumerate(self.layers):
            x = layer(x, key_padding_mask=key_padding_mask, key_lengths=key_lengths, mask=mask,
                      cache=None if cache is None else cache[i])
        return self.norm(x)


@dataclass
class DecoderLayerCache:
    """The caches of one decoder layer: causal self-attention keys and the encoder memory's keys."""

    self_attn: KVCache
    cross_attn: StaticKVCache


class TransformerDecoderLayer(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to ``memory``, feed-forward.

    Call: ``layer(x, memory, *, key_padding_mask=None, memory_key_padding_mask=None, memory_lengths=None,
    cache=None) -> (B, L, d_model)``; ``key_padding_mask`` covers the target keys (cached + new).

    Example:
        >>> import torch
        >>> TransformerDecoderLayer(16, 2)(torch.randn(1, 4, 16), torch.randn(1, 7, 16)).shape
        torch.Size([1, 4, 16])
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int | None = None, dropout: float = 0.0, *,
                 num_kv_heads: int | None = None, positional=None, activation: str = "gelu",
                 name: str = "layer", layer_index: int | None = None):
        super().__init__()
        check_int(d_model, "d_model")
        dropout = check_prob(dropout, "dropout")
        self.self_attn = _mha(d_model, num_heads, num_kv_heads, dropout, positional, causal(), None,
                              f"{name}.self_attn", layer_index)
        self.cross_attn = _mha(d_model, num_heads, num_kv_heads, dropout, None, None, None, f"{name}.cross_attn",
                               layer_index)
        self.ff = FeedForward(d_model, 4 * d_model if dim_feedforward is None else dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, *, key_padding_mask=None, memory_key_padding_mask=None, memory_lengths=None,
                cache: DecoderLayerCache | None = None):
        if cache is not None and not isinstance(cache, DecoderLayerCache):
            raise TypeError(f"cache must be a DecoderLayerCache; got {type(cache).__name__}.")
        a = self.self_attn(self.norm1(x), key_padding_mask=key_padding_mask,
                           cache=None if cache is None else cache.self_attn).output
        x = x + self.drop(a)
        c = self.cross_attn(self.norm2(x), memory, key_padding_mask=memory_key_padding_mask,
                            key_lengths=memory_lengths, cache=None if cache is None else cache.cross_attn).output
        x = x + self.drop(c)
        return x + self.drop(self.ff(self.norm3(x)))


class TransformerDecoder(nn.Module):
    """A stack of :class:`TransformerDecoderLayer` and a final LayerNorm; ``new_cache()`` for step-by-step decoding.

    Example:
        >>> import torch
        >>> dec = TransformerDecoder(1, 16, 2)
        >>> dec(torch.randn(2, 3, 16), torch.randn(2, 5, 16)).shape
        torch.Size([2, 3, 16])
    """

    def __init__(self, num_layers: int, d_model: int, num_heads: int, dim_feedforward: int | None = None,
                 dropout: float = 0.0, *, num_kv_heads: int | None = None, positional=None, activation: str = "gelu"):
        super().__init__()
        check_int(num_layers, "num_layers")
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, num_heads, dim_feedforward, dropout, num_kv_heads=num_kv_heads,
                                    positional=positional, activation=activation, name=f"layers.{i}", layer_index=i)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def new_cache(self) -> list[DecoderLayerCache]:
        """Empty caches, one :class:`DecoderLayerCache` per layer."""
        return [DecoderLayerCache(KVCache(), StaticKVCache()) for _ in self.layers]

    def forward(self, x, memory, *, key_padding_mask=None, memory_key_padding_mask=None, memory_lengths=None,
                cache: list[DecoderLayerCache] | None = None):
        if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers)):
            raise ValueError(f"cache must be the list of {len(self.layers)} caches from new_cache(); got {type(cache).__name__}.")
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, key_padding_mask=key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                      memory_lengths=memory_lengths, cache=None if cache is None else cache[i])
        return self.norm(x)

