"""Multi-head attention: self and cross attention, MHA / GQA / MQA, masks, positional schemes, KV cache.

Tensors at the module boundary are ``(B, L, E)`` (batch first; ``batch_first=False`` takes ``(L, B, E)`` like
``torch.nn.MultiheadAttention``'s default); inside, queries, keys and values are laid
out ``(B, H, L, D)`` and handed to :func:`salience.attention`, so every mask of :mod:`salience.masks`, every
score_mod of :mod:`salience.scores` and every fast kernel of the functional core applies.

Example:
    >>> import torch
    >>> from salience import masks
    >>> from salience.layers import MultiHeadAttention, KVCache
    >>> mha = MultiHeadAttention(32, num_heads=4, num_kv_heads=2, mask=masks.causal())
    >>> x = torch.randn(2, 10, 32)
    >>> full = mha(x).output
    >>> cache = KVCache()
    >>> steps = torch.cat([mha(x[:, i : i + 1], cache=cache).output for i in range(10)], dim=1)
    >>> torch.allclose(full, steps, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _hooks, _memory
from .._layout import check_scale
from ..functional import attention, attention_weights
from ..kvcache import attention_with_kvcache
from ..masks import as_mask_mod, causal
from ..scores import ScoreMod, alibi, compose
from ._util import (
    cache_mask,
    check_bool,
    check_int,
    check_lengths,
    check_prob,
    lengths_from_padding,
    shift_score_mod,
    with_padding,
)
from .positional import ALiBi, RotaryEmbedding, T5RelativeBias

__all__ = ["MultiHeadAttention", "MultiHeadOutput", "KVCache", "StaticKVCache"]


@dataclass
class MultiHeadOutput:
    """What :class:`MultiHeadAttention` returns.

    Attributes:
        output: (B, L, E).
        weights: per-head attention weights (B, H, L, S) when ``need_weights=True``, else None.
        lse: logsumexp of the scores (B, H, L) when it was computed (weights asked for, or a recorder active).

    Unpacks to ``(output, weights)`` like ``torch.nn.MultiheadAttention`` (always two values).
    """

    output: torch.Tensor
    weights: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.output, self.weights))


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding with self-attention.

    Holds ``k`` (B, Hkv, S, D) and ``v`` (B, Hkv, S, Dv) after projection and RoPE. Each call of the layer with
    ``cache=`` appends the new tokens, and its queries take positions ``length .. length + L - 1``, so feeding
    a sequence in pieces gives the outputs of the full sequence. One cache per layer and sequence batch.

    The keys live in a preallocated buffer (B, Hkv, capacity, D) written in place: ``max_length`` fixes the
    capacity up front (appending past it is an error); without it the capacity doubles when full (amortised O(1)
    copy per token instead of re-concatenating the whole cache every step). The layer attends through
    :func:`salience.attention_with_kvcache` on the buffer, so decoding steps run the decode kernel on the keys in
    place. ``k`` and ``v`` are views of the filled part. While gradients are recorded (training through a cache)
    the appended keys also keep their autograd graph, as a concatenation, so every chunk gets its gradient.

    Example:
        >>> c = KVCache()
        >>> _ = c.append(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
        >>> c.length, KVCache(max_length=100).max_length
        (3, 100)
    """

    #: smallest buffer allocated when no max_length is given (positions)
    MIN_CAPACITY = 64

    def __init__(self, max_length: int | None = None):
        if max_length is not None:
            check_int(max_length, "max_length", 1)
        self.max_length = max_length
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        self._graph: tuple | None = None  # (k, v) with their autograd graph while training through the cache

    @property
    def length(self) -> int:
        """How many positions are cached (0 when empty)."""
        return self._n

    @property
    def capacity(self) -> int:
        """Positions the buffer holds before it grows (0 when empty)."""
        return 0 if self._k is None else self._k.shape[2]

    @property
    def k(self) -> torch.Tensor | None:
        """The cached keys (B, Hkv, length, D) (a view of the buffer), or None when empty."""
        if self._graph is not None:
            return self._graph[0]
        return None if self._k is None else self._k[:, :, : self._n]

    @property
    def v(self) -> torch.Tensor | None:
        """The cached values (B, Hkv, length, Dv), or None when empty."""
        if self._graph is not None:
            return self._graph[1]
        return None if self._v is None else self._v[:, :, : self._n]

    @property
    def buffers(self) -> tuple:
        """``(k_buffer, v_buffer)``: the whole preallocated buffers (B, Hkv, capacity, D); the first ``length``
        positions are filled (what :func:`salience.attention_with_kvcache` takes with ``cache_seqlens=length``)."""
        return self._k, self._v

    def _grow(self, k, v, need: int) -> None:
        if self.max_length is not None and need > self.max_length:
            raise ValueError(f"KVCache(max_length={self.max_length}) cannot hold {need} positions ({self._n} cached + "
                             f"{need - self._n} new); build it with a larger max_length (or without one to grow).")
        if self._k is not None and need <= self.capacity:
            return
        cap = self.max_length or max(need, 2 * self.capacity, self.MIN_CAPACITY)
        B, Hkv, _, D = k.shape
        if k.device.type == "cpu":  # huge pages where Linux offers them: a decode step reads the buffers end to end
            nk, nv = _memory.zeros(B, Hkv, cap, D, dtype=k.dtype), _memory.zeros(B, Hkv, cap, v.shape[3], dtype=v.dtype)
        else:
            nk, nv = k.new_empty(B, Hkv, cap, D), v.new_empty(B, Hkv, cap, v.shape[3])
        if self._n:
            nk[:, :, : self._n] = self._k[:, :, : self._n]
            nv[:, :, : self._n] = self._v[:, :, : self._n]
        self._k, self._v = nk, nv

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Append new keys/values (B, Hkv, L, D) along the length axis in place; return all keys and values."""
        if self._k is not None and self._n == 0 and (
                k.shape[:2] != self._k.shape[:2] or k.shape[3] != self._k.shape[3] or v.shape[3] != self._v.shape[3]
                or k.dtype != self._k.dtype or k.device != self._k.device):
            self._k = self._v = None  # after reset(): a new batch, dtype or device gets a new buffer
        if self._k is not None:
            if (k.shape[0] != self._k.shape[0] or k.shape[1] != self._k.shape[1] or k.shape[3] != self._k.shape[3]
                    or v.shape[3] != self._v.shape[3]):
                raise ValueError(
                    f"new keys {tuple(k.shape)} do not continue the cached keys {tuple(self.k.shape)}: batch, heads "
                    "and head dim must match. Use one KVCache per layer and batch (cache.reset() to start over)."
                )
            if k.dtype != self._k.dtype or k.device != self._k.device:
                raise ValueError(f"new keys are {k.dtype} on {k.device} but the cache holds {self._k.dtype} on "
                                 f"{self._k.device}; keep one dtype and device per cache (cache.reset() to start over).")
        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        prev = (self.k, self.v) if grad and self._n else None
        n, need = self._n, self._n + k.shape[2]
        self._grow(k, v, need)
        with torch.no_grad():
            self._k[:, :, n:need] = k
            self._v[:, :, n:need] = v
        self._n = need
        if grad:  # training through the cache: keep the graph of every appended chunk
            self._graph = (k, v) if prev is None else (torch.cat((prev[0], k), 2), torch.cat((prev[1], v), 2))
        else:
            self._graph = None
        return self.k, self.v

    def reset(self) -> None:
        """Forget everything cached (the buffer is kept for reuse)."""
        self._n = 0
        self._graph = None

    def __repr__(self) -> str:
        cap = f", max_length={self.max_length}" if self.max_length is not None else ""
        return f"KVCache(length={self.length}{cap})"


class StaticKVCache:
    """Cross-attention cache: the encoder's keys and values, projected on the first call and reused after.

    Example:
        >>> mha = MultiHeadAttention(8, 2)
        >>> memory, cache = torch.randn(1, 5, 8), StaticKVCache()
        >>> a = mha(torch.randn(1, 1, 8), memory, cache=cache).output
        >>> cache.length
        5
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.k is not None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reset(self) -> None:
        self.k = self.v = None

    def __repr__(self) -> str:
        return f"StaticKVCache(length={self.length})"


