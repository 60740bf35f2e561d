"""Packed documents with ALiBi: the per-document span path against the blockwise kernel and plain causal.

    .venv/bin/python benchmarks/documents_bias.py            # N=16384, H=8, D=64, float32, 4 documents (3:5:2:6)

Prints medians over 5 interleaved repeats of: ``document(ids) & causal()`` + ``alibi`` on the default path
(one band problem per document), the same forced onto ``backend="blockwise"``, and plain causal attention
(torch's fused kernel) for scale.
"""

import sys
import time

import torch

import salience
from salience import masks as M
from salience import scores as Sc


def main(N: int = 16384, H: int = 8, D: int = 64, repeats: int = 5) -> None:
    torch.manual_seed(0)
    shares, bounds = [3, 5, 2, 6], [0]
    for s in shares:
        bounds.append(bounds[-1] + s)
    ids = torch.zeros(N, dtype=torch.long)
    for d in range(len(shares)):
        ids[N * bounds[d] // bounds[-1]: N * bounds[d + 1] // bounds[-1]] = d
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    mask, mod = M.document(ids) & M.causal(), Sc.alibi(H)
    runs = {
        "documents & causal + alibi (default)": lambda: salience.attention(q, k, v, mask=mask, score_mod=mod),
        "documents & causal + alibi (blockwise)": lambda: salience.attention(q, k, v, mask=mask, score_mod=mod,
                                                                               backend="blockwise"),
        "plain causal (torch fused kernel)": lambda: salience.attention(q, k, v, mask=M.causal()),
    }
    print(salience.plan(q, k, v, mask=mask, score_mod=mod))
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
    base = med["documents & causal + alibi (default)"]
    for name, ms in med.items():
        print(f"{name}: {ms:.1f} ms ({ms / base:.2f}x the default path)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
