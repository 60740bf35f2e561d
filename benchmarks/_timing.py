"""Helpers shared by the benchmark scripts: a median timer, the machine description written beside every figure,
and a switch for the compiled kernels."""

import contextlib
import platform
import statistics
import subprocess
import time

import torch

from salience.kernels import native

#: the CPU flags that decide which kernels run fast
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    """CPU model and the flags that matter, torch threads and version, and ``uptime`` (the load beside the figures)."""
    cpu, flags = platform.processor() or "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in FLAGS if x in have)
                    break
    except OSError:
        pass
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "uptime": up, "note": "the machine is shared with other engineers' jobs; see uptime's load average"}


def median_ms(fn, n: int = 5) -> float:
    """Median wall time of ``n`` calls of ``fn`` (after one warm-up call), in milliseconds."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def interleaved(fns: dict, n: int = 7) -> dict:
    """Median wall time (ms) of each callable over ``n`` rounds, after one warm-up call each; in every round the
    callables run in turn, so a drift of the machine's load hits all of them alike."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(n):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


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
