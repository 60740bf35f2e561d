"""Randomised differential test: seeded draws of shapes, dtypes, masks, score_mods, sinks and input storage
(contiguous, strided, transposed, expanded, the BLHD layout), each against the float64 reference forward and
backward with the relative-error rule. The draws are seeded, so a failure names a reproducible case."""

import random

import pytest
import torch

import salience
from salience import masks, reference, scores
from salience.testing import assert_rel_close

N_DRAWS = 48


def _mask(r, L, S, B):
    kind = r.choice(["none", "causal", "causal_br", "window", "window_causal", "documents", "padding", "prefix",
                     "lambda_band", "lambda_chained", "tensor", "global"])
    if kind == "none":
        return kind, None
    if kind == "causal":
        return kind, masks.causal()
    if kind == "causal_br":
        return kind, masks.causal(align="bottom_right")
    if kind == "window":
        return kind, masks.sliding_window(r.randint(0, 12), r.randint(0, 12))
    if kind == "window_causal":
        return kind, masks.causal() & masks.sliding_window(r.randint(1, 20))
    if kind == "documents":
        n = max(1, min(L, S) // r.randint(5, 30))
        ids = torch.sort(torch.randint(0, n, (min(L, S),))).values
        return kind, masks.document(ids) if L == S else masks.padding(kv_lengths=torch.full((B,), S))
    if kind == "padding":
        return kind, masks.padding(kv_lengths=torch.randint(0, S + 1, (B,)))
    if kind == "prefix":
        return kind, masks.prefix_lm(r.randint(0, L)) if L == S else masks.causal(align="bottom_right")
    if kind == "lambda_band":
        w = r.randint(1, 16)
        return kind, lambda b, h, q, kv: (q >= kv) & (q - kv <= w)
    if kind == "lambda_chained":  # FlexAttention style: chained indexing of a captured tensor
        lens = torch.randint(1, S + 1, (B,))
        return kind, lambda b, h, q, kv: kv < lens[b]
    if kind == "tensor":
        return kind, torch.rand(B, 1, L, S) < 0.7
    return kind, masks.global_tokens([0, S // 2]) | masks.sliding_window(3) if L == S else None


def _mod(r, H):
    kind = r.choice(["none", "none", "alibi", "softcap", "temperature", "relative_bias", "lambda_head"])
    if kind == "none":
        return kind, None
    if kind == "alibi":
        return kind, scores.alibi(H)
    if kind == "softcap":
        return kind, scores.softcap(r.choice([5.0, 20.0]))
    if kind == "temperature":
        return kind, scores.temperature(r.choice([0.5, 2.0]))
    if kind == "relative_bias":
        return kind, scores.relative_bias(torch.randn(32, H, dtype=torch.float64))
    slopes = torch.rand(H, dtype=torch.float64)
    return kind, lambda s, b, h, q, kv: s - slopes[h] * (q - kv).abs()


def _store(r, t, kind):
    """The same values held in another storage layout (the returned tensor equals ``t``)."""
    if kind == "contiguous":
        return t.clone()
    if kind == "step2":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "heads_last":
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    raise AssertionError(kind)


@pytest.mark.parametrize("seed", range(N_DRAWS))
def test_differential(seed):
    r = random.Random(seed)
    torch.manual_seed(seed)
    B, Hkv = r.randint(1, 3), r.choice([1, 2])
    H = Hkv * r.choice([1, 2, 3])
    L = r.randint(1, 150)
    S = L if r.random() < 0.6 else r.randint(1, 150)
    D, Dv = r.choice([8, 16, 32]), r.choice([8, 16, 32])
    dtype = r.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    mname, m = _mask(r, L, S, B)
    sname, sm = _mod(r, H)
    if sm is not None and dtype == torch.bfloat16 and sname == "relative_bias":
        sm = scores.relative_bias(sm.table.float()) if hasattr(sm, "table") else sm
    sinks = torch.randn(H, dtype=torch.float64) if r.random() < 0.2 else None
    storage = r.choice(["contiguous", "step2", "transposed", "heads_last"])
    expand_batch = B > 1 and r.random() < 0.25  # k, v with batch 1 against B queries
    layout = "BLHD" if r.random() < 0.2 else "BHLD"

    q64 = torch.randn(B, H, L, D, dtype=torch.float64)
    k64 = torch.randn(1 if expand_batch else B, Hkv, S, D, dtype=torch.float64)
    v64 = torch.randn(1 if expand_batch else B, Hkv, S, Dv, dtype=torch.float64)
    g64 = torch.randn(B, H, L, Dv, dtype=torch.float64)
    case = f"seed {seed}: B={B} H={H} Hkv={Hkv} L={L} S={S} D={D} Dv={Dv} {dtype} mask={mname} mod={sname} " \
           f"sinks={sinks is not None} storage={storage} expand={expand_batch} layout={layout}"

    def run(fn, dt, q, k, v, store):
        qs, ks, vs = (_store(r, t.to(dt), store) if store else t.to(dt).clone() for t in (q, k, v))
        if layout == "BLHD" and fn is salience.attention:
            qs, ks, vs = (x.transpose(1, 2) for x in (qs, ks, vs))
        leaves = [x.detach().requires_grad_() if x.is_leaf else x for x in (qs, ks, vs)]
        for x in leaves:
            x.retain_grad()
        kw = dict(mask=m, score_mod=sm, sinks=None if sinks is None else sinks.to(dt))
        if fn is salience.attention:
            out = fn(*leaves, layout=layout, **kw)
            out = out.transpose(1, 2) if layout == "BLHD" else out
        else:
            kk, vv = (x.expand(B, *x.shape[1:]) for x in leaves[1:])
            out = fn(leaves[0], kk, vv, **kw).out
        out.backward(g64.to(dt))
        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
        if layout == "BLHD" and fn is salience.attention:
            grads = [x.transpose(1, 2) for x in grads]
        return [out] + grads

    ref64 = run(reference.attention, torch.float64, q64, k64, v64, None)
    ref_t = run(reference.attention, dtype, q64, k64, v64, None)
    fast = run(salience.attention, dtype, q64, k64, v64, storage)
    terms = float(g64.abs().max() * v64.abs().max() * k64.abs().max()) * D ** -0.5
    for name, a, bt, b64 in zip(("out", "dq", "dk", "dv"), fast, ref_t, ref64):
        assert_rel_close(a, bt, b64, what=f"{name} ({case})", magnitude=0.0 if name == "out" else terms)
