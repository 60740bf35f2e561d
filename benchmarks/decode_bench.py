"""Decoding attention at the memory limit: salience.attention_with_kvcache against copy bandwidth and torch SDPA.

    .venv/bin/python benchmarks/decode_bench.py                 # the full set; writes benchmarks/results/decode.json
    .venv/bin/python benchmarks/decode_bench.py --small --json /tmp/d.json   # tiny sizes: checks the script runs

Every figure is a median over repeats in this one process, beside the copy bandwidth measured in the same run (a
large tensor copy; bytes read plus bytes written per second): once at the start (the headline figure) and again
for each row, the copy taking turns with that row's calls, because the bandwidth the machine gives drifts with
other work on the host. Each attention row gives the bytes of K and V it must read (the visible keys only), those
bytes per second, their ratio to the copy bandwidth measured alongside it, and the ratio of
torch SDPA's time to salience's (``F.scaled_dot_product_attention(..., enable_gqa=True)``; with per-sequence
lengths or a window SDPA gets a boolean mask and reads the whole cache). Rows:

* B=1, H=32, Hkv=8, D=128, S=32768, one query, float32 and bfloat16 (contiguous cache, bottom-right causal);
* B=8 sequences of 1k..32k keys in one call, contiguous (capacity 32k) and paged (block 16, shuffled pool);
* a sliding window of 4096 keys on a 32k cache (time follows the window, not S);
* B=1, S=32768 in flash-attention's (B, S, Hkv, D) cache order through ``compat.flash_attn_with_kvcache``;
* B=1, S=32768 with L=4 queries (speculative decoding: 16 query rows per kv head);
* ``generate()`` of a tiny random Llama-style model (transformers ``LlamaConfig``, random weights, no download)
  with an 8k-token prompt: decoding tokens per second, ``attn_implementation="salience"`` against ``"sdpa"``.

The CPU model, its vector flags, the thread count and ``uptime`` (the machine is shared) are printed and stored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _llama import timed_generate, tiny_llamas  # noqa: E402
from _timing import interleaved, median_ms  # noqa: E402

import salience  # noqa: E402
from salience import _memory, kvcache, masks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "decode.json")
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def machine() -> dict:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "unknown", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in FLAGS if x in have]
                    break
    except OSError:
        pass
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu_model": model, "cpu_flags": flags, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "uptime": up, "loadavg": list(os.getloadavg()),
            "decode_kernel": _decode_status()}


def _decode_status() -> str:
    from salience.kernels import decode

    return decode.status()


class Copier:
    """``dst.copy_(src)`` of a ``mib`` MiB float32 tensor: the bandwidth reference, read + written bytes."""

    def __init__(self, mib: int):
        n = mib * 2**20 // 4
        self.mib, self.bytes = mib, 2 * n * 4
        self.src, self.dst = torch.randn(n), torch.empty(n)

    def __call__(self):
        self.dst.copy_(self.src)

    def gb_per_s(self, ms: float) -> float:
        return self.bytes / (ms / 1e3) / 1e9


def copy_bandwidth(copier: Copier, repeats: int) -> dict:
    """Bytes read + written per second by the copy, median of ``repeats`` (the run's headline figure)."""
    ms = median_ms(copier, repeats)
    return {"mib": copier.mib, "median_ms": ms, "gb_per_s": copier.gb_per_s(ms)}


def timed_with_copy(fn, copier: Copier, repeats: int) -> tuple:
    """``(median ms of fn, copy GB/s)``: fn and the copy take turns ``repeats`` times (:func:`interleaved`), so
    the bandwidth a row is compared with is the one the machine gave while that row ran (it drifts with other
    work on the host, which ``uptime`` does not show)."""
    t = interleaved({"fn": fn, "copy": copier}, repeats)
    return t["fn"], copier.gb_per_s(t["copy"])


def _row(name, cfg, kv_bytes, copy_gbs, times, plan_path, extra=None) -> dict:
    """One table row; ``copy_gbs`` the copy bandwidth measured alongside this row (:func:`timed_with_copy`)."""
    s = times["salience"]
    row = {"name": name, "config": cfg, "kv_bytes_read": kv_bytes, "median_ms": times,
           "gb_per_s": kv_bytes / (s / 1e3) / 1e9, "plan": plan_path, "copy_gb_per_s": copy_gbs}
    row["ratio_to_copy"] = row["gb_per_s"] / copy_gbs
    if "sdpa" in times:
        row["speedup_vs_sdpa"] = times["sdpa"] / s
    if "salience.attention" in times:
        row["speedup_attention_vs_sdpa"] = times["sdpa"] / times["salience.attention"]
    row.update(extra or {})
    print(f"{name:44s} salience {s:8.2f} ms  {row['gb_per_s']:6.1f} GB/s  {row['ratio_to_copy']:5.2f}x copy "
          f"({copy_gbs:.1f} GB/s)  "
          + "  ".join(f"{k} {v:8.2f} ms" for k, v in times.items() if k != "salience")
          + (f"  SDPA/salience {row['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in row else "")
          + f"  [{plan_path}]", flush=True)
    return row


def _cache(shape, dtype, huge: bool) -> torch.Tensor:
    """Random cache contents in ordinary memory (torch.randn) or in huge pages (salience._memory.zeros, filled)."""
    if not huge:
        return torch.randn(*shape, dtype=dtype)
    t = _memory.zeros(*shape, dtype=dtype)
    t.copy_(torch.randn(*shape, dtype=dtype))
    return t


def single(dtype, S, H, Hkv, D, copier, repeats, window=None, huge=False, L=1) -> dict:
    """B=1, L queries (one; more for speculative decoding) against S cached keys (a window of ``window`` keys when
    given); ``huge``: the cache in transparent huge pages (salience._memory.zeros)."""
    q = torch.randn(1, H, L, D, dtype=dtype)
    kc, vc = _cache((1, Hkv, S, D), dtype, huge), _cache((1, Hkv, S, D), dtype, huge)
    mask = (masks.causal(align="bottom_right") if window is None
            else masks.sliding_window(window - 1, align="bottom_right"))
    with torch.no_grad():
        pl = kvcache.plan(q, kc, vc, cache_seqlens=S, mask=mask)
        ms, copy_gbs = timed_with_copy(lambda: salience.attention_with_kvcache(q, kc, vc, cache_seqlens=S, mask=mask),
                                       copier, repeats)
        times = {"salience": ms}
        ap = salience.plan(q, kc, vc, mask=mask)
        times["salience.attention"] = median_ms(lambda: salience.attention(q, kc, vc, mask=mask), repeats)
        if window is None and L == 1:
            times["sdpa"] = median_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), repeats)
        else:
            vis = mask.to_dense(1, 1, L, S)
            times["sdpa"] = median_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=vis,
                                                                             enable_gqa=True), repeats)
    keys = S if window is None else min(window, S)
    kv_bytes = Hkv * keys * 2 * D * kc.element_size()
    name = f"B=1 S={S} {'window ' + str(window) if window else 'causal'} {str(dtype)[6:]}" + (
        ", huge pages" if huge else "") + (f", L={L} queries (speculative)" if L > 1 else "")
    cfg = {"B": 1, "H": H, "Hkv": Hkv, "D": D, "S": S, "L": L, "dtype": str(dtype)[6:], "window": window,
           "huge_pages": huge}
    return _row(name, cfg, kv_bytes, copy_gbs, times, pl.path, {"attention_backend": ap.backend})


