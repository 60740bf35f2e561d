"""Efficient attention: kernelised and low-rank approximations of softmax attention, and exact local attention.

Every class here is a head-level module with the call of :func:`salience.attention`:
``core(q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> (B, H, L, Dv)`` with
q ``(B, H, L, D)``, k ``(B, Hkv, S, D)``, v ``(B, Hkv, S, Dv)`` and ``kv_lengths`` ``(B,)`` for right padding.
Use one alone, or as ``MultiHeadAttention(..., core=...)``. ``core.weights(q, k, ...)`` gives the
(approximate) weights ``(B, H, L, S)`` each one implies.

========================  =====================================  =========================  ==================
class                     what it computes                        time                       extra memory
========================  =====================================  =========================  ==================
:class:`LinearAttention`  ``phi(q) (phi(k)^T v)``, phi = elu + 1  O(L F Dv) (+ O(L C F)      O(F Dv) per chunk
                          (a different kernel, not softmax)      causal, chunk C)
:class:`PerformerAttention` FAVOR+ estimate of softmax, m         O(L m (D + Dv))            O(m Dv)
                          positive orthogonal random features
:class:`NystromAttention` Nystrom low-rank softmax, m landmarks   O((L + S) m (D + Dv) + m^3) O((L + S) m)
:class:`LinformerAttention` softmax over k projected keys        O(S k D + L k (D + Dv))    O(L k)
                          (length projections E, F)
:class:`LocalAttention`   **exact** softmax in a window           O(L w D)                   O(L D)
========================  =====================================  =========================  ==================

(F = D for elu + 1; w = left + right window.) The approximations converge to exact softmax attention as their
budget grows: features for Performer (error ~ 1/sqrt(m)), landmarks for Nystrom (exact at m = S), projected
length for Linformer (exact at k = S with the default segment-mean initialisation).

Example:
    >>> import torch, salience
    >>> from salience.layers import PerformerAttention
    >>> q, k, v = (0.5 * torch.randn(1, 2, 128, 16) for _ in range(3))
    >>> exact = salience.attention(q, k, v)
    >>> approx = PerformerAttention(16, num_features=256, seed=0)(q, k, v)
    >>> bool((approx - exact).abs().max() < 0.5)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._layout import check_qkv, check_scale
from ..functional import attention, attention_weights
from ..masks import as_mask_mod, dense, padding, sliding_window
from ._util import check_bool, check_int, check_lengths, is_top_left_causal

__all__ = [
    "LinearAttention",
    "PerformerAttention",
    "NystromAttention",
    "LinformerAttention",
    "LocalAttention",
    "elu_feature_map",
    "orthogonal_random_features",
]


# -------------------------------------------------------------------------------------------------- helpers


def _lengths(kv_lengths, B: int, S: int, device) -> torch.Tensor | None:
    if kv_lengths is None:
        return None
    return check_lengths(kv_lengths, B, S, "kv_lengths", device)


def _key_valid(kl: torch.Tensor | None, S: int, device, dtype) -> torch.Tensor | None:
    """(B, 1, S, 1) 1.0 for real keys, 0.0 for padding (None when nothing is padded)."""
    if kl is None:
        return None
    return (torch.arange(S, device=device).view(1, -1) < kl.view(-1, 1)).to(dtype).view(-1, 1, S, 1)


def _causal_flag(mask, who: str, L: int, S: int, alternatives: str) -> bool:
    """True for top-left causal, False for no mask; anything else is rejected with the reason."""
    if mask is None:
        return False
    if is_top_left_causal(mask):
        if L != S:
            raise ValueError(f"{who} supports causal masks for self-attention only (L == S); got L={L}, S={S}.")
        return True
    raise ValueError(
        f"{who} supports mask=None or salience.masks.causal(); got {mask}. Padding goes to kv_lengths=; "
        f"for other masks use exact attention ({alternatives})."
    )


def _no_score_mod(score_mod, who: str) -> None:
    if score_mod is not None:
        raise ValueError(
            f"{who} has no per-score bias: it never forms the scores, so score_mod={score_mod} cannot apply. "
            "Use RotaryEmbedding positions, or exact attention / LocalAttention for ALiBi and T5 biases."
        )


def _no_mask(mask, who: str, reason: str) -> None:
    """Reject any mask for layers without a masked form (padding still goes to kv_lengths)."""
    if mask is not None:
        raise ValueError(
            f"{who} takes no mask (got {mask}): {reason} Padding goes to kv_lengths=; for masks use "
            "LocalAttention or exact attention (salience.attention), or LinearAttention / PerformerAttention "
            "for causal masks (prefix sums)."
        )


def _check(q, k, v):
    shp = check_qkv(q, k, v)
    return shp, k.repeat_interleave(shp.group, 1) if shp.group > 1 else k, (
        v.repeat_interleave(shp.group, 1) if shp.group > 1 else v
    )


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (rows that see no key)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    c = x.cumsum(dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    return torch.cat((zero, c.narrow(dim, 0, c.shape[dim] - 1)), dim=dim)


def _linear_attend(fq, fk, v, causal: bool, chunk: int):
    """Kernelised attention ``sum_j (fq_i . fk_j) v_j / sum_j fq_i . fk_j`` over visible j.

    Non-causal: two products through the (F, Dv) state. Causal: chunks of ``chunk`` rows; inside a chunk the
    masked (C x C) products, across chunks exclusive prefix sums of the per-chunk states.
    """
    if not causal:
        kv = fk.transpose(-2, -1) @ v  # (B, H, F, Dv)
        z = fk.sum(-2)  # (B, H, F)
        return _safe_div(fq @ kv, (fq * z.unsqueeze(-2)).sum(-1, keepdim=True))
    B, H, L, Fd = fq.shape
    Dv = v.shape[-1]
    n = -(-L // chunk)
    pad = n * chunk - L
    if pad:
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    fq = fq.view(B, H, n, chunk, Fd)
    fk = fk.view(B, H, n, chunk, Fd)
    vc = v.view(B, H, n, chunk, Dv)
    state = _exclusive_cumsum(fk.transpose(-2, -1) @ vc, 2)  # (B, H, n, F, Dv): keys of earlier chunks
    zstate = _exclusive_cumsum(fk.sum(-2), 2)  # (B, H, n, F)
    a = (fq @ fk.transpose(-2, -1)).tril()  # (B, H, n, C, C): within the chunk, keys <= query
    num = a @ vc + fq @ state
    den = a.sum(-1, keepdim=True) + (fq * zstate.unsqueeze(-2)).sum(-1, keepdim=True)
    return _safe_div(num, den).view(B, H, n * chunk, Dv)[:, :, :L]


def _linear_weights(fq, fk, causal: bool):
    a = fq @ fk.transpose(-2, -1)
    if causal:
        a = a.tril()
    return _safe_div(a, a.sum(-1, keepdim=True))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``, the positive feature map of Katharopoulos et al. (2020).

    Example:
        >>> elu_feature_map(torch.tensor([-100.0, 0.0, 2.0])).tolist()
        [0.0, 1.0, 3.0]
    """
    return F.elu(x) + 1.0


