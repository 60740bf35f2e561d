"""Callables written for FlexAttention run unchanged in salience (issue 14).

A zoo of mask_mods and score_mods in FlexAttention's scalar style (the patterns of its documentation, its test
suite and attention-gym, written afresh here): chained indexing, unpacking a gathered row, ``torch.dot``,
``torch.where`` with scalars, Python-scalar arithmetic, closures over tensors indexed by b, h, q_idx or kv_idx,
cross attention with L != S. Each is passed *unchanged* to :func:`salience.attention` and compared in float64
with ``torch.nn.attention.flex_attention.flex_attention``'s eager path (forward; FlexAttention has no backward
on CPU, so gradients are compared with its eager math implementation, which vmaps the same callables).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch.nn.attention import flex_attention as FA

import salience
from salience import _callables
from salience import masks as M

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, D = 2, 2, 16
SIZES = {"self": (64, 64), "cross": (48, 80)}
ATOL = 1e-10


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)
    return t.requires_grad_(grad)


def _randint(lo, hi, *shape, seed=0):
    return torch.randint(lo, hi, shape, generator=_gen(seed))


def _sorted_ids(n, docs, batch=None, seed=0):
    """Packed document ids: sorted, ``docs`` documents over n tokens (per batch row when batch is given)."""
    rows = []
    for i in range(batch or 1):
        cuts = torch.sort(torch.randperm(n - 1, generator=_gen(seed + i))[: docs - 1] + 1).values
        ids = torch.zeros(n, dtype=torch.long)
        for c in cuts.tolist():
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows) if batch else rows[0]


# ----------------------------------------------------------------------------------------------- the zoo
# Each entry: name -> make(L, S, grad) returning (mask_mod or None, score_mod or None, [captured tensors]).
# The callables are written as they appear in FlexAttention code: scalar semantics, no salience imports.

ZOO: dict = {}


def zoo(name):
    def deco(fn):
        ZOO[name] = fn
        return fn

    return deco


# -- mask_mods ----------------------------------------------------------------------------------------------


@zoo("causal")
def _(L, S, grad):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal, None, []


@zoo("causal_bottom_right")
def _(L, S, grad):
    off = S - L

    def causal_br(b, h, q_idx, kv_idx):
        return q_idx + off >= kv_idx

    return causal_br, None, []


@zoo("sliding_window_causal")
def _(L, S, grad):
    window = 12

    def sliding(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        windowed = q_idx - kv_idx <= window
        return causal & windowed

    return sliding, None, []


@zoo("sliding_window_abs")
def _(L, S, grad):
    return (lambda b, h, q_idx, kv_idx: torch.abs(q_idx - kv_idx) <= 5), None, []


@zoo("prefix_lm_scalar")
def _(L, S, grad):
    prefix = 10

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= prefix) | (q_idx >= kv_idx)

    return prefix_lm, None, []


@zoo("prefix_lm_per_batch")
def _(L, S, grad):
    prefix_lengths = torch.tensor([7, 19])

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_lengths[b]) | (q_idx >= kv_idx)

    return prefix_lm, None, []


@zoo("document_shared_ids")
def _(L, S, grad):
    q_doc = _sorted_ids(L, 4, seed=1)
    kv_doc = torch.div(torch.arange(S) * 4, S, rounding_mode="floor")

    def document(b, h, q_idx, kv_idx):
        return q_doc[q_idx] == kv_doc[kv_idx]

    return document, None, []


@zoo("document_causal_chained")
def _(L, S, grad):
    doc_ids = _sorted_ids(max(L, S), 3, batch=B, seed=3)

    def doc_causal(b, h, q_idx, kv_idx):
        same = doc_ids[b][q_idx] == doc_ids[b][kv_idx]
        return same & (q_idx >= kv_idx)

    return doc_causal, None, []


@zoo("jagged_offsets_logical_window")
def _(L, S, grad):
    n = max(L, S)
    offsets = torch.tensor([0, 9, 30, 41, n])
    document_id = torch.zeros(n, dtype=torch.long)
    for i in range(1, offsets.numel() - 1):
        document_id[offsets[i]:] += 1

    def inner(b, h, q, kv):
        return (q >= kv) & (q - kv < 6)

    def jagged(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        q_logical = q_idx - offsets[document_id[q_idx]]
        kv_logical = kv_idx - offsets[document_id[kv_idx]]
        return same_doc & inner(b, h, q_logical, kv_logical)

    return jagged, None, []


@zoo("nested_offsets_per_batch")
def _(L, S, grad):
    n = max(L, S)
    offsets = torch.tensor([[0, 5, 20, n, n], [0, 17, 18, 40, n]])
    doc = torch.stack([torch.bucketize(torch.arange(n), o[1:], right=True) for o in offsets])

    def nested(b, h, q_idx, kv_idx):
        d = doc[b][q_idx]
        start = offsets[b][d]
        return (doc[b][kv_idx] == d) & (kv_idx >= start) & (kv_idx <= q_idx)

    return nested, None, []


@zoo("dilated")
def _(L, S, grad):
    return (lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 3 == 0), None, []


@zoo("global_tokens")
def _(L, S, grad):
    n_global = 4

    def global_and_local(b, h, q_idx, kv_idx):
        local = (q_idx - kv_idx).abs() <= 3
        return local | (q_idx < n_global) | (kv_idx < n_global)

    return global_and_local, None, []


@zoo("checkerboard")
def _(L, S, grad):
    return (lambda b, h, q_idx, kv_idx: (q_idx + kv_idx) % 2 == 0), None, []


@zoo("block_diagonal")
def _(L, S, grad):
    return (lambda b, h, q_idx, kv_idx: q_idx // 16 == kv_idx // 16), None, []


@zoo("key_padding")
def _(L, S, grad):
    lengths = torch.tensor([S - 13, S])

    def key_padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return key_padding, None, []


@zoo("query_and_key_padding")
def _(L, S, grad):
    q_len, kv_len = torch.tensor([L - 9, L]), torch.tensor([S, S - 21])

    def padded(b, h, q_idx, kv_idx):
        return (q_idx < q_len[b]) & (kv_idx < kv_len[b])

    return padded, None, []


@zoo("head_dependent_window")
def _(L, S, grad):
    windows = torch.tensor([2, 9])

    def per_head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= windows[h])

    return per_head_window, None, []


@zoo("where_with_python_bool")
def _(L, S, grad):
    def half_causal(b, h, q_idx, kv_idx):
        return torch.where(h == 0, q_idx >= kv_idx, True)

    return half_causal, None, []


@zoo("full_mask_tensor_chained")
def _(L, S, grad):
    m = _randint(0, 4, B, H, L, S, seed=5) > 0
    m[..., 0] = True

    def lookup(b, h, q_idx, kv_idx):
        return m[b][h][q_idx][kv_idx]

    return lookup, None, []


@zoo("mask_2d_tuple_index")
def _(L, S, grad):
    m = _randint(0, 3, L, S, seed=6) > 0

    def lookup(b, h, q_idx, kv_idx):
        return m[q_idx, kv_idx]

    return lookup, None, []


@zoo("flex_and_masks")
def _(L, S, grad):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < 20

    return FA.and_masks(causal, window), None, []


@zoo("flex_or_masks")
def _(L, S, grad):
    def diag_band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 1

    def sink(b, h, q_idx, kv_idx):
        return kv_idx == 0

    return FA.or_masks(diag_band, sink), None, []


@zoo("flex_noop_mask")
def _(L, S, grad):
    return FA.noop_mask, None, []


@zoo("dot_of_embeddings_mask")
def _(L, S, grad):
    qe, ke = _randn(L, 4, seed=7), _randn(S, 4, seed=8)

    def similar(b, h, q_idx, kv_idx):
        return torch.dot(qe[q_idx], ke[kv_idx]) > -0.5

    return similar, None, []


@zoo("unpack_gathered_span")
def _(L, S, grad):
    lo = torch.clamp(torch.arange(L) * S // L - 4, min=0)
    spans = torch.stack([lo, lo + 9], dim=1)

    def span(b, h, q_idx, kv_idx):
        start, stop = spans[q_idx]
        return (kv_idx >= start) & (kv_idx < stop)

    return span, None, []


@zoo("python_float_arithmetic_mask")
def _(L, S, grad):
    ratio = S / L

    def proportional_causal(b, h, q_idx, kv_idx):
        return kv_idx <= (q_idx + 1) * ratio - 1

    return proportional_causal, None, []


@zoo("sparse_transformer_fixed")
def _(L, S, grad):
    stride = 8

    def fixed(b, h, q_idx, kv_idx):
        summary = kv_idx % stride == stride - 1
        local = q_idx // stride == kv_idx // stride
        return (summary | local) & (q_idx >= kv_idx)

    return fixed, None, []


@zoo("logical_ops_mask")
def _(L, S, grad):
    def logical(b, h, q_idx, kv_idx):
        return torch.logical_or(torch.logical_and(q_idx >= kv_idx, b == 0), torch.logical_not(kv_idx > 30))

    return logical, None, []


@zoo("per_batch_head_lengths")
def _(L, S, grad):
    lengths = torch.tensor([[S, S // 2], [S - 5, 11]])

    def lengths_bh(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b, h]

    return lengths_bh, None, []


# -- score_mods ----------------------------------------------------------------------------------------------


@zoo("score_identity")
def _(L, S, grad):
    return None, (lambda score, b, h, q_idx, kv_idx: score), []


@zoo("relative_position_int")
def _(L, S, grad):
    def relative_positional(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * 0.05

    return None, relative_positional, []


@zoo("alibi_slopes_tensor")
def _(L, S, grad):
    slopes = torch.tensor([0.5, 0.0625], dtype=torch.float64).requires_grad_(grad)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return M.causal(), alibi, [slopes]


@zoo("alibi_exp2_per_head")
def _(L, S, grad):
    num_heads = H

    def alibi(score, b, h, q_idx, kv_idx):
        scale = torch.exp2(-((h + 1) * 8.0 / num_heads))
        return score + (q_idx - kv_idx) * scale

    return None, alibi, []


@zoo("relative_bias_table_lookup")
def _(L, S, grad):
    rel = _randn(L + S - 1, seed=9, grad=grad)
    offset = S - 1

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + rel[q_idx - kv_idx + offset]

    return None, rel_bias, [rel]


@zoo("per_head_relative_table_chained")
def _(L, S, grad):
    table = _randn(H, L + S - 1, seed=10, grad=grad)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h][q_idx - kv_idx + S - 1]

    return None, rel_bias, [table]


@zoo("full_bias_chained")
def _(L, S, grad):
    bias = _randn(B, H, L, S, seed=11, grad=grad)

    def full_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b][h][q_idx][kv_idx]

    return None, full_bias, [bias]


@zoo("full_bias_tuple")
def _(L, S, grad):
    bias = _randn(B, H, L, S, seed=12, grad=grad)

    def full_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    return M.causal(), full_bias, [bias]


@zoo("tanh_softcap")
def _(L, S, grad):
    cap = 2.5

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return None, softcap, []


@zoo("head_temperature_tensor")
def _(L, S, grad):
    temps = torch.tensor([0.5, 2.0], dtype=torch.float64).requires_grad_(grad)

    def temperature(score, b, h, q_idx, kv_idx):
        return score / temps[h]

    return None, temperature, [temps]


@zoo("head_temperature_python")
def _(L, S, grad):
    return None, (lambda score, b, h, q_idx, kv_idx: score * (1.0 + h) / 2), []


@zoo("where_causal_minus_inf")
def _(L, S, grad):
    def causal(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    return None, causal, []


@zoo("where_sink_bonus")
def _(L, S, grad):
    def sink(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == 0, score + 2.0, score)

    return None, sink, []


@zoo("per_batch_query_bias_chained")
def _(L, S, grad):
    bias = _randn(B, L, seed=13, grad=grad)

    def batch_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b][q_idx]

    return None, batch_bias, [bias]


@zoo("query_and_key_bias_vectors")
def _(L, S, grad):
    qb, kb = _randn(L, seed=14, grad=grad), _randn(S, seed=15, grad=grad)

    def qk_bias(score, b, h, q_idx, kv_idx):
        return score + qb[q_idx] - kb[kv_idx]

    return None, qk_bias, [qb, kb]


@zoo("torch_dot_embeddings")
def _(L, S, grad):
    qe, ke = _randn(L, 3, seed=16, grad=grad), _randn(S, 3, seed=17)

    def dot_bias(score, b, h, q_idx, kv_idx):
        return score + torch.dot(qe[q_idx], ke[kv_idx])

    return None, dot_bias, [qe]


@zoo("product_sum_embeddings")  # broadcasts without error but sums over the whole grid: must use vmap
def _(L, S, grad):
    qe, ke = _randn(L, 3, seed=18, grad=grad), _randn(S, 3, seed=19)

    def prod_sum(score, b, h, q_idx, kv_idx):
        return score + (qe[q_idx] * ke[kv_idx]).sum() * 0.3

    return None, prod_sum, [qe]


@zoo("unpack_per_head_affine")
def _(L, S, grad):
    coeffs = torch.tensor([[1.5, 0.2], [0.7, -0.3]], dtype=torch.float64).requires_grad_(grad)

    def affine(score, b, h, q_idx, kv_idx):
        a, c = coeffs[h]
        return score * a + c * (kv_idx % 2)

    return None, affine, [coeffs]


@zoo("t5_style_buckets")
def _(L, S, grad):
    num_buckets, max_distance = 16, 40
    table = _randn(num_buckets, H, seed=20, grad=grad)

    def t5(score, b, h, q_idx, kv_idx):
        rel = kv_idx - q_idx
        n = num_buckets // 2
        ret = (rel > 0).long() * n
        dist = rel.abs()
        exact = n // 2
        large = exact + (torch.log(dist.clamp(min=1).double() / exact) / math.log(max_distance / exact)
                         * (n - exact)).long()
        large = torch.clamp(large, max=n - 1)
        bucket = ret + torch.where(dist < exact, dist, large)
        return score + table[bucket, h]

    return None, t5, [table]


@zoo("python_scalar_affine")
def _(L, S, grad):
    return None, (lambda score, b, h, q_idx, kv_idx: score * 0.5 + 1), []


@zoo("sigmoid_head_gate")
def _(L, S, grad):
    gate = torch.tensor([0.3, -1.2], dtype=torch.float64).requires_grad_(grad)

    def gated(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(gate[h])

    return None, gated, [gate]


@zoo("softcap_then_alibi")
def _(L, S, grad):
    slopes = torch.tensor([0.25, 0.125], dtype=torch.float64)

    def capped(score, b, h, q_idx, kv_idx):
        s = 4.0 * torch.tanh(score / 4.0)
        return s - slopes[h] * (q_idx - kv_idx).abs()

    return None, capped, []


@zoo("cross_proportional_distance")
def _(L, S, grad):
    def proportional(score, b, h, q_idx, kv_idx):
        return score - (q_idx * S / L - kv_idx).abs() * 0.05

    return None, proportional, []


@zoo("clamp_minimum_bias")
def _(L, S, grad):
    def clamped(score, b, h, q_idx, kv_idx):
        return torch.minimum(score, torch.clamp(kv_idx - q_idx, min=-3, max=3) * 1.0 + 1.0)

    return None, clamped, []


@zoo("bias_2d_chained")
def _(L, S, grad):
    bias = _randn(L, S, seed=21, grad=grad)

    def b2d(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx][kv_idx]

    return None, b2d, [bias]


# -- mask_mod + score_mod ------------------------------------------------------------------------------------


@zoo("document_mask_and_doc_bias")
def _(L, S, grad):
    doc_ids = _sorted_ids(max(L, S), 3, batch=B, seed=22)
    doc_bias = _randn(B, 3, seed=23, grad=grad)

    def doc_mask(b, h, q_idx, kv_idx):
        return doc_ids[b][q_idx] == doc_ids[b][kv_idx]

    def doc_score(score, b, h, q_idx, kv_idx):
        return score + doc_bias[b][doc_ids[b][kv_idx]]

    return doc_mask, doc_score, [doc_bias]


@zoo("sliding_window_and_softcap")
def _(L, S, grad):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < 10

    def soft(score, b, h, q_idx, kv_idx):
        return 3.0 * torch.tanh(score / 3.0)

    return window, soft, []


GRAD_CASES = ["alibi_slopes_tensor", "relative_bias_table_lookup", "per_head_relative_table_chained",
              "full_bias_chained", "full_bias_tuple", "head_temperature_tensor", "per_batch_query_bias_chained",
              "query_and_key_bias_vectors", "torch_dot_embeddings", "product_sum_embeddings", "unpack_per_head_affine",
              "t5_style_buckets", "sigmoid_head_gate", "bias_2d_chained", "document_mask_and_doc_bias",
              "document_causal_chained", "jagged_offsets_logical_window", "unpack_gathered_span"]


def test_zoo_size():
    n = sum((m is not None and not isinstance(m, M.MaskMod)) + (s is not None) for m, s, _ in
            (ZOO[k](64, 64, False) for k in ZOO))
    assert n >= 40, n


# ----------------------------------------------------------------------------------------------- oracles


def _inputs(L, S, Hkv=H, grad=False, seed=0):
    q = _randn(B, H, L, D, seed=seed + 100, grad=grad)
    k = _randn(B, Hkv, S, D, seed=seed + 101, grad=grad)
    v = _randn(B, Hkv, S, D, seed=seed + 102, grad=grad)
    return q, k, v


@pytest.fixture(autouse=True)
def _flex_without_dynamo(monkeypatch):
    """Run FlexAttention's eager path without its dynamo pre-pass (its debug switch): the same dense math
    (``math_attention``, vmapped callables), about 10x faster here since every new callable would be traced.
    :func:`test_flex_default_eager_route` keeps the default route for a sample of the zoo."""
    monkeypatch.setattr(FA, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def _flex(q, k, v, mask_mod, score_mod):
    """FlexAttention's eager forward (it refuses inputs requiring grad on CPU)."""
    L, S = q.shape[-2], k.shape[-2]
    bm = None if mask_mod is None else FA.create_block_mask(mask_mod, B, H, L, S, device="cpu")
    return FA.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod, block_mask=bm,
                             enable_gqa=q.shape[1] != k.shape[1])


