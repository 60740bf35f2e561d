"""Sliding-window(256) forward vs forward+backward at N=16384 (B=1, H=8, D=64, fp32), in one run.

``python benchmarks/band_backward_block.py`` times the default backward (the compiled interval kernel of
``salience.kernels.native`` when it is built) and then the torch-kernel backward the span path falls back to,
for the band block sizes given on the command line (default: the current one), e.g.
``python benchmarks/band_backward_block.py 128 192 256``.

Medians over 7 runs, the forward timed alongside; prints the forward+backward / forward ratio (the kernels
issue targets <= 4x).
"""

import sys

import torch
from _timing import median_ms, without_native  # benchmarks/_timing.py (the script directory is on sys.path)

import salience
from salience import masks as M
from salience.kernels import config as kconfig
from salience.kernels import native


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
        f = median_ms(fwd, 7)
        both = median_ms(fwd_bwd, 7)
        print(f"{what}: forward {f:.1f} ms, forward+backward {both:.1f} ms, ratio {both / f:.2f}")

    print(f"compiled interval backward: {native.status()}")
    if native.available(q):
        report("compiled interval backward")
    with without_native():
        for bq in blocks:
            with kconfig.use(kconfig.DEFAULT.replace(band_q_block_bwd=bq)):
                report(f"torch-kernel backward, block {bq}")


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [kconfig.DEFAULT.band_q_block_bwd[torch.float32]])
