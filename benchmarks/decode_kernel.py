"""Decode kernel micro-benchmark (issue 16): salience.kernels.decode.forward against torch SDPA and the copy
bandwidth measured in the same run.

Rows:
* B=1, H=32, Hkv=8, D=128, S=32768, one query (float32 and bfloat16): ms, GB/s of K and V read, the ratio to the
  copy bandwidth, and the speed-up over ``F.scaled_dot_product_attention(..., enable_gqa=True)``;
* B=8 sequences with lengths spread from 1k to 32k in one call (per-sequence lengths), contiguous and paged
  (block size 16, shuffled pool): GB/s counted on the keys and values actually read;
* sliding window 4096 on a 32k cache: time against the full 32k row (reads only the window);
* for scale, ``k.sum() + v.sum()`` (torch reading the same bytes once) and the CPU time of each call.

Copy bandwidth: a 1 GiB float32 tensor copied into another (``dst.copy_(src)``), bytes read plus written per
second, median of repeats. Run it alone on the machine if you can; the load is printed with the figures. The
``cpu_*`` columns divide by CPU time (all threads) instead of wall time, for runs on a shared machine.

    .venv/bin/python benchmarks/decode_kernel.py [--repeats 9] [--quick]

writes benchmarks/results/decode_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_ms  # noqa: E402

from salience.kernels import decode  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "decode_kernel.json"


def cpu_info() -> dict:
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags.split()]
    return {"model": model or platform.processor(), "simd_flags": simd, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return "unknown"


def cpu_ms(fn, n: int) -> float:
    """Median CPU time (all threads of this process) of ``n`` calls, in ms: on a loaded machine, what the call
    itself costs, without the time it waited for a core."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[n // 2] * 1e3