# --------------------------------------------------------------------------------------------- linear


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020): ``out_i = phi(q_i) S / phi(q_i) z`` with
    ``S = sum_j phi(k_j)^T v_j``, ``z = sum_j phi(k_j)``, ``phi = elu + 1``.

    It replaces the softmax kernel ``exp(q.k)`` by ``phi(q).phi(k)``: a different attention, not an
    approximation with a budget. Cost O(L D Dv) time and O(D Dv) state instead of O(L S D). The causal form
    (``mask=salience.masks.causal()``) uses chunks of ``chunk_size`` rows: exact masked products inside a
    chunk, exclusive prefix sums of the chunk states across chunks, O(L (C + Dv) D) time.

    Args:
        chunk_size: rows per chunk of the causal form.
        feature_map: the positive map phi (default :func:`elu_feature_map`).

    Example:
        >>> from salience import masks
        >>> q = k = v = torch.randn(1, 2, 100, 8)
        >>> LinearAttention(chunk_size=16)(q, k, v, mask=masks.causal()).shape
        torch.Size([1, 2, 100, 8])
    """

    def __init__(self, chunk_size: int = 64, feature_map=None):
        super().__init__()
        self.chunk_size = check_int(chunk_size, "chunk_size")
        if feature_map is not None and not callable(feature_map):
            raise TypeError(f"feature_map must be callable (tensor -> positive tensor); got {type(feature_map).__name__}.")
        self.feature_map = elu_feature_map if feature_map is None else feature_map

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"

    def _features(self, q, k, v, mask, score_mod, scale, kv_lengths):
        who = type(self).__name__
        shp, k, v = _check(q, k, v)
        _no_score_mod(score_mod, who)
        if scale is not None:
            raise ValueError(f"{who} has no softmax scale (phi(q).phi(k) is used as is); pass scale=None.")
        causal = _causal_flag(as_mask_mod(mask) if mask is not None else None, who, shp.L, shp.S,
                              "salience.attention, or LocalAttention")
        kl = _lengths(kv_lengths, shp.B, shp.S, q.device)
        fq, fk = self.feature_map(q), self.feature_map(k)
        valid = _key_valid(kl, shp.S, q.device, q.dtype)
        if valid is not None:
            fk, v = fk * valid, v * valid
        return fq, fk, v, causal

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        fq, fk, v, causal = self._features(q, k, v, mask, score_mod, scale, kv_lengths)
        return _linear_attend(fq, fk, v, causal, self.chunk_size)

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        """The weights (B, H, L, S) this kernel implies: ``phi(q_i).phi(k_j)`` normalised over visible j."""
        fq, fk, _, causal = self._features(q, k, k, mask, score_mod, scale, kv_lengths)
        return _linear_weights(fq, fk, causal)


# ------------------------------------------------------------------------------------------- performer


def orthogonal_random_features(num_features: int, dim: int, orthogonal: bool = True, generator=None,
                               dtype=torch.float64) -> torch.Tensor:
    """Random projection (num_features, dim) for FAVOR+: rows of orthonormal blocks (QR of Gaussian matrices)
    rescaled by chi(dim)-distributed norms, so each row is marginally N(0, I); ``orthogonal=False`` gives
    i.i.d. Gaussian rows.

    Example:
        >>> w = orthogonal_random_features(4, 4, generator=torch.Generator().manual_seed(0))
        >>> g = w @ w.T
        >>> bool((g - torch.diag(torch.diag(g))).abs().max() < 1e-9)
        True
    """
    check_int(num_features, "num_features")
    check_int(dim, "dim")
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator, dtype=dtype)
    blocks = []
    for _ in range(-(-num_features // dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        qm = qm * torch.sign(torch.diagonal(r)).view(1, -1)  # Haar-distributed orthogonal matrix
        blocks.append(qm.T)
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


class PerformerAttention(nn.Module):
    """FAVOR+ (Choromanski et al. 2021): an unbiased estimate of softmax attention with positive random features.

    ``exp(s q.k) = E_w[phi(q) . phi(k)]`` with ``phi(x) = exp(w x' - |x'|^2 / 2) / sqrt(m)``, ``x' = sqrt(s) x``,
    ``w`` the rows of an (m, D) orthogonal random projection. Attention then costs O(L m (D + Dv)) time and
    O(m Dv) memory; the estimate's error falls like 1/sqrt(m) and grows with |q| |k| (it is good for
    small-norm queries and keys, as after normalisation). Causal masks use the chunked prefix sums of
    :class:`LinearAttention`. Stabilisers (a per-row max for queries, one max over all keys) cancel exactly.

    Args:
        head_dim: D.
        num_features: m, the budget.
        orthogonal: orthogonal (default) or i.i.d. Gaussian features.
        redraw_interval: in training mode, draw new features every this many calls (0 = never).
        seed: seed of the first draw (None: from torch's global generator).
        chunk_size: rows per chunk of the causal form.

    The projection is a buffer (saved in the state_dict); :meth:`redraw` draws a new one.

    Example:
        >>> perf = PerformerAttention(8, num_features=64, seed=0)
        >>> q = k = v = 0.3 * torch.randn(2, 2, 50, 8)
        >>> perf(q, k, v).shape
        torch.Size([2, 2, 50, 8])
    """

    def __init__(self, head_dim: int, num_features: int = 256, *, orthogonal: bool = True, redraw_interval: int = 0,
                 seed: int | None = None, chunk_size: int = 64):
        super().__init__()
        self.head_dim = check_int(head_dim, "head_dim")
        self.num_features = check_int(num_features, "num_features")
        self.orthogonal = check_bool(orthogonal, "orthogonal")
        self.redraw_interval = check_int(redraw_interval, "redraw_interval", 0)
        self.chunk_size = check_int(chunk_size, "chunk_size")
        if seed is not None:
            check_int(seed, "seed", 0)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("projection", orthogonal_random_features(num_features, head_dim, orthogonal, gen,
                                                                      torch.float32))
        self._calls = 0

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_features={self.num_features}, orthogonal={self.orthogonal}, "
                f"redraw_interval={self.redraw_interval}")

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection in place (same device and dtype)."""
        w = orthogonal_random_features(self.num_features, self.head_dim, self.orthogonal, generator)
        self.projection.copy_(w.to(self.projection.dtype))

    def _features(self, q, k, v, mask, score_mod, scale, kv_lengths):
        who = type(self).__name__
        shp, k, v = _check(q, k, v)
        if shp.D != self.head_dim:
            raise ValueError(f"q has head dim {shp.D} but this {who} was built for head_dim={self.head_dim}.")
        _no_score_mod(score_mod, who)
        causal = _causal_flag(as_mask_mod(mask) if mask is not None else None, who, shp.L, shp.S,
                              "salience.attention, or LocalAttention")
        s = check_scale(scale, shp.D)
        kl = _lengths(kv_lengths, shp.B, shp.S, q.device)
        # phi(x) = exp(w x' - |x'|^2 / 2 - c) / sqrt(m). For a query the |q'|^2 term and its stabiliser c (the
        # row max) are per-row constants that cancel in the normalisation, so only the row max is taken out;
        # for keys one max over all keys is subtracted (it cancels too). Elementwise passes over the (L, m)
        # matrices dominate the cost, so they are kept to two (queries) and three (keys). They run in place
        # (autograd allows it: matmul keeps its inputs, not its output, and exp_ keeps its result), so one
        # (L, m) and one (S, m) matrix are alive at the end instead of two of each: peak memory is linear in
        # L with a smaller constant (peak 80 -> 52 MiB at B=1, H=4, L=4096, m=256, float32, forward).
        w = self.projection.to(q.dtype) * math.sqrt(s)  # folds the softmax scale into the projection
        log_m = 0.5 * math.log(self.num_features)
        valid = _key_valid(kl, shp.S, q.device, q.dtype)
        wq = q @ w.T  # (B, H, L, m)
        fq = wq.sub_(wq.detach().amax(-1, keepdim=True) + log_m).exp_()
        wk = (k @ w.T).sub_((0.5 * s) * (k * k).sum(-1, keepdim=True))  # (B, H, S, m)
        wk_max = wk.detach() if valid is None else wk.detach().masked_fill(valid == 0, float("-inf"))
        kmax = wk_max.amax(dim=(-2, -1), keepdim=True)
        del wk_max
        kmax = torch.where(torch.isfinite(kmax), kmax, torch.zeros_like(kmax))
        fk = wk.sub_(kmax + log_m).exp_()
        if valid is not None:
            fk, v = fk * valid, v * valid
        return fq, fk, v, causal

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        if self.training and self.redraw_interval:
            if self._calls and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1
        fq, fk, v, causal = self._features(q, k, v, mask, score_mod, scale, kv_lengths)
        return _linear_attend(fq, fk, v, causal, self.chunk_size)

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        """The estimated softmax weights (B, H, L, S): ``phi(q_i).phi(k_j)`` normalised over visible j."""
        fq, fk, _, causal = self._features(q, k, k, mask, score_mod, scale, kv_lengths)
        return _linear_weights(fq, fk, causal)


# ---------------------------------------------------------------------------------------------- nystrom


def _segment_pool(n: int, m: int, lengths: torch.Tensor | None, B: int, device, dtype):
    """Pooling weights (B, m, n) averaging m contiguous, near-equal segments of the first lengths[b] rows,
    and a (B, m) flag of non-empty segments."""
    j = torch.arange(n, device=device).view(1, -1)
    nb = torch.full((B, 1), n, device=device, dtype=torch.long) if lengths is None else lengths.view(-1, 1)
    seg = torch.div(j * m, nb.clamp(min=1), rounding_mode="floor")  # (B, n)
    member = (seg.unsqueeze(1) == torch.arange(m, device=device).view(1, -1, 1)) & (j < nb).unsqueeze(1)
    counts = member.sum(-1)  # (B, m)
    pool = member.to(dtype) / counts.clamp(min=1).unsqueeze(-1).to(dtype)
    return pool, counts > 0


class NystromAttention(nn.Module):
    """Nystromformer (Xiong et al. 2021): softmax attention through m landmarks.

    With landmarks ``q~, k~`` the segment means of q and k, ``A ~ softmax(q k~^T) pinv(softmax(q~ k~^T))
    softmax(q~ k^T)``; each factor is computed by :func:`salience.attention_weights` /
    :func:`salience.attention`. Cost O((L + S) m (D + Dv) + m^3) time, O((L + S) m) memory. With m >= L and
    m >= S the call is exact attention; the error falls as m grows. No causal form (landmarks mix positions).

    Args:
        num_landmarks: m, the budget.
        pinv_iterations: Newton-Schulz iterations for the pseudo-inverse (the paper uses 6); 0 uses the
            exact SVD pseudo-inverse (``torch.linalg.pinv``).

    Example:
        >>> nys = NystromAttention(num_landmarks=16)
        >>> q = k = v = torch.randn(1, 2, 64, 8)
        >>> nys(q, k, v).shape
        torch.Size([1, 2, 64, 8])
    """

    def __init__(self, num_landmarks: int = 64, pinv_iterations: int = 6):
        super().__init__()
        self.num_landmarks = check_int(num_landmarks, "num_landmarks")
        self.pinv_iterations = check_int(pinv_iterations, "pinv_iterations", 0)

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"

    def pinv(self, a: torch.Tensor) -> torch.Tensor:
        """Pseudo-inverse of a batch of (m, m) matrices by the third-order iteration of the paper,
        ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z0 = A^T / (|A|_1 |A|_inf)``, or the exact
        SVD pseudo-inverse when ``pinv_iterations == 0`` (which amplifies tiny singular values: the finite
        iteration also regularises)."""
        if self.pinv_iterations == 0:
            return torch.linalg.pinv(a)
        n1 = a.abs().sum(-2).amax(-1, keepdim=True)  # max column sum
        ninf = a.abs().sum(-1).amax(-1, keepdim=True)  # max row sum
        denom = (n1 * ninf).clamp(min=torch.finfo(a.dtype).tiny).unsqueeze(-1)
        z = a.transpose(-2, -1) / denom
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        for _ in range(self.pinv_iterations):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        return z

    def _parts(self, q, k, v, mask, score_mod, scale, kv_lengths):
        who = type(self).__name__
        shp, k, v = _check(q, k, v)
        _no_score_mod(score_mod, who)
        _no_mask(mask, who, "every landmark averages keys from the whole sequence, so it has no causal or "
                 "masked form.")
        scale = check_scale(scale, shp.D)
        kl = _lengths(kv_lengths, shp.B, shp.S, q.device)
        return shp, k, v, scale, kl

    def _landmarks(self, q, k, shp, kl):
        m = self.num_landmarks
        pq, _ = _segment_pool(shp.L, min(m, shp.L), None, shp.B, q.device, q.dtype)
        pk, kvalid = _segment_pool(shp.S, min(m, shp.S), kl, shp.B, q.device, q.dtype)
        q_l = pq.unsqueeze(1) @ q  # (B, H, m, D)
        k_l = pk.unsqueeze(1) @ k
        return q_l, k_l, dense(kvalid.view(shp.B, 1, 1, -1))

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        shp, k, v, scale, kl = self._parts(q, k, v, mask, score_mod, scale, kv_lengths)
        pad = None if kl is None else padding(kv_lengths=kl)
        if self.num_landmarks >= shp.L and self.num_landmarks >= shp.S:
            return attention(q, k, v, mask=pad, scale=scale)
        q_l, k_l, lmask = self._landmarks(q, k, shp, kl)
        k1 = attention_weights(q, k_l, mask=lmask, scale=scale)  # (B, H, L, m)
        k2 = attention_weights(q_l, k_l, mask=lmask, scale=scale)  # (B, H, m, m)
        k3v = attention(q_l, k, v, mask=pad, scale=scale)  # (B, H, m, Dv)
        return k1 @ (self.pinv(k2) @ k3v)

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        """The approximate weight matrix (B, H, L, S) (rows sum to about 1; entries may be negative)."""
        shp, k, _, scale, kl = self._parts(q, k, k, mask, score_mod, scale, kv_lengths)
        pad = None if kl is None else padding(kv_lengths=kl)
        if self.num_landmarks >= shp.L and self.num_landmarks >= shp.S:
            return attention_weights(q, k, mask=pad, scale=scale)
        q_l, k_l, lmask = self._landmarks(q, k, shp, kl)
        k1 = attention_weights(q, k_l, mask=lmask, scale=scale)
        k2 = attention_weights(q_l, k_l, mask=lmask, scale=scale)
        k3 = attention_weights(q_l, k, mask=pad, scale=scale)
        return k1 @ (self.pinv(k2) @ k3)


# -------------------------------------------------------------------------------------------- linformer


class LinformerAttention(nn.Module):
    """Linformer (Wang et al. 2020): softmax attention over k keys projected along the length axis.

    ``out = softmax(s q (E k)^T + b) (F v)`` with learned ``E, F`` of shape (k, seq_len) shared by all heads
    (``share_kv=True`` uses E for both). Cost O(S k D + L k (D + Dv)) time and O(L k) memory, linear in
    length. Initialisation: E and F average k contiguous near-equal segments and ``b`` holds the log segment
    sizes, so at ``k = seq_len`` the layer is exact attention and smaller k coarsens the keys (the paper
    initialises randomly; this choice gives a budget curve before training). Sequences shorter than
    ``seq_len`` use the first S columns; padded keys (``kv_lengths``) are zeroed before projecting. No causal
    form (each projected key mixes the whole sequence).

    Args:
        seq_len: the maximum key length n.
        proj_len: k, the budget.
        share_kv: one projection for keys and values.

    Example:
        >>> lin = LinformerAttention(seq_len=64, proj_len=16)
        >>> q = k = v = torch.randn(1, 2, 64, 8)
        >>> lin(q, k, v).shape
        torch.Size([1, 2, 64, 8])
    """

    def __init__(self, seq_len: int, proj_len: int = 64, share_kv: bool = False):
        super().__init__()
        self.seq_len = check_int(seq_len, "seq_len")
        self.proj_len = check_int(proj_len, "proj_len")
        if proj_len > seq_len:
            raise ValueError(f"proj_len={proj_len} exceeds seq_len={seq_len}; a projection cannot add keys.")
        self.share_kv = check_bool(share_kv, "share_kv")
        pool, _ = _segment_pool(seq_len, proj_len, None, 1, None, torch.float32)
        self.E = nn.Parameter(pool[0].clone())
        self.F = None if share_kv else nn.Parameter(pool[0].clone())
        sizes = (pool[0] > 0).sum(-1).float()
        self.bias = nn.Parameter(sizes.log())

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, proj_len={self.proj_len}, share_kv={self.share_kv}"

    def _project(self, q, k, v, mask, score_mod, scale, kv_lengths):
        who = type(self).__name__
        shp, k, v = _check(q, k, v)
        _no_score_mod(score_mod, who)
        _no_mask(mask, who, "every projected key mixes the whole sequence, so it has no causal or masked form.")
        if shp.S > self.seq_len:
            raise ValueError(f"key length S={shp.S} exceeds seq_len={self.seq_len}; build the layer with seq_len >= {shp.S}.")
        scale = check_scale(scale, shp.D)
        kl = _lengths(kv_lengths, shp.B, shp.S, q.device)
        valid = _key_valid(kl, shp.S, q.device, q.dtype)
        if valid is not None:
            k, v = k * valid, v * valid
        e = self.E[:, : shp.S].to(q.dtype)
        f = e if self.F is None else self.F[:, : shp.S].to(q.dtype)
        # the per-slot bias b rides in one extra channel, so that the call stays on the fused kernel:
        # scale * [q, 1/scale] . [E k, b] = scale * q . E k + b
        kp = e @ k
        bias = self.bias.to(q.dtype).view(1, 1, -1, 1).expand(*kp.shape[:-1], 1)
        q_aug = torch.cat((q, q.new_full((*q.shape[:-1], 1), 1.0 / scale)), dim=-1)
        return q_aug, torch.cat((kp, bias), dim=-1), f @ v, scale, f

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        q_aug, kp, vp, scale, _ = self._project(q, k, v, mask, score_mod, scale, kv_lengths)
        return attention(q_aug, kp, vp, scale=scale)

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        """The effective weights over the original keys (B, H, L, S): ``softmax(...) @ F``."""
        q_aug, kp, _, scale, f = self._project(q, k, k, mask, score_mod, scale, kv_lengths)
        return attention_weights(q_aug, kp, scale=scale) @ f


# ------------------------------------------------------------------------------------------------ local


class LocalAttention(nn.Module):
    """Exact sliding-window attention: query i sees keys ``i - left .. i + right`` (both inclusive).

    One call of :func:`salience.attention` with the named mask :func:`salience.masks.sliding_window`, which
    the kernels run over just the keys each block of queries can reach: O(L (left + right + 1) D) time and
    no L x S tensor, linear in length. Any extra ``mask`` (global positions; ``causal()`` sets right to 0),
    ``score_mod`` (ALiBi, T5 bias) and ``kv_lengths`` apply exactly.

    Args:
        left: keys before the query it sees; right: keys after (0 for causal language models).

    Example:
        >>> import salience
        >>> q = k = v = torch.randn(1, 2, 300, 8)
        >>> out = LocalAttention(left=16)(q, k, v)
        >>> ref = salience.reference.attention(q, k, v, mask=salience.masks.sliding_window(16)).out
        >>> bool((out - ref).abs().max() < 1e-5)
        True
    """

    def __init__(self, left: int, right: int = 0):
        super().__init__()
        self.left = check_int(left, "left", 0)
        self.right = check_int(right, "right", 0)

    def extra_repr(self) -> str:
        return f"left={self.left}, right={self.right}"

    def window(self, mask=None, kv_lengths=None, B: int | None = None, S: int | None = None):
        """The mask this layer applies: the window, ``& mask``, ``& padding(kv_lengths)``."""
        right = self.right
        if mask is not None:
            mask = as_mask_mod(mask)
            if is_top_left_causal(mask):
                mask, right = None, 0
        m = sliding_window(self.left, right)
        if mask is not None:
            m = m & mask
        if kv_lengths is not None:
            m = m & padding(kv_lengths=_lengths(kv_lengths, B, S, None))
        return m

    def forward(self, q, k, v, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        shp = check_qkv(q, k, v)
        m = self.window(mask, kv_lengths, shp.B, shp.S)
        return attention(q, k, v, mask=m, score_mod=score_mod, scale=scale)

    def weights(self, q, k, *, mask=None, score_mod=None, scale=None, kv_lengths=None) -> torch.Tensor:
        """The exact weights (B, H, L, S) (zero outside the window); costs O(L S)."""
        shp = check_qkv(q, k)
        return attention_weights(q, k, mask=self.window(mask, kv_lengths, shp.B, shp.S), score_mod=score_mod,
                                 scale=scale)
