"""Structure as data: the structure of every factory and combinator, its predicate against the mask's own,
and the structure queries against the kernels' previous attribute/name readers (kept here as a frozen oracle)
and against the dense mask itself."""

import functools
import math
import random

import pytest
import torch

from salience import masks as M
from salience import scores as Sc
from salience import structure as st

INF = math.inf


# ---------------------------------------------------------------------------------------- the oracle
# The readers the kernels used before structure existed (kernels/spans.py and kernels/dispatch.py at commit
# 16a0bc6), copied so that the comparison survives their rewrite. They read .kind/.band/.parts and names.


def _old_band_of(m):
    band = getattr(m, "band", None)
    if band is not None:
        return band
    if getattr(m, "kind", None) == ("causal", "top_left"):
        return (None, 0)
    return None


def old_relative_band(m):
    if m is None or getattr(m, "name", None) == "full()":
        return (None, None)
    band = _old_band_of(m)
    if band is not None:
        return band
    parts = getattr(m, "parts", None)
    if parts is not None and parts[0] == "&":
        a, b = old_relative_band(parts[1]), old_relative_band(parts[2])
        if a is None or b is None:
            return None
        lo = a[0] if b[0] is None else (b[0] if a[0] is None else max(a[0], b[0]))
        hi = a[1] if b[1] is None else (b[1] if a[1] is None else min(a[1], b[1]))
        return (lo, hi)
    return None


def _old_global_spans(m, B, rows, Sg, device):  # noqa: C901 - a verbatim copy
    n = rows.numel()
    zeros = torch.zeros(1, n, dtype=torch.long, device=device)
    if m is None or getattr(m, "name", None) == "full()":
        return zeros, zeros + Sg
    band = _old_band_of(m)
    if band is not None:
        lo = zeros if band[0] is None else (rows + band[0]).view(1, -1)
        hi = zeros + Sg if band[1] is None else (rows + band[1] + 1).view(1, -1)
        return lo, hi
    kind = getattr(m, "kind", None)
    if isinstance(kind, tuple) and kind:
        if kind[0] == "prefix_lm":
            return zeros, torch.clamp(rows + 1, min=kind[1]).view(1, -1)
        if kind[0] == "block_diagonal":
            size = kind[1]
            lo = (torch.div(rows, size, rounding_mode="floor") * size).view(1, -1)
            return lo, lo + size
        if kind[0] == "padding":
            qd, kd = kind[1], kind[2]
            hi = (zeros + Sg) if kd is None else kd.to(device).view(-1, 1).expand(-1, n)
            if qd is not None:
                real = rows.view(1, -1) < qd.to(device).view(-1, 1)
                hi = torch.where(real, hi, torch.zeros((), dtype=torch.long, device=device))
            return torch.zeros_like(hi), hi
        if kind[0] == "document":
            qd, kd = kind[1].to(device), kind[2].to(device)
            k2 = kd if kd.dim() == 2 else kd.unsqueeze(0)
            if k2.shape[-1] > 1 and bool((k2[:, 1:] < k2[:, :-1]).any()):
                return None
            q2 = qd if qd.dim() == 2 else qd.unsqueeze(0)
            if q2.shape[-1] <= int(rows.max()):
                return None
            qv = q2[:, rows]
            if k2.shape[0] != qv.shape[0]:
                k2, qv = k2.expand(max(k2.shape[0], qv.shape[0]), -1), qv.expand(max(k2.shape[0], qv.shape[0]), -1)
            k2 = k2.contiguous()
            return (torch.searchsorted(k2, qv.contiguous(), right=False),
                    torch.searchsorted(k2, qv.contiguous(), right=True))
    parts = getattr(m, "parts", None)
    if parts is not None and parts[0] in ("&", "|"):
        a = _old_global_spans(parts[1], B, rows, Sg, device)
        b = _old_global_spans(parts[2], B, rows, Sg, device)
        if a is None or b is None:
            return None
        (alo, ahi), (blo, bhi) = a, b
        if parts[0] == "&":
            return torch.maximum(alo, blo), torch.minimum(ahi, bhi)
        a_empty, b_empty = ahi <= alo, bhi <= blo
        lo, hi = torch.minimum(alo, blo), torch.maximum(ahi, bhi)
        lo = torch.where(a_empty, blo, torch.where(b_empty, alo, lo))
        hi = torch.where(a_empty, bhi, torch.where(b_empty, ahi, hi))
        touching = (torch.maximum(alo, blo) <= torch.minimum(ahi, bhi)) | a_empty | b_empty
        if not bool(touching.all()):
            return None
        return lo, hi
    return None


def old_row_spans(mask, B, L, S, *, q_offset=0, kv_offset=0, q_len=None, kv_len=None):
    Sg = kv_offset + S if kv_len is None else kv_len
    rows = torch.arange(q_offset, q_offset + L)
    got = _old_global_spans(mask, B, rows, Sg, torch.device("cpu"))
    if got is None:
        return None
    lo, hi = got
    lo = torch.clamp(lo - kv_offset, 0, S)
    hi = torch.clamp(hi - kv_offset, 0, S)
    nonempty = hi > lo
    return torch.where(nonempty, lo, torch.zeros_like(lo)), torch.where(nonempty, hi, torch.zeros_like(hi))


