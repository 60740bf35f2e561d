"""Keys hidden by a score_mod's -inf, by a bias tensor's -inf, or held in another rank's shard of a ring never
change a row that cannot see them, whatever they hold (NaN, inf), forward and backward, on every backend that takes
the call (forced with ``backend=``).

Each case is compared with the float64 reference computed on the same inputs with the poisoned entries replaced
by finite values (:func:`salience.testing.assert_rel_close`): rows that see no bad key must match it; rows that
see one are not finite, as in eager attention. The upstream gradient is put on the rows that see no bad key only;
then dq of those rows, and dk/dv of every key that no row seeing a bad key sees, must match the reference, and a
bad key that no row sees gets a gradient of exactly zero.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import socket
import time
import traceback

import pytest
import torch

import salience
from salience import masks, reference, scores
from salience._layout import expand_kv
from salience.kernels import bias as kb
from salience.kernels import guard
from salience.testing import assert_rel_close

B, H, HKV, L, D = 2, 4, 2, 160, 16
NEG = float("-inf")
BACKENDS = (None, "sdpa", "spans", "blockwise", "bias", "reference")


def _flex_causal(s, b, h, q, k):  # FlexAttention's way of writing a causal mask as a score_mod; row 5 sees nothing
    return torch.where((k > q) | (q == 5), torch.full_like(s, NEG), s)


def _flex_keypad(s, b, h, q, k):  # keys from 120 on are padding, for every row
    return torch.where(k >= 120, torch.full_like(s, NEG), s)


def _t5_hiding_future():
    """A T5 relative bias whose buckets for keys after the query are -inf (a causal relative bias)."""
    table = torch.randn(32, H, dtype=torch.float64)
    table[16:] = NEG  # bidirectional buckets: 16.. are the positive distances kv - q > 0
    return scores.relative_bias(table, num_buckets=32, max_distance=64)


def _bias_causal():
    bias = torch.randn(L, L, dtype=torch.float64).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), NEG)
    bias[5] = NEG  # a row that sees nothing
    return bias


def _bias_keypad():
    keep = torch.arange(L).view(1, -1) < torch.tensor([L, 100]).view(-1, 1)  # batch 1: keys 100.. are padding
    return torch.zeros(B, 1, 1, L, dtype=torch.float64).masked_fill(~keep.view(B, 1, 1, L), NEG) + \
        torch.randn(B, 1, 1, L, dtype=torch.float64)


CASES = {  # name: (keyword arguments of the call, bad keys (batch, index), backends that must take it)
    "scoremod_flex_causal": (lambda: dict(score_mod=_flex_causal), [(0, 70), (1, 150)], {"blockwise", "reference"}),
    "scoremod_keypad": (lambda: dict(score_mod=_flex_keypad), [(0, 130), (1, 159)], {"blockwise", "reference"}),
    "scoremod_keypad_and_mask": (lambda: dict(score_mod=_flex_keypad, mask=masks.sliding_window(64, 64)),
                                 [(1, 125)], {"blockwise", "reference"}),
    "scoremod_t5_inf_band": (lambda: dict(score_mod=_t5_hiding_future(), mask=masks.sliding_window(40, 40)),
                             [(0, 100)], {"spans", "blockwise", "reference"}),
    "bias_causal": (lambda: dict(bias=_bias_causal()), [(0, 70), (1, 150)], {"sdpa", "blockwise", "bias", "reference"}),
    "bias_keypad": (lambda: dict(bias=_bias_keypad()), [(1, 120), (1, 159)], {"sdpa", "blockwise", "bias", "reference"}),
    "bias_keypad_and_causal": (lambda: dict(bias=_bias_keypad(), mask=masks.causal()), [(1, 130)],
                               {"sdpa", "blockwise", "bias", "reference"}),
}

POISON = [("v", float("nan")), ("k", float("nan")), ("both", float("inf")), ("v", -float("inf"))]


def _poison(t, bad, value):
    t = t.clone()
    for b, j in bad:
        t[b, :, j] = value
    return t


def _visibility(q, k, kw):
    """(B, H, L, S) bool: what each row sees, from the reference's scores on finite inputs."""
    s = reference.scores(q, expand_kv(k, q.shape[1]), mask=kw.get("mask"), score_mod=kw.get("score_mod"),
                         bias=kw.get("bias"))
    return s != NEG


