"""A key that a row cannot see never changes that row, whatever it holds (NaN, inf).

The kernels multiply hidden keys' values by a zero weight and add -inf to their scores, which lets a NaN or inf
stored at a hidden key (a padding slot, a key outside a window, a key a score_mod sends to -inf, a bias column of
-inf) poison rows that never see it (``0 * NaN = NaN`` in ``P @ V``). :func:`guarded` detects non-finite keys with
one summing pass over k and v (remembered per tensor and version, so an executor that checks again reads the
answer instead of a second pass), runs the kernels on copies with those entries zeroed, and recomputes only the
rows that do see a bad key with the textbook formula on the original tensors.

A key is *hidden* from a row when the mask hides it, the bias is -inf there, or the score_mod returns -inf for it,
the score being computed with the key's non-finite entries replaced by zero (so what a key holds never decides
whether it is seen). A row that sees a bad key gets what eager attention gives (NaN or inf); the bad keys it does
not see still do not reach it.

Example:
    >>> import torch, salience
    >>> q = torch.randn(1, 1, 4, 8); k = torch.randn(1, 1, 4, 8); v = torch.randn(1, 1, 4, 8)
    >>> v[0, 0, 3] = float("nan")  # the last key: no row of a causal mask sees it before row 3
    >>> out = salience.attention(q, k, v, mask=salience.masks.causal())
    >>> bool(out[0, 0, :3].isfinite().all()), bool(out[0, 0, 3].isnan().any())
    (True, True)
    >>> hide = lambda s, b, h, i, j: torch.where(j > i, float("-inf"), s)  # the same hiding by a score_mod
    >>> bool(salience.attention(q, k, v, score_mod=hide)[0, 0, :3].isfinite().all())
    True
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .._layout import check_scale
from .._result import AttentionResult
from ..masks import as_mask_mod, check_mask_output
from ..reference import _acc_dtype, select_bias, softmax_from_scores
from ..scores import as_score_mod

__all__ = ["Scoring", "guarded", "patch_rows", "all_finite", "finite_pair", "cleaned", "cleaned_and_bad", "bad_keys", "rows_seeing",
           "visible", "textbook_rows", "textbook_grads"]

NEG = float("-inf")


@dataclass(frozen=True)
class Scoring:
    """Everything besides q, k and v that decides a row's scores, hence which keys it sees.

    ``mask`` (a MaskMod, bound or not), ``score_mod``, ``bias`` (a float tensor broadcastable to this call's
    (B, H, L, S), indexed by local rows and keys), ``scale``, ``compatibility``, ``dropout_p``; ``q_offset`` and
    ``kv_offset`` place the rows and keys in a larger problem of global lengths ``L`` and ``S`` (ring blocks: the
    mask and score_mod see global indices)."""

    mask: object = None
    score_mod: object = None
    bias: torch.Tensor | None = None
    scale: object = None
    compatibility: object = None
    dropout_p: float = 0.0
    q_offset: int = 0
    kv_offset: int = 0
    L: int | None = None
    S: int | None = None

    @property
    def hides_keys(self) -> bool:
        """False when every row sees every key (no mask, score_mod or bias)."""
        return self.mask is not None or self.score_mod is not None or self.bias is not None

    def sized(self, L: int, S: int) -> Scoring:
        """With the global lengths filled in (offset + local length) where they were not given."""
        return replace(self, L=self.q_offset + L if self.L is None else self.L,
                       S=self.kv_offset + S if self.S is None else self.S)


# ------------------------------------------------------------------------------------ finiteness, remembered

_KNOWN: list = []  # (weakref k, version k, weakref v, version v, finite), newest last; only during a guarded call
_KNOWN_MAX = 32
_DEPTH = [0]  # guarded calls in progress: the findings are forgotten when the last one ends


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or inf: one summing pass (an overflowing sum of finite values only sends
    the call down the exact guarded route, which is still right)."""
    with torch.no_grad():
        return bool(torch.isfinite(t.sum(dtype=_acc_dtype(t.dtype))))


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: never remembered
        return None


def _remember(k, v, finite: bool) -> None:
    vk, vv = _version(k), _version(v)
    if vk is None or vv is None or _DEPTH[0] == 0:
        return
    _KNOWN[:] = [e for e in _KNOWN if e[0]() is not None and e[2]() is not None][-(_KNOWN_MAX - 1):]
    _KNOWN.append((weakref.ref(k), vk, weakref.ref(v), vv, finite))


