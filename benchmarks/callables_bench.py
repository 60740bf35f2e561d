"""Mask callables at the speed of their structure (issue 15): derived once, cached, run on the span kernels or the
block-map executor, against the named mask, torch SDPA with a dense bool mask and compiled FlexAttention.

Cases (B=1, H=8, D=64, fp32, forward, medians over repeats after the first call, methods interleaved per repeat so
that a busy machine slows them alike):

* ``window``: ``lambda b, h, q, kv: (q >= kv) & (q - kv <= 256)`` vs ``masks.causal() & masks.sliding_window(256)``;
* ``checkerboard``: ``((q // 64 + kv // 64) % 2 == 0) & (q >= kv)`` (no interval structure).

"salience derived" = ``kernels.derive.executor(fn, q, k, v, scale=...)`` then ``forward``: the per-call cost
includes the cache lookup and the executor set-up. The first call (derivation) is reported separately, as is
FlexAttention's ``create_block_mask`` and compile time. Training memory: forward+backward through the autograd
function in a fresh process per N, peak RSS growth (VmHWM after resetting it via /proc/self/clear_refs) at two N.

Writes benchmarks/results/callables.json. Run:
    .venv/bin/python benchmarks/callables_bench.py [--n 8192] [--repeats 3] [--threads 1] [--no-flex]
        [--memory 2048,4096,8192]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import salience
from salience import masks
from salience.kernels import derive

OUT = Path(__file__).parent / "results" / "callables.json"


def window(b, h, q, kv):
    return (q >= kv) & (q - kv <= 256)


def checkerboard(b, h, q, kv):
    return ((q // 64 + kv // 64) % 2 == 0) & (q >= kv)


def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma") if f in have)
                break
    except OSError:
        pass
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "uptime": up}


def _derived(fn, q, k, v, scale):
    ex, _ = derive.executor(fn, q, k, v, scale=scale)
    return ex.forward(q, k, v)


def methods(case, fn, q, k, v, flex, dense_sdpa):
    """name -> zero-arg callable for one case."""
    N, D = q.shape[2], q.shape[3]
    scale = 1 / math.sqrt(D)
    out = {"salience derived": lambda: _derived(fn, q, k, v, scale)}
    if case == "window":
        named = masks.causal() & masks.sliding_window(256)
        out["salience named"] = lambda: salience.attention(q, k, v, mask=named)
    if dense_sdpa:
        dense = masks.as_mask_mod(fn).to_dense(1, 1, N, N)
        out["torch SDPA dense bool mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if flex is not None:
        out["FlexAttention compiled"] = flex
    return out


def make_flex(fn, q, k, v, info):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = q.shape[2]
    t0 = time.perf_counter()
    bm = create_block_mask(fn, None, None, N, N, device="cpu")
    info["create_block_mask_s"] = round(time.perf_counter() - t0, 3)
    compiled = torch.compile(flex_attention)
    t0 = time.perf_counter()
    compiled(q, k, v, block_mask=bm)
    info["compile_and_first_call_s"] = round(time.perf_counter() - t0, 2)
    return lambda: compiled(q, k, v, block_mask=bm)


def run_case(case, fn, N, repeats, use_flex, dense_sdpa):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    info = {}
    derive.clear_cache()
    t0 = time.perf_counter()
    with torch.no_grad():
        _derived(fn, q, k, v, 1 / 8)
    info["salience_first_call_s"] = round(time.perf_counter() - t0, 3)
    info["structure"] = derive.executor(fn, q, k, v, scale=0.125)[1]
    flex = None
    if use_flex:
        try:
            flex = make_flex(fn, q, k, v, info)
        except Exception as e:  # noqa: BLE001 - reported, the other figures stand
            info["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    ms = methods(case, fn, q, k, v, flex, dense_sdpa)
    times = {name: [] for name in ms}
    with torch.no_grad():
        for f in ms.values():  # warm-up
            f()
        for _ in range(repeats):
            for name, f in ms.items():
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: round(sorted(t)[len(t) // 2], 1) for name, t in times.items()}
    return {"N": N, "median_ms": med, "all_ms": {n: [round(x, 1) for x in t] for n, t in times.items()}, **info}


# ---------------------------------------------------------------------------------------------- memory


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def memory_child(case: str, N: int) -> None:
    """Peak RSS growth (MB) of one forward+backward with a derived mask, printed as JSON (run in a fresh process)."""
    try:
        from salience.kernels.executors import AttentionFunction
    except ImportError:  # before the dispatcher split
        from salience.kernels.dispatch import AttentionFunction
    fn = {"window": window, "checkerboard": checkerboard}[case]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, N, 64, requires_grad=True) for _ in range(3))

    def step():
        ex, _ = derive.executor(fn, q, k, v, scale=0.125, need_grad=True)
        out, lse = AttentionFunction.apply(ex, q, k, v)
        out.sum().backward()

    derive.structure(fn, 1, 8, N, N)  # the one-off derivation (bounded by EVAL_ELEMENTS) is not training memory
    try:  # hand freed heap memory back, so that the peak below is this step's own
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_kb("VmRSS")
    step()
    peak = _rss_kb("VmHWM")
    print(json.dumps({"case": case, "N": N, "peak_growth_mb": round((peak - base) / 1024, 1),
                      "dense_scores_mb": round(8 * N * N * 4 / 2**20, 1)}))


def memory(ns):
    rows = []
    for case in ("window", "checkerboard"):
        for N in ns:
            r = subprocess.run([sys.executable, __file__, "--memory-child", case, str(N)], capture_output=True,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
            if r.returncode != 0:
                rows.append({"case": case, "N": N, "error": r.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


# ---------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="skip torch SDPA with a dense bool mask")
    ap.add_argument("--memory", default="2048,4096,8192", help="N values for the training-memory check ('' = skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        memory_child(a.memory_child[0], int(a.memory_child[1]))  # threads come from OMP_NUM_THREADS
        return
    env = cpu_info()
    print(f"CPU: {env['cpu']}  flags: {' '.join(env['flags'])}  threads: {env['threads']}  torch {env['torch']}")
    print(f"load: {env['uptime']}  (a shared machine: other engineers' jobs run beside these figures)")
    res = {"env": env, "config": {"B": 1, "H": 8, "D": 64, "dtype": "float32", "N": a.n, "repeats": a.repeats},
           "cases": {}}
    for case, fn in (("window", window), ("checkerboard", checkerboard)):
        r = run_case(case, fn, a.n, a.repeats, not a.no_flex, not a.no_dense)
        res["cases"][case] = r
        med = r["median_ms"]
        ours = med["salience derived"]
        print(f"\n{case} N={a.n}: first call (derivation) {r['salience_first_call_s']} s; structure "
              f"{r['structure']['structure']} -> {r['structure']['executor']}")
        for name, ms in med.items():
            ratio = "" if name == "salience derived" else f"  ({ms / ours:.2f}x the derived callable's time)"
            print(f"  {name:32s} {ms:9.1f} ms{ratio}")
        if "compile_and_first_call_s" in r:
            print(f"  FlexAttention: create_block_mask {r['create_block_mask_s']} s, compile + first call "
                  f"{r['compile_and_first_call_s']} s")
    ns = [int(x) for x in a.memory.split(",") if x.strip()]
    if ns:
        res["training_memory"] = memory(ns)
        print("\ntraining (forward+backward) peak RSS growth, fresh process per N:")
        for row in res["training_memory"]:
            print(f"  {row}")
    res["env"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {OUT}; load at the end: {res['env']['uptime_end']}")


if __name__ == "__main__":
    main()
