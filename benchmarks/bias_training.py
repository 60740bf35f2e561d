"""Attention with ALiBi on interval masks: the compiled interval kernels against the paths they replace.

``python benchmarks/bias_training.py``: B=1, H=8, D=64, N=16384, fp32, medians of 5 (3 for the slow rows),
in one run.

* A sliding window of 256 and 4 packed documents & causal: the forward, and the forward+backward step on the
  compiled interval kernels (the default when they are built) and without them (the strided-bias span plans
  on torch's fused kernels, forward and backward).
* Prefix-LM (4096) and 4 documents given as per-batch (2-d) ids & causal (IntervalPlan: the compiled kernels
  both ways): forward and forward+backward against the blockwise kernel, which serves them without the
  compiled kernels.
"""

import torch
from _timing import median_ms, without_native  # benchmarks/_timing.py (the script directory is on sys.path)

import salience
from salience import masks as M
from salience import scores as Sc
from salience.kernels import native


def main() -> None:
    torch.manual_seed(0)
    N = 16384
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    dout = torch.randn_like(q)
    ids = torch.arange(N) // (N // 4)
    mod = Sc.alibi(8)
    print(f"compiled interval kernels: {native.status()}")
    for name, mask in (("window 256 + ALiBi", M.sliding_window(256)),
                       ("4 documents & causal + ALiBi", M.document(ids) & M.causal())):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]

        def step(xs=xs, mask=mask):
            for x in xs:
                x.grad = None
            salience.attention(*xs, mask=mask, score_mod=mod).backward(dout)

        fwd = median_ms(lambda mask=mask: salience.attention(q, k, v, mask=mask, score_mod=mod))
        compiled = median_ms(step)
        with without_native():
            fallback = median_ms(step)
        print(f"{name}: forward {fwd:.0f} ms; forward+backward {compiled:.0f} ms compiled ({compiled / fwd:.2f}x "
              f"the forward), {fallback:.0f} ms without them: torch's kernels ({fallback / compiled:.2f}x slower)")


    for name, mask in (("prefix-LM 4096 + ALiBi", M.prefix_lm(4096)),
                       ("4 documents (2-d ids) & causal + ALiBi", M.document(ids.view(1, -1)) & M.causal())):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]

        def step(backend=None, xs=xs, mask=mask):
            for x in xs:
                x.grad = None
            salience.attention(*xs, mask=mask, score_mod=mod, backend=backend).backward(dout)

        fwd = median_ms(lambda mask=mask: salience.attention(q, k, v, mask=mask, score_mod=mod), 3)
        fwd_b = median_ms(lambda mask=mask: salience.attention(q, k, v, mask=mask, score_mod=mod,
                                                               backend="blockwise"), 3)
        both = median_ms(step, 3)
        both_b = median_ms(lambda step=step: step("blockwise"), 3)
        print(f"{name}: forward {fwd:.0f} ms compiled, {fwd_b:.0f} ms blockwise ({fwd_b / fwd:.2f}x slower); "
              f"forward+backward {both:.0f} ms compiled, {both_b:.0f} ms blockwise ({both_b / both:.2f}x slower)")


if __name__ == "__main__":
    main()