def finite_pair(k: torch.Tensor, v: torch.Tensor) -> bool:
    """``all_finite(k) and all_finite(v)``, remembered per tensor object and version for the rest of a
    :func:`guarded` call (then forgotten: a write that bypasses the version counter, ``k.data[...] = nan``, is
    seen by the next call): the dispatcher's check and an executor's own (the bias executor, which can also be run
    directly) cost one pass, not two."""
    vk, vv = _version(k), _version(v)
    for rk, ck, rv, cv, fin in reversed(_KNOWN):
        if rk() is k and rv() is v and ck == vk and cv == vv and vk is not None:
            return fin
    fin = all_finite(k) and all_finite(v)
    _remember(k, v, fin)
    return fin


def cleaned(k: torch.Tensor, v: torch.Tensor):
    """``(kc, vc)``: k and v with NaN/inf entries replaced by 0 (differentiable: the gradient flows to every
    finite entry), remembered as finite."""
    return cleaned_and_bad(k, v)[:2]


def cleaned_and_bad(k: torch.Tensor, v: torch.Tensor):
    """``(kc, vc, bad)``: :func:`cleaned` and :func:`bad_keys` from one finiteness map of each tensor."""
    with torch.no_grad():
        fk, fv = torch.isfinite(k), torch.isfinite(v)
        bad = ~(fk.all(-1) & fv.all(-1))
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    kc, vc = torch.where(fk, k, zero), torch.where(fv, v, zero.to(v.dtype))
    _remember(kc, vc, True)
    return kc, vc, bad


def bad_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S) bool: keys whose key or value vector holds a NaN or inf."""
    with torch.no_grad():
        return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


# ------------------------------------------------------------------------------------------- who sees what


def _scores_at(q, k, sc: Scoring, b_idx, h_idx, rows, cols):
    """Scores (B', H', r, n) of query rows ``rows`` (local) of batches ``b_idx``/heads ``h_idx`` (q holds them)
    against keys ``cols`` (local; k holds them), as :func:`salience.reference.scores` computes them: hidden -inf."""
    dev = q.device
    if sc.compatibility is not None:
        s = sc.compatibility(q, k)
        s = s if sc.scale is None else s * sc.scale
    else:
        s = (q @ k.transpose(-2, -1)) * check_scale(sc.scale, q.shape[-1])
    bi, hi = b_idx.view(-1, 1, 1, 1), h_idx.view(1, -1, 1, 1)
    qi = (rows + sc.q_offset).view(1, 1, -1, 1)
    kj = (cols + sc.kv_offset).view(1, 1, 1, -1)
    if sc.score_mod is not None:
        mod = as_score_mod(sc.score_mod)
        mod = mod.to(dev) if hasattr(mod, "to") else mod
        s = mod(s, bi, hi, qi, kj).to(s.dtype)
    if sc.bias is not None:
        t = select_bias(sc.bias, bi, hi, rows.view(1, 1, -1, 1))
        t = t.index_select(3, cols.to(t.device)) if t.shape[3] > 1 else t
        s = s + t.to(s.dtype)
    if sc.mask is not None:
        m = as_mask_mod(sc.mask).bind(sc.L, sc.S, dev)
        s = s.masked_fill(~check_mask_output(m(bi, hi, qi, kj), m, tuple(s.shape)), NEG)
    return s


def visible(q, kc, sc: Scoring, b_idx, h_idx, rows, cols) -> torch.Tensor:
    """(B', H', r, n) bool: which of the keys ``cols`` (of the zeroed copy ``kc``) the rows ``rows`` of batches
    ``b_idx`` and heads ``h_idx`` see (a NaN score counts as seen: that row is not finite in eager either)."""
    B, H = len(b_idx), len(h_idx)
    if sc.score_mod is None and sc.bias is None and sc.compatibility is None:  # the mask alone decides
        if sc.mask is None:
            return torch.ones(B, H, len(rows), len(cols), dtype=torch.bool, device=q.device)
        m = as_mask_mod(sc.mask).bind(sc.L, sc.S, q.device)
        vis = m(b_idx.view(-1, 1, 1, 1), h_idx.view(1, -1, 1, 1), (rows + sc.q_offset).view(1, 1, -1, 1),
                (cols + sc.kv_offset).view(1, 1, 1, -1))
        return torch.as_tensor(vis, device=q.device).expand(B, H, len(rows), len(cols))
    g = q.shape[1] // kc.shape[1]
    qs = _take(_take(_take(q, 0, b_idx), 1, h_idx), 2, rows)
    ks = _take(_take(_take(kc, 0, b_idx), 1, h_idx // g), 2, cols)
    with torch.no_grad():
        return _scores_at(qs, ks, sc, b_idx, h_idx, rows, cols) != NEG


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, idx)`` without a copy when idx is one index or every index in order."""
    if idx.numel() == 1:
        i = int(idx)
        return t.narrow(dim, i, 1)
    if idx.numel() == t.shape[dim] and bool((idx == torch.arange(t.shape[dim], device=idx.device)).all()):
        return t
    return t.index_select(dim, idx)


