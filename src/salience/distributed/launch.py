"""Run long-sequence ring attention across ranks, time it, and check it against one process.

Under ``torchrun`` (one process per rank; ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` come from torchrun)::

    torchrun --standalone --nproc-per-node 2 -m salience.distributed --seq 16384 --mask causal --layout zigzag

or without torchrun, spawning ``--nproc`` local processes on gloo over 127.0.0.1::

    python -m salience.distributed --nproc 2 --seq 16384 --mask causal --layout zigzag

Every rank builds its own shard of deterministic random q, k, v (the same global tensors whatever the
layout or world size), runs the ring forward and backward ``--repeat`` times and reports the median time and
the peak memory per rank. Rank 0 then times single-process :func:`salience.attention` on the whole sequence
(with the threads of one rank, and with the threads of all ranks) while the others wait, and checks the
gathered ring output and gradients against a float64 single-process computation with the relative-error
rule of :mod:`salience.testing`. The exit status is 0 when the check passes.

Example:
    >>> from salience.distributed.launch import build_parser
    >>> build_parser().parse_args(["--seq", "1024", "--mask", "causal"]).seq
    1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch

__all__ = ["add_arguments", "build_parser", "run", "main", "parse_mask"]


def parse_mask(spec: str, n: int):
    """Build the global mask named by ``--mask``: ``none``, ``causal``, ``sliding:W`` (causal window of W
    keys), ``documents:K`` (K documents of unequal lengths, boundaries not aligned to shards) or
    ``documents-causal:K``.

    Example:
        >>> parse_mask("sliding:128", 1024)
        sliding_window(left=128, right=0)
    """
    from .. import masks as M

    name, _, arg = spec.partition(":")
    if name == "none" and not arg:
        return None
    if name == "causal" and not arg:
        return M.causal()
    if name == "sliding" and arg.isdigit():
        return M.sliding_window(int(arg))
    if name in ("documents", "documents-causal") and arg.isdigit() and int(arg) >= 1:
        k = int(arg)
        # lengths proportional to 1, 2, ..., k so that boundaries fall inside shards
        w = torch.arange(1, k + 1, dtype=torch.float64)
        ends = (torch.cumsum(w, 0) / w.sum() * n).round().long()
        ids = torch.bucketize(torch.arange(n), ends, right=True).clamp(max=k - 1)
        m = M.document(ids)
        return m & M.causal() if name == "documents-causal" else m
    raise ValueError(
        f"--mask must be none, causal, sliding:W, documents:K or documents-causal:K; got {spec!r}."
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the launcher's options to ``p`` (used by ``python -m salience.distributed`` and the CLI)."""
    p.add_argument("--seq", type=int, default=8192, help="global sequence length N (default 8192)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=8, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--dim", type=int, default=64, help="head dimension")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32",
                   help="dtype of q, k and v")
    p.add_argument("--mask", default="none", help="none | causal | sliding:W | documents:K | documents-causal:K")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous",
                   help="how the sequence is sharded: contiguous, or zigzag (balances causal work; --seq must be a multiple of 2 x ranks)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--no-baseline", action="store_true", help="skip the single-process timing")
    p.add_argument("--no-check", action="store_true", help="skip the float64 check against one process")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda uses NCCL, cpu gloo")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a stalled peer is an error")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v")
    p.add_argument("--json", default=None, help="write the results of rank 0 to this JSON file (default: none written)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m salience.distributed",
        description="Ring attention across ranks: time per rank, memory, and a check against one process.",
    )
    add_arguments(p)
    return p


# ------------------------------------------------------------------------------------------ inputs


def _chunks(args, world: int) -> tuple[int, int]:
    """(number of chunks, chunk length): the global tensors are generated chunk by chunk."""
    n_chunks = 2 * world if args.layout == "zigzag" else world
    return n_chunks, args.seq // n_chunks


def _make(args, world: int, chunk_ids, device, dtype):
    """q, k, v, dout for the listed chunks (concatenated in that order), generated chunk by chunk from the
    seed so that every rank builds only its own part of the same global tensors."""
    Hkv = args.kv_heads or args.heads
    _, c = _chunks(args, world)
    out = []
    for t, (H, D) in enumerate(((args.heads, args.dim), (Hkv, args.dim), (Hkv, args.dim), (args.heads, args.dim))):
        parts = []
        for ci in chunk_ids:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + t * 10_007 + ci)
            parts.append(torch.randn(args.batch, H, c, D, generator=g, dtype=torch.float32))
        out.append(torch.cat(parts, dim=2).to(device=device, dtype=dtype))
    return out


def _my_chunks(args, rank: int, world: int):
    n_chunks, _ = _chunks(args, world)
    return [rank, n_chunks - 1 - rank] if args.layout == "zigzag" else [rank]


