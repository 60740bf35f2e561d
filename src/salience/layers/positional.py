"""Positional schemes: rotary (RoPE), ALiBi, T5 relative buckets and sinusoidal absolute encodings.

Two kinds of scheme exist, and :class:`~salience.layers.MultiHeadAttention` takes either as ``positional=``:

* **rotations of q and k** (:class:`RotaryEmbedding`): applied to ``(B, H, L, D)`` queries and keys before
  attention, at explicit token positions, so that a KV cache (positions ``offset .. offset + L - 1``) and
  a shard of a long sequence (positions ``start .. start + L - 1``) rotate exactly like the full sequence;
* **score_mods** (:class:`ALiBi`, :class:`T5RelativeBias`): add a bias that depends on ``kv_idx - q_idx``
  to the scores, built from :func:`salience.scores.alibi` / :func:`salience.scores.relative_bias`.

:class:`SinusoidalPositionalEncoding` is the absolute encoding of Vaswani et al. (2017), added to token
embeddings ``(B, L, E)`` before the first layer.

Example:
    >>> import torch
    >>> from salience.layers import RotaryEmbedding
    >>> rope = RotaryEmbedding(8)
    >>> q = torch.randn(1, 2, 5, 8)
    >>> rope(q).shape, torch.allclose(rope(q).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    (torch.Size([1, 2, 5, 8]), True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import scores as _scores
from ._util import check_int

__all__ = [
    "RotaryEmbedding",
    "ALiBi",
    "T5RelativeBias",
    "SinusoidalPositionalEncoding",
    "alibi_slopes",
    "t5_bucket",
    "positions_for",
]

alibi_slopes = _scores.alibi_slopes
t5_bucket = _scores.t5_bucket


def _check_pos_float(value, argname: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{argname} must be a positive finite number; got {value!r}.")
    return float(value)


def positions_for(L: int, offset=0, positions=None, device=None) -> torch.Tensor:
    """Token positions of a block of ``L`` tokens: ``(L,)`` or ``(B, L)`` int64.

    ``positions`` (an int tensor ``(L,)`` or ``(B, L)``) wins when given; otherwise ``offset + arange(L)``,
    where ``offset`` is an int or an int tensor ``(B,)`` (one offset per batch row, e.g. per-row cache lengths
    or the start of each row's shard).

    Example:
        >>> positions_for(3, offset=4).tolist()
        [4, 5, 6]
        >>> positions_for(2, offset=torch.tensor([0, 10])).tolist()
        [[0, 1], [10, 11]]
    """
    if positions is not None:
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(positions)
        if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.dim() not in (1, 2):
            raise ValueError(
                f"positions must be an integer tensor (L,) or (B, L); got {positions.dtype} {tuple(positions.shape)}."
            )
        if positions.shape[-1] != L:
            raise ValueError(f"positions covers {positions.shape[-1]} tokens but the input has L={L}; give one per token.")
        return positions.to(device=device, dtype=torch.long)
    base = torch.arange(L, device=device)
    if isinstance(offset, torch.Tensor):
        if offset.dim() == 0:
            return base + offset.to(device=device, dtype=torch.long)
        if offset.dim() != 1 or offset.dtype.is_floating_point or offset.dtype == torch.bool:
            raise ValueError(f"offset must be an int or an int tensor (B,); got {offset.dtype} {tuple(offset.shape)}.")
        return offset.to(device=device, dtype=torch.long).view(-1, 1) + base.view(1, -1)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int or an int tensor (B,); got {type(offset).__name__}.")
    if offset < 0:
        raise ValueError(f"offset must be >= 0; got {offset}.")
    return base + offset


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) for ``(B, H, L, D)`` queries and keys.

    Pairs of channels are rotated by the angle ``position * base ** (-2 i / rotary_dim)``, so that
    ``rope(q, p) . rope(k, p')`` depends only on ``p - p'``. ``interleaved=False`` pairs channel ``i`` with
    ``i + rotary_dim / 2`` (the GPT-NeoX / Llama layout of Hugging Face checkpoints); ``interleaved=True``
    pairs ``2i`` with ``2i + 1`` (the paper's and GPT-J's layout). Channels beyond ``rotary_dim`` pass through.
    Angles are computed in float64 and cast, so long positions stay accurate in float32.

    Args:
        head_dim: D, the last dimension of the tensors it rotates.
        base: the frequency base (10000 in the paper; 500000 in Llama 3).
        rotary_dim: how many leading channels rotate (even, <= head_dim); default all.
        interleaved: channel pairing, see above.

    Call: ``rope(x, offset=0, positions=None)`` with x ``(B, H, L, D)``; positions ``(L,)`` or ``(B, L)``
    or ``offset`` (int or ``(B,)``) as in :func:`positions_for`. Returns a tensor of x's shape and dtype.

    Example:
        >>> rope = RotaryEmbedding(4)
        >>> q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
        >>> a = (rope(q, offset=3) * rope(k, offset=1)).sum()
        >>> b = (rope(q, offset=7) * rope(k, offset=5)).sum()
        >>> bool(torch.isclose(a, b, atol=1e-5))
        True
    """

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None,
                 interleaved: bool = False):
        super().__init__()
        check_int(head_dim, "head_dim", 2)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        check_int(rotary_dim, "rotary_dim", 2)
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(
                f"rotary_dim must be even and <= head_dim={head_dim}; got {rotary_dim}. "
                "RoPE rotates channel pairs, so use an even head dim (or rotary_dim)."
            )
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved must be a bool; got {type(interleaved).__name__}.")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = _check_pos_float(base, "base")
        self.interleaved = interleaved

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, rotary_dim={self.rotary_dim}, interleaved={self.interleaved}"

    def inv_freq(self, device=None, dtype=torch.float64) -> torch.Tensor:
        """The rotation frequencies ``base ** (-2 i / rotary_dim)``, shape ``(rotary_dim / 2,)``."""
        i = torch.arange(0, self.rotary_dim, 2, device=device, dtype=torch.float64)
        return (1.0 / (self.base ** (i / self.rotary_dim))).to(dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """``cos`` and ``sin`` of the angles, each ``(..., L, rotary_dim / 2)`` in ``dtype``."""
        wide = torch.float32 if positions.device.type == "mps" else torch.float64
        ang = positions.to(wide).unsqueeze(-1) * self.inv_freq(positions.device, wide)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, x: torch.Tensor, offset=0, positions=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            seen = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor (B, H, L, D) with D={self.head_dim}; got {seen}.")
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x has head dim {x.shape[-1]} but this RotaryEmbedding was built for head_dim={self.head_dim}."
            )
        B, _, L, _ = x.shape
        pos = positions_for(L, offset, positions, x.device)
        if pos.dim() == 2 and pos.shape[0] not in (1, B):
            raise ValueError(f"positions/offset give {pos.shape[0]} rows but x has batch size {B}.")
        cos, sin = self.cos_sin(pos, x.dtype)
        cos = cos.unsqueeze(-3) if cos.dim() == 3 else cos  # (B, 1, L, R/2) or (L, R/2)
        sin = sin.unsqueeze(-3) if sin.dim() == 3 else sin
        r = self.rotary_dim
        xr, rest = x[..., :r], x[..., r:]
        if self.interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            y = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
            y = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return y if rest.shape[-1] == 0 else torch.cat((y, rest), dim=-1)