def rows_seeing(sc: Scoring, q, kc, bad: torch.Tensor) -> torch.Tensor:
    """(B, H, L) bool: query rows that see at least one key flagged in ``bad`` (B, Hkv, S)."""
    B, Hkv, S = bad.shape
    H, L = q.shape[1], q.shape[2]
    dev = q.device
    cols = bad.any(0).any(0).nonzero().flatten()  # the keys that are bad for some (batch, kv head)
    badh = bad.repeat_interleave(H // Hkv, dim=1)[..., cols].unsqueeze(2)  # (B, H, 1, n)
    hit = torch.zeros(B, H, L, dtype=torch.bool, device=dev)
    bs, hs = torch.arange(B, device=dev), torch.arange(H, device=dev)
    step = max(1, (1 << 22) // max(1, B * H * cols.numel()))
    for i in range(0, L, step):
        rows = torch.arange(i, min(L, i + step), device=dev)
        hit[:, :, i:i + step] = (visible(q, kc, sc, bs, hs, rows, cols) & badh).any(-1)
    return hit


# --------------------------------------------------------------------------------- the rows that see a bad key


def _patterns(q, kc, sc: Scoring, b: int, h: int, rows, bad_bh):
    """Groups of ``rows`` (of batch b, head h) that see the same bad keys: ``[(row positions, hide (S,) bool)]``,
    ``hide`` marking the bad keys that group does not see (their non-finite entries are read as 0)."""
    dev = q.device
    cols = bad_bh.nonzero().flatten()
    if cols.numel() == 0:  # no bad key here (a ring block of a row that sees one elsewhere)
        return [(torch.arange(len(rows), device=dev), torch.zeros(bad_bh.shape[0], 1, dtype=torch.bool, device=dev))]
    vis = visible(q, kc, sc, torch.tensor([b], device=dev), torch.tensor([h], device=dev), rows, cols)[0, 0]
    pats, inv = torch.unique(vis, dim=0, return_inverse=True)
    out = []
    for p in range(pats.shape[0]):
        hide = torch.zeros(bad_bh.shape[0], dtype=torch.bool, device=dev)
        hide[cols[~pats[p]]] = True
        out.append(((inv == p).nonzero().flatten(), hide.unsqueeze(-1)))
    return out


def textbook_rows(q, k, v, kc, vc, sc: Scoring, b: int, h: int, rows, bad_bh) -> AttentionResult:
    """The textbook result (out (1, 1, r, Dv), lse (1, 1, r)) of rows ``rows`` of batch b, head h on the original
    k and v, except that the bad keys (``bad_bh`` (S,) bool) a row does not see are read from the zeroed copies
    ``kc``/``vc``: what eager attention gives for a row that sees a bad key, without the ones it does not see."""
    hk = h // (q.shape[1] // k.shape[1])
    S, dev = k.shape[2], q.device
    out = q.new_zeros(len(rows), v.shape[-1])
    lse = torch.zeros(len(rows), dtype=_acc_dtype(q.dtype), device=dev)
    bi, hi, cols = torch.tensor([b], device=dev), torch.tensor([h], device=dev), torch.arange(S, device=dev)
    for sel, hide in _patterns(q, kc, sc, b, h, rows, bad_bh):
        kg = torch.where(hide, kc[b, hk], k[b, hk])
        vg = torch.where(hide, vc[b, hk], v[b, hk])
        s = _scores_at(q[b, h].index_select(0, rows[sel])[None, None], kg[None, None], sc, bi, hi, rows[sel], cols)
        hid = s == NEG  # no gradient through a hidden score, and weight exactly 0 there even in a NaN row
        w, ls = softmax_from_scores(torch.where(hid, NEG, s))
        w = torch.where(hid, torch.zeros((), dtype=w.dtype, device=dev), w)
        if sc.dropout_p > 0:
            w = F.dropout(w, p=sc.dropout_p)
        out = out.index_put((sel,), (w @ vg.to(w.dtype))[0, 0].to(out.dtype))
        lse = lse.index_put((sel,), ls[0, 0].to(lse.dtype))
    return AttentionResult(out=out[None, None], lse=lse[None, None])


def textbook_grads(q, k, v, sc: Scoring, b: int, h: int, rows, bad_bh, out, lse, dout, dlse):
    """This block's share ``(dq (r, D), dk (S, D), dv (S, Dv))`` of the gradients of rows ``rows`` (batch b, head
    h) that see a bad key, from their final ``out`` (r, Dv), ``lse`` (r,), ``dout``, ``dlse`` (or None):
    FlashAttention-2's ``dS = P (dP - delta)`` by autograd on the textbook scores, the bad keys a row does not see
    read as 0 and their weights exactly 0 (so a NaN delta of such a row reaches only the keys it sees)."""
    hk = h // (q.shape[1] // k.shape[1])
    S, dev = k.shape[2], q.device
    acc = _acc_dtype(q.dtype)
    qr = q[b, h].index_select(0, rows).detach().to(acc).requires_grad_(True)
    kb, vb = (t[b, hk].detach().to(acc).requires_grad_(True) for t in (k, v))
    zero = torch.zeros((), dtype=acc, device=dev)
    kcb, vcb = torch.where(torch.isfinite(kb), kb, zero), torch.where(torch.isfinite(vb), vb, zero)
    delta = (dout.to(acc) * out.to(acc)).sum(-1) - (0 if dlse is None else dlse.to(acc))
    bi, hi, cols = torch.tensor([b], device=dev), torch.tensor([h], device=dev), torch.arange(S, device=dev)
    total = zero
    with torch.enable_grad():
        for sel, hide in _patterns(q, _zeroed(k), sc, b, h, rows, bad_bh):
            kg, vg = torch.where(hide, kcb, kb), torch.where(hide, vcb, vb)
            s = _scores_at(qr[sel][None, None], kg[None, None], sc, bi, hi, rows[sel], cols)[0, 0]
            hid = s == NEG
            p = torch.where(hid, zero, torch.exp(torch.where(hid, zero, s) - lse[sel].to(acc).unsqueeze(-1)))
            dp = dout[sel].to(acc) @ vg.transpose(0, 1) - delta[sel].unsqueeze(-1)
            total = total + torch.where(hid, zero, p * dp).sum()
        dq, dk, dv = torch.autograd.grad(total, (qr, kb, vb), allow_unused=True)
    dk = torch.zeros_like(kb) if dk is None else dk
    dv = torch.zeros_like(vb) if dv is None else dv
    return dq, dk, dv


def _zeroed(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


# ---------------------------------------------------------------------------------------------- the guard


def patch_rows(res: AttentionResult, q, k, v, kc, vc, sc: Scoring, textbook=None, hit=None,
               bad=None) -> AttentionResult:
    """``res`` (computed on the zeroed copies ``kc``, ``vc``) with the rows that see a bad key of k or v (``hit``
    (B, H, L) bool, default :func:`rows_seeing`) replaced by ``textbook`` (default :func:`textbook_rows`; same
    signature) on the original tensors. ``bad``: :func:`bad_keys` of k and v when already known."""
    textbook = textbook_rows if textbook is None else textbook
    bad = bad_keys(k, v) if bad is None else bad
    sc = sc.sized(q.shape[2], k.shape[2])
    hit = rows_seeing(sc, q, kc, bad) if hit is None else hit
    if not bool(hit.any()):
        return res
    out, lse = res.out.clone(), None if res.lse is None else res.lse.clone()
    g = q.shape[1] // k.shape[1]
    step = max(1, (1 << 22) // max(1, k.shape[2]))  # rows per textbook call: at most ~4M score elements
    for b, h in hit.any(2).nonzero().tolist():  # recompute only the (batch, head, row) triples that see one
        rs = hit[b, h].nonzero().flatten()
        for i in range(0, rs.numel(), step):
            r = rs[i:i + step]
            ref = textbook(q, k, v, kc, vc, sc, b, h, r, bad[b, h // g])
            out[b, h, r] = ref.out[0, 0].to(out.dtype)
            if lse is not None:
                lse[b, h, r] = ref.lse[0, 0].to(lse.dtype)
    return AttentionResult(out=out, lse=lse)


def guarded(q, k, v, scoring, run_clean, textbook=None) -> AttentionResult:
    """Run attention so that a key a row cannot see never changes that row, whatever it holds.

    ``scoring``: a :class:`Scoring` (or a mask, read as ``Scoring(mask=...)``); ``run_clean(q, k, v)`` runs the
    kernels; ``textbook``: see :func:`patch_rows`. When k and v are finite (one summing pass, remembered), or when
    nothing hides a key (every row then sees every key, so the kernels on the original tensors give what eager
    gives), ``run_clean`` runs on them as they are. Otherwise it runs on copies with the NaN/inf entries zeroed
    (the gradient still flows to every finite entry) and the rows that see a bad key are recomputed by the
    textbook formula."""
    sc = scoring if isinstance(scoring, Scoring) else Scoring(mask=scoring)
    _DEPTH[0] += 1
    try:
        if not sc.hides_keys or finite_pair(k, v):
            return run_clean(q, k, v)
        kc, vc, bad = cleaned_and_bad(k, v)
        return patch_rows(run_clean(q, kc, vc), q, k, v, kc, vc, sc, textbook, bad=bad)
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            _KNOWN.clear()
