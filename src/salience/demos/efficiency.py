"""Time and peak memory of attention as the sequence length doubles, with the fitted log-log slope.

Methods measured (forward pass, q = k = v of shape (B, H, N, D), float32 by default):

* ``full``: exact softmax attention, :func:`salience.attention` with no mask (torch's fused kernel).
* ``sliding_window``: exact attention in a causal window of ``window`` keys,
  ``salience.attention(q, k, v, mask=salience.masks.sliding_window(window))``; the path salience chose is
  recorded (the tile-skipping kernels when they are available, otherwise the chunked reference).
* ``linear``: :class:`salience.layers.LinearAttention` (elu + 1 feature map; a different kernel).
* ``performer``: :class:`salience.layers.PerformerAttention` (FAVOR+ with ``features`` random features).
* ``textbook``: :func:`salience.reference.attention`, which materialises the (N, N) weights; it shows the
  quadratic memory that the other paths avoid, and is the one that runs out of memory first.

Lengths double from ``min_len`` to ``max_len``. A method stops growing when the next length is predicted
(from its last two points) to exceed ``time_limit`` seconds per call or ``memory_limit`` bytes, or when a
call raises ``MemoryError``/``RuntimeError`` for lack of memory; the reason is recorded.

Peak memory is the growth of the process's resident set (``/proc/self/statm``, sampled every 0.5 ms by a
thread) during one call, above what was resident before it (inputs included in the baseline). During that
call glibc is asked to serve every allocation of 64 KiB or more with ``mmap`` (``mallopt``), so freed
blocks leave the resident set and the next call starts clean; the timed calls run with glibc's usual
32 MiB threshold. Before that call glibc returns the free memory it kept from earlier calls
(``malloc_trim``), which would otherwise serve the call's allocations unseen. Peaks below :data:`MEMORY_RESOLUTION` (1 MiB) are noise and are left out of the slope
fit. Where /proc is missing, memory is reported as None.

Example:
    >>> from salience.demos.efficiency import sweep
    >>> res = sweep(methods=("full", "linear"), min_len=64, max_len=128, heads=1, head_dim=8, repeats=1)
    >>> [(p.method, p.length) for p in res.points]
    [('full', 64), ('full', 128), ('linear', 64), ('linear', 128)]
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .. import masks, reference
from ..functional import attention, plan
from ..layers import LinearAttention, PerformerAttention

__all__ = ["METHODS", "MEMORY_RESOLUTION", "Point", "SweepResult", "SlopeFit", "sweep", "fit_slope", "slope_fit",
           "PeakRSS"]

#: peaks below this many bytes are not resolved by the resident-set sampling
MEMORY_RESOLUTION = 1 << 20

#: method name -> human label
METHODS = {
    "full": "exact full (fused)",
    "sliding_window": "exact sliding window",
    "linear": "linear (elu+1)",
    "performer": "Performer (FAVOR+)",
    "textbook": "exact, materialised weights (textbook)",
}

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def _rss() -> int | None:
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _mmap_threshold(threshold: int) -> bool:
    """Ask glibc to serve allocations >= threshold with mmap, so that freeing them lowers the RSS."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> bool:
    """Return the free memory glibc keeps in its heaps to the system (``malloc_trim(0)``).

    Without it a call's allocations may be served from memory that earlier calls freed but glibc kept
    resident (glibc only asks the kernel for new pages, mmap included, when its free lists cannot serve a
    request), so their peak does not show in the resident set: a method measured after a larger one read
    0.02 MiB at N=512 and 11 MiB at N=1024 instead of 10 and 20, and its memory slope came out 1.38 where
    it is 1.00."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakRSS:
    """Context manager: ``peak`` = highest resident set size seen minus the size at entry, in bytes.

    ``peak`` is None where the resident set cannot be read (no /proc).

    Example:
        >>> import torch
        >>> with PeakRSS() as m:
        ...     x = torch.ones(64 << 20, dtype=torch.uint8)
        >>> m.peak is None or m.peak > 32 << 20
        True
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak: int | None = None
        self._base = self._max = None
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            r = _rss()
            if r is not None and r > self._max:
                self._max = r
            time.sleep(self.interval)

    def __enter__(self):
        self._base = _rss()
        if self._base is None:
            return self
        self._max = self._base
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._base is None:
            return False
        self._stop.set()
        self._thread.join()
        r = _rss()
        if r is not None:
            self._max = max(self._max, r)
        self.peak = self._max - self._base
        return False