def _cast(kw, dt):
    return {n: (x.to(dt) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


def _reference(q, k, v, kw, g, dt):
    leaves = [t.detach().to(dt).clone().requires_grad_(True) for t in (q, k, v)]
    r = reference.attention(*leaves, **_cast(kw, dt))
    r.out.backward(g.to(dt))
    return r.out.detach(), r.lse.detach(), [t.grad for t in leaves]


def _grid():
    """float32 with every poison, float64 and bfloat16 with NaN in v; the other float64 poisons under ``slow``."""
    out = []
    for dt, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        for i, (w, val) in enumerate(POISON):
            marks = [pytest.mark.slow] if dt == torch.float64 and i > 0 else []
            out.append(pytest.param(w, val, dt, id=f"{w}-{val}-{tag}", marks=marks))
    out.append(pytest.param("v", float("nan"), torch.bfloat16, id="v-nan-bf16"))
    return out


@pytest.mark.parametrize("where,value,dtype", _grid())
@pytest.mark.parametrize("name", sorted(CASES))
def test_hidden_nonfinite_keys_never_change_a_row(name, where, value, dtype):
    torch.manual_seed(hash(name) % 1000)
    make, bad, must = CASES[name]
    kw = make()
    q, k, v = (torch.randn(B, n, L, D, dtype=torch.float64) for n in (H, HKV, HKV))
    kbad = _poison(k, bad, value) if where in ("k", "both") else k
    vbad = _poison(v, bad, value) if where in ("v", "both") else v
    vis = _visibility(q, k, kw)
    badmask = torch.zeros(B, HKV, L, dtype=torch.bool)
    for b, j in bad:
        badmask[b, :, j] = True
    badh = badmask.repeat_interleave(H // HKV, 1)
    sees = (vis & badh.unsqueeze(2)).any(-1)  # (B, H, L)
    ok = ~sees
    g = torch.randn(B, H, L, D, dtype=torch.float64) * ok.unsqueeze(-1)
    r64 = _reference(q, k, v, kw, g, torch.float64)
    rT = _reference(q, k, v, kw, g, dtype)
    # keys no row that sees a bad key sees: their dk, dv come from clean rows only
    clean_keys = ~((vis & sees.unsqueeze(-1)).view(B, HKV, H // HKV, L, L).any(2).any(2))  # (B, HKV, S)
    tried = set()
    for be in BACKENDS:
        try:
            pl = salience.plan(q.to(dtype), kbad.to(dtype), vbad.to(dtype), backend=be, **_cast(kw, dtype))
        except ValueError:
            continue
        what = f"{name} {where}={value} {dtype} backend={be}->{pl.backend}"
        tried.add(pl.backend)
        qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_(True) for t in (q, kbad, vbad))
        res = salience.attention(qq, kk, vv, backend=be, return_lse=True, **_cast(kw, dtype))
        assert_rel_close(res.out[ok], rT[0][ok], r64[0][ok], what=what + " out")
        assert_rel_close(res.lse[ok], rT[1][ok], r64[1][ok], what=what + " lse")
        assert (~torch.isfinite(res.out[sees])).any(-1).all(), what + ": a row that sees a bad key, as in eager"
        empty = torch.isneginf(r64[1])  # rows that see nothing: zeros and lse -inf, never NaN
        assert (res.out[empty] == 0).all() and torch.isneginf(res.lse[empty]).all(), what
        res.out.backward(g.to(dtype))
        assert_rel_close(qq.grad[ok], rT[2][0][ok], r64[2][0][ok], what=what + " dq")
        for i, t in ((1, kk), (2, vv)):
            assert_rel_close(t.grad[clean_keys], rT[2][i][clean_keys], r64[2][i][clean_keys],
                             what=what + (" dk", " dv")[i - 1])
        for b, j in bad:
            if clean_keys[b, :, j].all() and (r64[2][1][b, :, j] == 0).all():  # hidden from every row
                assert (kk.grad[b, :, j] == 0).all() and (vv.grad[b, :, j] == 0).all(), what + " hidden key grad"
    assert must <= tried, (name, tried)


def test_finite_inputs_make_one_pass_over_k_and_v(monkeypatch):
    """The dispatcher's finiteness check is remembered for the call: the bias executor reads it instead of a second
    pass, and its backward reads the forward's; a score_mod or bias without NaN takes no guarded work; the next
    call checks afresh."""
    calls, real = [], guard.all_finite
    monkeypatch.setattr(guard, "all_finite", lambda t: calls.append(t.shape) or real(t))
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(64, 64).masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), NEG)
    assert salience.plan(q, k, v, bias=bias).backend == "bias"
    salience.attention(q, k, v, bias=bias).sum().backward()
    assert len(calls) == 2, calls  # k once and v once, for the forward and the backward together
    calls.clear()
    bad_calls = []
    monkeypatch.setattr(guard, "bad_keys", lambda k, v: bad_calls.append(1))
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))  # new tensors: checked afresh
    salience.attention(q, k, v, score_mod=_flex_causal, backend="blockwise")
    assert len(calls) == 2 and bad_calls == []
    k.data[0, 0, 3, 0] = float("nan")  # a write the version counter does not see: the next call checks afresh
    out = salience.attention(q, k, v, bias=bias)
    assert len(calls) == 3  # k checked again (and found bad: v need not be)
    assert torch.isfinite(out[0, 0, :3]).all() and out[0, 0, 3:].isnan().any(-1).all()


