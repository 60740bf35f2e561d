"""What the edge guards cost on the fast paths: the non-finite check on k and v, and the unit-stride copy.

``python benchmarks/edges_cost.py [--json benchmarks/results/edges_cost.json] [--doc docs/kernels.md]``: B=1, H=8, D=64, fp32, forward.
For each problem, ``salience.attention`` as shipped (with the guards) and ``salience.attention`` with the
guards switched off (``guard.guarded`` replaced by a direct call, for this comparison only) are timed
interleaved in one process, medians of 7; the ratio is the guards' cost. A strided q (``x[..., ::2]``) is timed too: its copy to a unit last-axis stride, against the same
values already contiguous. The CPU model and flags are printed beside the figures. ``--doc`` rewrites the table
between the ``table:edges-cost`` markers of that file from the JSON this run wrote (the renderer of
``benchmarks/docs_tables.py``, which checks that table in CI).
"""

import argparse
import json
import os
import platform
import sys

import torch

import salience
from salience import masks as M
from salience.kernels import guard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved  # noqa: E402


def cpu() -> dict:
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model.strip():
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    flags = " ".join(x for x in fl if x.startswith(("avx", "amx", "fma")))
                    break
    except OSError:
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def unguarded(fn):
    """Run ``fn`` with the non-finite guard off (the kernels straight on k and v)."""
    saved = guard.guarded
    guard.guarded = lambda q, k, v, mask, run_clean, reference_rows: run_clean(q, k, v)
    try:
        return fn()
    finally:
        guard.guarded = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--doc", default=None, help="markdown file whose edges_cost table is rewritten from --json")
    args = ap.parse_args()
    torch.manual_seed(0)
    N = args.n
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    problems = {
        "sliding window 256": M.causal() & M.sliding_window(256),
        "4 documents": M.document(torch.arange(N) // (N // 4)),
        "key padding (3/4 kept)": M.padding(kv_lengths=torch.tensor([3 * N // 4])),
        "causal (sdpa)": M.causal(),
    }
    info = cpu()
    print(f"CPU: {info['model']} ({info['flags']}), {info['threads']} threads; load {os.getloadavg()}")
    rows = []
    for name, m in problems.items():
        pl = salience.plan(q, k, v, mask=m)
        with torch.no_grad():
            t = interleaved({
                "guarded": lambda m=m: salience.attention(q, k, v, mask=m),
                "unguarded": lambda m=m: unguarded(lambda: salience.attention(q, k, v, mask=m)),
            })
        rows.append({"problem": name, "backend": pl.backend, "guarded_ms": t["guarded"],
                     "unguarded_ms": t["unguarded"], "ratio": t["guarded"] / t["unguarded"]})
        print(f"{name:24s} {pl.backend:9s} guarded {t['guarded']:8.1f} ms  unguarded {t['unguarded']:8.1f} ms  "
              f"ratio {t['guarded'] / t['unguarded']:.3f}")
    qs = torch.randn(1, 8, N, 128)[..., ::2]
    qc = qs.contiguous()
    m = problems["sliding window 256"]
    with torch.no_grad():
        t = interleaved({"strided": lambda: salience.attention(qs, k, v, mask=m),
                         "contiguous": lambda: salience.attention(qc, k, v, mask=m)})
    rows.append({"problem": "sliding window 256, q[..., ::2]", "backend": "spans", "guarded_ms": t["strided"],
                 "unguarded_ms": t["contiguous"], "ratio": t["strided"] / t["contiguous"]})
    print(f"strided q, window 256: {t['strided']:.1f} ms vs contiguous {t['contiguous']:.1f} ms "
          f"(ratio {t['strided'] / t['contiguous']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"command": "python benchmarks/edges_cost.py --json " + args.json, "cpu": info,
                                "torch": torch.__version__, "loadavg": os.getloadavg(), "N": N},
                       "results": rows}, f, indent=2)
    if args.doc and args.json:
        render(args.json, args.doc)


def render(json_path: str, doc: str) -> None:
    """Rewrite the ``edges-cost`` table (between ``<!-- table:edges-cost:begin -->`` and ``...:end -->``) in
    ``doc`` from ``json_path``, with the renderer ``benchmarks/docs_tables.py`` checks it against."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import docs_tables

    with open(json_path) as f:
        data = json.load(f)
    with open(doc) as f:
        text = f.read()
    a, b = "<!-- table:edges-cost:begin -->", "<!-- table:edges-cost:end -->"
    i, j = text.index(a) + len(a), text.index(b)
    with open(doc, "w") as f:
        f.write(text[:i] + docs_tables.block("edges-cost", data) + text[j:])


if __name__ == "__main__":
    main()