def _flex_math(q, k, v, mask_mod, score_mod):
    """FlexAttention's eager math (its ``_vmap_for_bhqkv`` over b, h, q_idx, kv_idx, then a safe softmax), in
    plain autograd: differentiable, for gradients (FlexAttention itself has no CPU backward)."""
    L, S = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    idx = [torch.arange(n) for n in (B, H, L, S)]
    if score_mod is not None:
        s = FA._vmap_for_bhqkv(score_mod, prefix=(0,))(s, *idx)
    if mask_mod is not None:
        s = torch.where(FA._vmap_for_bhqkv(mask_mod, prefix=())(*idx), s, -math.inf)
    w = torch._safe_softmax(s, dim=-1)
    return w @ v


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_forward_matches_flex(name, size):
    L, S = SIZES[size]
    mask_mod, score_mod, _ = ZOO[name](L, S, False)
    q, k, v = _inputs(L, S)
    want = _flex(q, k, v, mask_mod, score_mod)
    for backend in (None, "blockwise", "reference"):
        got = salience.attention(q, k, v, mask=mask_mod, score_mod=score_mod, backend=backend)
        assert (got - want).abs().max().item() <= ATOL, (name, size, backend)


@pytest.mark.parametrize("name", GRAD_CASES)
def test_zoo_backward_matches_flex_math(name):
    L, S = SIZES["cross"]
    mask_mod, score_mod, captured = ZOO[name](L, S, True)
    q, k, v = _inputs(L, S, grad=True, seed=1)
    do = _randn(B, H, L, D, seed=7)
    ref = _flex_math(q, k, v, mask_mod, score_mod)
    assert (ref - _flex(q, k, v, mask_mod, score_mod)).abs().max().item() <= ATOL  # the oracle is Flex's forward
    leaves = [q, k, v, *[t for t in captured if t.requires_grad]]
    want = torch.autograd.grad((ref * do).sum(), leaves)
    for backend in (None, "blockwise"):
        out = salience.attention(q, k, v, mask=mask_mod, score_mod=score_mod, backend=backend)
        got = torch.autograd.grad((out * do).sum(), leaves)
        for i, (g, w) in enumerate(zip(got, want)):
            assert (g - w).abs().max().item() <= 1e-9, (name, backend, i)


