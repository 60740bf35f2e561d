"""Per-call overhead of the decode path: how much of a small decoding call is Python around the C kernel.

    .venv/bin/python benchmarks/decode_overhead.py --label after   # writes benchmarks/results/decode_overhead.json
    .venv/bin/python benchmarks/decode_overhead.py --small --json /tmp/o.json   # quick: checks the script runs

Per-call microseconds (median over repeats of the mean over ``calls`` back-to-back calls, one process) of

* ``kernel``: the compiled decode kernel alone, called through its ctypes function with arguments prepared once;
* ``decode.forward``: :func:`salience.kernels.decode.forward` (argument checks, operands, the kernel);
* ``attention_with_kvcache``: append one token in place and attend (the decode route, bottom-right causal);
* ``salience.attention``: the dispatcher's ``decode`` rule (bottom-right causal, no gradient);
* ``sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` on the same cache;
* ``attention_with_kvcache compiled``: the same step under ``torch.compile(fullgraph=True)`` (inductor), which
  runs the custom ops ``salience::kvcache_append`` and ``salience::decode_forward``;

on B=1, H=8, Hkv=2, D=64, L=1 with S=256, 1024 and 4096 keys (float32; at 256 ``salience.attention`` takes
torch's fused kernel, below the decode rule's ``decode_min_keys``), with ``torch._dynamo`` imported first, as in
every process that imports transformers (a ``torch.compiler.disable`` wrapper around the dispatcher used to cost
~140 us per call once it was loaded), and the tokens per second of ``generate()``
of a tiny random Llama-style model (transformers, random weights, no download) with salience's attention
against transformers' ``"sdpa"`` (same tokens checked). ``--label`` names the run; runs with different labels
are kept side by side in the JSON (``before``/``after`` a change). The CPU model, flags and ``uptime`` (the
machine is shared with other engineers' jobs) are stored and printed beside the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _llama import timed_generate, tiny_llamas  # noqa: E402
from _timing import machine  # noqa: E402

import salience  # noqa: E402
from salience import masks  # noqa: E402
from salience.kernels import decode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "decode_overhead.json")


def per_call_us(fns: dict, calls: int, repeats: int) -> tuple:
    """For each function: the median and the minimum over ``repeats`` of the mean time of ``calls`` back-to-back
    calls, in microseconds. The functions take turns inside each repeat, so a change of machine load hits them
    alike; on a loaded machine the minimum is the steadier figure for Python-bound calls (load only adds time)."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return ({name: sorted(t)[repeats // 2] * 1e6 for name, t in times.items()},
            {name: min(t) * 1e6 for name, t in times.items()})


def _kernel_alone(q, k, v, S: int):
    """The ctypes call with every operand and the argument struct prepared once (what no wrapper can beat)."""
    lib = decode._lib()
    B, H, L, D = q.shape
    out, lse = torch.empty(B, H, L, D), torch.empty(B, H, L)
    lo, hi = torch.zeros(B, L, dtype=torch.long), torch.full((B, L), S, dtype=torch.long)
    a = decode._Args(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), k_s0=k.stride(0), k_s1=k.stride(1),
                     k_s2=k.stride(2), v_s0=v.stride(0), v_s1=v.stride(1), v_s2=v.stride(2), lo=lo.data_ptr(),
                     hi=hi.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(), B=B, H=H, Hkv=k.shape[1], L=L, D=D,
                     Dv=D, scale=D ** -0.5, softcap=0.0, nthreads=max(1, torch.get_num_threads()), dtype=0,
                     min_split=256, capacity=k.shape[2], num_blocks=k.shape[0])
    ref = ctypes.byref(a)
    keep = (out, lse, lo, hi)

    def call():
        lib.salience_decode_forward(ref)
        return keep

    return call


def _step(S: int):
    """One decoding step's operands (B=1, H=8, Hkv=2, D=64, one query, S cached keys, float32): q, the caches,
    the new key and value, cache_seqlens, the rows' intervals [lo, hi) and the bottom-right causal mask."""
    B, H, Hkv, D, L = 1, 8, 2, 64, 1
    torch.manual_seed(0)
    q = torch.randn(B, H, L, D)
    kc, vc = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kn, vn = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    lens = torch.full((B,), S - 1, dtype=torch.long)
    lo, hi = torch.zeros(B, L, dtype=torch.long), torch.full((B, L), S, dtype=torch.long)
    return q, kc, vc, kn, vn, lens, lo, hi, masks.causal(align="bottom_right")


def calls_row(S: int, calls: int, repeats: int, compiled: bool = False) -> dict:
    q, kc, vc, kn, vn, lens, lo, hi, causal = _step(S)
    (B, H, L, D), Hkv = q.shape, kc.shape[1]
    scale = D ** -0.5
    route = salience.plan(q, kc, vc, mask=causal).backend
    fns = {
        "kernel": _kernel_alone(q, kc, vc, S),
        "decode.forward": lambda: decode.forward(q, kc, vc, lo=lo, hi=hi, scale=scale),
        "attention_with_kvcache": lambda: salience.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens,
                                                                          mask=causal),
        "salience.attention": lambda: salience.attention(q, kc, vc, mask=causal),
        "sdpa": lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True),
    }
    if compiled:
        step = torch.compile(lambda q_, k_, v_, kn_, vn_, n_: salience.attention_with_kvcache(
            q_, k_, v_, kn_, vn_, cache_seqlens=n_, mask=causal), fullgraph=True)
        fns["attention_with_kvcache compiled"] = lambda: step(q, kc, vc, kn, vn, lens)
    with torch.no_grad():
        us, us_min = per_call_us(fns, calls, repeats)
    row = {"name": f"B={B} H={H} Hkv={Hkv} D={D} L={L} S={S} float32", "S": S, "us_per_call": us,
           "us_per_call_min": us_min, "salience_attention_route": route,
           "python_us": {n: us[n] - us["kernel"] for n in us if n not in ("kernel", "sdpa")},
           "ratio_to_kernel": {n: us[n] / us["kernel"] for n in us}}
    print(f"S={S:5d}  " + "  ".join(f"{n} {t:7.1f} us" for n, t in us.items()) + f"  (salience.attention: {route})",
          flush=True)
    return row