@dataclass
class Point:
    """One measurement: ``seconds`` (median forward time) and ``peak_bytes`` of one method at one length."""

    method: str
    length: int
    seconds: float
    peak_bytes: int | None
    backend: str = ""


@dataclass
class SweepResult:
    """All points, the fitted slopes per method and why each method stopped where it did."""

    points: list[Point]
    config: dict
    stopped: dict[str, str] = field(default_factory=dict)

    def of(self, method: str) -> list[Point]:
        return [p for p in self.points if p.method == method]

    def slopes(self, what: str = "seconds", tail: int = 4) -> dict[str, float | None]:
        """Least-squares slope of log(what) against log(length) over each method's last ``tail`` points
        (for memory, points below :data:`MEMORY_RESOLUTION` are left out)."""
        floor = MEMORY_RESOLUTION if what == "peak_bytes" else 0
        out = {}
        for m in dict.fromkeys(p.method for p in self.points):
            pts = [(p.length, getattr(p, what)) for p in self.of(m)
                   if getattr(p, what) is not None and getattr(p, what) > floor]
            out[m] = fit_slope(pts[-tail:]) if len(pts) >= 2 else None
        return out

    def slope_fits(self, what: str = "seconds", tail: int = 4) -> dict[str, SlopeFit]:
        """Like :meth:`slopes`, with the fit's quality and whether the slope is readable
        (:func:`slope_fit`)."""
        floor = MEMORY_RESOLUTION if what == "peak_bytes" else 0
        out = {}
        for m in dict.fromkeys(p.method for p in self.points):
            pts = [(p.length, getattr(p, what)) for p in self.of(m)
                   if getattr(p, what) is not None and getattr(p, what) > floor]
            out[m] = slope_fit(pts[-tail:])
        return out

    def to_dict(self) -> dict:
        return {"config": self.config, "points": [asdict(p) for p in self.points], "stopped": self.stopped,
                "slope_time": self.slopes("seconds"), "slope_memory": self.slopes("peak_bytes"),
                "slope_fit": {"time": {m: asdict(f) for m, f in self.slope_fits("seconds").items()},
                              "memory": {m: asdict(f) for m, f in self.slope_fits("peak_bytes").items()}}}


#: a slope is shown only when fitted through at least this many points ...
SLOPE_MIN_POINTS = 3
#: ... with at least this R^2 of the log-log line ...
SLOPE_MIN_R2 = 0.98
#: ... and no doubling step whose own exponent is further than this from the fitted one
SLOPE_MAX_STEP_DEVIATION = 0.5


@dataclass
class SlopeFit:
    """A fitted exponent with its evidence: ``r2`` of the log-log line, ``n`` points, the exponent of each
    step between consecutive points, and ``readable`` (see :func:`slope_fit`) with ``reason`` when not."""

    slope: float | None
    r2: float | None
    n: int
    steps: list[float]
    readable: bool
    reason: str = ""

    def label(self) -> str:
        """``"1.02"``, or ``"not readable (R^2=0.91)"`` and the like."""
        if self.readable:
            return f"{self.slope:.2f}"
        return f"not readable ({self.reason})" if self.reason else "not readable"