def old_is_top_left_causal(mask):
    return isinstance(mask, M.MaskMod) and getattr(mask, "kind", None) == ("causal", "top_left")


def old_key_padding(m, B, S):
    causal_too = False
    parts = getattr(m, "parts", None)
    if parts is not None and parts[0] == "&":
        _, a, b = parts
        if old_is_top_left_causal(a):
            m, causal_too = b, True
        elif old_is_top_left_causal(b):
            m, causal_too = a, True
        else:
            return None
    kind = getattr(m, "kind", None)
    if not (isinstance(kind, tuple) and kind[0] == "padding" and kind[1] is None and kind[2] is not None):
        return None
    kl = kind[2]
    if kl.numel() != B or bool((kl <= 0).any()):
        return None
    return torch.arange(S).view(1, S) < kl.view(B, 1), causal_too


def _old_is_structure(m):
    kind = getattr(m, "kind", None)
    return kind is not None and kind[0] in ("document", "padding")


def old_document_segments(m, L, S):
    kind = getattr(m, "kind", None)
    if kind is None or kind[0] != "document" or L != S or L == 0:
        return None
    _, qd, kd = kind
    if qd.dim() != 1 or kd.dim() != 1 or qd.shape[0] != L or not torch.equal(qd, kd):
        return None
    cut = (torch.nonzero(qd[1:] != qd[:-1]).view(-1) + 1).tolist()
    edges = [0] + cut + [L]
    if len(edges) - 1 != int(torch.unique(qd).numel()):
        return None
    return list(zip(edges[:-1], edges[1:]))


def old_independent_pieces(m, B, L, S):
    if m is None:
        return None
    if _old_is_structure(m):
        struct, band = m, (None, None)
    else:
        parts = getattr(m, "parts", None)
        if parts is None or parts[0] != "&":
            return None
        a, b = parts[1], parts[2]
        if _old_is_structure(b):
            a, b = b, a
        if not _old_is_structure(a):
            return None
        band = old_relative_band(b)
        if band is None:
            return None
        struct = a
    kind = struct.kind
    if kind[0] == "padding":
        _, qd, kd = kind
        merged = []
        for b in range(B):
            p = (b, b + 1, 0, min(L if qd is None else int(qd[b]), L), 0, min(S if kd is None else int(kd[b]), S))
            if merged and merged[-1][2:] == p[2:] and merged[-1][1] == p[0]:
                merged[-1] = (merged[-1][0], p[1], *p[2:])
            else:
                merged.append(p)
        return merged, band
    bounds = old_document_segments(struct, L, S)
    if bounds is None:
        return None
    return [(0, B, a, z, a, z) for a, z in bounds], band


def _old_mod_parts(mod):
    parts = getattr(mod, "parts", None)
    if parts is not None:
        return [p for m in parts for p in _old_mod_parts(m)]
    return [mod]


def old_linear_form(mod):
    if mod is None:
        return 1.0, []
    alpha, biases = 1.0, []
    for m in _old_mod_parts(mod):
        name = getattr(m, "name", "")
        if isinstance(getattr(m, "t", None), float) and name.startswith("temperature("):
            alpha /= m.t
            biases = [(b, w / m.t) for b, w in biases]
        elif (name.startswith("alibi(") and hasattr(m, "slopes")) or (
                name.startswith("relative_bias(") and hasattr(m, "table")):
            biases.append((m, 1.0))
        else:
            return None
    return alpha, biases


HAS_OLD = hasattr(M.causal(), "kind") and hasattr(M.causal() & M.full(), "parts")
needs_old = pytest.mark.skipif(not HAS_OLD, reason="the old .kind/.parts attributes are gone (kernels read structure)")


# --------------------------------------------------------------------------------------- the mask zoo

B = 2


