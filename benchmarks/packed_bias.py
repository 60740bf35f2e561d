"""Packed documents and padded batches with ALiBi: the span path (one band problem per document or per
sequence) against the blockwise kernel and plain causal attention.

    .venv/bin/python benchmarks/packed_bias.py     # N=16384, H=8, D=64, float32

Prints medians over 5 interleaved repeats of:

* 4 documents (3:5:2:6) ``document(ids) & causal()`` + ``alibi``, B=1, N=16384: the default path, the same
  forced onto ``backend="blockwise"``, and plain causal attention (torch's fused kernel) for scale;
* a padded batch ``padding(q_lengths=..., kv_lengths=...) & causal()`` + ``alibi``: B=4 sequences of
  N/4, 3N/16, N/8 and N/16 tokens padded to L=N/4: the same three.
"""

import sys
import time

import torch

import salience
from salience import masks as M
from salience import scores as Sc


def timed(runs: dict, repeats: int) -> None:
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
    base = next(iter(med.values()))
    for name, ms in med.items():
        print(f"  {name}: {ms:.1f} ms ({ms / base:.2f}x the default path)")


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
    print(f"4 documents, B=1, N={N}:", salience.plan(q, k, v, mask=mask, score_mod=mod))
    timed(runs, repeats)

    L = N // 4
    lengths = [L, 3 * L // 4, L // 2, L // 4]
    q, k, v = (torch.randn(4, H, L, D) for _ in range(3))
    mask = M.padding(q_lengths=lengths, kv_lengths=lengths) & M.causal()
    print(f"padded batch, B=4, L={L}, lengths {lengths}:", salience.plan(q, k, v, mask=mask, score_mod=mod))
    timed({
        "padding & causal + alibi (default)": lambda: salience.attention(q, k, v, mask=mask, score_mod=mod),
        "padding & causal + alibi (blockwise)": lambda: salience.attention(q, k, v, mask=mask, score_mod=mod,
                                                                             backend="blockwise"),
        "plain causal (torch fused kernel)": lambda: salience.attention(q, k, v, mask=M.causal()),
    }, repeats)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