def flash_layout(dtype, S, H, Hkv, D, copier, repeats) -> dict:
    """B=1, one query against S keys in flash-attention's (B, S, Hkv, D) cache order, through
    ``salience.compat.flash_attn_with_kvcache(..., causal=True)`` (the kernel reads all kv heads of an item side
    by side there)."""
    from salience import compat

    q = torch.randn(1, 1, H, D, dtype=dtype)
    kc, vc = torch.randn(1, S, Hkv, D, dtype=dtype), torch.randn(1, S, Hkv, D, dtype=dtype)
    with torch.no_grad():
        pl = compat.plan(compat.flash_attn_with_kvcache, q, kc, vc, cache_seqlens=S, causal=True)
        ms, copy_gbs = timed_with_copy(lambda: compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=S, causal=True),
                                       copier, repeats)
    kv_bytes = Hkv * S * 2 * D * kc.element_size()
    cfg = {"B": 1, "H": H, "Hkv": Hkv, "D": D, "S": S, "L": 1, "dtype": str(dtype)[6:], "layout": "(B, S, Hkv, D)"}
    return _row(f"B=1 S={S} causal {str(dtype)[6:]}, flash_attn_with_kvcache (B, S, Hkv, D)", cfg, kv_bytes,
                copy_gbs, {"salience": ms}, pl.path)


