"""What the non-finite guard costs on calls that a score_mod's -inf or a bias's -inf hides keys in.

``python benchmarks/guard_cost.py [--n 4096] [--json benchmarks/results/guard_cost.json]``: B=1, H=8, D=64, fp32.
For each problem, ``salience.attention`` as shipped and with the guard switched off (``guard.guarded`` replaced by
a direct call and ``guard.finite_pair`` by ``True``, which also switches off the bias executor's own check, for
this comparison only) are timed interleaved in one process, medians of ``--repeat``; the ratio is the guard's cost
on finite k and v (the hot path: one summing pass over k and v, remembered per tensor and version; that pass alone
is timed too, ``finite_check_ms``, since on a shared machine the ratio's noise exceeds it). The same call
with one NaN in a hidden key (the guarded route: zeroed copies, the visibility of the bad key, no row recomputed)
is timed beside it. Forward only, and forward + backward for the flex causal score_mod and the causal bias. The
CPU model, flags and ``uptime`` (the load: the machine is shared) are printed and written beside the figures.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, machine  # noqa: E402

import salience  # noqa: E402
from salience import masks as M  # noqa: E402
from salience import scores as Sc  # noqa: E402
from salience.kernels import guard  # noqa: E402

NEG = float("-inf")


def unguarded(fn):
    """Run ``fn`` with the non-finite guard off (the kernels straight on k and v, no finiteness pass)."""
    saved = guard.guarded, guard.finite_pair
    guard.guarded = lambda q, k, v, scoring, run_clean, textbook=None: run_clean(q, k, v)
    guard.finite_pair = lambda k, v: True
    try:
        return fn()
    finally:
        guard.guarded, guard.finite_pair = saved


def problems(N: int) -> dict:
    causal_bias = torch.full((N, N), NEG).triu(1)
    keypad = torch.zeros(1, 1, 1, N)
    keypad[..., 3 * N // 4:] = NEG
    flex = lambda s, b, h, i, j: torch.where(j > i, torch.full_like(s, NEG), s)  # noqa: E731
    return {  # name: (keyword arguments, a key hidden from every row or most rows, time the backward too)
        "score_mod flex causal (no mask)": (dict(score_mod=flex), N - 1, True),
        "score_mod softcap + window 256": (dict(score_mod=Sc.softcap(30.0), mask=M.causal() & M.sliding_window(256)),
                                           N // 2 + 300, False),
        "bias causal -inf (no mask)": (dict(bias=causal_bias), N - 1, True),
        "bias key padding + causal mask": (dict(bias=keypad, mask=M.causal()), N - 2, False),
    }


def measure(name: str, kw: dict, hidden_key: int, bwd: bool, N: int, repeat: int) -> dict:
    """One problem's row: forward (finite, guard off, one hidden NaN) and optionally forward + backward."""
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    vn = v.clone()
    vn[0, :, hidden_key] = float("nan")
    backend = salience.plan(q, k, v, **kw).backend
    with torch.no_grad():
        t = interleaved({"guarded": lambda: salience.attention(q, k, v, **kw),
                         "unguarded": lambda: unguarded(lambda: salience.attention(q, k, v, **kw)),
                         "nan": lambda: salience.attention(q, k, vn, **kw)}, repeat)
    t["check"] = interleaved({"check": lambda: guard.all_finite(k) and guard.all_finite(v)}, repeat)["check"]
    row = {"problem": name, "backend": backend, "N": N, "finite_check_ms": t["check"], "fwd_guarded_ms": t["guarded"],
           "fwd_unguarded_ms": t["unguarded"], "fwd_ratio": t["guarded"] / t["unguarded"],
           "fwd_hidden_nan_ms": t["nan"], "fwd_hidden_nan_ratio": t["nan"] / t["unguarded"]}
    if bwd:
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

        def step():
            salience.attention(qg, kg, vg, **kw).sum().backward()

        tb = interleaved({"guarded": step, "unguarded": lambda: unguarded(step)}, repeat)
        row.update(fwdbwd_guarded_ms=tb["guarded"], fwdbwd_unguarded_ms=tb["unguarded"],
                   fwdbwd_ratio=tb["guarded"] / tb["unguarded"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.n < 1024:
        ap.error(f"--n must be at least 1024 (the window problem poisons key N/2 + 300 and needs it inside the "
                 f"sequence); got {args.n}")
    torch.manual_seed(0)
    N = args.n
    info = machine()
    print(f"CPU: {info['cpu']} ({info['flags']}), {info['threads']} threads, torch {info['torch']}")
    print(f"uptime: {info['uptime']}  ({info['note']})")
    rows = []
    for name, (kw, hidden_key, bwd) in problems(N).items():
        row = measure(name, kw, hidden_key, bwd, N, args.repeat)
        line = (f"{name:34s} {row['backend']:9s} check {row['finite_check_ms']:.2f} ms  fwd guarded {row['fwd_guarded_ms']:8.1f} ms  off "
                f"{row['fwd_unguarded_ms']:8.1f} ms  ratio {row['fwd_ratio']:.3f}  | hidden NaN "
                f"{row['fwd_hidden_nan_ms']:8.1f} ms ({row['fwd_hidden_nan_ratio']:.2f}x)")
        if bwd:
            line += f"  | fwd+bwd ratio {row['fwdbwd_ratio']:.3f}"
        print(line)
        rows.append(row)
    if args.json:
        cmd = f"python benchmarks/guard_cost.py --n {N} --repeat {args.repeat} --json {args.json}"
        with open(args.json, "w") as f:
            json.dump({"meta": {"command": cmd, "machine": info, "loadavg_end": os.getloadavg()}, "results": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
