"""Sliding-window(256) forward vs forward+backward at N=16384 (B=1, H=8, D=64, fp32), in one run.

``python benchmarks/band_backward_block.py`` times the default backward (the compiled interval kernel of
``salience.kernels.native`` when it is built) and then the torch-kernel backward the span path falls back to,
for the band block sizes given on the command line (default: the current one), e.g.
``python benchmarks/band_backward_block.py 128 192 256``.

Medians over 7 runs, the forward timed alongside; prints the forward+backward / forward ratio (the kernels
issue targets <= 4x).
"""

import sys
import time

import torch

import salience
from salience import masks as M
from salience.kernels import native, spans


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
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)

    def fwd():
        salience.attention(q, k, v, mask=mask)

    def fwd_bwd():
        for t in (qg, kg, vg):  # as optimizer.zero_grad() does: no accumulation into old gradients
            t.grad = None
        salience.attention(qg, kg, vg, mask=mask).backward(dout)

    def report(what):
        f = median_ms(fwd)
        both = median_ms(fwd_bwd)
        print(f"{what}: forward {f:.1f} ms, forward+backward {both:.1f} ms, ratio {both / f:.2f}")

    print(f"compiled interval backward: {native.status()}")
    if native.available(q):
        report("compiled interval backward")
    saved = dict(native._STATE)
    native._STATE.update(lib=None, why="off for this comparison")
    try:
        for bq in blocks:
            spans.BAND_Q_BLOCK_BWD[torch.float32] = bq
            report(f"torch-kernel backward, block {bq}")
    finally:
        native._STATE.clear()
        native._STATE.update(saved)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [spans.BAND_Q_BLOCK_BWD[torch.float32]])