LARGE = ["document_causal_chained", "jagged_offsets_logical_window", "nested_offsets_per_batch", "head_dependent_window",
         "unpack_gathered_span", "per_batch_query_bias_chained", "full_bias_chained", "product_sum_embeddings",
         "document_mask_and_doc_bias", "sliding_window_and_softcap"]


@pytest.mark.parametrize("name", LARGE)
def test_zoo_large_runs_a_kernel_and_matches_flex(name):
    """Large enough for the kernels: a callable mask runs on its derived structure (intervals on the span
    kernels, else a cached block map), never on the textbook path."""
    L = S = 256
    mask_mod, score_mod, _ = ZOO[name](L, S, False)
    q, k, v = _inputs(L, S, seed=2)
    p = salience.plan(q, k, v, mask=mask_mod, score_mod=score_mod)
    assert p.backend in ("blockwise", "spans"), p
    if mask_mod is not None:
        assert "derived" in p.reason, p
    want = _flex(q, k, v, mask_mod, score_mod)
    got = salience.attention(q, k, v, mask=mask_mod, score_mod=score_mod)
    assert (got - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["document_causal_chained", "unpack_gathered_span", "full_bias_chained",
                                  "torch_dot_embeddings", "product_sum_embeddings", "where_causal_minus_inf"])