def copy_bandwidth(repeats: int):
    """GB/s of a large tensor copy, counting bytes read plus bytes written: per second of wall time, and per
    second of CPU time (all threads)."""
    src = torch.randn(256 * 1024 * 1024 // 4 * 4)  # 1 GiB float32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats)
    cpu = cpu_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9, 2 * src.numel() * 4 / (cpu * 1e-3) / 1e9


def _paged(k, v, lengths, block_size=16, seed=0):
    """Scatter per-sequence caches (B, Hkv, S, D) into a shuffled pool; only each sequence's blocks."""
    B, Hkv, S, D = k.shape
    nblk = [-(-int(n) // block_size) for n in lengths]
    total = sum(nblk)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    pk = torch.empty(total, Hkv, block_size, D, dtype=k.dtype)
    pv = torch.empty(total, Hkv, block_size, v.shape[3], dtype=v.dtype)
    table = torch.zeros(B, max(nblk), dtype=torch.int32)
    at = 0
    for b in range(B):
        for j in range(nblk[b]):
            dst = perm[at]
            at += 1
            table[b, j] = dst
            n = min(block_size, S - j * block_size)
            pk[dst, :, :n] = k[b, :, j * block_size: j * block_size + n]
            pv[dst, :, :n] = v[b, :, j * block_size: j * block_size + n]
    return pk, pv, table


def single(dtype, bw, bw_cpu, repeats, S=32768, H=32, Hkv=8, D=128):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, S, D, generator=g).to(dtype)
    lo, hi = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), S)
    scale = D ** -0.5
    ms = median_ms(lambda: decode.forward(q, k, v, lo=lo, hi=hi, scale=scale), repeats)
    cpu = cpu_ms(lambda: decode.forward(q, k, v, lo=lo, hi=hi, scale=scale), repeats)
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), max(3, repeats // 2))
    sdpa_cpu = cpu_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), max(3, repeats // 2))
    read = median_ms(lambda: (k.sum(), v.sum()), repeats)  # torch reading the same bytes once, for scale
    nbytes = 2 * k.numel() * k.element_size()
    gbs = nbytes / (ms * 1e-3) / 1e9
    w = 4096
    lo_w = torch.full((1, 1), S - w)
    ms_w = median_ms(lambda: decode.forward(q, k, v, lo=lo_w, hi=hi, scale=scale), repeats)
    return {"case": f"B=1 H={H} Hkv={Hkv} D={D} S={S} L=1", "dtype": str(dtype).replace("torch.", ""),
            "ms": round(ms, 3), "cpu_ms_all_threads": round(cpu, 3), "sdpa_ms": round(sdpa, 3), "speedup_vs_sdpa": round(sdpa / ms, 2),
            "kv_bytes": nbytes, "gb_per_s": round(gbs, 2), "fraction_of_copy_bw": round(gbs / bw, 3),
            "torch_sum_of_k_and_v_ms": round(read, 3), "ms_over_torch_sum_ms": round(ms / read, 3),
            "sdpa_cpu_ms_all_threads": round(sdpa_cpu, 3), "cpu_speedup_vs_sdpa": round(sdpa_cpu / cpu, 2),
            "cpu_fraction_of_copy_bw": round(nbytes / (cpu * 1e-3) / 1e9 / bw_cpu, 3),
            "window4096_ms": round(ms_w, 3), "window_ms_over_full_ms": round(ms_w / ms, 3)}


def batched(dtype, bw, bw_cpu, repeats, paged: bool, B=8, H=32, Hkv=8, D=128):
    g = torch.Generator().manual_seed(1)
    lengths = torch.linspace(1024, 32768, B).round().long()
    S = int(lengths.max())
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    bt = None
    if paged:
        k, v, bt = _paged(k, v, lengths)
    lo, hi = torch.zeros(B, 1, dtype=torch.long), lengths.view(B, 1)
    ms = median_ms(lambda: decode.forward(q, k, v, lo=lo, hi=hi, scale=D ** -0.5, block_table=bt), repeats)
    cpu = cpu_ms(lambda: decode.forward(q, k, v, lo=lo, hi=hi, scale=D ** -0.5, block_table=bt), repeats)
    nbytes = int(lengths.sum()) * Hkv * D * 2 * k.element_size()
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"case": f"B={B} H={H} Hkv={Hkv} D={D} lengths {int(lengths.min())}..{S} L=1 "
                    f"{'paged (block 16)' if paged else 'contiguous'}",
            "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 3), "cpu_ms_all_threads": round(cpu, 3),
            "kv_bytes_read": nbytes,
            "gb_per_s": round(gbs, 2), "fraction_of_copy_bw": round(gbs / bw, 3),
            "cpu_fraction_of_copy_bw": round(nbytes / (cpu * 1e-3) / 1e9 / bw_cpu, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="float32 single-sequence row only")
    args = ap.parse_args(argv)
    print(f"decode kernel: {decode.status()}; CPU: {cpu_info()}")
    load_before = uptime()
    bw, bw_cpu = copy_bandwidth(args.repeats)
    print(f"copy bandwidth (read + write): {bw:.1f} GB/s of wall time, {bw_cpu:.1f} GB/s of CPU time")
    rows = [single(torch.float32, bw, bw_cpu, args.repeats)]
    if not args.quick:
        rows.append(single(torch.bfloat16, bw, bw_cpu, args.repeats))
        for dt in (torch.float32, torch.bfloat16):
            rows += [batched(dt, bw, bw_cpu, args.repeats, False), batched(dt, bw, bw_cpu, args.repeats, True)]
    bw_after, bw_cpu_after = copy_bandwidth(args.repeats)
    for r in rows:
        print(json.dumps(r))
    res = {"cpu": cpu_info(), "kernel_status": decode.status(), "torch": torch.__version__,
           "copy_bw_gb_per_s": round(bw, 2), "copy_bw_after_gb_per_s": round(bw_after, 2),
           "copy_bw_gb_per_cpu_s": round(bw_cpu, 2), "copy_bw_after_gb_per_cpu_s": round(bw_cpu_after, 2),
           "cpu_columns": "cpu_* figures divide by CPU time (all threads) instead of wall time: on a machine shared "
                          "with other work they show what the calls cost without the time spent waiting for a core; "
                          "the targets are stated for wall time on a quiet machine",
           "uptime_before": load_before, "uptime_after": uptime(), "repeats": args.repeats, "rows": rows,
           "command": "benchmarks/decode_kernel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "targets": {"float32": ">= 0.60 of copy bw and >= 4x SDPA", "bfloat16": ">= 0.50 of copy bw and >= 15x SDPA",
                       "batched": ">= 0.50 of copy bw on the bytes read"}}
    print(f"copy bandwidth after: {bw_after:.1f} GB/s; load: {res['uptime_after']}")
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {OUT}")
    return res


if __name__ == "__main__":
    main()