def batched(dtype, lengths, H, Hkv, D, copier, repeats, paged: bool, block_size: int = 16, huge=False) -> dict:
    """B sequences of the given cache lengths in one call, one query each (``huge``: caches in huge pages)."""
    B, cap = len(lengths), max(lengths)
    q = torch.randn(B, H, 1, D, dtype=dtype)
    lens = torch.tensor(lengths)
    mask = masks.causal(align="bottom_right")
    bt = None
    if paged:
        nb = [-(-n // block_size) for n in lengths]
        pool = sum(nb)
        perm = torch.randperm(pool)
        mb = max(nb)
        bt = torch.zeros(B, mb, dtype=torch.int32)
        at = 0
        for b, n in enumerate(nb):
            bt[b, :n] = perm[at : at + n].to(torch.int32)
            at += n
        kc, vc = (_cache((pool, Hkv, block_size, D), dtype, huge) for _ in range(2))
    else:
        kc, vc = (_cache((B, Hkv, cap, D), dtype, huge) for _ in range(2))
    with torch.no_grad():
        pl = kvcache.plan(q, kc, vc, cache_seqlens=lens, block_table=bt, mask=mask)
        ms, copy_gbs = timed_with_copy(lambda: salience.attention_with_kvcache(
            q, kc, vc, cache_seqlens=lens, block_table=bt, mask=mask), copier, repeats)
        times = {"salience": ms}
        if not paged:  # SDPA on the same contiguous cache, lengths as a boolean key mask (it reads every slot)
            vis = (torch.arange(cap).view(1, 1, 1, -1) < lens.view(-1, 1, 1, 1))
            times["sdpa"] = median_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=vis,
                                                                             enable_gqa=True), repeats)
    kv_bytes = Hkv * int(lens.sum()) * 2 * D * kc.element_size()
    name = (f"B={B} lengths {min(lengths) // 1024}k..{cap // 1024}k {'paged' if paged else 'contiguous'} "
            f"{str(dtype)[6:]}" + (", huge pages" if huge else ""))
    cfg = {"B": B, "H": H, "Hkv": Hkv, "D": D, "lengths": lengths, "L": 1, "dtype": str(dtype)[6:], "paged": paged,
           "block_size": block_size if paged else None, "huge_pages": huge}
    return _row(name, cfg, kv_bytes, copy_gbs, times, pl.path)