def slope_fit(points) -> SlopeFit:
    """The log-log slope of ``(x, y)`` points and whether it can be read as the cost's exponent.

    The rule: at least :data:`SLOPE_MIN_POINTS` points, R^2 of the line at least :data:`SLOPE_MIN_R2`, and
    every doubling step's own exponent within :data:`SLOPE_MAX_STEP_DEVIATION` of the fit. Short calls on a
    shared machine and memory peaks near the sampling resolution break one of these; the figure and the
    table then say "not readable" instead of printing a misleading exponent.

    Example:
        >>> slope_fit([(512, 1.0), (1024, 2.0), (2048, 4.1), (4096, 8.0)]).label()
        '1.00'
        >>> slope_fit([(512, 1.0), (1024, 1.1), (2048, 9.0), (4096, 10.0)]).label()
        'not readable (R^2=0.835)'
        >>> slope_fit([(512, 1.0), (1024, 4.0)]).label()
        'not readable (2 points)'
    """
    pts = sorted((x, y) for x, y in points if x > 0 and y is not None and y > 0)
    n = len(pts)
    if n < 2 or len({x for x, _ in pts}) < 2:
        return SlopeFit(None, None, n, [], False, f"{n} point{'s' if n != 1 else ''}")
    p = fit_slope(pts)
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    my = sum(ly) / n
    mx = sum(lx) / n
    sst = sum((y - my) ** 2 for y in ly)
    sse = sum((y - (my + p * (x - mx))) ** 2 for x, y in zip(lx, ly))
    r2 = 1.0 if sst == 0 else 1.0 - sse / sst
    steps = [(ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i]) for i in range(n - 1) if lx[i + 1] != lx[i]]
    if n < SLOPE_MIN_POINTS:
        return SlopeFit(p, r2, n, steps, False, f"{n} points")
    if r2 < SLOPE_MIN_R2:
        return SlopeFit(p, r2, n, steps, False, f"R^2={r2:.3f}")
    worst = max(steps, key=lambda st: abs(st - p))
    if abs(worst - p) > SLOPE_MAX_STEP_DEVIATION:
        return SlopeFit(p, r2, n, steps, False, f"R^2={r2:.3f}, one doubling step {worst:.2f}")
    return SlopeFit(p, r2, n, steps, True)


def fit_slope(points) -> float:
    """Slope of the least-squares line through ``(log x, log y)``: the exponent p of y ~ x^p.

    Example:
        >>> round(fit_slope([(512, 1.0), (1024, 4.0), (2048, 16.0)]), 6)
        2.0
    """
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        raise ValueError(f"fit_slope needs at least 2 points with positive values; got {list(points)!r}.")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        raise ValueError("fit_slope needs at least two different x values.")
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def _callable(method: str, head_dim: int, window: int, features: int, q, k, v):
    """(fn, backend description) for one method on these inputs."""
    if method == "full":
        return (lambda: attention(q, k, v)), plan(q, k, v).backend
    if method == "sliding_window":
        m = masks.sliding_window(window)
        return (lambda: attention(q, k, v, mask=m)), plan(q, k, v, mask=m).backend
    if method == "linear":
        core = LinearAttention()
        return (lambda: core(q, k, v)), "LinearAttention"
    if method == "performer":
        core = PerformerAttention(head_dim, num_features=features, seed=0)
        return (lambda: core(q, k, v)), "PerformerAttention"
    if method == "textbook":
        return (lambda: reference.attention(q, k, v).out), "reference"
    raise ValueError(f"method must be one of {tuple(METHODS)}; got {method!r}.")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "alloc" in str(e).lower() or "memory" in str(e).lower()))


def _lengths(min_len: int, max_len: int) -> list[int]:
    for name, v in (("min_len", min_len), ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}.")
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len; got min_len={min_len}, max_len={max_len}.")
    out, n = [], min_len
    while n <= max_len:
        out.append(n)
        n *= 2
    return out


