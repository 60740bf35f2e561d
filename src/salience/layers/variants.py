"""Attention variants beyond the softmax: sparse normalisers, hard attention, sigmoid and differential attention.

* :func:`sparsemax` (Martins & Astudillo 2016) and :func:`entmax15` (1.5-entmax, Peters et al. 2019): exact
  sort-based forward passes and closed-form backward passes; they give exact zeros, so the weights are
  sparse and easier to read. :class:`SparsemaxAttention` and :class:`Entmax15Attention` use them in place of
  the softmax.
* :class:`HardAttention`: one key per query; Gumbel-softmax with a straight-through gradient in training,
  argmax at inference (soft attention is :func:`salience.attention`).
* :class:`SigmoidAttention` (Ramapuram et al. 2024): ``sigmoid(score - log n)`` weights, no normalisation.
* :class:`DifferentialAttention` (Ye et al. 2024): the difference of two softmax maps with a learned lambda.

Head-level modules take ``(q, k, v, *, mask=None, score_mod=None, scale=None)`` laid out (B, H, L, D) like
:func:`salience.attention`; their scores are :func:`salience.reference.scores` (the specification's scaled,
modified, masked scores), evaluated ``chunk`` query rows at a time so memory stays O(chunk x S).

Example:
    >>> import torch
    >>> from salience.layers import sparsemax, entmax15
    >>> z = torch.tensor([[2.0, 1.0, -1.0]])
    >>> sparsemax(z).tolist(), round(entmax15(z).sum().item(), 5)
    ([[1.0, 0.0, 0.0]], 1.0)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._layout import check_qkv
from ..functional import attention, attention_weights
from ..masks import as_mask_mod, padding
from ..reference import scores as _ref_scores
from ..reference import softmax_from_scores
from ._util import cache_mask, check_bool, check_int, check_prob, with_padding
from .multihead import MultiHeadOutput
from .positional import RotaryEmbedding

__all__ = [
    "sparsemax",
    "entmax15",
    "SparsemaxAttention",
    "Entmax15Attention",
    "HardAttention",
    "SigmoidAttention",
    "DifferentialAttention",
    "differential_lambda_init",
]


# ------------------------------------------------------------------------------------------ normalisers


def _prepare_rows(z: torch.Tensor):
    """Shift rows by their max and replace -inf by a value that can never enter the support.

    Returns (shifted z, finite mask, row_has_any). Both normalisers are shift invariant, and every entry in
    their support lies within 1 (sparsemax) or 2 (1.5-entmax, in z units) of the row max, so z_max - 4 is safe.
    """
    finite = torch.isfinite(z)
    any_ = finite.any(-1, keepdim=True)
    zmax = torch.where(finite, z, torch.full_like(z, float("-inf"))).amax(-1, keepdim=True)
    zmax = torch.where(any_, zmax, torch.zeros_like(zmax))
    zs = torch.where(finite, z - zmax, torch.full_like(z, -4.0))
    return zs, finite, any_


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        zs, finite, any_ = _prepare_rows(z)
        srt, _ = torch.sort(zs, dim=-1, descending=True)
        kk = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        cs = srt.cumsum(-1)
        size = ((1 + kk * srt) > cs).sum(-1, keepdim=True).clamp(min=1)
        tau = (cs.gather(-1, size - 1) - 1) / size.to(z.dtype)
        p = (zs - tau).clamp(min=0)
        p = torch.where(finite & any_, p, torch.zeros_like(p))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        supp = (p > 0).to(g.dtype)
        n = supp.sum(-1, keepdim=True).clamp(min=1)
        return supp * (g - (g * supp).sum(-1, keepdim=True) / n)


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        zs, finite, any_ = _prepare_rows(z)
        u = zs / 2
        srt, _ = torch.sort(u, dim=-1, descending=True)
        kk = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        mean = srt.cumsum(-1) / kk
        meansq = (srt * srt).cumsum(-1) / kk
        delta = (1 - kk * (meansq - mean * mean)) / kk
        tau_k = mean - delta.clamp(min=0).sqrt()
        size = ((tau_k <= srt) & (delta >= 0)).sum(-1, keepdim=True).clamp(min=1)
        tau = tau_k.gather(-1, size - 1)
        s = (u - tau).clamp(min=0)
        s = torch.where(finite & any_, s, torch.zeros_like(s))
        ctx.save_for_backward(s)
        return s * s

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        tot = s.sum(-1, keepdim=True)
        safe = torch.where(tot > 0, tot, torch.ones_like(tot))
        return s * (g - (g * s).sum(-1, keepdim=True) / safe)


def _apply_last(fn, x: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}.")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension.")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of {x.dim()} dimensions.")
    if dim in (-1, x.dim() - 1):
        return fn.apply(x)
    return fn.apply(x.transpose(dim, -1)).transpose(dim, -1)


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax: the Euclidean projection of ``x`` onto the probability simplex along ``dim``.

    ``p = max(x - tau, 0)`` with tau such that p sums to 1; exact zeros outside the support. -inf entries get
    0 and rows of only -inf give all zeros. Gradient: ``g - mean_support(g)`` on the support, 0 elsewhere.

    Example:
        >>> [round(t, 4) for t in sparsemax(torch.tensor([0.5, 0.3, -2.0])).tolist()]
        [0.6, 0.4, 0.0]
    """
    return _apply_last(_Sparsemax, x, dim)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax: ``p = max(x / 2 - tau, 0) ** 2`` with tau such that p sums to 1 (exact, by sorting).

    Between softmax (dense) and sparsemax (sparsest). -inf entries get 0; rows of only -inf give zeros.
    Gradient: ``s * (g - (g . s) / sum(s))`` with ``s = sqrt(p)``.

    Example:
        >>> p = entmax15(torch.tensor([1.0, 0.8, -3.0]))
        >>> [round(t, 4) for t in p.tolist()]
        [0.5705, 0.4295, 0.0]
    """
    return _apply_last(_Entmax15, x, dim)


# ------------------------------------------------------------------------------- score-based head modules

#: query rows per chunk of the score-based variants
CHUNK = 512


def _rowwise(q, k, v, mask, score_mod, scale, fn):
    """Apply ``fn(scores) -> weights`` to the spec's masked scores, :data:`CHUNK` query rows at a time, and
    return (output (B, H, L, Dv) or None when v is None, weights list)."""
    chunk = CHUNK
    shp = check_qkv(q, k, v)
    H = shp.H
    ke = k.repeat_interleave(shp.group, 1) if shp.group > 1 else k
    ve = None if v is None else (v.repeat_interleave(shp.group, 1) if shp.group > 1 else v)
    m = None if mask is None else as_mask_mod(mask)
    outs, ws = [], []
    for i in range(0, shp.L, chunk):
        rows = torch.arange(i, min(i + chunk, shp.L), device=q.device)
        s = _ref_scores(q[:, :, i : i + chunk], ke, mask=m, score_mod=score_mod, scale=scale,
                        heads=torch.arange(H, device=q.device), rows=rows, L=shp.L)
        w = fn(s)
        ws.append(w)
        if ve is not None:
            outs.append(w @ ve)
    out = None if ve is None else (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    return out, ws


class _ScoreNormAttention(nn.Module):
    """Attention whose weights are ``normalise(scores)`` instead of the softmax."""

    def normalise(self, s: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        mask = _with_lengths(mask, kv_lengths)
        out, _ = _rowwise(q, k, v, mask, score_mod, scale, self.normalise)
        return out

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        """The weights (B, H, L, S)."""
        mask = _with_lengths(mask, kv_lengths)
        _, ws = _rowwise(q, k, None, mask, score_mod, scale, self.normalise)
        return ws[0] if len(ws) == 1 else torch.cat(ws, dim=2)


def _with_lengths(mask, kv_lengths):
    if kv_lengths is None:
        return mask
    pm = padding(kv_lengths=kv_lengths)
    return pm if mask is None else as_mask_mod(mask) & pm


class SparsemaxAttention(_ScoreNormAttention):
    """Attention with sparsemax weights: ``out = sparsemax(scores) @ v``; many weights are exactly 0.

    Same call as :func:`salience.attention` (q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask,
    score_mod, scale) plus ``kv_lengths``; fully masked rows give 0. Costs O(L S log S) for the sort.

    Example:
        >>> q = k = v = torch.randn(1, 2, 6, 4)
        >>> att = SparsemaxAttention()
        >>> att(q, k, v).shape, bool((att.weights(q, k) == 0).any())
        (torch.Size([1, 2, 6, 4]), True)
    """

    def normalise(self, s):
        return sparsemax(s)


class Entmax15Attention(_ScoreNormAttention):
    """Attention with 1.5-entmax weights: sparse like sparsemax but smoother (Correia et al. 2019).

    Example:
        >>> q = k = v = torch.randn(1, 2, 6, 4)
        >>> Entmax15Attention()(q, k, v).shape
        torch.Size([1, 2, 6, 4])
    """

    def normalise(self, s):
        return entmax15(s)


class SigmoidAttention(_ScoreNormAttention):
    """Sigmoid attention (Ramapuram et al. 2024): ``out = sigmoid(scores + b) @ v`` with ``b = -log(n)``,
    n the key length S, so that the weights of a row sum to about 1 at initialisation. No normalisation
    across keys: rows are independent, masked keys get weight 0 (a fully masked row gives 0).

    Args:
        bias: a fixed bias instead of ``-log(S)``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 8, 4)
        >>> SigmoidAttention()(q, k, v).shape
        torch.Size([1, 2, 8, 4])
    """

    def __init__(self, bias: float | None = None):
        super().__init__()
        if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)):
            raise ValueError(f"bias must be a finite number or None (for -log n); got {bias!r}.")
        self.bias = None if bias is None else float(bias)

    def extra_repr(self) -> str:
        return f"bias={'-log(n)' if self.bias is None else self.bias}"

    def normalise(self, s):
        b = -math.log(s.shape[-1]) if self.bias is None else self.bias
        return torch.sigmoid(s + b)


class HardAttention(nn.Module):
    """Hard attention: each query takes the value of one key.

    Training: the Gumbel-softmax sample ``y = softmax((scores + g) / temperature)`` (g Gumbel noise) is
    replaced in the forward pass by its one-hot argmax, and the gradient flows through y (straight-through,
    Jang et al. 2017). Inference (``eval()``): the argmax of the scores, deterministic. Masked keys are never
    chosen; fully masked rows give 0.

    Args:
        temperature: tau of the relaxed sample (lower: closer to one-hot, noisier gradients).

    Call: ``hard(q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None, generator=None)``.

    Example:
        >>> hard = HardAttention().eval()
        >>> q = k = v = torch.randn(1, 1, 4, 3)
        >>> w = hard.weights(q, k)
        >>> w.sum(-1).tolist(), bool(((w == 0) | (w == 1)).all())
        ([[[1.0, 1.0, 1.0, 1.0]]], True)
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number; got {temperature!r}.")
        self.temperature = float(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def _select(self, s: torch.Tensor, generator=None) -> torch.Tensor:
        any_ = (s != float("-inf")).any(-1, keepdim=True)
        if self.training:
            u = torch.rand(s.shape, generator=generator, dtype=s.dtype, device=s.device)
            tiny = torch.finfo(s.dtype).tiny
            g = -torch.log(-torch.log(u.clamp(min=tiny, max=1 - torch.finfo(s.dtype).eps)))
            y_soft, _ = softmax_from_scores((s + g) / self.temperature)
            idx = (s + g).argmax(-1, keepdim=True)
        else:
            y_soft, idx = None, s.argmax(-1, keepdim=True)
        hard = torch.zeros_like(s).scatter_(-1, idx, 1.0)
        hard = torch.where(any_, hard, torch.zeros_like(hard))
        return hard if y_soft is None else hard - y_soft.detach() + y_soft

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None, generator=None):
        mask = _with_lengths(mask, kv_lengths)
        out, _ = _rowwise(q, k, v, mask, score_mod, scale, lambda s: self._select(s, generator))
        return out

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None, generator=None):
        """The one-hot weights (B, H, L, S) (with the straight-through gradient in training)."""
        mask = _with_lengths(mask, kv_lengths)
        _, ws = _rowwise(q, k, None, mask, score_mod, scale, lambda s: self._select(s, generator))
        return ws[0] if len(ws) == 1 else torch.cat(ws, dim=2)


