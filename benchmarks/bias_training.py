"""Training steps with ALiBi on the band + bias span path, compiled backward against the torch-kernel one.

``python benchmarks/bias_training.py``: B=1, H=8, D=64, N=16384, fp32; a sliding window of 256 and 4 packed
documents & causal, each with ALiBi. Prints the forward, the forward+backward step with the compiled interval
backward (the default when it is built) and with the torch-kernel fallback, medians of 5, in one run.
"""

import time

import torch

import salience
from salience import masks as M
from salience import scores as Sc
from salience.kernels import native


def median_ms(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    N = 16384
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    dout = torch.randn_like(q)
    ids = torch.arange(N) // (N // 4)
    mod = Sc.alibi(8)
    print(f"compiled interval backward: {native.status()}")
    for name, mask in (("window 256 + ALiBi", M.sliding_window(256)),
                       ("4 documents & causal + ALiBi", M.document(ids) & M.causal())):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]

        def step(xs=xs, mask=mask):
            for x in xs:
                x.grad = None
            salience.attention(*xs, mask=mask, score_mod=mod).backward(dout)

        fwd = median_ms(lambda mask=mask: salience.attention(q, k, v, mask=mask, score_mod=mod))
        compiled = median_ms(step)
        saved = dict(native._STATE)
        native._STATE.update(lib=None, why="off for this comparison")
        try:
            fallback = median_ms(step)
        finally:
            native._STATE.clear()
            native._STATE.update(saved)
        print(f"{name}: forward {fwd:.0f} ms; forward+backward {compiled:.0f} ms compiled ({compiled / fwd:.2f}x "
              f"the forward), {fallback:.0f} ms with the torch-kernel backward ({fallback / compiled:.2f}x slower)")


if __name__ == "__main__":
    main()
