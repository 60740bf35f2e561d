"""Ring attention (salience.distributed): sharding helpers, per-block maths, and 2- and 3-process rings on
gloo over 127.0.0.1 against the single-process float64 reference, forward and backward; dead and stalled
ranks give a clear error within a timeout.

Every multi-process launch is bounded: the process group and the ring have timeouts, and the test joins its
processes with a deadline and kills what is left.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import salience
from salience import masks as M
from salience import scores as Sc
from salience.distributed import (
    LAYOUTS,
    _block,
    gather,
    positions,
    ring_attention,
    segments,
    shard,
    unshard,
)
from salience.kernels.merge import merge
from salience.testing import assert_rel_close

#: seconds a whole launch may take before its processes are killed and the test fails
JOIN_TIMEOUT = 90
#: seconds the ring waits for a peer inside the workers
RING_TIMEOUT = 20

N = 48  # global length: divisible by 2 * W for W in (2, 3)
DOC_IDS = [0] * 7 + [1] * 20 + [2] * 5 + [3] * 16  # documents that span shards for W = 2 and 3


# ------------------------------------------------------------------------------------------ cases


def _custom_mask(b, h, q_idx, kv_idx):  # a plain callable: no analytic tile bounds, classified by evaluation
    return ((q_idx + 2 * kv_idx) % 5 != 0) | (q_idx == kv_idx)


def _case_list():
    cases = []
    for dtype in ("float64", "float32"):
        for mask in ("none", "causal", "sliding_window", "documents"):
            for layout in LAYOUTS:
                cases.append(dict(name=f"{mask}-{layout}-{dtype}", mask=mask, layout=layout, dtype=dtype))
    cases += [
        dict(name="gqa-alibi-causal-zigzag-float32", mask="causal", layout="zigzag", dtype="float32",
             score_mod="alibi", H=4, Hkv=2),
        dict(name="custom-softcap-contiguous-float64", mask="custom", layout="contiguous", dtype="float64",
             score_mod="softcap"),
        dict(name="documents-causal-zigzag-float32", mask="documents_causal", layout="zigzag", dtype="float32"),
        dict(name="padding-rows-zigzag-float64", mask="padding", layout="zigzag", dtype="float64"),
        dict(name="cross-dv-contiguous-float32", mask="none", layout="contiguous", dtype="float32", S=72, Dv=5),
        dict(name="causal-zigzag-bfloat16", mask="causal", layout="zigzag", dtype="bfloat16"),
    ]
    for i, c in enumerate(cases):  # every other case also puts a gradient on the logsumexp
        c["lse_grad"] = i % 2 == 1
    return cases


CASES = _case_list()


def _mask(name):
    return {
        "none": None,
        "causal": M.causal(),
        "sliding_window": M.sliding_window(6, 2),
        "documents": M.document(DOC_IDS),
        "documents_causal": M.document(DOC_IDS) & M.causal(),
        "custom": _custom_mask,
        "padding": M.padding(q_lengths=[40, 13]) & M.causal(),
    }[name]


def _score_mod(name, H):
    return {None: None, "alibi": Sc.alibi(H), "softcap": Sc.softcap(1.5)}[name]


def _inputs(case):
    """Global float64 q, k, v, dout, dlse for a case (the same in every process)."""
    g = torch.Generator().manual_seed(1234)
    B, H, Hkv = 2, case.get("H", 2), case.get("Hkv", case.get("H", 2))
    S, D, Dv = case.get("S", N), 8, case.get("Dv", 8)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    dl = torch.randn(B, H, N, generator=g, dtype=torch.float64)
    return q, k, v, do, dl


# ---------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port, pg_timeout=30):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))


def _save(obj, outdir, name):
    path = os.path.join(outdir, name)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _launch(target, world, outdir, *args, expendable=()):
    """Run target(rank, world, port, outdir, *args) in ``world`` spawned processes; kill them at the deadline
    (ranks in ``expendable`` are killed as soon as the others have finished).
    Returns (exit codes, seconds)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, str(outdir), *args), daemon=True) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for r, p in enumerate(procs):
        if r not in expendable:
            p.join(max(0.1, JOIN_TIMEOUT - (time.monotonic() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs], time.monotonic() - t0


def _load(outdir, name):
    f = os.path.join(str(outdir), name)
    return torch.load(f, weights_only=False) if os.path.exists(f) else None


#: per world size, how one rank (the victim) fails after the cases: it dies, or stalls instead of the backward
FAILURES = {2: ("dies", 1), 3: ("skips_backward", 2)}


def _cases_worker(rank, world, port, outdir, mode, victim):
    """Run every case and save this rank's output, lse and gradients (or the error) per case; then check
    that shards of different shapes raise on every rank; then let ``victim`` die or stall and record the
    error the other ranks get."""
    import torch.distributed as dist

    _init(rank, world, port)
    results = {}
    for case in CASES:
        try:
            dt = getattr(torch, case["dtype"])
            q, k, v, do, dl = _inputs(case)
            lay = case["layout"]
            ql, kl, vl = (shard(t, rank, world, lay).to(dt).clone().requires_grad_(True) for t in (q, k, v))
            res = ring_attention(ql, kl, vl, mask=_mask(case["mask"]), score_mod=_score_mod(case.get("score_mod"), q.shape[1]),
                                 layout=lay, return_lse=True, timeout=RING_TIMEOUT)
            if case["lse_grad"]:
                torch.autograd.backward([res.out, res.lse], [shard(do, rank, world, lay).to(dt),
                                                             shard(dl, rank, world, lay).to(res.lse.dtype)])
            else:
                res.out.backward(shard(do, rank, world, lay).to(dt))
            results[case["name"]] = dict(out=res.out.detach(), lse=res.lse, dq=ql.grad, dk=kl.grad, dv=vl.grad)
        except Exception:  # report per case; the parent fails that case with the traceback
            results[case["name"]] = dict(error=traceback.format_exc())
    first = CASES[0]
    results["gathered"] = gather(results[first["name"]]["out"], layout=first["layout"])
    # a ring over a subgroup: ranks 0 and world-1 only, in group rank order, global ranks mapped for p2p
    members = [0, world - 1]
    sub = dist.new_group(members)
    if rank in members:
        gr = members.index(rank)
        q, k, v, do, _ = _inputs(CASES[1])
        ql, kl, vl = (shard(t, gr, 2, "zigzag").clone().requires_grad_(True) for t in (q, k, v))
        out = ring_attention(ql, kl, vl, group=sub, mask=M.causal(), layout="zigzag", timeout=RING_TIMEOUT)
        out.backward(shard(do, gr, 2, "zigzag"))
        results["subgroup"] = dict(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad)
    # ranks that disagree on the shard shapes: a ValueError on every rank, not a hang
    try:
        n = 8 if rank == 0 else 10
        x = torch.randn(1, 1, n, 4)
        ring_attention(x, x, x, timeout=RING_TIMEOUT)
        results["mismatch"] = "no error"
    except Exception as e:
        results["mismatch"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    _save(results, outdir, f"rank{rank}.pt")
    dist.barrier()

    # a dead or stalled rank: the others fail with RingError within the ring's timeout
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    if rank == victim and mode == "dies":
        os._exit(3)
    t0 = time.monotonic()
    try:
        out = ring_attention(q, q, q, mask=M.causal(), timeout=2.0)
        if rank == victim and mode == "skips_backward":
            time.sleep(JOIN_TIMEOUT)  # killed by the parent
        out.sum().backward()
        res = dict(error=None)
    except Exception as e:
        res = dict(error=type(e).__name__, message=str(e))
    res["seconds"] = time.monotonic() - t0
    _save(res, outdir, f"rank{rank}-failure.pt")
    os._exit(0)  # skip gloo teardown, which may wait for the stalled peer


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def ring_run(request, tmp_path_factory):
    world = request.param
    outdir = tmp_path_factory.mktemp(f"ring{world}")
    mode, victim = FAILURES[world]
    codes, secs = _launch(_cases_worker, world, outdir, mode, victim, expendable=(victim,))
    saved = [_load(outdir, f"rank{r}.pt") for r in range(world)]
    failures = [_load(outdir, f"rank{r}-failure.pt") for r in range(world)]
    return world, codes, secs, saved, failures


def _reference(case, dt):
    q, k, v, do, dl = _inputs(case)
    outs = {}
    for T in (torch.float64, dt):
        qq, kk, vv = (t.to(T).clone().requires_grad_(True) for t in (q, k, v))
        r = salience.reference.attention(qq, kk, vv, mask=_mask(case["mask"]),
                                         score_mod=_score_mod(case.get("score_mod"), q.shape[1]))
        if case["lse_grad"]:
            torch.autograd.backward([r.out, r.lse], [do.to(T), dl.to(r.lse.dtype)])
        else:
            r.out.backward(do.to(T))
        outs[T] = dict(out=r.out.detach(), lse=r.lse.detach(), dq=qq.grad, dk=kk.grad, dv=vv.grad)
    return outs


def test_ring_processes_exit_cleanly(ring_run):
    world, codes, secs, saved, _ = ring_run
    victim = FAILURES[world][1]
    assert [c for r, c in enumerate(codes) if r != victim] == [0] * (world - 1), f"exit codes {codes} after {secs:.1f} s"
    assert all(s is not None for s in saved)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ring_matches_reference(ring_run, case):
    world, codes, secs, saved, _ = ring_run
    assert all(s is not None for s in saved), f"a rank saved nothing (exit codes {codes})"
    per_rank = [s[case["name"]] for s in saved]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r} of {world} failed:\n{res['error']}"
    dt = getattr(torch, case["dtype"])
    ref = _reference(case, dt)
    lay = case["layout"]
    for key in ("out", "lse", "dq", "dk", "dv"):
        got = unshard([res[key] for res in per_rank], layout=lay)
        assert_rel_close(got, ref[dt][key], ref[torch.float64][key], what=f"{case['name']} {key} ({world} ranks)")


def test_ring_padding_rows_are_zero_not_nan(ring_run):
    world, _, _, saved, _ = ring_run
    res = [s["padding-rows-zigzag-float64"] for s in saved]
    out = unshard([r["out"] for r in res], layout="zigzag")
    lse = unshard([r["lse"] for r in res], layout="zigzag")
    dq = unshard([r["dq"] for r in res], layout="zigzag")
    assert not torch.isnan(out).any() and not torch.isnan(dq).any()
    assert (out[1, :, 13:] == 0).all() and (dq[1, :, 13:] == 0).all()
    assert torch.isneginf(lse[1, :, 13:]).all() and torch.isfinite(lse[1, :, :13]).all()


def test_gather_returns_the_global_tensor_on_every_rank(ring_run):
    world, _, _, saved, _ = ring_run
    first = CASES[0]
    whole = unshard([s[first["name"]]["out"] for s in saved], layout=first["layout"])
    for s in saved:
        assert torch.equal(s["gathered"], whole)


def test_ring_over_a_subgroup(ring_run):
    """A 2-rank ring on ranks (0, W-1) of the launch: causal, zigzag, float64, against the reference."""
    world, _, _, saved, _ = ring_run
    res = [saved[0]["subgroup"], saved[world - 1]["subgroup"]]
    q, k, v, do, _ = _inputs(CASES[1])
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    r = salience.reference.attention(qq, kk, vv, mask=M.causal())
    r.out.backward(do)
    for key, ref in (("out", r.out.detach()), ("dq", qq.grad), ("dk", kk.grad), ("dv", vv.grad)):
        got = unshard([x[key] for x in res], layout="zigzag")
        assert_rel_close(got, ref, ref, what=f"subgroup {key}")


def test_ring_mismatched_shards_raise_on_every_rank(ring_run):
    world, _, _, saved, _ = ring_run
    for r, s in enumerate(saved):
        msg = s["mismatch"]
        assert msg.startswith("ValueError") and "L/W: 8 vs 10" in msg, f"rank {r}: {msg}"


# ------------------------------------------------------------------------------ dead and stalled ranks


def test_ring_dead_or_stalled_rank_fails_within_timeout(ring_run):
    """2 ranks: rank 1 dies before a call; 3 ranks: rank 2 runs the forward but never the backward. The other
    ranks raise RingError naming themselves, within the 2 s ring timeout (plus slack), and exit."""
    world, codes, secs, saved, failures = ring_run
    mode, victim = FAILURES[world]
    assert secs < JOIN_TIMEOUT, "the launch hit the join deadline: something hung"
    for r in range(world):
        if r == victim:
            continue
        res = failures[r]
        assert res is not None, f"rank {r} saved nothing after the {mode} failure (exit codes {codes})"
        assert res["error"] == "RingError", res
        assert f"rank {r} of {world}" in res["message"] and "died, stalled" in res["message"]
        assert res["seconds"] < 2.0 + 8.0, res  # the 2 s ring timeout, plus slack for a loaded machine
        if mode == "skips_backward":
            assert "backward" in res["message"]


# ----------------------------------------------------------------------------- in-process: sharding


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_unshard_roundtrip_and_positions(layout, world):
    x = torch.randn(2, 3, 12, 4)
    parts = [shard(x, r, world, layout) for r in range(world)]
    assert torch.equal(unshard(parts, layout), x)
    for r in range(world):
        pos = positions(12, r, world, layout)
        assert torch.equal(parts[r], x[:, :, pos])
        assert sum(n for _, n in segments(12, r, world, layout)) == 12 // world
    allpos = torch.cat([positions(12, r, world, layout) for r in range(world)])
    assert torch.equal(allpos.sort().values, torch.arange(12))
    ids = torch.arange(12)
    assert torch.equal(unshard([shard(ids, r, world, layout, dim=0) for r in range(world)], layout, dim=0), ids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_give_rope_of_the_full_sequence(layout):
    from salience.layers.positional import RotaryEmbedding

    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 24, 8, dtype=torch.float64)
    full = rope(x)
    for r in range(3):
        local = rope(shard(x, r, 3, layout), positions=positions(24, r, 3, layout))
        assert torch.allclose(local, shard(full, r, 3, layout), atol=1e-12)


def test_zigzag_balances_causal_work():
    world, n = 4, 64
    work = []
    for r in range(world):
        pos = positions(n, r, world, "zigzag")
        work.append(int((pos + 1).sum()))  # visible keys per query under causal
    assert max(work) == min(work)


def test_sharding_errors():
    x = torch.randn(1, 1, 10, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(x, 0, 2, layout="striped")
    with pytest.raises(ValueError, match="multiple of 4.*Pad it by 2"):
        shard(x, 0, 2, layout="zigzag")
    with pytest.raises(ValueError, match="multiple of 3"):
        shard(x, 0, 3)
    with pytest.raises(ValueError, match="rank must be < world"):
        shard(x, 2, 2)
    with pytest.raises(TypeError, match="world must be an int"):
        shard(x, 0, 2.0)
    with pytest.raises(ValueError, match="dim must be an int"):
        shard(x, 0, 2, dim=4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        shard([1, 2], 0, 2)
    with pytest.raises(ValueError, match="parts\\[1\\] has shape"):
        unshard([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 2)])
    with pytest.raises(TypeError, match="non-empty list"):
        unshard([])
    with pytest.raises(ValueError, match="must be even"):
        unshard([torch.zeros(1, 1, 3, 2)] * 2, layout="zigzag")


# ---------------------------------------------------------------------- in-process: argument errors


def test_ring_attention_argument_errors():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="ring")
    with pytest.raises(ValueError, match="local length of q must be even"):
        ring_attention(torch.randn(1, 2, 7, 4), q, q, layout="zigzag")
    with pytest.raises(TypeError, match="timeout must be seconds"):
        ring_attention(q, q, q, timeout="10s")
    with pytest.raises(ValueError, match="timeout must be positive"):
        ring_attention(q, q, q, timeout=-1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        ring_attention(q, q, q, return_lse=1)
    with pytest.raises(TypeError, match="floating-point"):
        ring_attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="4 dimensions"):
        ring_attention(q[0], q, q)
    with pytest.raises(ValueError, match="scale must be positive"):
        ring_attention(q, q, q, scale=0.0)
    with pytest.raises(TypeError, match="mask must be a mask_mod"):
        ring_attention(q, q, q, mask=lambda s, b, h, qi, ki: s)
    with pytest.raises(TypeError, match="score_mod must be a score_mod"):
        ring_attention(q, q, q, score_mod=lambda b, h, qi, ki: qi >= ki)


def test_ring_attention_refuses_learned_score_mod_tensors():
    q = torch.randn(1, 2, 8, 4)
    table = torch.zeros(8, 2, requires_grad=True)
    with pytest.raises(NotImplementedError, match="requires grad.*table.detach"):
        ring_attention(q, q, q, score_mod=Sc.relative_bias(table, num_buckets=8))


def test_ring_attention_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


def test_ring_attention_rejects_a_non_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        q = torch.randn(1, 2, 8, 4)
        with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
            ring_attention(q, q, q, group="world")
        # a one-process ring is plain attention
        out = ring_attention(q, q, q, mask=M.sliding_window(2), layout="zigzag")
        assert torch.allclose(out, salience.attention(q, q, q, mask=M.sliding_window(2)), atol=1e-6)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- in-process: the per-block maths


_MASKS = ["none", "causal", "sliding_window", "documents", "custom", "padding"]


def _spec(mask_name, score_mod, B, H, L, S, D):
    m = _mask(mask_name)
    m = None if m is None else M.as_mask_mod(m).bind(L, S, None)
    return _block.Spec(mask=m, score_mod=score_mod, scale=1 / math.sqrt(D), L=L, S=S, B=B, H=H)


def _cuts(draw, n, most):
    pts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=most))))
    edges = [0] + pts + [n]
    return [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_blocks_merge_to_the_reference(data):
    """Any split of the query and key positions into blocks, computed block by block with global offsets
    (empty blocks skipped) and merged with logsumexps (forward), then with the global out/lse (backward,
    with and without a gradient on lse), equals the reference."""
    draw = data.draw
    mask_name = draw(st.sampled_from(_MASKS))
    mod = draw(st.sampled_from([None, "alibi", "softcap"]))
    dt = draw(st.sampled_from([torch.float64, torch.float32]))
    with_dlse = draw(st.booleans())
    B, H, Hkv, D = 2, 2, draw(st.sampled_from([1, 2])), 4
    Dv = draw(st.sampled_from([4, 3]))
    L = S = N
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q64 = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64)
    do64 = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    dl64 = torch.randn(B, H, L, generator=g, dtype=torch.float64) if with_dlse else None
    sm = _score_mod(mod, H)
    qsegs, ksegs = _cuts(draw, L, 3), _cuts(draw, S, 3)
    spec = _spec(mask_name, sm, B, H, L, S, D)
    q, k, v, do = (t.to(dt) for t in (q64, k64, v64, do64))
    dl = None if dl64 is None else dl64.to(_block.acc_dtype(dt))
    acc = _block.acc_dtype(dt)
    outs, lses = [], []
    for q0, nq in qsegs:
        part = None
        for k0, nk in ksegs:
            r = _block.block_forward(spec, q[:, :, q0:q0 + nq], k[:, :, k0:k0 + nk], v[:, :, k0:k0 + nk], q0, k0)
            if r is None:
                continue
            part = (r.out, r.lse) if part is None else tuple(merge(part[0], part[1], r.out, r.lse))
        if part is None:
            part = (torch.zeros(B, H, nq, Dv, dtype=acc), torch.full((B, H, nq), float("-inf"), dtype=acc))
        outs.append(part[0])
        lses.append(part[1])
    out, lse = torch.cat(outs, 2).to(dt), torch.cat(lses, 2)
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    for q0, nq in qsegs:
        qs = slice(q0, q0 + nq)
        for k0, nk in ksegs:
            ks = slice(k0, k0 + nk)
            gr = _block.block_backward(spec, q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs], lse[:, :, qs],
                                       do[:, :, qs], None if dl is None else dl[:, :, qs], q0, k0)
            if gr is not None:
                dq[:, :, qs] += gr[0]
                dk[:, :, ks] += gr[1]
                dv[:, :, ks] += gr[2]
    ref = {}
    for T in (torch.float64, dt):
        qq, kk, vv = (t.to(T).clone().requires_grad_(True) for t in (q64, k64, v64))
        r = salience.reference.attention(qq, kk, vv, mask=_mask(mask_name), score_mod=sm)
        outs_, grads_ = [r.out], [do64.to(T)]
        if dl64 is not None:
            outs_.append(r.lse)
            grads_.append(dl64.to(r.lse.dtype))
        torch.autograd.backward(outs_, grads_)
        ref[T] = dict(out=r.out.detach(), lse=r.lse.detach(), dq=qq.grad, dk=kk.grad, dv=vv.grad)
    got = dict(out=out, lse=lse, dq=dq.to(dt), dk=dk.to(dt), dv=dv.to(dt))
    for key, val in got.items():
        assert not torch.isnan(val).any(), key
        assert_rel_close(val, ref[dt][key], ref[torch.float64][key], what=f"{key} {mask_name} {mod} {qsegs} {ksegs}")


