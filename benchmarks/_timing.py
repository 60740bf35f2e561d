"""Helpers shared by the benchmark scripts: a median timer and a switch for the compiled kernels."""

import contextlib
import time

from salience.kernels import native


def median_ms(fn, n: int = 5) -> float:
    """Median wall time of ``n`` calls of ``fn`` (after one warm-up call), in milliseconds."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


@contextlib.contextmanager
def without_native():
    """Run the block as on a machine without the compiled interval kernels (torch's kernels instead)."""
    native.status()  # build (or fail) first, so that the saved state is the settled one
    saved = dict(native._STATE)
    native._STATE.update(lib=None, why="off for this comparison")
    try:
        yield
    finally:
        native._STATE.clear()
        native._STATE.update(saved)
