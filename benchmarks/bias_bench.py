"""Float bias tensors: salience's bias executor against torch SDPA with the same float ``attn_mask``.

``python benchmarks/bias_bench.py [--n 2048] [--repeats 5]``: B=1, H=8, D=64, fp32, medians of ``--repeats``
(after a warm-up; the two sides interleaved), every ratio measured in the same run. Writes benchmarks/results/bias.json.

Two clocks, both in the JSON: ``wall`` (wall time with torch's default threads) and ``cpu1`` (process CPU time
with one thread: the work done, far less disturbed by other jobs on a shared machine).

Rows:

* ``dense``: a random (1, 8, N, N) bias with no -inf (no structure to skip): forward, forward+backward with
  q, k, v requiring grad, and forward+backward with the bias requiring grad too (torch SDPA then falls back to
  its math path, which materialises the (B, H, N, N) weights; salience recomputes dS tile by tile).
* ``causal+alibi``: -inf above the diagonal plus ALiBi values (slopes 2^-8h/H), (1, 8, N, N): salience runs
  each 256-row block over just the keys its rows leave finite (about half the work), SDPA runs everything.
* ``causal 0/-inf``: the same -inf structure with zeros elsewhere (a causal mask given as a float bias).

Salience is called through ``salience.attention(bias=...)`` when the dispatcher routes the bias to
``kernels.bias`` (plan backend "bias"), else through ``dispatch.run`` with the executor (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import machine

import salience
from salience.kernels import bias as kb
from salience.kernels import dispatch


def median_ms(fa, fb, n: int, clock: str) -> tuple:
    """Medians (ms) of ``n`` calls of ``fa`` and of ``fb``, interleaved (a, b, a, b, ...) after one warm-up
    each, so that the load's drift hits both: wall time, or process CPU time for ``clock="cpu1"``."""
    tick = time.process_time if clock == "cpu1" else time.perf_counter
    fa()
    fb()
    ta, tb = [], []
    for _ in range(n):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = tick()
            fn()
            times.append(tick() - t0)
    return sorted(ta)[n // 2] * 1e3, sorted(tb)[n // 2] * 1e3


def _salience_call(q, k, v, bias):
    """``(fn(q, k, v) -> out, route)``: salience.attention when its plan is the bias executor, else the
    executor through dispatch.run."""
    if salience.plan(q, k, v, bias=bias).backend == "bias":
        return (lambda q_, k_, v_: salience.attention(q_, k_, v_, bias=bias)), "salience.attention(bias=)"

    def direct(q_, k_, v_):
        ex, det = kb.executor(q_, k_, v_, bias, scale=q_.shape[-1] ** -0.5, need_grad=torch.is_grad_enabled())
        return dispatch.run(dispatch.Plan("bias", "bench", det, ex), q_, k_, v_).out

    return direct, "kernels.bias.executor via dispatch.run (the dispatcher's bias rule is not in place)"


def _step(fn, xs, dout):
    def run():
        for x in xs:
            x.grad = None
        fn(*xs[:3]).backward(dout)
    return run


def _case(name, q, k, v, bias, repeats, clock) -> dict:
    dout = torch.randn_like(q)
    sal, route = _salience_call(q, k, v, bias)
    with torch.no_grad():
        err = float((sal(q, k, v) - F.scaled_dot_product_attention(q, k, v, attn_mask=bias)).abs().max())
        f_s, f_t = median_ms(lambda: sal(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                             repeats, clock)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    b_s, b_t = median_ms(_step(sal, xs, dout),
                         _step(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias), xs, dout),
                         repeats, clock)
    row = {"case": name, "clock": clock, "route": route, "max_abs_diff_vs_sdpa": err,
           "forward_ms": {"salience": round(f_s, 1), "sdpa": round(f_t, 1), "sdpa_over_salience": round(f_t / f_s, 3)},
           "fwd_bwd_ms": {"salience": round(b_s, 1), "sdpa": round(b_t, 1), "sdpa_over_salience": round(b_t / b_s, 3)}}
    ex, det = kb.executor(q, k, v, bias, scale=q.shape[-1] ** -0.5, need_grad=False)
    row["skipped"] = det["skipped"]
    print(f"[{clock}] {name:14s} fwd  salience {f_s:8.1f} ms  sdpa {f_t:8.1f} ms  sdpa/salience {f_t / f_s:5.2f}   "
          f"(skipped {det['skipped']:.2f}, max diff {err:.1e})")
    print(f"[{clock}] {name:14s} f+b  salience {b_s:8.1f} ms  sdpa {b_t:8.1f} ms  sdpa/salience {b_t / b_s:5.2f}")
    return row


def _bias_grad_case(name, q, k, v, bias, repeats, clock) -> dict:
    dout = torch.randn_like(q)
    bg = bias.clone().requires_grad_()
    sal, _ = _salience_call(q, k, v, bg)
    xs = [x.clone().requires_grad_() for x in (q, k, v)] + [bg]

    def s_step():
        for x in xs:
            x.grad = None
        sal(*xs[:3]).backward(dout)

    def t_step():
        for x in xs:
            x.grad = None
        F.scaled_dot_product_attention(*xs[:3], attn_mask=bg).backward(dout)

    b_s, b_t = median_ms(s_step, t_step, repeats, clock)
    print(f"[{clock}] {name:14s} f+b with dbias: salience {b_s:8.1f} ms  sdpa (math path) {b_t:8.1f} ms  "
          f"sdpa/salience {b_t / b_s:5.2f}")
    return {"case": name + " (bias requires grad)", "clock": clock,
            "fwd_bwd_ms": {"salience": round(b_s, 1), "sdpa": round(b_t, 1), "sdpa_over_salience": round(b_t / b_s, 3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bias.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    N, H, D = args.n, 8, 64
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    mach = machine()
    print(f"{mach['cpu']} [{mach['flags']}], {mach['threads']} threads, torch {mach['torch']}\n{mach['uptime']}")
    dense = torch.randn(1, H, N, N)
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    dist = (torch.arange(N).view(1, -1) - torch.arange(N).view(-1, 1)).float()
    alibi = (slopes.view(H, 1, 1) * dist).unsqueeze(0)
    causal_alibi = alibi.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    causal = torch.zeros(N, N).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    rows = []
    threads = torch.get_num_threads()
    for clock in ("cpu1", "wall"):
        torch.set_num_threads(1 if clock == "cpu1" else threads)
        for name, b in (("dense", dense), ("causal+alibi", causal_alibi), ("causal 0/-inf", causal)):
            rows.append(_case(name, q, k, v, b, args.repeats, clock))
        rows.append(_bias_grad_case("dense", q, k, v, dense, args.repeats, clock))
    res = {"command": f"python benchmarks/bias_bench.py --n {N} --repeats {args.repeats}",
           "shape": {"B": 1, "H": H, "N": N, "D": D, "dtype": "float32"}, "machine": mach,
           "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}\n{res['uptime_after']}")


if __name__ == "__main__":
    main()