def test_bias_executor_run_directly_guards_itself():
    """The bias executor outside the dispatcher (kernels.bias.executor + dispatch.run) applies the same guard."""
    from salience.kernels import dispatch

    q, k, v = (torch.randn(1, 2, 48, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(48, 48, dtype=torch.float64)
    bias[:, 30:] = NEG  # keys 30.. hidden from every row by the bias alone
    vb = v.clone()
    vb[0, 1, 33] = float("nan")
    ex, det = kb.executor(q, k, vb, bias, scale=0.3, need_grad=False)
    got = dispatch.run(dispatch.Plan("bias", "test", det, ex), q, k, vb)
    ref = reference.attention(q, k, v, bias=bias, scale=0.3)
    assert torch.allclose(got.out, ref.out, atol=1e-12) and torch.allclose(got.lse, ref.lse, atol=1e-12)


def test_a_row_seeing_one_bad_key_is_not_changed_by_another_it_cannot_see():
    """Row i sees the inf at key 10 (so it is inf, as in eager) but not the NaN at key 50 hidden by the
    score_mod: it stays inf, not NaN."""
    q, k, v = (torch.randn(1, 1, 64, 4, dtype=torch.float64) for _ in range(3))
    v[0, 0, 10, 2] = float("inf")
    v[0, 0, 50] = float("nan")
    hide = lambda s, b, h, i, j: torch.where((j > i) | (j >= 40), torch.full_like(s, NEG), s)  # noqa: E731
    for be in (None, "blockwise", "reference"):
        out = salience.attention(q, k, v, score_mod=hide, backend=be)
        assert torch.isinf(out[0, 0, 10:, 2]).all(), be
        assert not out.isnan().any(), be
        assert torch.isfinite(out[0, 0, :10]).all() and torch.isfinite(out[0, 0, 10:, [0, 1, 3]]).all(), be


# ------------------------------------------------------------------------------------------- ring attention

JOIN_TIMEOUT = 120
N = 48
DOC_IDS = [0] * 7 + [1] * 20 + [2] * 5 + [3] * 16  # documents that span the two shards


def _keypad40(s, b, h, q, k):
    return torch.where(k >= 40, torch.full_like(s, NEG), s)


RING_CASES = {  # name: (mask, score_mod, layout, bad (batch, key), where); "gqa" names: H 4 over Hkv 2
    "window": (lambda: masks.sliding_window(6, 2), None, "contiguous", [(0, 27)], "v"),
    "gqa-window-zigzag": (lambda: masks.sliding_window(6, 2), None, "zigzag", [(1, 20)], "both"),
    "keypad-scoremod": (lambda: masks.causal(), _keypad40, "zigzag", [(0, 44), (1, 41)], "both"),
    "documents": (lambda: masks.document(DOC_IDS), None, "contiguous", [(1, 29)], "k"),
    "scoremod-only": (lambda: None, _keypad40, "contiguous", [(0, 45)], "v"),
}


def _ring_inputs(name, dt):
    g = torch.Generator().manual_seed(7)
    Hq = 4 if name.startswith("gqa") else 2
    q, k, v, do = (torch.randn(2, h, N, 8, generator=g, dtype=torch.float64) for h in (Hq, 2, 2, Hq))
    return q, k, v, do


def _ring_worker(rank, world, port, outdir):
    import torch.distributed as dist

    from salience.distributed import ring_attention, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, (mask, sm, lay, bad, where) in RING_CASES.items():
        for dt in (torch.float64, torch.float32):
            key = f"{name}-{dt}"
            try:
                q, k, v, do = _ring_inputs(name, dt)
                k = _poison(k, bad, float("nan")) if where in ("k", "both") else k
                v = _poison(v, bad, float("nan")) if where in ("v", "both") else v
                ql, kl, vl = (shard(t, rank, world, lay).to(dt).clone().requires_grad_(True) for t in (q, k, v))
                res = ring_attention(ql, kl, vl, mask=mask(), score_mod=sm, layout=lay, return_lse=True, timeout=30)
                dsel = _ring_ok(name, q, k)[0].unsqueeze(-1)
                res.out.backward(shard(do * dsel, rank, world, lay).to(dt))
                results[key] = dict(out=res.out.detach(), lse=res.lse.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad)
            except Exception:
                results[key] = dict(error=traceback.format_exc())
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)


def _ring_ok(name, q, k):
    mask, sm, _lay, bad, _where = RING_CASES[name]
    vis = _visibility(q, k, dict(mask=mask(), score_mod=sm))
    Hq, Hkv = q.shape[1], k.shape[1]
    badm = torch.zeros(2, Hkv, N, dtype=torch.bool)
    for b, j in bad:
        badm[b, :, j] = True
    sees = (vis & badm.repeat_interleave(Hq // Hkv, 1).unsqueeze(2)).any(-1)
    # (B, Hkv, S): keys no row that sees a bad key sees
    clean_keys = ~(vis & sees.unsqueeze(-1)).view(2, Hkv, Hq // Hkv, N, N).any(2).any(2)
    return ~sees, clean_keys


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("ring_guard")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ring_worker, args=(r, 2, port, str(outdir)), daemon=True) for r in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.1, JOIN_TIMEOUT - (time.monotonic() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    files = [os.path.join(outdir, f"rank{r}.pt") for r in range(2)]
    assert all(os.path.exists(f) for f in files), f"exit codes {[p.exitcode for p in procs]}"
    return [torch.load(f, weights_only=False) for f in files]


@pytest.mark.parametrize("dt", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(RING_CASES))
def test_ring_hidden_nan_in_another_ranks_shard(ring_results, name, dt):
    from salience.distributed import unshard

    key = f"{name}-{dt}"
    for r, res in enumerate(ring_results):
        assert "error" not in res[key], f"rank {r}:\n{res[key]['error']}"
    mask, sm, lay, bad, _ = RING_CASES[name]
    got = {n: unshard([res[key][n] for res in ring_results], layout=lay) for n in ("out", "lse", "dq", "dk", "dv")}
    q, k, v, do = _ring_inputs(name, dt)
    ok, clean_keys = _ring_ok(name, q, k)
    g = do * ok.unsqueeze(-1)
    kw = dict(mask=mask(), score_mod=sm)
    r64, rT = _reference(q, k, v, kw, g, torch.float64), _reference(q, k, v, kw, g, dt)
    assert ok.any()
    assert_rel_close(got["out"][ok], rT[0][ok], r64[0][ok], what=f"ring {key} out")
    assert_rel_close(got["lse"][ok], rT[1][ok], r64[1][ok], what=f"ring {key} lse")
    assert (~torch.isfinite(got["out"][~ok])).any(-1).all(), f"ring {key}: rows that see the NaN, as in eager"
    assert_rel_close(got["dq"][ok], rT[2][0][ok], r64[2][0][ok], what=f"ring {key} dq")
    for i, n in ((1, "dk"), (2, "dv")):
        assert_rel_close(got[n][clean_keys], rT[2][i][clean_keys], r64[2][i][clean_keys], what=f"ring {key} {n}")
    for b, j in bad:
        if clean_keys[b, :, j].all() and (r64[2][1][b, :, j] == 0).all():
            assert (got["dk"][b, :, j] == 0).all() and (got["dv"][b, :, j] == 0).all(), f"ring {key}"
    assert math.isfinite(float(got["dq"][ok].abs().sum()))
