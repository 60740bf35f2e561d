"""torch.compile of a model calling salience.attention: graph breaks before/after the custom op, and speed.

``python benchmarks/compile_bench.py [--n 1024] [--repeats 5] [--inductor window] [--quick]``

A 2-block pre-norm transformer (d_model 256, 8 heads of 32, MLP 4x, B=2, fp32) whose attention is
``salience.attention`` with one mask per row: ``causal``, ``window`` (causal & sliding_window(128)), ``documents``
(4 packed documents & causal) and ``callable`` (a user lambda: the same window written as a predicate).

Per mask, in one run:

* graph breaks reported by ``torch._dynamo.explain`` (also for ``salience.layers.TransformerEncoder``, 2 layers):
  **before** (salience's opaque ``dispatch.attend``, the
  behaviour before kernels/ops.py: the functional hook bypassed) and **after** (the ``salience::attention``
  custom op);
* forward+backward time of eager, ``torch.compile(backend="aot_eager")`` and, for the masks named by
  ``--inductor``, the default inductor backend (medians of ``--repeats`` rounds after a warm-up, the variants
  timed in turn within each round), with the compile (first-call) time; ratios are eager / compiled (above 1:
  compiled is faster). The attention itself runs the same kernels either way (the custom op calls the
  dispatcher); what compiling changes is the code around it and the op's bookkeeping.

Writes benchmarks/results/compile.json with the CPU model, flags and ``uptime`` (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest import mock

# compile afresh: inductor's caches key on the graph, not on salience's fake kernels, and a warm cache would also
# hide the compile time reported below
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402
from _timing import machine  # noqa: E402

import salience  # noqa: E402
from salience import masks  # noqa: E402
from salience.kernels import dispatch, ops  # noqa: E402

D_MODEL, HEADS = 256, 8


class Block(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.n1, self.n2 = torch.nn.LayerNorm(D_MODEL), torch.nn.LayerNorm(D_MODEL)
        self.qkv, self.o = torch.nn.Linear(D_MODEL, 3 * D_MODEL), torch.nn.Linear(D_MODEL, D_MODEL)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D_MODEL, 4 * D_MODEL), torch.nn.GELU(),
                                       torch.nn.Linear(4 * D_MODEL, D_MODEL))
        self.mask = mask

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, L, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        a = salience.attention(q, k, v, mask=self.mask)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, D_MODEL))
        return x + self.mlp(self.n2(x))


def _masks(n: int) -> dict:
    ids = torch.arange(n) * 4 // n  # 4 equal packed documents
    return {
        "causal": masks.causal(),
        "window": masks.causal() & masks.sliding_window(128),
        "documents": masks.document(ids) & masks.causal(),
        "callable": lambda b, h, i, j: (i >= j) & (i - j <= 128),
    }


def _breaks(model, x, *, opaque: bool) -> int:
    """Graph breaks of one forward; ``opaque=True`` bypasses the custom op (salience before kernels/ops.py)."""
    torch._dynamo.reset()
    patch = mock.patch.object(ops, "compiled", lambda mask, score_mod: dispatch.attend) if opaque else None
    if patch is not None:
        patch.start()
    try:
        return torch._dynamo.explain(model)(x).graph_break_count
    finally:
        if patch is not None:
            patch.stop()
        torch._dynamo.reset()


def _layers_breaks(n: int) -> dict:
    """Graph breaks of ``salience.layers.TransformerEncoder`` (2 layers, causal; the issue's 2-block model)."""
    from salience.layers import TransformerEncoder

    enc = TransformerEncoder(num_layers=2, d_model=D_MODEL, num_heads=HEADS, mask=masks.causal())
    x = torch.randn(2, n, D_MODEL)
    return {"model": "salience.layers.TransformerEncoder(num_layers=2, causal)",
            "graph_breaks_before": _breaks(enc, x, opaque=True), "graph_breaks_after": _breaks(enc, x, opaque=False)}


def _step(fn, model, x):
    def run():
        model.zero_grad(set_to_none=True)
        fn(x).square().mean().backward()

    return run


def _interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median wall time (ms) of each step, the steps timed in turn in every round (the machine's load drifts,
    so alternating keeps the ratios fair)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def _row(name, mask, n, repeats, inductor: bool) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(mask), Block(mask))
    x = torch.randn(2, n, D_MODEL)
    qh = torch.randn(2, HEADS, n, D_MODEL // HEADS)
    row = {"mask": name, "plan": salience.plan(qh, qh, qh, mask=mask).backend,
           "graph_breaks_before": _breaks(model, x, opaque=True),
           "graph_breaks_after": _breaks(model, x, opaque=False)}
    steps = {"eager": _step(model, model, x)}
    for be in ["aot_eager"] + (["inductor"] if inductor else []):
        compiled = torch.compile(model, backend=be, fullgraph=True)
        t0 = time.perf_counter()
        _step(compiled, model, x)()  # the first call compiles
        row[f"{be}_compile_s"] = round(time.perf_counter() - t0, 1)
        steps[be] = _step(compiled, model, x)
    steps["eager"]()  # warm-up
    for k, ms in _interleaved_ms(steps, repeats).items():
        row[f"{k}_ms"] = round(ms, 1)
        if k != "eager":
            row[f"eager_over_{k}"] = round(row["eager_ms"] / ms, 3)
    torch._dynamo.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="sequence length (default 1024)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inductor", default="window", help="comma-separated masks also compiled with inductor "
                    "('' for none; inductor's first compile takes about a minute per model on 2 cores)")
    ap.add_argument("--quick", action="store_true", help="n=256, repeats 3, masks causal and window")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile.json"))
    args = ap.parse_args()
    n, repeats = (256, 3) if args.quick else (args.n, args.repeats)
    chosen = _masks(n)
    if args.quick:
        chosen = {k: chosen[k] for k in ("causal", "window")}
    ind = {s for s in args.inductor.split(",") if s}
    rows = []
    for name, mask in chosen.items():
        rows.append(_row(name, mask, n, repeats, name in ind))
        print(json.dumps(rows[-1]), flush=True)
    layers = _layers_breaks(n)
    print(json.dumps(layers), flush=True)
    out = {"machine": machine(), "layers_encoder": layers, "config": {"B": 2, "N": n, "d_model": D_MODEL, "heads": HEADS, "blocks": 2,
                                            "dtype": "float32", "repeats": repeats,
                                            "measure": "forward+backward of the mean square of the output"},
           "command": "python benchmarks/compile_bench.py" + (" --quick" if args.quick else f" --n {n} --repeats "
                                                                f"{repeats} --inductor {args.inductor}"),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["machine"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
