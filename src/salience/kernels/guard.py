"""A key that a row cannot see never changes that row, whatever it holds (NaN, inf).

The kernels multiply hidden keys' values by a zero weight and add -inf to their scores, which lets a NaN or inf
stored at a hidden key (a padding slot, a key outside a window) poison rows that never see it. :func:`guarded`
detects non-finite keys with one summing pass over k and v, runs the kernels on zeroed copies, and recomputes
only the rows that do see a bad key with the textbook formula on the original tensors.

Example:
    >>> import torch, salience
    >>> q = torch.randn(1, 1, 4, 8); k = torch.randn(1, 1, 4, 8); v = torch.randn(1, 1, 4, 8)
    >>> v[0, 0, 3] = float("nan")  # the last key: no row of a causal mask sees it before row 3
    >>> out = salience.attention(q, k, v, mask=salience.masks.causal())
    >>> bool(out[0, 0, :3].isfinite().all()), bool(out[0, 0, 3].isnan().any())
    (True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._result import AttentionResult
from ..reference import _acc_dtype, scores, softmax_from_scores

__all__ = ["guarded", "all_finite", "bad_keys", "rows_seeing", "reference_rows"]


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or inf: one summing pass (an overflowing sum of finite values only sends
    the call down the exact guarded route, which is still right)."""
    with torch.no_grad():
        return bool(torch.isfinite(t.sum(dtype=_acc_dtype(t.dtype))))


def bad_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S) bool: keys whose key or value vector holds a NaN or inf."""
    with torch.no_grad():
        return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def rows_seeing(m, bad: torch.Tensor, H: int, L: int) -> torch.Tensor:
    """(B, H, L) bool: query rows whose mask lets them see at least one key flagged in ``bad`` (B, Hkv, S)."""
    B, Hkv, S = bad.shape
    dev = bad.device
    cols = bad.any(0).any(0).nonzero().flatten()  # the keys that are bad for some (batch, kv head)
    hit = torch.zeros(B, H, L, dtype=torch.bool, device=dev)
    badh = bad.repeat_interleave(H // Hkv, dim=1)[..., cols]  # (B, H, n)
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    kv = cols.view(1, 1, 1, -1)
    step = max(1, (1 << 22) // max(1, B * H * cols.numel()))
    for i in range(0, L, step):
        qi = torch.arange(i, min(L, i + step), device=dev).view(1, 1, -1, 1)
        vis = torch.as_tensor(m(b, h, qi, kv)).expand(B, H, qi.shape[2], cols.numel())
        hit[:, :, i:i + step] = (vis & badh.unsqueeze(2)).any(-1)
    return hit


def guarded(q, k, v, mask, run_clean, reference_rows):
    """Run attention so that a key a row cannot see never changes that row, whatever it holds.

    The kernels multiply hidden keys' values by a zero weight (and add their scores to -inf), which lets a
    NaN or inf stored at a hidden key (a padding slot, a key outside a window) poison rows that never see
    it. When k or v holds a non-finite value, the kernels run on copies with those entries zeroed (the
    gradient still flows to every finite entry), and the rows that do see a non-finite key are recomputed
    by the textbook formula on the original tensors, so they get exactly what eager attention gives."""
    if mask is None or (all_finite(k) and all_finite(v)):
        return run_clean(q, k, v)
    bad = bad_keys(k, v)
    kc = torch.where(torch.isfinite(k), k, torch.zeros((), dtype=k.dtype, device=k.device))
    vc = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))
    res = run_clean(q, kc, vc)
    L = q.shape[2]
    hit = rows_seeing(mask.bind(L, k.shape[2], q.device), bad, q.shape[1], L)
    if not hit.any():
        return res
    out, lse = res.out.clone(), None if res.lse is None else res.lse.clone()
    for b, h in hit.any(2).nonzero().tolist():  # recompute only the (batch, head, row) triples that see one
        r = hit[b, h].nonzero().flatten()
        ref = reference_rows(b, h, r)
        out[b, h, r] = ref.out[0, 0].to(out.dtype)
        if lse is not None:
            lse[b, h, r] = ref.lse[0, 0].to(lse.dtype)
    return AttentionResult(out=out, lse=lse)


def reference_rows(q, k, v, mask, score_mod, scale, compatibility, dropout_p, b, h, rows,
                   bias=None) -> AttentionResult:
    """The textbook result of query rows ``rows`` of batch ``b``, head ``h`` on the original k and v (``bias``:
    a float tensor broadcastable to (B, H, L, S), or None)."""
    g = q.shape[1] // k.shape[1]
    bi, hi = torch.tensor([b], device=q.device), torch.tensor([h], device=q.device)
    kw = {} if bias is None else {"bias": bias}  # scores() reads the batch, head and rows it needs
    s = scores(q[b:b + 1, h:h + 1].index_select(2, rows), k[b:b + 1, h // g:h // g + 1], mask=mask,
               score_mod=score_mod, scale=scale, compatibility=compatibility, batches=bi, heads=hi, rows=rows,
               L=q.shape[2], **kw)
    w, lse = softmax_from_scores(s)
    if dropout_p > 0:
        w = F.dropout(w, p=dropout_p)
    return AttentionResult(out=w @ v[b:b + 1, h // g:h // g + 1], lse=lse.to(_acc_dtype(q.dtype)))
