"""Training steps with attention dropout: the compiled interval kernels against the paths dropout used to take.

``python benchmarks/dropout_training.py``: B=1, H=8, D=64, N=4096, fp32, dropout_p=0.1; a sliding window of
256 and causal attention. One forward+backward step (median of 3; the slow peers once) on the default path
(the compiled kernels), on ``backend="reference"`` (the chunked textbook computation, which holds L x S
weights) and, for causal, on torch SDPA with ``dropout_p`` (its CPU flash kernel has no dropout, so torch runs
its math path).
"""

import torch
from _timing import median_ms  # benchmarks/_timing.py (the script directory is on sys.path)

import salience
from salience import masks as M


def main() -> None:
    torch.manual_seed(0)
    N = 4096
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    dout = torch.randn_like(q)
    for name, mask in (("window 256", M.sliding_window(256)), ("causal", M.causal())):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]

        def step(backend=None, xs=xs, mask=mask):
            for x in xs:
                x.grad = None
            salience.attention(*xs, mask=mask, dropout_p=0.1, backend=backend).backward(dout)

        print(f"{name}: {salience.plan(q, k, v, mask=mask, dropout_p=0.1).reason}")
        fast = median_ms(step, 3)
        ref = median_ms(lambda step=step: step("reference"), 1)
        line = f"  forward+backward {fast:.0f} ms; reference {ref:.0f} ms ({ref / fast:.1f}x slower)"
        if name == "causal":
            sdpa = median_ms(lambda step=step: step("sdpa"), 1)
            line += f"; torch SDPA {sdpa:.0f} ms ({sdpa / fast:.1f}x slower)"
        print(line)


if __name__ == "__main__":
    main()
