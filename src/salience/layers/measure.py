"""Measure the efficient layers: error against exact softmax attention as the budget grows, and cost in length.

Run ``python -m salience.layers.measure`` (add ``--quick`` for smaller sizes). Errors are relative Frobenius
errors ``|approx - exact| / |exact|`` of the output, in float64. Costs are matmul FLOPs counted by
``torch.utils.flop_counter`` (exact and repeatable) and the best wall time of a few forward passes in float32.

Three kinds of inputs are used, because an approximation's error depends on the attention map:

* ``small``: i.i.d. Gaussian q, k times 0.25, a flat map (FAVOR+'s variance grows with |q| |k|);
* ``random``: i.i.d. standard Gaussian q, k, a peaked map of nearly full rank (the hard case for low rank);
* ``smooth``: q and k that vary smoothly with position (:func:`smooth`), a map of low effective rank;
  Nystrom and Linformer need this structure.

Example:
    >>> from salience.layers.measure import error_curve
    >>> rows = error_curve("linformer", budgets=(8, 64), L=64, seeds=1)
    >>> rows[0]["budget"], rows[0]["error"] > rows[1]["error"]
    (8, True)
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import masks
from ..functional import attention
from .efficient import (
    LinearAttention,
    LinformerAttention,
    LocalAttention,
    NystromAttention,
    PerformerAttention,
)

__all__ = ["smooth", "error_curve", "cost_table", "add_arguments", "run", "main"]


def smooth(B: int, H: int, L: int, D: int, freq: float = 4.0, amp: float = 2.0, seed: int = 0,
           dtype=torch.float64) -> torch.Tensor:
    """(B, H, L, D) vectors that vary smoothly with position: random mixtures of 2D cosines of position.

    Example:
        >>> smooth(1, 2, 16, 4).shape
        torch.Size([1, 2, 16, 4])
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, L, dtype=torch.float64).view(1, 1, L, 1)
    w = torch.randn(B, H, 1, 2 * D, generator=g, dtype=torch.float64) * freq
    ph = torch.rand(B, H, 1, 2 * D, generator=g, dtype=torch.float64) * 2 * math.pi
    mix = torch.randn(B, H, 2 * D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    return (amp * torch.cos(t * w + ph) @ mix).to(dtype)


def _inputs(kind: str, L: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 2, L, D, generator=g, dtype=torch.float64)
    if kind in ("small", "random"):
        a = 0.25 if kind == "small" else 1.0
        q = a * torch.randn(1, 2, L, D, generator=g, dtype=torch.float64)
        k = a * torch.randn(1, 2, L, D, generator=g, dtype=torch.float64)
    elif kind == "smooth":
        q, k = smooth(1, 2, L, D, seed=2 * seed + 1), smooth(1, 2, L, D, seed=2 * seed + 2)
    else:
        raise ValueError(f"kind must be 'small', 'random' or 'smooth'; got {kind!r}.")
    return q, k, v


def _make(name: str, budget: int, L: int, D: int, seed: int):
    if name == "performer":
        return PerformerAttention(D, budget, seed=seed).double()
    if name == "nystrom":
        return NystromAttention(budget)
    if name == "linformer":
        return LinformerAttention(L, budget).double()
    raise ValueError(f"name must be 'performer', 'nystrom' or 'linformer'; got {name!r}.")


def error_curve(name: str, budgets=(16, 64, 256), L: int = 256, D: int = 16, kind: str | None = None,
                seeds: int = 3) -> list[dict]:
    """Mean relative output error of ``name`` (performer, nystrom, linformer) per budget, over ``seeds`` inputs
    (and, for Performer, feature draws). ``kind`` defaults to small for Performer and smooth otherwise."""
    kind = kind or ("small" if name == "performer" else "smooth")
    rows = []
    for b in budgets:
        errs = []
        for s in range(seeds):
            q, k, v = _inputs(kind, L, D, s)
            exact = attention(q, k, v)
            approx = _make(name, b, L, D, s)(q, k, v)
            errs.append(((approx - exact).norm() / exact.norm()).item())
        rows.append({"layer": name, "inputs": kind, "budget": b, "error": sum(errs) / len(errs)})
    return rows


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _wall(fn, repeats: int) -> float:
    """Best of ``repeats`` (after a warm-up): the least disturbed run on a shared machine."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def cost_table(lengths=(1024, 2048, 4096, 8192), H: int = 4, D: int = 64, repeats: int = 3) -> list[dict]:
    """FLOPs and best-of-``repeats`` forward wall time (float32, B=1) per layer and length, exact included."""
    causal = masks.causal()
    lin, perf = LinearAttention(), PerformerAttention(D, 256, seed=0)  # modules built once, outside the timing
    nys, lfm, loc = NystromAttention(64), LinformerAttention(max(lengths), 256), LocalAttention(256)
    layers = {
        "exact (salience.attention)": lambda q, k, v: attention(q, k, v),
        "exact causal": lambda q, k, v: attention(q, k, v, mask=causal),
        "linear": lambda q, k, v: lin(q, k, v),
        "linear causal": lambda q, k, v: lin(q, k, v, mask=causal),
        "performer m=256": lambda q, k, v: perf(q, k, v),
        "performer causal m=256": lambda q, k, v: perf(q, k, v, mask=causal),
        "nystrom m=64": lambda q, k, v: nys(q, k, v),
        "linformer k=256": lambda q, k, v: lfm(q, k, v),
        "local w=256 (exact)": lambda q, k, v: loc(q, k, v),
    }
    rows = []
    with torch.no_grad():
        for L in lengths:
            q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
            for name, fn in layers.items():
                call = functools.partial(fn, q, k, v)
                rows.append({"layer": name, "L": L, "gflop": _flops(call) / 1e9, "ms": 1e3 * _wall(call, repeats)})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the command (for ``salience.cli``'s registry)."""
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the timings (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the best is reported")


def run(args) -> int:
    """Print the error curves and the cost table."""
    torch.manual_seed(0)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1; got {args.repeats}.")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1; got {args.threads}.")
        torch.set_num_threads(args.threads)
    L = 128 if args.quick else 256
    print(f"Relative output error against exact softmax attention (float64, L={L}, D=16, mean of 3 inputs)")
    print(f"{'layer':<10} {'inputs':<7} " + "budget -> error")
    for name, kinds, budgets in (
        ("performer", ("small", "random"), (16, 64, 256, 1024)),
        ("nystrom", ("smooth", "random"), sorted({4, 8, 16, 32, 64, L // 2, L})),
        ("linformer", ("smooth", "random"), sorted({8, 16, 32, 64, L // 2, L})),
    ):
        for kind in kinds:
            rows = error_curve(name, budgets, L=L, kind=kind)
            print(f"{name:<10} {kind:<7} " + "  ".join(f"{r['budget']}: {r['error']:.4f}" for r in rows))
    lengths = (512, 1024, 2048) if args.quick else (1024, 2048, 4096, 8192)
    print(f"\nForward cost, float32, B=1, H=4, D=64, {torch.get_num_threads()} threads: GFLOP (matmuls) / ms (best of {args.repeats})")
    rows = cost_table(lengths, repeats=args.repeats)
    names = list(dict.fromkeys(r["layer"] for r in rows))
    print(f"{'layer':<26}" + "".join(f"{'L=' + str(L):>18}" for L in lengths))
    for n in names:
        cells = [r for r in rows if r["layer"] == n]
        print(f"{n:<26}" + "".join(f"{r['gflop']:>9.2f} /{r['ms']:>7.1f}" for r in cells))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m salience.layers.measure", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