def test_empty_blocks_are_skipped_and_full_blocks_fused():
    spec = _spec("causal", None, 1, 1, 64, 64, 4)
    assert _block.is_empty(spec, 0, 16, 32, 16, None)  # keys after every query
    assert _block.kind(spec, 32, 16, 0, 16, None) == "full"
    assert _block.kind(spec, 16, 16, 16, 16, None) == "causal"
    assert _block.kind(spec, 16, 16, 8, 16, None) == "blocks"
    assert _block.kind(_spec("causal", Sc.softcap(2.0), 1, 1, 64, 64, 4), 32, 16, 0, 16, None) == "blocks"
    assert _block.kind(_spec("none", None, 1, 1, 64, 64, 4), 32, 16, 0, 16, None) == "full"
    spec = _spec("sliding_window", None, 1, 1, 64, 64, 4)  # window 6 left, 2 right
    assert _block.is_empty(spec, 48, 16, 0, 16, None)
    assert _block.kind(spec, 16, 16, 30, 16, None) == "blocks"
    q = torch.randn(1, 1, 16, 4)
    assert _block.block_forward(spec, q, q, q, 48, 0) is None
    assert _block.block_backward(spec, q, q, q, q, q[..., 0], q, None, 48, 0) is None
    spec = _spec("custom", None, 1, 1, 64, 64, 4)  # no closed form: classified by evaluation
    assert not _block.is_empty(spec, 0, 16, 0, 16, None)