class ALiBi(nn.Module):
    """ALiBi (Press et al. 2022): the score of query i and key j gets ``-slope[h] * |i - j|``.

    The slopes follow :func:`salience.scores.alibi_slopes` for any head count (not only powers of two), or
    are given explicitly. They are a non-trainable buffer saved in the state_dict.

    Args:
        num_heads: number of query heads H (each gets its own slope).
        slopes: optional explicit slopes, a float tensor (H,).

    ``alibi.score_mod()`` returns the :func:`salience.scores.alibi` score_mod for ``salience.attention``.

    Example:
        >>> import salience
        >>> alibi = ALiBi(3)
        >>> q = torch.randn(1, 3, 6, 4)
        >>> salience.attention(q, q, q, score_mod=alibi.score_mod()).shape
        torch.Size([1, 3, 6, 4])
    """

    def __init__(self, num_heads: int, slopes: torch.Tensor | None = None):
        super().__init__()
        check_int(num_heads, "num_heads")
        if slopes is None:
            slopes = _scores.alibi_slopes(num_heads)
        slopes = torch.as_tensor(slopes)
        if slopes.shape != (num_heads,) or not slopes.is_floating_point():
            raise ValueError(f"slopes must be a float tensor of shape ({num_heads},); got {slopes.dtype} {tuple(slopes.shape)}.")
        self.num_heads = num_heads
        self.register_buffer("slopes", slopes.clone().float())

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

    def score_mod(self) -> _scores.ScoreMod:
        """The score_mod ``score - slopes[h] * |q_idx - kv_idx|``."""
        return _scores.alibi(self.slopes)

    def bias(self, L: int, S: int | None = None) -> torch.Tensor:
        """The additive bias (H, L, S) it applies (for inspection)."""
        S = L if S is None else S
        d = (torch.arange(L, device=self.slopes.device).view(-1, 1) - torch.arange(S, device=self.slopes.device)).abs()
        return -self.slopes.view(-1, 1, 1) * d