def generate_row(prompt: int, new_tokens: int, repeats: int) -> dict:
    """Decoding tokens/s of a tiny random Llama-style model after a ``prompt``-token prompt, salience vs sdpa.

    One ``generate()`` call per repeat; a logits processor stamps the time at every step, so the decoding steps
    (after the prefill) are timed inside generate() itself: tokens/s = 1 / median step time. The prefill is the time
    to the first step."""
    models, ids = tiny_llamas(prompt)
    out, tokens = {}, {}
    for impl, model in models.items():
        steps, prefill = [], []
        for _ in range(repeats):
            tokens[impl], first, between = timed_generate(model, ids, new_tokens)
            prefill.append(first)
            steps += between
        steps.sort()
        med = steps[len(steps) // 2]
        out[impl] = {"prefill_ms": sorted(prefill)[len(prefill) // 2] * 1e3, "decode_ms_per_token": med * 1e3,
                     "tokens_per_s": 1.0 / med, "steps_timed": len(steps)}
    same = tokens["salience"] == tokens["sdpa"]
    row = {"name": f"generate() tiny Llama, {prompt}-token prompt", "config": {
        "prompt": prompt, "new_tokens": new_tokens, "layers": 2, "hidden": 256, "heads": 8, "kv_heads": 2,
        "head_dim": 32, "cache": "DynamicCache (transformers' default)"}, "impls": out, "same_tokens": same,
        "speedup_vs_sdpa": out["salience"]["tokens_per_s"] / out["sdpa"]["tokens_per_s"]}
    print(f"{row['name']:44s} salience {out['salience']['tokens_per_s']:7.1f} tok/s  sdpa "
          f"{out['sdpa']['tokens_per_s']:7.1f} tok/s  ({row['speedup_vs_sdpa']:.2f}x, same tokens: {same}); "
          f"prefill {out['salience']['prefill_ms']:.0f} / {out['sdpa']['prefill_ms']:.0f} ms", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (checks that the script runs; not figures)")
    ap.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-generate", action="store_true", help="skip the end-to-end generate() row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    small = args.small
    reps = args.repeats or (3 if small else 11)
    S = 512 if small else 32768
    H, Hkv, D = (8, 2, 32) if small else (32, 8, 128)
    lengths = ([64, 128, 200, 256, 300, 400, 480, 512] if small
               else [1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768])
    info = machine()
    print(f"CPU {info['cpu_model']} ({info['cpu_count']} cores; flags {' '.join(info['cpu_flags'])}); torch "
          f"{info['torch']}, {info['torch_threads']} threads; decode kernel: {info['decode_kernel']}")
    print(f"machine load (shared with other work): {info['uptime']}")
    copier = Copier(64 if small else 1024)
    copy = copy_bandwidth(copier, reps)
    print(f"copy bandwidth: {copy['gb_per_s']:.1f} GB/s (read + write, {copy['mib']} MiB float32 copy, median "
          f"{copy['median_ms']:.1f} ms)")
    with torch.no_grad():  # warm-up: the compiled kernel's first calls (build check, threads) are not timed
        wq, wk = torch.randn(1, H, 1, D), torch.randn(1, Hkv, 4096, D)
        for _ in range(20):
            salience.attention_with_kvcache(wq, wk, wk, cache_seqlens=4096)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows.append(single(dtype, S, H, Hkv, D, copier, reps))
    for dtype in (torch.bfloat16, torch.float32):
        for paged in (False, True):
            rows.append(batched(dtype, lengths, H, Hkv, D, copier, reps, paged))
    for dtype in (torch.bfloat16, torch.float32):
        rows.append(single(dtype, S, H, Hkv, D, copier, reps, window=64 if small else 4096))
    for dtype in (torch.bfloat16, torch.float32):
        rows.append(flash_layout(dtype, S, H, Hkv, D, copier, reps))
    for dtype in (torch.bfloat16, torch.float32):  # speculative decoding: 16 rows per kv head, compute-bound here
        rows.append(single(dtype, S, H, Hkv, D, copier, reps, L=4))
    # the same caches in transparent huge pages (salience._memory.zeros), where Linux offers them
    if _memory.huge_pages_offered():
        for dtype in (torch.bfloat16, torch.float32):
            rows.append(single(dtype, S, H, Hkv, D, copier, reps, huge=True))
        for paged in (False, True):
            rows.append(batched(torch.bfloat16, lengths, H, Hkv, D, copier, reps, paged, huge=True))
    if not args.no_generate:
        rows.append(generate_row(256 if small else 8192, 8 if small else 32, 1 if small else 2))
    info["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine load after: {info['uptime_after']}")
    cmd = "python benchmarks/decode_bench.py" + (" --small" if small else "") + (
        f" --threads {args.threads}" if args.threads else "")
    data = {"command": cmd, "machine": info,
            "copy_bandwidth": copy, "repeats": reps, "results": rows, "small": small}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"took {time.time() - t0:.0f} s")
    sys.exit(rc)