# ------------------------------------------------------------------------------------------ differential


def differential_lambda_init(layer_index: int) -> float:
    """``0.8 - 0.6 exp(-0.3 (l - 1))`` for layer l = 1, 2, ... (Ye et al. 2024).

    Example:
        >>> round(differential_lambda_init(1), 4), round(differential_lambda_init(12), 4)
        (0.2, 0.7779)
    """
    check_int(layer_index, "layer_index")
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_index - 1))


class DifferentialAttention(nn.Module):
    """Differential attention (DIFF Transformer, Ye et al. 2024).

    Per head, queries and keys are split in two halves of size d; with two softmax maps
    ``A1 = softmax(q1 k1^T / sqrt(d))``, ``A2 = softmax(q2 k2^T / sqrt(d))`` and a value of size 2d,
    ``head = (A1 - lambda A2) v``, then RMS-normalised per head and scaled by ``1 - lambda_init``;
    ``lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` with learned vectors lq1, lk1, lq2, lk2 (size d).
    Both maps go through :func:`salience.attention` (any mask, fast kernels), and ``(A1 - lambda A2) v`` is
    computed as ``A1 v - lambda A2 v``.

    Args:
        embed_dim: E; num_heads: H; head_dim: d (default E // (2 H));
        layer_index: depth l >= 1 for ``lambda_init`` (or give lambda_init); mask: applied on every call;
        positional: an optional :class:`RotaryEmbedding` of size d; bias: projection biases; dropout.

    Call: ``diff(x, key=None, value=None, *, mask=None, key_padding_mask=None, key_lengths=None,
    need_weights=False) -> MultiHeadOutput`` (weights ``A1 - lambda A2``, (B, H, L, S)).

    Example:
        >>> diff = DifferentialAttention(32, num_heads=2, layer_index=3)
        >>> out = diff(torch.randn(2, 6, 32), need_weights=True)
        >>> out.output.shape, out.weights.shape
        (torch.Size([2, 6, 32]), torch.Size([2, 2, 6, 6]))
    """

    def __init__(self, embed_dim: int, num_heads: int, *, head_dim: int | None = None, layer_index: int = 1,
                 lambda_init: float | None = None, mask=None, positional: RotaryEmbedding | None = None,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        check_int(embed_dim, "embed_dim")
        check_int(num_heads, "num_heads")
        if head_dim is None:
            if embed_dim % (2 * num_heads):
                raise ValueError(
                    f"embed_dim={embed_dim} must be divisible by 2 * num_heads = {2 * num_heads} (each head has two "
                    "query/key halves); choose them so or pass head_dim=."
                )
            head_dim = embed_dim // (2 * num_heads)
        check_int(head_dim, "head_dim")
        check_bool(bias, "bias")
        self.dropout = check_prob(dropout, "dropout")
        self.lambda_init = differential_lambda_init(layer_index) if lambda_init is None else float(lambda_init)
        if not math.isfinite(self.lambda_init):
            raise ValueError(f"lambda_init must be finite; got {lambda_init!r}.")
        if positional is not None:
            if not isinstance(positional, RotaryEmbedding):
                raise TypeError(f"positional must be a RotaryEmbedding or None; got {type(positional).__name__}.")
            if positional.head_dim != head_dim:
                raise ValueError(f"positional RotaryEmbedding has head_dim={positional.head_dim}; this layer needs {head_dim}.")
        self.positional = positional
        self.mask = None if mask is None else as_mask_mod(mask, "mask")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        inner = num_heads * 2 * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.lambda_q1 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.norm = nn.RMSNorm(2 * head_dim, eps=1e-5)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, lambda_init={self.lambda_init:.4f}"

    def lam(self) -> torch.Tensor:
        """The current lambda (a scalar tensor)."""
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def heads(self, x, key=None, value=None):
        """The projected halves q1, q2, k1, k2 (B, H, L|S, d) (RoPE applied) and v (B, H, S, 2d)."""
        key = x if key is None else key
        value = key if value is None else value
        B, L, _ = x.shape
        S = key.shape[1]
        H, d = self.num_heads, self.head_dim
        q1, q2 = self.q_proj(x).view(B, L, H, 2 * d).transpose(1, 2).split(d, dim=-1)
        k1, k2 = self.k_proj(key).view(B, S, H, 2 * d).transpose(1, 2).split(d, dim=-1)
        v = self.v_proj(value).view(B, S, H, 2 * d).transpose(1, 2)
        if self.positional is not None:
            q1, q2, k1, k2 = (self.positional(t) for t in (q1, q2, k1, k2))
        return q1, q2, k1, k2, v

    def forward(self, x, key=None, value=None, *, mask=None, key_padding_mask=None, key_lengths=None,
                need_weights: bool = False) -> MultiHeadOutput:
        who = type(self).__name__
        for name, t in (("x", x), ("key", key), ("value", value)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                seen = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{who}: {name} must have shape (B, L, {self.embed_dim}); got {seen}.")
            if t.dtype != self.q_proj.weight.dtype:
                raise TypeError(f"{who}: {name} has dtype {t.dtype} but the weights are {self.q_proj.weight.dtype}.")
        check_bool(need_weights, "need_weights")
        q1, q2, k1, k2, v = self.heads(x, key, value)
        B, _, L, _ = q1.shape
        S = k1.shape[2]
        m = self.mask
        if mask is not None:
            m = as_mask_mod(mask, "mask") if m is None else m & as_mask_mod(mask, "mask")
        m = cache_mask(m, 0, L, S)
        m = with_padding(m, key_padding_mask, key_lengths, B, S, x.device)
        p = self.dropout if self.training else 0.0
        lam = self.lam().to(x.dtype)
        a1 = attention(q1, k1, v, mask=m, dropout_p=p)
        a2 = attention(q2, k2, v, mask=m, dropout_p=p)
        heads = self.norm(a1 - lam * a2) * (1 - self.lambda_init)
        out = self.out_proj(heads.transpose(1, 2).reshape(B, L, -1))
        weights = None
        if need_weights:
            weights = attention_weights(q1, k1, mask=m) - lam * attention_weights(q2, k2, mask=m)
        return MultiHeadOutput(out, weights, None)