def sweep(methods=tuple(METHODS), min_len: int = 512, max_len: int = 65536, batch: int = 1, heads: int = 4,
          head_dim: int = 64, window: int = 256, features: int = 256, dtype: torch.dtype = torch.float32,
          time_limit: float = 30.0, memory_limit: int = 4 << 30, repeats: int = 3, min_time: float = 0.2,
          threads: int | None = None, seed: int = 0,
          progress: Callable[[str, int, Point | None], None] | None = None) -> SweepResult:
    """Measure every method at lengths ``min_len, 2 min_len, ...`` up to ``max_len``.

    Args:
        methods: names from :data:`METHODS`.
        min_len, max_len: the length range N (doubling).
        batch, heads, head_dim: B, H, D of q = k = v (B, H, N, D).
        window: keys per query of the sliding window; features: Performer's random features.
        time_limit: seconds per call above which a method stops growing (predicted from the last two lengths).
        memory_limit: bytes of peak memory above which a method stops growing (predicted likewise).
        repeats, min_time: each point is the median of at least ``repeats`` timed calls (more, up to 50,
            until ``min_time`` seconds were spent) after a first call that measures the memory; a first call
            slower than 1 s is used as the time directly.
        threads: torch intra-op threads during the sweep (None: leave as is).
        progress: ``progress(method, length, point_or_None)`` before (None) and after each measurement.

    Returns:
        :class:`SweepResult`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty selection of {tuple(METHODS)}; got {tuple(methods)!r}.")
    lengths = _lengths(min_len, max_len)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    cfg = {"methods": list(methods), "min_len": min_len, "max_len": max_len, "batch": batch, "heads": heads,
           "head_dim": head_dim, "window": window, "features": features, "dtype": str(dtype).replace("torch.", ""),
           "time_limit": time_limit, "memory_limit": memory_limit, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "pass": "forward"}
    points, stopped = [], {}
    try:
        for method in methods:
            mine: list[Point] = []
            for n in lengths:
                reason = _predicted_over(mine, n, time_limit, memory_limit)
                if reason:
                    stopped[method] = reason
                    break
                if progress is not None:
                    progress(method, n, None)
                g = torch.Generator().manual_seed(seed)
                q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, dtype=dtype) for _ in range(3))
                try:
                    pt = _measure(method, n, q, k, v, head_dim, window, features, repeats, min_time)
                except (MemoryError, RuntimeError) as e:
                    if not _is_oom(e):
                        raise
                    stopped[method] = f"out of memory at N={n}"
                    break
                finally:
                    del q, k, v
                mine.append(pt)
                points.append(pt)
                if progress is not None:
                    progress(method, n, pt)
            else:
                stopped[method] = f"reached max_len={max_len}"
    finally:
        torch.set_num_threads(old_threads)
    return SweepResult(points, cfg, stopped)


def _predicted_over(mine: list[Point], n: int, time_limit: float, memory_limit: int) -> str:
    if not mine:
        return ""
    last = mine[-1]
    # growth factor per doubling, from the last two points, kept within [2, 4.5] (linear .. quadratic + noise)
    rt = rm = 2.0
    if len(mine) >= 2:
        prev = mine[-2]
        rt = min(max(last.seconds / max(prev.seconds, 1e-9), 2.0), 4.5)
        if last.peak_bytes is not None and prev.peak_bytes is not None and prev.peak_bytes > MEMORY_RESOLUTION:
            rm = min(max(last.peak_bytes / prev.peak_bytes, 2.0), 4.5)
    if last.seconds * rt > time_limit:
        return f"next length N={n} predicted at {last.seconds * rt:.1f} s per call > time limit {time_limit:g} s"
    if last.peak_bytes is not None and last.peak_bytes * rm > memory_limit:
        return (f"next length N={n} predicted at {last.peak_bytes * rm / 2**30:.2f} GiB peak > memory limit "
                f"{memory_limit / 2**30:.2f} GiB")
    return ""


@torch.no_grad()
def _measure(method, n, q, k, v, head_dim, window, features, repeats, min_time) -> Point:
    fn, backend = _callable(method, head_dim, window, features, q, k, v)
    _malloc_trim()  # start from a clean heap: see _malloc_trim
    _mmap_threshold(64 << 10)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # let the sampling thread in between the call's many short ops
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            first = time.perf_counter() - t0
        del out
    finally:
        sys.setswitchinterval(switch)
        _mmap_threshold(32 << 20)
    if first > 1.0 or repeats <= 0:
        secs = first
    else:
        times, spent = [], 0.0
        while len(times) < 50 and (len(times) < repeats or spent < min_time):
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            del out
            times.append(dt)
            spent += dt
        secs = statistics.median(times)
    return Point(method, n, secs, mem.peak, backend)