# ------------------------------------------------------------------------------------------ one rank


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, device, cpu: list | None = None):
    """(result, wall seconds); appends the process CPU seconds (all threads) to ``cpu`` if given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    r = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return r, t


def _single_once(full, mask, backward: bool, device, cpu: list):
    """Single-process salience.attention on the whole sequence: (forward s, backward s)."""
    from .. import attention

    qq, kk, vv = (t.detach().requires_grad_(backward) for t in full[:3])
    out, tf = _timed(lambda: attention(qq, kk, vv, mask=mask), device, cpu)
    tb = _timed(lambda: out.backward(full[3]), device, cpu)[1] if backward else 0.0
    return tf, tb


def _rank_main(args, rank: int, world: int, device) -> int:
    import torch.distributed as dist

    from .. import attention
    from ..testing import rel_error_report
    from .ring import gather, reset_stats, ring_attention

    dtype = getattr(torch, args.dtype)
    mask = parse_mask(args.mask, args.seq)
    q, k, v, do = _make(args, world, _my_chunks(args, rank, world), device, dtype)
    backward = not args.no_backward

    def ring_once(cpu=None):
        qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
        out, tf = _timed(lambda: ring_attention(qq, kk, vv, mask=mask, layout=args.layout, timeout=args.timeout),
                         device, cpu)
        tb = 0.0
        if backward:
            _, tb = _timed(lambda: out.backward(do), device, cpu)
        return (out.detach(), qq.grad, kk.grad, vv.grad), tf, tb

    for _ in range(args.warmup):
        ring_once()
    fwd, bwd, cpu, waits = [], [], [], []
    load0 = os.getloadavg()[0]
    for _ in range(args.repeat):
        dist.barrier()
        c = []
        reset_stats()
        res, tf, tb = ring_once(c)
        fwd.append(tf)
        bwd.append(tb)
        cpu.append(sum(c))
        waits.append(reset_stats()["wait_s"])
    mine = torch.tensor([statistics.median(fwd), statistics.median(bwd), _peak_mb(device), statistics.median(cpu),
                         statistics.median(waits)], dtype=torch.float64, device=device)
    allt = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(allt, mine)
    gathered = [gather(t, layout=args.layout) for t in res if t is not None]

    summary = dict(
        seq=args.seq, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads, dim=args.dim,
        dtype=args.dtype, mask=args.mask, layout=args.layout, world=world, threads_per_rank=torch.get_num_threads(),
        backend=dist.get_backend(), backward=backward,
        ranks=[dict(rank=r, forward_ms=1e3 * float(t[0]), backward_ms=1e3 * float(t[1]), peak_mb=float(t[2]),
                    cpu_ms=1e3 * float(t[3]), wait_ms=1e3 * float(t[4])) for r, t in enumerate(allt)],
        load_average=load0,
    )
    ok = True
    if rank == 0:
        full = _make(args, world, range(_chunks(args, world)[0]), device, dtype)
        single = {}
        if not args.no_baseline:
            threads = torch.get_num_threads()
            for nt in sorted({threads, threads * world}):
                if device.type == "cpu":
                    torch.set_num_threads(nt)
                ts = []
                for i in range(args.warmup + args.repeat):
                    c = []
                    tf, tb = _single_once(full, mask, backward, device, c)
                    if i >= args.warmup:
                        ts.append((tf, tb, sum(c)))
                single[nt] = dict(forward_ms=1e3 * statistics.median(t[0] for t in ts),
                                  backward_ms=1e3 * statistics.median(t[1] for t in ts),
                                  cpu_ms=1e3 * statistics.median(t[2] for t in ts))
            if device.type == "cpu":
                torch.set_num_threads(threads)
            summary["single_process"] = {f"{nt}_threads": s for nt, s in single.items()}
            summary["single_process_peak_mb"] = _peak_mb(device)
        if not args.no_check:
            names = ["out", "dq", "dk", "dv"][: len(gathered)]
            refs = {}
            for T in (torch.float64, dtype):
                qq, kk, vv = (t.detach().to(T).requires_grad_(backward) for t in full[:3])
                out = attention(qq, kk, vv, mask=mask)
                if backward:
                    out.backward(full[3].to(T))
                refs[T] = [out.detach(), qq.grad, kk.grad, vv.grad][: len(names)]
            checks = {}
            for i, nm in enumerate(names):
                err, bound = rel_error_report(gathered[i], refs[dtype][i], refs[torch.float64][i])
                checks[nm] = dict(error=err, bound=bound, ok=bool(err <= bound))
                ok = ok and err <= bound
            summary["check"] = checks
        _report(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    flag = torch.tensor([1 if ok else 0])
    dist.broadcast(flag, 0)
    return 0 if int(flag) else 1


def _report(s: dict) -> None:
    print(
        f"salience ring attention: N={s['seq']} B={s['batch']} H={s['heads']} Hkv={s['kv_heads']} D={s['dim']} "
        f"{s['dtype']} mask={s['mask']} layout={s['layout']}; {s['world']} ranks x {s['threads_per_rank']} "
        f"thread(s), {s['backend']}; load average {s['load_average']:.2f}"
    )
    print(f"{'rank':>4}  {'forward ms':>10}  {'backward ms':>11}  {'CPU ms':>8}  {'comm wait ms':>12}  {'peak MB':>8}")
    for r in s["ranks"]:
        print(f"{r['rank']:>4}  {r['forward_ms']:>10.1f}  {r['backward_ms']:>11.1f}  {r['cpu_ms']:>8.1f}  "
              f"{r['wait_ms']:>12.1f}  {r['peak_mb']:>8.0f}")
    ring_f = max(r["forward_ms"] for r in s["ranks"])
    ring_b = max(r["backward_ms"] for r in s["ranks"])
    ring_c = max(r["cpu_ms"] for r in s["ranks"])
    print(f"ring (slowest rank): forward {ring_f:.1f} ms, backward {ring_b:.1f} ms, total {ring_f + ring_b:.1f} ms, "
          f"CPU {ring_c:.1f} ms")
    for key, t in s.get("single_process", {}).items():
        tot = t["forward_ms"] + t["backward_ms"]
        nt = int(key.split("_")[0])
        line = (f"one process, {nt} thread(s): forward {t['forward_ms']:.1f} ms, backward {t['backward_ms']:.1f} ms, "
                f"total {tot:.1f} ms, CPU {t['cpu_ms']:.1f} ms")
        if nt == s["threads_per_rank"]:
            ideal, ideal_c = tot / s["world"], t["cpu_ms"] / s["world"]
            line += (f"; ideal per rank {ideal:.1f} ms; ring overhead {(ring_f + ring_b) / ideal:.2f}x wall, "
                     f"{ring_c / ideal_c:.2f}x CPU")
        else:
            line += f"; ring speed-up over it {tot / (ring_f + ring_b):.2f}x"
        print(line)
    if "check" in s:
        parts = [f"{k} {'ok' if c['ok'] else 'FAIL'} ({c['error']:.2e} <= {c['bound']:.2e})" for k, c in s["check"].items()]
        verdict = "PASS" if all(c["ok"] for c in s["check"].values()) else "FAIL"
        print("check against one process (float64, relative-error rule): " + ", ".join(parts) + f": {verdict}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ launching


def _validate(args) -> None:
    world = None
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    elif isinstance(args.nproc, int):
        world = args.nproc
    if world is None or world < 1:
        raise ValueError(f"--nproc must be >= 1; got {args.nproc}.")
    d = 2 * world if args.layout == "zigzag" else world
    if args.seq < d or args.seq % d:
        near = max(d, round(args.seq / d) * d)
        raise ValueError(f"--seq {args.seq} must be a positive multiple of {d} for {world} ranks with "
                         f"--layout {args.layout}; e.g. --seq {near}.")
    if args.warmup < 0 or not args.timeout > 0:
        raise ValueError(f"--warmup must be >= 0 and --timeout > 0; got {args.warmup} and {args.timeout}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA build of torch and a GPU; none is available here (use --device cpu).")
    for name in ("batch", "heads", "dim", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.kv_heads is not None and (args.kv_heads < 1 or args.heads % args.kv_heads):
        raise ValueError(f"--kv-heads must divide --heads {args.heads}; got {args.kv_heads}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}.")
    parse_mask(args.mask, args.seq)


def _setup_rank(args, rank: int, world: int, local_rank: int, local_world: int, init_method=None):
    import torch.distributed as dist

    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    kw = dict(backend=backend, timeout=datetime.timedelta(seconds=args.timeout))
    if init_method is not None:
        kw.update(init_method=init_method, rank=rank, world_size=world)
    dist.init_process_group(**kw)
    return device


def _spawned(rank: int, world: int, port: int, args) -> None:
    device = _setup_rank(args, rank, world, rank, world, init_method=f"tcp://127.0.0.1:{port}")
    code = _rank_main(args, rank, world, device)
    sys.stdout.flush()
    os._exit(code)


def run(args) -> int:
    """Entry point for the CLI: run under torchrun if its environment is set, else spawn ``--nproc``."""
    _validate(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        device = _setup_rank(args, rank, world, local_rank, local_world)
        code = _rank_main(args, rank, world, device)
        dist.destroy_process_group()
        return code
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_spawned, args=(r, args.nproc, port, args)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 3 * args.timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        print(f"ranks exited with codes {codes}", file=sys.stderr)
    return 0 if all(c == 0 for c in codes) else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