class _NoKernel:
    """Stands in for the compiled library: the check passes and the kernel returns at once, so a wrapper's time is
    its Python alone (what it adds to every call, whatever the kernel costs)."""

    def salience_decode_check(self, args):
        return 0

    def salience_decode_forward(self, args):
        return None

    def salience_decode_max_rows(self):
        return 64


def python_only_row(S: int, calls: int, repeats: int) -> dict:
    """Per-call microseconds of the wrappers with the kernel replaced by :class:`_NoKernel`."""
    q, kc, vc, kn, vn, lens, lo, hi, causal = _step(S)
    (B, H, L, D), Hkv = q.shape, kc.shape[1]
    fns = {
        "decode.forward": lambda: decode.forward(q, kc, vc, lo=lo, hi=hi, scale=D ** -0.5),
        "attention_with_kvcache": lambda: salience.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens,
                                                                          mask=causal),
        "salience.attention": lambda: salience.attention(q, kc, vc, mask=causal),
    }
    decode.status()
    saved = dict(decode._STATE)
    decode._STATE["lib"] = _NoKernel()
    try:
        with torch.no_grad():
            us, us_min = per_call_us(fns, calls, repeats)
    finally:
        decode._STATE.clear()
        decode._STATE.update(saved)
    print(f"S={S:5d}  Python only (no-op kernel), median / min: " + "  ".join(
        f"{n} {t:6.1f} / {us_min[n]:6.1f} us" for n, t in us.items()), flush=True)
    return {"name": f"Python only, B={B} H={H} Hkv={Hkv} D={D} L={L} S={S}", "S": S, "us_per_call": us,
            "us_per_call_min": us_min}


def generate_row(prompt: int, new_tokens: int, repeats: int) -> dict:
    """Decoding tokens/s of a tiny random Llama (2 layers, hidden 256, 8 heads, 2 kv heads) after a ``prompt``-token
    prompt: the median step time inside generate() (a logits processor stamps every step)."""
    models, ids = tiny_llamas(prompt, room=512)
    steps, tokens = {impl: [] for impl in models}, {}
    for _ in range(repeats):  # the two take turns, so a change of machine load hits both
        for impl, model in models.items():
            tokens[impl], _, between = timed_generate(model, ids, new_tokens)
            steps[impl] += between
    out = {}
    for impl, ts in steps.items():
        med = sorted(ts)[len(ts) // 2]
        out[impl] = {"ms_per_token": med * 1e3, "tokens_per_s": 1.0 / med, "steps_timed": len(ts)}
    row = {"name": f"generate() tiny Llama, {prompt}-token prompt, {new_tokens} new tokens", "prompt": prompt,
           "new_tokens": new_tokens, "impls": out, "same_tokens": tokens["salience"] == tokens["sdpa"],
           "salience_over_sdpa": out["salience"]["tokens_per_s"] / out["sdpa"]["tokens_per_s"]}
    print(f"{row['name']}: salience {out['salience']['tokens_per_s']:.1f} tok/s, sdpa "
          f"{out['sdpa']['tokens_per_s']:.1f} tok/s ({row['salience_over_sdpa']:.2f}x, same tokens: "
          f"{row['same_tokens']})", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="after", help="name of this run in the JSON (e.g. before / after)")
    ap.add_argument("--small", action="store_true", help="few calls (checks that the script runs; not figures)")
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd attention_with_kvcache row "
                    "(the code before the decode custom ops graph-breaks there)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine two "
                    "threads stall for a scheduler time slice whenever another job holds a core, which hides the "
                    "per-call figures)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls, reps = (20, 3) if args.small else (300, 15)
    info = machine()
    print(f"CPU {info['cpu']} (flags {info['flags']}); torch {info['torch']}, {info['threads']} threads; decode "
          f"kernel: {decode.status()}\nmachine load (shared with other engineers' jobs): {info['uptime']}")
    importlib.import_module("torch._dynamo")  # loaded as in every process that imports transformers (docstring)
    rows = [calls_row(S, calls, reps, compiled=not args.no_compile and S != 256) for S in (256, 1024, 4096)]
    python_only = [python_only_row(S, calls, reps) for S in (256, 1024)]
    gens = []
    if not args.no_generate:
        for prompt in ((32,) if args.small else (128, 1024)):
            gens.append(generate_row(prompt, 8 if args.small else 48, 1 if args.small else 5))
    info["uptime_after"] = __import__("subprocess").run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine load after: {info['uptime_after']}")
    data = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
    data.setdefault("runs", {})[args.label] = {
        "command": "python benchmarks/decode_overhead.py --label " + args.label + f" --threads {args.threads}"
                   + (" --small" if args.small else "") + (" --no-generate" if args.no_generate else "")
                   + (" --no-compile" if args.no_compile else ""),
        "machine": info, "calls_per_repeat": calls, "repeats": reps, "calls": rows, "python_only": python_only, "generate": gens,
        "small": args.small, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