def atoms(L, S):
    """Named masks that fit a B x L x S problem (B = 2)."""
    ids_q = torch.tensor(sorted([0] * (L // 3) + [1] * (L - L // 3 - L // 4) + [2] * (L // 4)))
    ids_k = torch.tensor(sorted([0] * (S // 2) + [1] * (S - S // 2 - S // 5) + [2] * (S // 5)))
    out = {
        "full": M.full(),
        "causal": M.causal(),
        "causal_br": M.causal(align="bottom_right"),
        "sw3": M.sliding_window(3),
        "sw2_4": M.sliding_window(2, 4),
        "sw_br": M.sliding_window(2, 1, align="bottom_right"),
        "sw_none_2": M.sliding_window(None, 2),
        "sw_none_none": M.sliding_window(None, None),
        "band_off": M.band(-5, -2),
        "band_above": M.band(2, None),
        "band_br": M.band(-4, -1, align="bottom_right"),
        "pad_kv": M.padding(kv_lengths=[S, max(1, S // 2)]),
        "pad_kv0": M.padding(kv_lengths=[S - 1, 0]),
        "pad_q": M.padding(q_lengths=[L // 2, L]),
        "pad_both": M.padding(q_lengths=[L, L - 2], kv_lengths=[S - 3, S]),
        "doc": M.document(ids_q, ids_k),
        "doc_batched": M.document(torch.stack([ids_q, ids_q.flip(0)]), torch.stack([ids_k, ids_k])),
        "prefix": M.prefix_lm(3),
        "blockdiag": M.block_diagonal(4),
        "global": M.global_tokens([0, L // 2]),
        "dilated": M.dilated(3),
        "random": M.random_blocks(0.5, block=3, seed=7),
        "dense": M.dense(torch.rand(L, S, generator=torch.Generator().manual_seed(L * S)) < 0.6),
        "per_seq": M.causal("bottom_right", q_lengths=[L, L - 2], kv_lengths=[S, S - 1]),
        "per_seq_sw": M.sliding_window(2, 0, align="bottom_right", q_lengths=[L - 1, L], kv_lengths=[S - 2, S]),
        "lambda": M.as_mask_mod(lambda b, h, q, kv: (q >= kv) & (q - kv <= 2)),
    }
    if L == S:
        ids = torch.tensor([0] * 3 + [1] * (L - 6) + [2] * 3)
        out["doc_packed"] = M.document(ids)
        out["doc_unsorted"] = M.document(torch.tensor([0, 1] * (L // 2) + [0] * (L % 2)))
    return out


COMBOS = {
    "causal&pad_kv": lambda a: a["causal"] & a["pad_kv"],
    "pad_kv&causal": lambda a: a["pad_kv"] & a["causal"],
    "causal&sw3": lambda a: a["causal"] & a["sw3"],
    "sw3&sw2_4&causal": lambda a: a["sw3"] & a["sw2_4"] & a["causal"],
    "causal&doc": lambda a: a["causal"] & a["doc"],
    "doc&sw3": lambda a: a["doc"] & a["sw3"],
    "(doc&causal)&sw3": lambda a: (a["doc"] & a["causal"]) & a["sw3"],
    "pad_both&sw2_4": lambda a: a["pad_both"] & a["sw2_4"],
    "pad_kv&pad_q": lambda a: a["pad_kv"] & a["pad_q"],
    "full&causal": lambda a: a["full"] & a["causal"],
    "full&prefix": lambda a: a["full"] & a["prefix"],
    "sw3|band_above": lambda a: a["sw3"] | a["band_above"],
    "causal|band_above": lambda a: a["causal"] | a["band_above"],
    "band_off|causal": lambda a: a["band_off"] | a["causal"],
    "band_off|sw2_4": lambda a: a["band_off"] | a["sw2_4"],
    "sw3|global": lambda a: a["sw3"] | a["global"],
    "prefix|sw3": lambda a: a["prefix"] | a["sw3"],
    "blockdiag|causal": lambda a: a["blockdiag"] | a["causal"],
    "~causal": lambda a: ~a["causal"],
    "~~causal": lambda a: ~~a["causal"],
    "~sw3": lambda a: ~a["sw3"],
    "~pad_kv": lambda a: ~a["pad_kv"],
    "causal_br&sw_br": lambda a: a["causal_br"] & a["sw_br"],
    "causal_br&causal": lambda a: a["causal_br"] & a["causal"],
    "causal_br&pad_kv": lambda a: a["causal_br"] & a["pad_kv"],
    "lambda&causal": lambda a: a["lambda"] & a["causal"],
    "dilated&causal": lambda a: a["dilated"] & a["causal"],
    "dense|causal": lambda a: a["dense"] | a["causal"],
    "per_seq&pad_both": lambda a: a["per_seq"] & a["pad_both"],
    "shift_sw": lambda a: M.shift(a["sw3"], 2, 1),
    "shift_prefix": lambda a: M.shift(a["prefix"], 3, 0),
    "shift_pad": lambda a: M.shift(a["causal"] & a["pad_kv"], 1, 2),
    "shift_br": lambda a: M.shift(a["causal_br"], 2, 3, 20, 24),
}

SIZES = [(12, 12, 0, 0, None, None), (6, 12, 0, 0, None, None), (12, 7, 0, 0, None, None),
         (5, 6, 4, 3, 12, 12), (4, 12, 8, 0, 12, 12)]


def zoo(L, S):
    a = atoms(L, S)
    out = dict(a)
    for name, make in COMBOS.items():
        try:
            out[name] = make(a)
        except KeyError:
            pass
    return out


def fits(m, Lg, Sg):
    try:
        m.check(B, 1, Lg, Sg)
        m.to_dense(B, 1, Lg, Sg)
    except ValueError:
        return False
    return True


def cases():
    for L, S, qo, ko, ql, kl in SIZES:
        Lg = qo + L if ql is None else ql
        Sg = ko + S if kl is None else kl
        for name, m in zoo(Lg, Sg).items():
            yield pytest.param(m, L, S, qo, ko, ql, kl, id=f"{name}-{L}x{S}@{qo},{ko}")


def _same_spans(old, new):
    """Equal intervals; a simplified structure may give (1, L) where the old reader gave (B, L) rows that were
    all equal (e.g. ``full() | padding(...)`` is Full)."""
    n = max(old[0].shape[0], new[0].shape[0])
    if new[0].shape[0] > old[0].shape[0]:
        return False
    return all(torch.equal(o.expand(n, -1), w.expand(n, -1)) for o, w in zip(old, new))


def _truth_matches(lo, hi, dense):
    """lo/hi (1 or B, L) describe exactly the visible keys of dense (B, L, S) in every row."""
    Bd, L, S = dense.shape
    j = torch.arange(S).view(1, 1, S)
    want = (j >= lo.expand(Bd, L).unsqueeze(-1)) & (j < hi.expand(Bd, L).unsqueeze(-1))
    return torch.equal(want, dense)


# ------------------------------------------------------------------------- queries: masks, row intervals


@pytest.mark.parametrize("m,L,S,qo,ko,ql,kl", list(cases()))
def test_row_intervals_equal_old_and_the_dense_mask(m, L, S, qo, ko, ql, kl):
    Lg = qo + L if ql is None else ql
    Sg = ko + S if kl is None else kl
    if not fits(m, Lg, Sg):
        pytest.skip("mask does not fit these sizes")
    bound = m.bind(Lg, Sg)
    kw = dict(q_offset=qo, kv_offset=ko, q_len=ql, kv_len=kl)
    new = st.row_intervals(bound, B, L, S, **kw)
    # unbound masks: bottom-right bands are resolved from the global lengths, to the same answer
    unbound = st.row_intervals(m, B, L, S, **kw)
    assert (new is None) == (unbound is None)
    if new is not None:
        assert torch.equal(new[0], unbound[0]) and torch.equal(new[1], unbound[1])
    if HAS_OLD:
        old = old_row_spans(bound, B, L, S, **kw)
        if old is not None:
            assert new is not None, "structure lost an interval mask"
            assert _same_spans(old, new)
    if new is not None:
        dense = bound.to_dense(B, 1, Lg, Sg)[:, 0, qo:qo + L, ko:ko + S]
        assert new[0].dtype == torch.long and new[0].shape[-1] == L
        assert _truth_matches(new[0], new[1], dense)


@pytest.mark.parametrize("m,L,S,qo,ko,ql,kl", list(cases()))
def test_structure_predicate_equals_the_mask(m, L, S, qo, ko, ql, kl):
    Lg = qo + L if ql is None else ql
    Sg = ko + S if kl is None else kl
    if not fits(m, Lg, Sg):
        pytest.skip("mask does not fit these sizes")
    want = m.to_dense(B, 2, Lg, Sg)
    assert torch.equal(st.to_dense(m.structure, B, 2, Lg, Sg), want)  # unbound structure, resolved at (Lg, Sg)
    bound = m.bind(Lg, Sg)
    assert torch.equal(st.to_dense(bound.structure, B, 2, Lg, Sg), want)
    assert st.resolve(m.structure, Lg, Sg) == st.resolve(bound.structure, Lg, Sg) or isinstance(
        bound.structure, (st.Shifted, st.And, st.Or, st.Not, st.Callable))


@pytest.mark.parametrize("m,L,S,qo,ko,ql,kl", [c for c in cases() if c.values[1] == c.values[2] == 12])
def test_mask_queries_equal_old(m, L, S, qo, ko, ql, kl):
    if not fits(m, L, S):
        pytest.skip("mask does not fit these sizes")
    bound = m.bind(L, S)
    band, pieces = st.relative_band(bound), st.independent_pieces(bound, B, L, S)
    kp, segs = st.key_padding(bound, B, S), st.document_segments(bound, L, S)
    dense = bound.to_dense(B, 1, L, S)[:, 0]
    if band is not None:  # a band says exactly which keys are visible
        lo, hi = band
        d = torch.arange(S).view(1, -1) - torch.arange(L).view(-1, 1)
        want = ((d >= lo) if lo is not None else d == d) & ((d <= hi) if hi is not None else d == d)
        assert torch.equal(dense, want.expand(B, L, S))
    if kp is not None:
        keep, causal = kp
        want = keep[:, None, :].expand(B, L, S)
        if causal:
            want = want & M.causal().to_dense(1, 1, L, S)[0]
        assert torch.equal(dense, want)
    if pieces is not None:  # rectangles cover every visible key, and the band inside them is the mask
        rects, pband = pieces
        cover = torch.zeros(B, L, S, dtype=torch.bool)
        for b0, b1, r0, r1, k0, k1 in rects:
            lo, hi = pband
            i = torch.arange(r1 - r0).view(-1, 1)
            j = torch.arange(k1 - k0).view(1, -1)
            d = j - i
            cover[b0:b1, r0:r1, k0:k1] = ((d >= lo) if lo is not None else d == d) & ((d <= hi) if hi is not None else d == d)
        assert torch.equal(cover, dense)
    if not HAS_OLD:
        return
    old_band = old_relative_band(bound)
    if old_band is not None:
        assert band == old_band
    old_kp = old_key_padding(bound, B, S)
    if old_kp is not None:
        assert kp is not None and torch.equal(kp[0], old_kp[0]) and kp[1] == old_kp[1]
    old_pieces = old_independent_pieces(bound, B, L, S)
    if old_pieces is not None:
        assert pieces == old_pieces
    old_segs = old_document_segments(bound, L, S)
    assert segs == old_segs
    assert st.is_top_left_causal(bound) >= old_is_top_left_causal(bound)


@pytest.mark.parametrize("m,L,S,qo,ko,ql,kl", [c for c in cases() if c.values[1] == c.values[2] == 12])
def test_is_relative(m, L, S, qo, ko, ql, kl):
    if not fits(m, L, S):
        pytest.skip("mask does not fit these sizes")
    bound = m.bind(L, S)
    rel = st.is_relative(bound)
    assert rel >= bool(m.relative)  # every mask the attribute called relative, and the simplified ones
    if rel:  # then the mask depends on kv - q only: constant along every diagonal
        dense = bound.to_dense(B, 2, L, S)
        assert torch.equal(dense, dense[:1, :1].expand_as(dense))
        d = dense[0, 0]
        assert torch.equal(d[1:, 1:], d[:-1, :-1])


def test_is_top_left_causal_reads_the_band():
    assert st.is_top_left_causal(M.causal())
    assert st.is_top_left_causal(M.sliding_window(None, 0))  # the same mask under another name
    assert st.is_top_left_causal(M.causal("bottom_right").bind(5, 5))
    assert not st.is_top_left_causal(M.causal("bottom_right").bind(3, 5))
    assert not st.is_top_left_causal(M.causal("bottom_right"))  # unbound: depends on the lengths
    assert not st.is_top_left_causal(M.sliding_window(4))
    assert not st.is_top_left_causal(None)
    assert st.is_full(None) and st.is_full(M.full()) and st.is_full(M.sliding_window(None, None))
    assert not st.is_full(M.causal())


def test_key_padding_cases():
    kl = [5, 3]
    keep, causal = st.key_padding(M.padding(kv_lengths=kl), 2, 6)
    assert keep.tolist() == [[True] * 5 + [False], [True] * 3 + [False] * 3] and not causal
    assert st.key_padding(M.causal() & M.padding(kv_lengths=kl), 2, 6)[1] is True
    assert st.key_padding(M.padding(kv_lengths=kl) & M.causal(), 2, 6)[1] is True
    assert st.key_padding(M.padding(kv_lengths=[5, 0]), 2, 6) is None  # a row with no key
    assert st.key_padding(M.padding(q_lengths=[5, 3]), 2, 6) is None
    assert st.key_padding(M.sliding_window(2) & M.padding(kv_lengths=kl), 2, 6) is None
    assert st.key_padding(M.padding(kv_lengths=kl), 3, 6) is None  # wrong batch


# ------------------------------------------------------------------------------------ random combinations


def _random_mask(rng, a, depth):
    names = sorted(a)
    if depth == 0 or rng.random() < 0.3:
        return a[rng.choice(names)]
    op = rng.choice("&&||~")
    if op == "~":
        return ~_random_mask(rng, a, depth - 1)
    x, y = _random_mask(rng, a, depth - 1), _random_mask(rng, a, depth - 1)
    return x & y if op == "&" else x | y


@pytest.mark.parametrize("seed", range(12))
def test_random_combinations(seed):
    rng = random.Random(seed)
    L = S = 12
    a = {k: v for k, v in atoms(L, S).items() if k not in ("per_seq", "per_seq_sw")}
    for _ in range(25):
        m = _random_mask(rng, a, 3)
        Lb, Sb = L, S
        if rng.random() < 0.3:  # one 8 x 8 block of the 12 x 12 problem
            m = M.shift(m, rng.randrange(5), rng.randrange(5), L, S)
            Lb = Sb = 8
        bound = m.bind(Lb, Sb)
        want = bound.to_dense(B, 1, Lb, Sb)
        assert torch.equal(st.to_dense(bound.structure, B, 1, Lb, Sb), want), m.name
        assert torch.equal(st.to_dense(m.structure, B, 1, Lb, Sb), want), m.name
        for qo, ko, Ll, Sl in ((0, 0, Lb, Sb), (3, 2, Lb - 4, Sb - 3)):
            kw = dict(q_offset=qo, kv_offset=ko, q_len=Lb, kv_len=Sb)
            new = st.row_intervals(bound, B, Ll, Sl, **kw)
            if HAS_OLD:
                old = old_row_spans(bound, B, Ll, Sl, **kw)
                if old is not None:
                    assert new is not None and _same_spans(old, new), m.name
            if new is not None:
                assert _truth_matches(new[0], new[1], want[:, 0, qo:qo + Ll, ko:ko + Sl]), m.name
            if HAS_OLD and old_relative_band(bound) is not None:
                assert st.relative_band(bound) == old_relative_band(bound), m.name


# ------------------------------------------------------------------------------- structure of factories


def test_structure_of_every_factory():
    Band = st.Band
    assert M.full().structure == st.Full()
    assert M.causal().structure == Band(-INF, 0)
    assert M.causal("bottom_right").structure == Band(-INF, 0, "bottom_right")
    assert M.causal("bottom_right").bind(3, 7).structure == Band(-INF, 4)
    assert M.sliding_window(8).structure == Band(-8, 0)
    assert M.sliding_window(2, 3).structure == Band(-2, 3)
    assert M.sliding_window(None, 3).structure == Band(-INF, 3)
    assert M.sliding_window(2, None).structure == Band(-2, INF)
    assert M.sliding_window(2, 1, align="bottom_right").structure == Band(-2, 1, "bottom_right")
    assert M.sliding_window(2, 1, align="bottom_right").bind(2, 5).structure == Band(1, 4)
    ps = M.causal("bottom_right", q_lengths=[2, 3], kv_lengths=[4, 3]).structure
    assert isinstance(ps, st.PerSequence) and (ps.lo, ps.hi) == (-INF, 0)
    assert ps.q_lengths.tolist() == [2, 3] and ps.kv_lengths.tolist() == [4, 3]
    ps = M.sliding_window(3, 1, align="bottom_right", q_lengths=[2], kv_lengths=[4]).structure
    assert (ps.lo, ps.hi) == (-3, 1)
    p = M.padding(q_lengths=[1, 2], kv_lengths=[3, 4]).structure
    assert p == st.Padding(torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert M.padding(kv_lengths=[3]).structure == st.Padding(None, torch.tensor([3]))
    assert M.document([0, 0, 1]).structure == st.Documents(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    assert M.document([0, 1], [1, 1, 0]).structure == st.Documents(torch.tensor([0, 1]), torch.tensor([1, 1, 0]))
    assert M.prefix_lm(4).structure == st.PrefixLM(4)
    assert M.block_diagonal(8).structure == st.BlockDiagonal(8)
    assert M.global_tokens([5, 0, 5]).structure == st.GlobalTokens(torch.tensor([0, 5]))
    assert M.dilated(2).structure == st.Dilated(2)
    assert M.random_blocks(0.25, block=16, seed=3).structure == st.RandomBlocks(0.25, 16, 3)
    md = torch.ones(2, 3, dtype=torch.bool)
    assert M.dense(md).structure == st.Dense(md.view(1, 1, 2, 3))
    assert M.band(-5, -2).structure == Band(-5, -2)
    assert M.band(1, None, align="bottom_right").structure == Band(1, INF, "bottom_right")

    def fn(b, h, q, kv):
        return q >= kv

    assert M.as_mask_mod(fn).structure == st.Callable(fn)
    assert M.as_mask_mod(fn).structure.fn is fn  # the user's object: a stable cache key
    assert M.as_mask_mod(torch.ones(2, 2, dtype=torch.bool)).structure == st.Dense(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    assert M.MaskMod(fn, "mine").structure == st.Callable(fn)

    @functools.wraps(fn)
    def negated(b, h, q, kv):  # a decorator that changes the predicate: its own object is the structure
        return ~fn(b, h, q, kv)

    m = M.as_mask_mod(negated)
    assert m.structure.fn is negated
    assert torch.equal(st.to_dense(m.structure, 1, 1, 4, 4), m.to_dense(1, 1, 4, 4))
    from salience._callables import wrap

    assert M.as_mask_mod(wrap(fn, "mask")).structure.fn is fn  # salience's own wrapper is looked through


def test_structure_of_score_mods():
    sl = Sc.alibi_slopes(4)
    assert Sc.alibi(sl).structure == st.Alibi(sl, 0)
    assert Sc.alibi(sl, offset=3).structure == st.Alibi(sl, 3)
    per_batch = torch.stack([sl, 2 * sl])
    assert Sc.alibi(per_batch).structure == st.Alibi(per_batch, 0)
    assert not Sc.alibi(per_batch).structure.per_head
    assert Sc.alibi(torch.stack([sl, sl])).structure == st.Alibi(sl, 0)  # equal rows: per head
    assert Sc.softcap(30).structure == st.Softcap(30.0)
    assert Sc.temperature(2).structure == st.Temperature(2.0)
    table = torch.randn(8, 4)
    assert Sc.relative_bias(table, 8, 16, False).structure == st.RelativeBias(table, 8, 16, False)
    c = Sc.compose(Sc.temperature(2), Sc.compose(Sc.softcap(5), Sc.alibi(sl)))
    assert c.structure == st.Compose((st.Temperature(2.0), st.Softcap(5.0), st.Alibi(sl, 0)))
    assert (Sc.temperature(2) >> Sc.softcap(5)).structure == st.Compose((st.Temperature(2.0), st.Softcap(5.0)))

    def fn(s, b, h, q, kv):
        return s * 2

    assert Sc.as_score_mod(fn).structure == st.Callable(fn)
    assert Sc.as_score_mod(fn).structure.fn is fn
    assert Sc.compose(fn).structure == st.Callable(fn)
    # moving to a device keeps the structure
    assert Sc.alibi(sl).to("cpu").structure == st.Alibi(sl, 0)


def test_bias_values_equal_the_mods():
    d = torch.arange(-6, 7)
    H = 4
    h = torch.arange(H).view(1, -1, 1, 1)
    qi = torch.full((1, 1, 1, 1), 6)
    ki = (6 + d).view(1, 1, 1, -1)
    z = torch.zeros(1, H, 1, d.numel(), dtype=torch.float64)
    for mod in (Sc.alibi(H), Sc.alibi(H, offset=2), Sc.relative_bias(torch.randn(8, H), 8, 16),
                Sc.relative_bias(torch.randn(8, H), 8, 16, bidirectional=False)):
        want = mod(z, 0, h, qi, ki).view(H, -1)
        got = mod.structure.values(d, torch.float64)
        torch.testing.assert_close(got, want)


def test_linear_form_equals_old():
    H = 4
    sl = Sc.alibi_slopes(H)
    table = torch.randn(8, H)
    mods = [None, Sc.temperature(2.0), Sc.alibi(sl), Sc.alibi(sl, offset=3), Sc.relative_bias(table, 8, 16),
            Sc.compose(Sc.temperature(2.0), Sc.alibi(sl)), Sc.compose(Sc.alibi(sl), Sc.temperature(4.0)),
            Sc.compose(Sc.alibi(sl), Sc.relative_bias(table, 8, 16), Sc.temperature(0.5)),
            Sc.compose(Sc.temperature(2.0), Sc.compose(Sc.relative_bias(table, 8, 16), Sc.temperature(3.0))),
            Sc.softcap(5.0), Sc.compose(Sc.alibi(sl), Sc.softcap(5.0)), Sc.alibi(torch.stack([sl, 2 * sl])),
            Sc.as_score_mod(lambda s, b, h, q, kv: s + 1)]
    for mod in mods:
        new = st.linear_form(mod)
        if HAS_OLD:
            old = old_linear_form(mod)
            assert (old is None) == (new is None), mod
        if new is None:
            continue
        assert st.linear_form(None if mod is None else mod.structure) == new
        if HAS_OLD:
            assert old[0] == new[0] and len(old[1]) == len(new[1])
            for (om, ow), (nm, nw) in zip(old[1], new[1]):
                assert om.structure == nm and ow == nw
        # the linear form reproduces the mod on a grid
        s = torch.randn(1, H, 5, 7, dtype=torch.float64)
        b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(H).view(1, -1, 1, 1)
        qi, ki = torch.arange(5).view(1, 1, -1, 1), torch.arange(7).view(1, 1, 1, -1)
        want = s if mod is None else mod(s, b, h, qi, ki)
        d = (ki - qi).view(-1)
        got = new[0] * s
        for node, w in new[1]:
            got = got + w * node.values(d, torch.float64).view(1, H, 5, 7)
        torch.testing.assert_close(got, want)


def test_softcap_of():
    assert st.softcap_of(Sc.softcap(5.0)) == 5.0
    assert st.softcap_of(Sc.compose(Sc.softcap(5.0), Sc.temperature(2.0))) is None
    assert st.softcap_of(None) is None and st.softcap_of(Sc.temperature(2.0)) is None


# ------------------------------------------------------------------------------------------ combinators


def test_combinators_closed_cases():
    Band = st.Band
    assert (M.causal() & M.sliding_window(4)).structure == Band(-4, 0)
    assert (M.sliding_window(4, 4) & M.sliding_window(2, 6)).structure == Band(-2, 4)
    assert (M.band(-5, -2) | M.causal()).structure == Band(-INF, 0)  # overlap
    assert (M.band(-5, -2) | M.band(-1, 3)).structure == Band(-5, 3)  # touching: -2 and -1 are adjacent
    assert (M.causal() | M.band(1, None)).structure == st.Full()
    assert (M.full() & M.prefix_lm(2)).structure == st.PrefixLM(2)
    assert (M.prefix_lm(2) & M.full()).structure == st.PrefixLM(2)
    assert (M.full() | M.dilated(2)).structure == st.Full()
    p = (M.padding(q_lengths=[3, 4], kv_lengths=[5, 2]) & M.padding(kv_lengths=[4, 4])).structure
    assert p == st.Padding(torch.tensor([3, 4]), torch.tensor([4, 2]))
    assert (~~M.dilated(2)).structure == st.Dilated(2)
    assert (~M.causal()).structure == Band(1, INF)
    assert (~M.band(2, None)).structure == Band(-INF, 1)
    a = M.causal() & M.padding(kv_lengths=[3]) & M.sliding_window(5) & M.document([0, 0, 1])
    assert a.structure == st.And((Band(-5, 0), st.Padding(None, torch.tensor([3])),
                                  st.Documents(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))))
    # shifting a top-left band moves it; Full stays Full; And distributes
    assert M.shift(M.sliding_window(2), 3, 1).bind(4, 4).structure == Band(0, 2)
    assert M.shift(M.causal() & M.prefix_lm(2), 3, 1).bind(4, 4).structure == st.And(
        (Band(-INF, 2), st.Shifted(st.PrefixLM(2), 3, 1)))
    assert M.shift(M.full(), 2, 2).bind(3, 3).structure == st.Full()


def test_combinators_generic_cases():
    Band = st.Band
    assert (M.causal() & M.dilated(2)).structure == st.And((Band(-INF, 0), st.Dilated(2)))
    assert (M.sliding_window(1) | M.global_tokens([0])).structure == st.Or((Band(-1, 0), st.GlobalTokens(torch.tensor([0]))))
    assert (M.band(-9, -5) | M.band(0, 2)).structure == st.Or((Band(-9, -5), Band(0, 2)))  # a gap
    assert (~M.sliding_window(2)).structure == st.Not(Band(-2, 0))
    assert (~M.padding(kv_lengths=[2])).structure == st.Not(st.Padding(None, torch.tensor([2])))
    br = (M.causal("bottom_right") & M.causal()).structure  # alignments differ: not merged until resolved
    assert br == st.And((Band(-INF, 0, "bottom_right"), Band(-INF, 0)))
    assert st.resolve(br, 3, 5) == Band(-INF, 0)
    assert st.resolve(br, 5, 3) == Band(-INF, -2)
    u = M.shift(M.causal("bottom_right"), 1, 2)  # unbound: the totals are unknown
    assert u.structure == st.Shifted(Band(-INF, 0, "bottom_right"), 1, 2)
    assert u.bind(3, 4).structure == Band(-INF, 1 + (6 - 4) - 2)
    # flattening: (a & b) & c and a & (b & c) give one And with three parts
    x = (M.dilated(2) & M.prefix_lm(1)) & M.global_tokens([1])
    y = M.dilated(2) & (M.prefix_lm(1) & M.global_tokens([1]))
    assert x.structure == y.structure and len(x.structure.parts) == 3
    z = (M.dilated(2) | M.prefix_lm(1)) | M.global_tokens([1])
    assert isinstance(z.structure, st.Or) and len(z.structure.parts) == 3
    # structure objects combine the same way
    assert st.Band(-3, 0) & st.Band(-INF, -1) == st.Band(-3, -1)
    assert st.Band(-3, 0) | st.Band(1, 2) == st.Band(-3, 2)
    assert ~st.Not(st.Dilated(3)) == st.Dilated(3)
    assert st.and_() == st.Full()


def test_equality_and_hash():
    a = st.Padding(torch.tensor([1, 2]), None)
    b = st.Padding(torch.tensor([1, 2]), None)
    assert a == b and hash(a) == hash(b)
    assert a != st.Padding(torch.tensor([1, 3]), None)
    assert st.Band(-2, 0) != st.Band(-2, 0, "bottom_right")
    assert len({st.Band(-2, 0), st.Band(-2.0, 0), st.Full(), st.Full()}) == 2
    with pytest.raises(TypeError, match="lo"):
        st.Band("a", 0)
    with pytest.raises(ValueError, match="align"):
        st.Band(0, 0, "middle")
    with pytest.raises(ValueError, match="lo"):
        st.Band(0.5, 1)


def test_row_intervals_extended_cases_are_exact():
    """Masks the old readers did not see as interval masks, and that are: checked against the dense mask."""
    L = S = 10
    for m in (M.causal("bottom_right", q_lengths=[10, 7], kv_lengths=[10, 9]), M.shift(M.prefix_lm(3), 2, 0),
              M.band(-6, -4) | M.band(-3, -1) | M.band(0, 0), M.sliding_window(1) | M.prefix_lm(2) | M.causal(),
              ~M.causal(), M.full() | M.dilated(3)):
        got = st.row_intervals(m.bind(L, S), 2, L, S)
        assert got is not None, m.name
        assert _truth_matches(got[0], got[1], m.bind(L, S).to_dense(2, 1, L, S)[:, 0]), m.name


# --------------------------------------------------------------------------------------------- masks.band


@pytest.mark.parametrize("lo,hi", [(None, None), (None, 0), (None, 3), (-3, None), (2, None), (-4, -2), (1, 3),
                                   (-2, 2), (0, 0), (3, 1), (None, -2)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(6, 6), (4, 9), (9, 4)])
def test_band_against_its_definition(lo, hi, align, L, S):
    m = M.band(lo, hi, align=align)
    off = 0 if align == "top_left" else S - L
    d = torch.arange(S).view(1, -1) - torch.arange(L).view(-1, 1) - off
    want = ((d >= lo) if lo is not None else d == d) & ((d <= hi) if hi is not None else d == d)
    assert torch.equal(m.to_dense(1, 1, L, S)[0, 0], want)
    bound = m.bind(L, S)
    if not st.is_full(bound):
        assert st.relative_band(bound) == tuple(None if v is None else v + off for v in (lo, hi))
    lo_hi = st.row_intervals(bound, 1, L, S)
    assert lo_hi is not None and _truth_matches(lo_hi[0], lo_hi[1], want.unsqueeze(0))
    # analytic tiles agree with the dense mask
    from salience.blocks import BlockMask

    bm = BlockMask.from_mask(m, 1, 1, L, S, q_block=2, kv_block=3)
    assert bm.analytic
    pad = torch.nn.functional.pad
    nq, nk = bm.classes.shape[-2:]
    grid_any = pad(want, (0, nk * 3 - S, 0, nq * 2 - L), value=False).view(nq, 2, nk, 3)
    grid_all = pad(want, (0, nk * 3 - S, 0, nq * 2 - L), value=True).view(nq, 2, nk, 3)
    cls = torch.where(grid_all.all(3).all(1), 2, torch.where(grid_any.any(3).any(1), 1, 0))
    got = bm.classes[0, 0].long()
    if lo is None or hi is None or lo <= hi:
        assert torch.equal(got, cls)
    else:  # the empty band: tiles may be over-estimated as partial (costs work, never correctness)
        assert bool(((got == 0) <= (cls == 0)).all()) and bool(((got == 2) <= (cls == 2)).all())


def test_band_names_and_errors():
    assert M.band(None, 0).name == "causal()"
    assert M.band(None, 0, align="bottom_right").name == "causal(align='bottom_right')"
    assert M.band(-4, 0).kind == ("sliding_window", 4, 0)
    assert M.band(None, None).name == "full()"
    assert M.band(-5, -2).name == "band(lo=-5, hi=-2)"
    with pytest.raises(TypeError, match="lo must be an int"):
        M.band(1.5, 2)
    with pytest.raises(ValueError, match="align"):
        M.band(0, 1, align="centre")