class T5RelativeBias(nn.Module):
    """T5 relative position bias (Raffel et al. 2020): a learned scalar per (bucket of ``kv_idx - q_idx``, head).

    Buckets come from :func:`salience.scores.t5_bucket`: exact for small distances, logarithmic up to
    ``max_distance``. ``bidirectional=True`` (encoders) gives past and future their own buckets;
    ``bidirectional=False`` (causal decoders) buckets only the past.

    Args:
        num_heads: H; num_buckets: table rows (even when bidirectional); max_distance: where buckets saturate.

    The table is ``self.embedding.weight`` of shape (num_buckets, H), trainable, initialised N(0, 1) like
    ``nn.Embedding`` (T5 checkpoints load into it directly).

    Example:
        >>> import salience
        >>> rel = T5RelativeBias(2, num_buckets=8, max_distance=16)
        >>> q = torch.randn(1, 2, 5, 4)
        >>> salience.attention(q, q, q, score_mod=rel.score_mod()).shape
        torch.Size([1, 2, 5, 4])
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        check_int(num_heads, "num_heads")
        check_int(num_buckets, "num_buckets", 2)
        check_int(max_distance, "max_distance", 1)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool; got {type(bidirectional).__name__}.")
        if bidirectional and num_buckets % 2:
            raise ValueError(f"num_buckets must be even when bidirectional=True; got {num_buckets}.")
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if max_distance <= exact:
            raise ValueError(
                f"max_distance={max_distance} must exceed the {exact} exact buckets per direction "
                f"(num_buckets={num_buckets}); raise max_distance or lower num_buckets."
            )
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")

    def score_mod(self) -> _scores.ScoreMod:
        """The score_mod ``score + table[bucket(kv_idx - q_idx), h]`` (differentiable in the table)."""
        return _scores.relative_bias(self.embedding.weight, self.num_buckets, self.max_distance, self.bidirectional)

    def bias(self, L: int, S: int | None = None, offset: int = 0) -> torch.Tensor:
        """The additive bias (H, L, S) for queries at positions ``offset .. offset + L - 1``."""
        S = L if S is None else S
        dev = self.embedding.weight.device
        rel = torch.arange(S, device=dev).view(1, -1) - (torch.arange(L, device=dev) + offset).view(-1, 1)
        b = _scores.t5_bucket(rel, self.num_buckets, self.max_distance, self.bidirectional)
        return self.embedding(b).permute(2, 0, 1)


class SinusoidalPositionalEncoding(nn.Module):
    """Absolute sinusoidal encoding (Vaswani et al. 2017): ``PE[p, 2i] = sin(p / base**(2i/dim))``,
    ``PE[p, 2i+1] = cos(p / base**(2i/dim))``; added to embeddings ``(B, L, dim)``.

    Args:
        dim: embedding size E (odd sizes allowed: the last channel is a sine).
        base: 10000 in the paper.
        scale_input: multiply the embeddings by ``sqrt(dim)`` before adding (the paper's convention); default False.

    Call: ``pe(x, offset=0, positions=None)`` with x ``(B, L, dim)`` returns ``x (* sqrt(dim)) + PE``;
    ``pe.encoding(positions)`` returns the table rows ``(..., L, dim)``.

    Example:
        >>> pe = SinusoidalPositionalEncoding(6)
        >>> pe.encoding(torch.tensor([0]))[0].tolist()
        [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        >>> pe(torch.zeros(2, 3, 6)).shape
        torch.Size([2, 3, 6])
    """

    def __init__(self, dim: int, base: float = 10000.0, scale_input: bool = False):
        super().__init__()
        self.dim = check_int(dim, "dim")
        self.base = _check_pos_float(base, "base")
        if not isinstance(scale_input, bool):
            raise TypeError(f"scale_input must be a bool; got {type(scale_input).__name__}.")
        self.scale_input = scale_input

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}, scale_input={self.scale_input}"

    def encoding(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of the table for integer ``positions`` (any shape ``P``): ``(*P, dim)`` in ``dtype``."""
        wide = torch.float32 if positions.device.type == "mps" else torch.float64
        i = torch.arange(0, self.dim, 2, device=positions.device, dtype=wide)
        ang = positions.to(wide).unsqueeze(-1) / (self.base ** (i / self.dim))
        pe = torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)[..., : self.dim]
        return pe.to(dtype)

    def forward(self, x: torch.Tensor, offset=0, positions=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim or not x.is_floating_point():
            seen = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor (B, L, {self.dim}); got {seen}.")
        pos = positions_for(x.shape[1], offset, positions, x.device)
        pe = self.encoding(pos, x.dtype)
        if self.scale_input:
            x = x * math.sqrt(self.dim)
        return x + pe