# ----------------------------------------------------------------------------------------------- launcher


def test_launcher_runs_and_checks_against_one_process(tmp_path):
    """``python -m salience.distributed --nproc 2``: spawns 2 ranks, times them, checks against float64."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ring.json"
    cmd = [sys.executable, "-m", "salience.distributed", "--nproc", "2", "--threads", "1", "--seq", "96",
           "--heads", "2", "--dim", "8", "--mask", "sliding:5", "--layout", "zigzag", "--repeat", "1",
           "--warmup", "0", "--timeout", "30", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=JOIN_TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check against one process" in p.stdout and ": PASS" in p.stdout
    res = json.loads(out.read_text())
    assert [r["rank"] for r in res["ranks"]] == [0, 1]
    assert all(r["forward_ms"] > 0 and r["peak_mb"] > 0 for r in res["ranks"])
    assert all(c["ok"] for c in res["check"].values()) and set(res["check"]) == {"out", "dq", "dk", "dv"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "2", "--seq", "10", "--layout", "zigzag"], "multiple of 4"),
        (["--nproc", "0"], "--nproc must be >= 1"),
        (["--mask", "window:5"], "--mask must be none, causal"),
        (["--heads", "4", "--kv-heads", "3"], "--kv-heads must divide"),
        (["--repeat", "0"], "--repeat must be >= 1"),
    ],
)
def test_launcher_argument_errors(argv, message, capsys, monkeypatch):
    from salience.distributed.launch import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