def _check_positional(positional):
    if positional is None or isinstance(positional, (RotaryEmbedding, ALiBi, T5RelativeBias)):
        return positional
    raise TypeError(
        "positional must be None, a RotaryEmbedding, an ALiBi or a T5RelativeBias (salience.layers); got "
        f"{type(positional).__name__}. Absolute encodings (SinusoidalPositionalEncoding) go on the embeddings."
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention over the functional core: ``out_proj(attention(q_proj(x), k_proj(y), v_proj(y)))``.

    Self-attention when called with one tensor, cross-attention with ``key`` (and ``value``). ``num_kv_heads``
    below ``num_heads`` gives grouped-query attention (MQA with 1): query head i reads kv head
    ``i // (num_heads // num_kv_heads)``. With weights copied by :meth:`from_torch`, outputs and gradients match
    ``torch.nn.MultiheadAttention``.

    Args:
        embed_dim: E, the size of the query input and of the output.
        num_heads: H query heads.
        num_kv_heads: Hkv key/value heads, dividing H (default H).
        kdim, vdim: sizes of the key and value inputs (default E).
        head_dim: D per head (default E // H; then E must be divisible by H).
        bias: biases in the four projections.
        dropout: dropout on the attention weights during training.
        positional: a :class:`RotaryEmbedding` (rotates q, k), :class:`ALiBi` or :class:`T5RelativeBias`
            (score_mods); positions continue across KV-cache calls.
        mask: a mask applied on every call (e.g. ``salience.masks.causal()`` for a decoder), in global positions.
        scale: softmax scale (default 1/sqrt(D)).
        core: optional head-level module replacing exact attention (e.g. ``PerformerAttention``); called
            ``core(q, k, v, mask=, score_mod=, scale=, kv_lengths=)``. No KV cache with a core.
        name, layer_index: how the layer identifies itself to interpretability recorders.
        batch_first: True (default): query, key, value and the output are (B, L, E); False: (L, B, E), the
            default of ``torch.nn.MultiheadAttention`` (:meth:`from_torch` copies the torch module's setting).
            Masks, paddings and weights are batch first either way.

    Call:
        ``mha(query, key=None, value=None, *, mask=None, key_padding_mask=None, key_lengths=None,
        need_weights=False, cache=None, positions=None, attn_mask=None, is_causal=False,
        average_attn_weights=False) -> MultiHeadOutput``

        * query (B, L, E); key (B, S, kdim); value (B, S, vdim).
        * mask: any salience mask (True = visible), combined with the layer's mask.
        * key_padding_mask: bool (B, S), **True = padding** (torch's convention); or key_lengths (B,).
          With a cache they cover all S keys (cached + new).
        * need_weights: also return per-head weights (B, H, L, S), from :func:`salience.attention_weights`.
        * cache: a :class:`KVCache` (self-attention) or :class:`StaticKVCache` (cross-attention).
        * positions: explicit token positions (L,) or (B, L) for RoPE (e.g. a shard of a long sequence).
        * attn_mask, is_causal, average_attn_weights: ``torch.nn.MultiheadAttention``'s, with torch's meaning
          (porting is unchanged code): ``attn_mask`` (L, S) or (B * num_heads, L, S), bool with **True = NOT
          allowed** (the opposite of salience's ``mask=``, where True = visible) or float added to the scores;
          ``is_causal=True`` applies the top-left causal mask (torch reads it as a hint that ``attn_mask`` is
          causal and requires ``attn_mask`` with it; here ``attn_mask`` is optional and both are applied);
          ``average_attn_weights=True`` returns the weights averaged over heads (B, L, S).

        Where the defaults differ from torch's: ``need_weights`` is False here (torch: True) and weights are
        per head unless ``average_attn_weights=True`` (torch's default averages); ``batch_first`` is True
        here (torch: False). Pass them explicitly when porting. Rows whose keys are all masked give 0 (torch
        gives NaN in some versions).

    Example:
        >>> mha = MultiHeadAttention(16, 4, positional=RotaryEmbedding(4))
        >>> out = mha(torch.randn(2, 7, 16), key_lengths=[7, 5], need_weights=True)
        >>> out.output.shape, out.weights.shape, out.weights[1, :, :, 5:].abs().sum().item()
        (torch.Size([2, 7, 16]), torch.Size([2, 4, 7, 7]), 0.0)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        positional=None,
        mask=None,
        scale: float | None = None,
        core: nn.Module | None = None,
        name: str | None = None,
        layer_index: int | None = None,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.batch_first = check_bool(batch_first, "batch_first")
        check_int(embed_dim, "embed_dim")
        check_int(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} (query head i reads kv "
                f"head i // (num_heads // num_kv_heads)); choose num_kv_heads dividing {num_heads}."
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; choose them so, or pass "
                    "head_dim= explicitly."
                )
            head_dim = embed_dim // num_heads
        check_int(head_dim, "head_dim")
        kdim = embed_dim if kdim is None else check_int(kdim, "kdim")
        vdim = embed_dim if vdim is None else check_int(vdim, "vdim")
        check_bool(bias, "bias")
        self.dropout = check_prob(dropout, "dropout")
        self.positional = _check_positional(positional)
        if isinstance(positional, RotaryEmbedding) and positional.head_dim != head_dim:
            raise ValueError(f"positional RotaryEmbedding has head_dim={positional.head_dim} but the layer's head_dim is {head_dim}.")
        if isinstance(positional, (ALiBi, T5RelativeBias)) and positional.num_heads != num_heads:
            raise ValueError(
                f"positional {type(positional).__name__} has num_heads={positional.num_heads} but the layer has "
                f"num_heads={num_heads}; build it with {num_heads}."
            )
        self.mask = None if mask is None else as_mask_mod(mask, "mask")
        if scale is not None:
            scale = check_scale(scale, head_dim)
        if core is not None and not callable(core):
            raise TypeError(f"core must be a callable head-level attention module; got {type(core).__name__}.")
        self.core = core
        self.scale = scale
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.kdim, self.vdim = kdim, vdim
        self.name = name if name is not None else type(self).__name__
        self.layer_index = layer_index
        fk = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(kdim, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(vdim, num_kv_heads * head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections and zero biases (the initialisation of torch.nn.MultiheadAttention)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        s = (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
             f"head_dim={self.head_dim}, dropout={self.dropout}")
        if self.mask is not None:
            s += f", mask={self.mask}"
        if not self.batch_first:
            s += ", batch_first=False"
        return s

    # ------------------------------------------------------------------------------------------- torch peer
    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """A MultiHeadAttention with the weights of a ``torch.nn.MultiheadAttention`` (same outputs).

        ``add_bias_kv`` and ``add_zero_attn`` have no counterpart and are rejected. The layout follows
        ``mha.batch_first``: (L, B, E) inputs and outputs when it is False (torch's default), (B, L, E) when True,
        so the same tensors give the same outputs in both modules.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention; got {type(mha).__name__}.")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn have no counterpart in salience; build mha without them.")
        w = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        bias = mha.in_proj_bias is not None
        layer = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=bias, dropout=mha.dropout,
                    batch_first=bool(mha.batch_first), device=w.device, dtype=w.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            layer.q_proj.weight.copy_(wq)
            layer.k_proj.weight.copy_(wk)
            layer.v_proj.weight.copy_(wv)
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                b = mha.in_proj_bias
                layer.q_proj.bias.copy_(b[:E])
                layer.k_proj.bias.copy_(b[E : 2 * E])
                layer.v_proj.bias.copy_(b[2 * E :])
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    # --------------------------------------------------------------------------------------------- forward
    def _check_input(self, t, argname: str, dim: int, B: int | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{argname} must be a torch.Tensor (B, L, {dim}); got {type(t).__name__}.")
        if t.dim() != 3 or t.shape[-1] != dim:
            raise ValueError(
                f"{argname} must have shape (B, L, {dim}) (batch first); got {tuple(t.shape)}. "
                f"Unbatched input: {argname}.unsqueeze(0)."
            )
        w = self.q_proj.weight
        if t.dtype != w.dtype:
            raise TypeError(f"{argname} has dtype {t.dtype} but the layer's weights are {w.dtype}; cast one of them.")
        if B is not None and t.shape[0] != B:
            raise ValueError(f"{argname} has batch size {t.shape[0]} but query has {B}; they must match.")
        if t.shape[1] == 0:
            raise ValueError(f"{argname} is empty along the length axis (shape {tuple(t.shape)}).")

    def _split(self, x, n_heads):
        B, L, _ = x.shape
        return x.view(B, L, n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        mask=None,
        key_padding_mask: torch.Tensor | None = None,
        key_lengths=None,
        need_weights: bool = False,
        cache: KVCache | StaticKVCache | None = None,
        positions=None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        average_attn_weights: bool = False,
    ) -> MultiHeadOutput:
        kw = dict(mask=mask, key_padding_mask=key_padding_mask, key_lengths=key_lengths, need_weights=need_weights,
                  cache=cache, positions=positions, attn_mask=attn_mask, is_causal=is_causal,
                  average_attn_weights=average_attn_weights)
        if self.batch_first:
            return self._forward(query, key, value, **kw)
        # batch_first=False: (L, B, E) in and out, like torch.nn.MultiheadAttention's default
        ins = []
        for argname, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t is not None:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{argname} must be a torch.Tensor (L, B, {dim}) (batch_first=False); got "
                                    f"{type(t).__name__}.")
                if t.dim() != 3 or t.shape[-1] != dim:
                    raise ValueError(
                        f"{argname} must have shape (L, B, {dim}) (batch_first=False, torch's default layout); got "
                        f"{tuple(t.shape)}. Unbatched input: {argname}.unsqueeze(1); for (B, L, {dim}) input build "
                        "the layer with batch_first=True."
                    )
                t = t.transpose(0, 1)
            ins.append(t)
        res = self._forward(*ins, **kw)
        return MultiHeadOutput(res.output.transpose(0, 1), res.weights, res.lse)

    def _forward(self, query, key=None, value=None, *, mask=None, key_padding_mask=None, key_lengths=None,
                 need_weights=False, cache=None, positions=None, attn_mask=None, is_causal=False,
                 average_attn_weights=False) -> MultiHeadOutput:
        self._check_input(query, "query", self.embed_dim)
        B, L, _ = query.shape
        check_bool(need_weights, "need_weights")
        check_bool(is_causal, "is_causal")
        check_bool(average_attn_weights, "average_attn_weights")
        res = self._forward_inner(query, key, value, mask=mask, key_padding_mask=key_padding_mask,
                                  key_lengths=key_lengths, need_weights=need_weights, cache=cache, positions=positions,
                                  attn_mask=attn_mask, is_causal=is_causal)
        if average_attn_weights and res.weights is not None:
            res = MultiHeadOutput(res.output, res.weights.mean(1), res.lse)
        return res

    def _torch_attn_mask(self, attn_mask, B: int, L: int, S: int):
        """torch's ``attn_mask`` (L, S) or (B * num_heads, L, S), bool True = NOT allowed or float added, as
        ``(salience mask or None, additive score_mod or None)``."""
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor (L, S) or (B * num_heads, L, S); got "
                            f"{type(attn_mask).__name__}.")
        H = self.num_heads
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
            am = attn_mask.view(1, 1, L, S)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B * H, L, S):
            am = attn_mask.view(B, H, L, S)
        else:
            raise ValueError(f"attn_mask must have shape (L, S) = ({L}, {S}) or (B * num_heads, L, S) = "
                             f"({B * H}, {L}, {S}) (torch.nn.MultiheadAttention's); got {tuple(attn_mask.shape)}.")
        if am.dtype == torch.bool:
            return as_mask_mod(~am, "attn_mask"), None  # torch: True = NOT allowed; salience: True = visible
        if not am.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = NOT allowed, torch's convention) or float (added); got "
                            f"{am.dtype}.")
        n = am.shape

        def add(score, b, h, q, kv):
            return score + am[b.clamp(max=n[0] - 1) if n[0] > 1 else 0 * b, h.clamp(max=n[1] - 1) if n[1] > 1 else 0 * h,
                              q, kv].to(score.dtype)

        return None, ScoreMod(add, f"attn_mask(<float {tuple(n)}>)")

    def _forward_inner(self, query, key=None, value=None, *, mask=None, key_padding_mask=None, key_lengths=None,
                       need_weights=False, cache=None, positions=None, attn_mask=None, is_causal=False):
        B, L, _ = query.shape
        if key is None and value is not None:
            raise ValueError("value was given without key; pass key= as well for cross-attention (or neither).")
        cross = key is not None or isinstance(cache, StaticKVCache)
        if cache is not None and not isinstance(cache, (KVCache, StaticKVCache)):
            raise TypeError(f"cache must be a KVCache, a StaticKVCache or None; got {type(cache).__name__}.")
        if isinstance(cache, KVCache) and cross:
            raise ValueError("a KVCache appends self-attention keys; for cross-attention pass a StaticKVCache.")
        if cache is not None and self.core is not None:
            raise ValueError(f"core {type(self.core).__name__} has no KV cache; decode with core=None (exact attention).")
        if cross and self.positional is not None:
            raise ValueError(
                "positional encodings apply to self-attention; this call is cross-attention (key= or a "
                "StaticKVCache). Build the cross-attention layer without positional=."
            )
        if positions is not None and not isinstance(self.positional, RotaryEmbedding):
            raise ValueError("positions= sets RoPE positions and needs positional=RotaryEmbedding(...).")
        if mask is not None:
            mask = as_mask_mod(mask, "mask")
        if is_causal:
            mask = causal() if mask is None else mask & causal()

        q = self._split(self.q_proj(query), self.num_heads)
        offset = 0
        if isinstance(cache, StaticKVCache) and cache.filled:
            if cache.k.shape[0] != B:
                raise ValueError(f"the StaticKVCache holds batch size {cache.k.shape[0]} but query has {B}.")
            k, v = cache.k, cache.v
        else:
            if cross:
                if key is None:
                    raise ValueError("an empty StaticKVCache needs key= (the encoder output) on the first call.")
                value = key if value is None else value
                self._check_input(key, "key", self.kdim, B)
                self._check_input(value, "value", self.vdim, B)
                if value.shape[1] != key.shape[1]:
                    raise ValueError(f"key has length {key.shape[1]} but value has {value.shape[1]}; they must match.")
            else:
                key = value = query
            k = self._split(self.k_proj(key), self.num_kv_heads)
            v = self._split(self.v_proj(value), self.num_kv_heads)
            if isinstance(self.positional, RotaryEmbedding):
                offset = cache.length if isinstance(cache, KVCache) else 0
                q = self.positional(q, offset=offset, positions=positions)
                k = self.positional(k, offset=offset, positions=positions)
            if isinstance(cache, KVCache):
                offset = cache.length
                k, v = cache.append(k, v)
            elif isinstance(cache, StaticKVCache):
                cache.k, cache.v = k, v
        S = k.shape[2]

        # masks are written in global positions; with a cache the queries start at `offset`
        m = self.mask
        if mask is not None:
            m = mask if m is None else m & mask
        m_base = cache_mask(m, offset, L, S)
        t_mask, t_add = (None, None) if attn_mask is None else self._torch_attn_mask(attn_mask, B, L, S)
        if t_mask is not None:  # torch's attn_mask is in this call's (local) positions
            m_base = t_mask if m_base is None else m_base & t_mask
        m = with_padding(m_base, key_padding_mask, key_lengths, B, S, query.device)
        sm = None
        if isinstance(self.positional, ALiBi):  # alibi's own offset: the form the decode kernel takes
            sm = alibi(self.positional.slopes, offset=offset)
        elif isinstance(self.positional, T5RelativeBias):
            sm = shift_score_mod(self.positional.score_mod(), offset, 0)
        if t_add is not None:
            sm = t_add if sm is None else compose(sm, t_add)
        p = self.dropout if self.training else 0.0

        if self.core is not None:
            return self._forward_core(q, k, v, m_base, sm, key_padding_mask, key_lengths, need_weights, B, L)

        need_lse = need_weights or _hooks.recording()
        if isinstance(cache, KVCache) and p == 0.0 and cache._graph is None:
            # the buffer in place: decoding steps take the decode kernel without copying the cache
            kb, vb = cache.buffers
            res = attention_with_kvcache(q, kb, vb, cache_seqlens=cache.length, mask=m, score_mod=sm,
                                         scale=self.scale, return_lse=need_lse)
        else:
            res = attention(q, k, v, mask=m, score_mod=sm, scale=self.scale, dropout_p=p, return_lse=need_lse)
        out, lse = (res.out, res.lse) if need_lse else (res, None)
        weights = None
        if need_weights:
            weights = attention_weights(q, k, mask=m, score_mod=sm, scale=self.scale, lse=lse)
        if lse is not None and _hooks.recording():
            _hooks.emit(_hooks.AttentionEvent(name=self.name, q=q, k=k, mask=m, score_mod=sm, scale=self.scale,
                                              lse=lse, layer_index=self.layer_index, module=self))
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return MultiHeadOutput(self.out_proj(out), weights, lse)

    def _forward_core(self, q, k, v, m_base, sm, key_padding_mask, key_lengths, need_weights, B, L):
        # the core receives the layer/call mask without padding, and padding as right-padded lengths
        lengths = None
        if key_padding_mask is not None:
            lengths = lengths_from_padding(key_padding_mask, type(self.core).__name__)
        elif key_lengths is not None:
            lengths = check_lengths(key_lengths, B, k.shape[2], "key_lengths", q.device)
        kw = {"mask": m_base, "score_mod": sm, "scale": self.scale, "kv_lengths": lengths}
        out = self.core(q, k, v, **kw)
        weights = None
        if need_weights:
            if not hasattr(self.core, "weights"):
                raise ValueError(f"core {type(self.core).__name__} does not expose attention weights.")
            weights = self.core.weights(q, k, **kw)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return MultiHeadOutput(self.out_proj(out), weights, None)
