"""Sliding-window(256) forward vs forward+backward at N=16384 (B=1, H=8, D=64, fp32) for the band backward
block sizes given on the command line, e.g. ``python benchmarks/band_backward_block.py 128 192 256``.

Medians over 7 runs; prints the forward+backward / forward ratio (the kernels issue targets <= 4x).
"""

import sys
import time

import torch

import salience
from salience import masks as M
from salience.kernels import spans


def median_ms(fn, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def main(blocks) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 16384, 64) for _ in range(3))
    mask = M.sliding_window(256)
    fwd = median_ms(lambda: salience.attention(q, k, v, mask=mask))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)

    def fwd_bwd():
        for t in (qg, kg, vg):  # as optimizer.zero_grad() does: no accumulation into old gradients
            t.grad = None
        salience.attention(qg, kg, vg, mask=mask).backward(dout)

    for bq in blocks:
        spans.BAND_Q_BLOCK_BWD[torch.float32] = bq
        both = median_ms(fwd_bwd)
        print(f"backward block {bq}: forward {fwd:.1f} ms, forward+backward {both:.1f} ms, ratio {both / fwd:.2f}")


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [spans.BAND_Q_BLOCK_BWD[torch.float32]])