def test_flex_default_eager_route(name, monkeypatch):
    monkeypatch.setattr(FA, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", False)
    L, S = SIZES["cross"]
    mask_mod, score_mod, _ = ZOO[name](L, S, False)
    q, k, v = _inputs(L, S, seed=5)
    want = _flex(q, k, v, mask_mod, score_mod)
    got = salience.attention(q, k, v, mask=mask_mod, score_mod=score_mod)
    assert (got - want).abs().max().item() <= ATOL


def test_zoo_gqa_matches_flex():
    L, S = SIZES["cross"]
    mask_mod, score_mod, _ = ZOO["document_mask_and_doc_bias"](L, S, False)
    q, k, v = _inputs(L, S, Hkv=1, seed=3)
    want = _flex(q, k, v, mask_mod, score_mod)
    got = salience.attention(q, k, v, mask=mask_mod, score_mod=score_mod)
    assert (got - want).abs().max().item() <= ATOL


# -- salience's own masks, ported the other way: FlexAttention calls them under vmap -----------------------

OWN = {
    "sliding_window": lambda L, S: M.sliding_window(9),
    "document": lambda L, S: M.document(_sorted_ids(L, 4, seed=30)),
    "document_per_batch_causal": lambda L, S: M.document(_sorted_ids(L, 3, batch=B, seed=31)) & M.causal(),
    "padding_causal": lambda L, S: M.padding(kv_lengths=[S - 100, S]) & M.causal(),
    "prefix_lm": lambda L, S: M.prefix_lm(40),
    "block_diagonal": lambda L, S: M.block_diagonal(64),
    "global_tokens": lambda L, S: M.sliding_window(16, 16) | M.global_tokens([0, 5]),
    "dilated": lambda L, S: M.dilated(3),
}


@pytest.mark.parametrize("name", sorted(OWN))
def test_salience_masks_match_flex_on_their_paths(name):
    L = S = 256
    m = OWN[name](L, S)
    q, k, v = _inputs(L, S, seed=4)
    p = salience.plan(q, k, v, mask=m)
    assert p.backend in ("spans", "blockwise", "sdpa"), p
    want = _flex(q, k, v, m, None)
    got = salience.attention(q, k, v, mask=m)
    assert (got - want).abs().max().item() <= ATOL, p.backend


def test_spans_path_is_covered():
    L = S = 256
    backends = {salience.plan(*_inputs(L, S), mask=OWN[n](L, S)).backend for n in OWN}
    assert {"spans", "blockwise"} <= backends, backends


# -- evaluation modes, probe cost, errors ------------------------------------------------------------------


def _grid(Bn, Hn, L, S):
    return M.index_grid(Bn, Hn, L, S)


def test_own_factories_are_never_wrapped_or_probed():
    for m in (M.causal(), M.sliding_window(4) & M.causal(), M.document([0, 0, 1]), M.padding(kv_lengths=[2])):
        assert not isinstance(M.as_mask_mod(m).fn, _callables.FlexCallable)
    from salience import scores as Sc

    for s in (Sc.alibi(2), Sc.softcap(3.0), Sc.compose(Sc.alibi(2), Sc.temperature(2.0))):
        assert not isinstance(Sc.as_score_mod(s).fn, _callables.FlexCallable)


def test_modes_are_decided_once_per_callable():
    def broadcastable(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    doc = _sorted_ids(32, 3, batch=2, seed=40)

    def chained(b, h, q_idx, kv_idx):
        return doc[b][q_idx] == doc[b][kv_idx]

    for fn, mode in ((broadcastable, "broadcast"), (chained, "vmap")):
        a = M.as_mask_mod(fn)
        a.to_dense(2, 2, 32, 32)
        assert a.fn.mode == mode
        assert _callables.mode_of(fn) == mode
        assert M.as_mask_mod(fn).fn.mode == mode  # a new wrapper of the same callable: no new probe


def test_silently_wrong_broadcast_is_detected():
    e = _randn(8, 3, seed=41)

    def prod_sum(score, b, h, q_idx, kv_idx):  # broadcast: one sum over the grid; Flex: a dot product per element
        return score + (e[q_idx] * e[kv_idx]).sum()

    from salience import scores as Sc

    mod = Sc.as_score_mod(prod_sum)
    b, h, q, kv = _grid(1, 1, 8, 8)
    got = mod(torch.zeros(1, 1, 8, 8, dtype=torch.float64), b, h, q, kv)
    assert mod.fn.mode == "vmap"
    assert torch.allclose(got[0, 0], e @ e.T)


def test_both_ways_failing_gives_one_clear_error():
    table = torch.zeros(4)

    def broken(b, h, q_idx, kv_idx):
        return table[q_idx + 100] > 0

    q = _randn(1, 1, 8, 4)
    with pytest.raises(_callables.CallableError) as ei:
        salience.attention(q, q, q, mask=broken)
    msg = str(ei.value)
    assert "mask_mod(b, h, q_idx, kv_idx) -> bool" in msg and "torch.vmap" in msg and "IndexError" in msg
    assert isinstance(ei.value.__cause__, IndexError)

    def broken_score(score, b, h, q_idx, kv_idx):
        return score + table[kv_idx + 50]

    with pytest.raises(ValueError, match=r"score_mod broken_score .*score_mod\(score, b, h, q_idx, kv_idx\) -> score"):
        salience.attention(q, q, q, score_mod=broken_score)


@pytest.mark.parametrize("ret", [lambda s, q, kv: q >= kv, lambda s, q, kv: (s > 0), lambda s, q, kv: q - kv])
def test_score_mod_returning_bool_or_int_is_an_error(ret):
    q = _randn(1, 1, 8, 4)
    with pytest.raises(TypeError, match="score_mod .*non-floating.*never bool or int"):
        salience.attention(q, q, q, score_mod=lambda s, b, h, qi, kv: ret(s, qi, kv))


def test_mask_mod_returning_non_bool_is_an_error():
    q = _randn(1, 1, 8, 4)
    for bad in (lambda b, h, qi, kv: (qi - kv).float(), lambda b, h, qi, kv: qi - kv):
        with pytest.raises(TypeError, match="bool"):
            salience.attention(q, q, q, mask=bad)


def test_flex_reduction_semantics_are_kept():
    """``s.sum()`` of a 0-d score is the score itself under FlexAttention: salience agrees."""
    q, k, v = _inputs(8, 8)
    mod = lambda s, b, h, qi, kv: s.sum()  # noqa: E731
    want = _flex(q, k, v, None, mod)
    assert (salience.attention(q, k, v, score_mod=mod) - want).abs().max().item() <= ATOL


def test_probe_overhead_is_small():
    """The probe runs once per user callable; salience's factories never run it (measured, not a speed test)."""
    q, k, v = _inputs(64, 64)
    fn = lambda b, h, qi, kv: qi >= kv  # noqa: E731
    t0 = time.perf_counter()
    salience.attention(q, k, v, mask=fn, backend="blockwise")
    first = time.perf_counter() - t0
    assert _callables.mode_of(fn) == "broadcast"
    assert first < 5.0


def test_vmap_mask_that_ignores_b_and_h_stays_compact():
    """Tile classification reduces over the axes a mask depends on; a vmapped mask keeps size 1 on b and h."""
    e = _randn(16, 3, seed=42)
    m = M.as_mask_mod(lambda b, h, q_idx, kv_idx: torch.dot(e[q_idx], e[kv_idx]) > 0)
    out = m(*_grid(2, 2, 16, 16))
    assert m.fn.mode == "vmap" and out.shape == (1, 1, 16, 16)
    assert torch.equal(out[0, 0], e @ e.T > 0)


def test_broadcast_decision_is_reprobed_when_an_axis_grows():
    """Decided on one batch row, a callable is compared again once a call spans more rows."""
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]])

    def row_gate(b, h, q_idx, kv_idx):  # broadcast: .all() over every row at once; Flex: per batch row
        return (w[b] > 0).all() | (q_idx >= kv_idx)

    m = M.as_mask_mod(row_gate)
    assert bool(m.to_dense(1, 1, 8, 8).all()) and m.fn.mode == "broadcast"
    got = m.to_dense(2, 1, 8, 8)
    assert m.fn.mode == "vmap"
    assert bool(got[0].all()) and torch.equal(got[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())
