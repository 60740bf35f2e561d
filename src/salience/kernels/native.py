"""A compiled backward for interval masks: work in proportion to the visible keys.

torch's CPU flash backward computes every key of every call, so the span path used to run it on strided
windows (a sliding window's rows in blocks of 192 see 448 keys for 257 visible) and add the overlapping
key-gradient windows afterwards. :func:`span_backward` instead runs ``span_backward.cpp`` (next to this
file): for each tile of 64 query rows it recomputes the probabilities only over the union of the rows' key
intervals, zero outside each row's own interval, and accumulates the key and value gradients in place. Any
mask with one key interval per row benefits: sliding windows, packed documents, padding, prefix-LM.

The C++ file is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``), against the BLAS
that libtorch exports, and cached under ``$SALIENCE_CACHE`` (default ``~/.cache/salience``), keyed by the
source, the torch version and the CPU flags. There is no build step at install time and nothing is
downloaded. Without a compiler, or if the build fails, :func:`available` is False, the reason is in
:func:`status`, and the span path keeps its torch-kernel backward: same results, slower. Set
``SALIENCE_NATIVE=0`` to turn it off.

Example:
    >>> import torch
    >>> from salience.kernels import native
    >>> q = torch.randn(1, 2, 8, 16)
    >>> native.status() in ("compiled",) or not native.available(q)  # the reason when it is not built
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "describe", "status", "span_backward", "Q_TILE", "KV_CHUNK"]

#: query rows per tile and keys per inner chunk of the compiled backward
Q_TILE = 64
KV_CHUNK = 512

_SOURCE = Path(__file__).with_name("span_backward.cpp")
_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("SALIENCE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "salience")
    return Path(root)


def _build() -> ctypes.CDLL:
    src = _SOURCE.read_bytes()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    torch_lib = Path(torch.__file__).with_name("lib")
    # -fno-trapping-math lets the exp loop vectorise (its float -> int conversion); no -ffast-math: the
    # kernel relies on IEEE infinities and on the order of its sums being the written one
    flags = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared",
             "-std=c++17"]
    libs = [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    ident = "\n".join([torch.__version__, _cpu_flags(), cxx, *flags, *libs]).encode()
    key = hashlib.sha256(src + ident).hexdigest()[:16]
    target = _cache_dir() / f"span_backward_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmp_so = Path(tmp) / target.name
            cmd = [cxx, *flags, str(_SOURCE), "-o", str(tmp_so), *libs]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"compiling {_SOURCE.name} failed: {run.stderr.strip()[-600:]}")
            os.replace(tmp_so, target)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(target))
    if lib.salience_span_backward_abi() != 2:
        raise RuntimeError(f"{target} has an unexpected ABI version")
    p, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for name in ("salience_span_backward_f32", "salience_span_backward_f64"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [p] * 9 + [i64, p, i64, i64] + [p] * 3 + [i64] * 7 + [dbl, i64, i64, i32]
    return lib


def _lib():
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                lib, why = None, ""
                if os.environ.get("SALIENCE_NATIVE", "1") == "0":
                    why = "turned off by SALIENCE_NATIVE=0"
                elif not sys.platform.startswith("linux"):
                    why = f"the compiled backward is built for Linux only (this is {sys.platform})"
                else:
                    try:
                        lib = _build()
                        why = "compiled"
                    except Exception as e:  # noqa: BLE001 - reported by status(), the torch path is used
                        why = f"{type(e).__name__}: {e}"
                _STATE["why"] = why
                _STATE["lib"] = lib
    return _STATE["lib"]


def status() -> str:
    """Why the compiled backward is or is not in use ("compiled" when it is)."""
    _lib()
    return _STATE["why"]


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def available(q: torch.Tensor) -> bool:
    """True when :func:`span_backward` can run on tensors like ``q`` (a CPU float tensor, and the kernel built)."""
    return q.device.type == "cpu" and q.dtype in _DTYPES and _lib() is not None


def describe(q: torch.Tensor) -> str:
    """One line for :func:`salience.plan`: which backward the span path will run, without building anything."""
    if q.device.type != "cpu" or q.dtype not in _DTYPES:
        return f"torch fused calls (the compiled kernel takes CPU float tensors; got {q.dtype} on {q.device})"
    if "lib" not in _STATE:
        return "compiled interval kernel (built on first backward)"
    if _STATE["lib"] is None:
        return f"torch fused calls (compiled kernel unavailable: {_STATE['why']})"
    return "compiled interval kernel"


def span_backward(q, k, v, out, lse, dout, dlse, lo, hi, scale: float, bias=None):
    """Gradients of interval-masked attention, recomputed from the logsumexp.

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv). float32 and float64 run as they are; bfloat16
            and float16 are computed in float32 (copies of q, k, v, out and dout) and rounded at the end.
        out, dout: (B, H, L, Dv), the forward's output and its gradient.
        lse: (B, H, L) logsumexp of the forward (-inf on rows with no visible key); dlse: its gradient or None.
        lo, hi: int64 (1 or B, L): row i sees keys ``lo[i] <= j < hi[i]``.
        scale: the factor on q k^T.
        bias: None, or ``(g, offset)`` for an additive bias that depends only on the head and ``j - i``
            (ALiBi, T5 buckets): ``g`` (B * H, n) float, and the bias of row i, key j is
            ``g[b * H + h, j - i + offset]`` (indices must stay in ``[0, n)`` for every visible pair).

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v. Rows with no visible key get zero gradients.

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 1, 4, 8, dtype=torch.float64)
        >>> lo = torch.zeros(1, 4, dtype=torch.long); hi = torch.arange(1, 5).view(1, 4)  # causal
        >>> out = torch.randn(1, 1, 4, 8, dtype=torch.float64); lse = torch.zeros(1, 1, 4, dtype=torch.float64)
        >>> if available(q):
        ...     dq, dk, dv = span_backward(q, k, v, out, lse, torch.ones_like(out), None, lo, hi, 0.35)
        ...     assert dq.shape == q.shape and dk.shape == k.shape
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the compiled span backward is unavailable: {status()}")
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dtypes = (q.dtype, k.dtype, v.dtype)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, out, dout = (t.to(dt).contiguous() for t in (q, k, v, out, dout))
    lse = lse.to(dt).contiguous()
    dlse = None if dlse is None else dlse.to(dt).contiguous()
    lo = lo.to(device="cpu", dtype=torch.int64).contiguous()
    hi = hi.to(device="cpu", dtype=torch.int64).contiguous()
    dq = torch.zeros(B, H, L, D, dtype=dt)
    dk = torch.zeros(B, H, S, D, dtype=dt)
    dv = torch.zeros(B, H, S, Dv, dtype=dt)
    fn = lib.salience_span_backward_f32 if dt == torch.float32 else lib.salience_span_backward_f64
    g, g_stride, g_off = None, 0, 0
    if bias is not None:
        g, g_off = bias
        if g.shape[0] != B * H:
            raise ValueError(f"bias: expected one row per (batch, head), {B * H}; got {tuple(g.shape)}")
        g = g.to(dt).contiguous()
        g_stride = g.shape[1]
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(),
       None if dlse is None else dlse.data_ptr(), lo.data_ptr(), hi.data_ptr(), 0 if lo.shape[0] == 1 else L,
       None if g is None else g.data_ptr(), g_stride, int(g_off), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
       B, H, Hkv, L, S, D, Dv, float(scale), Q_TILE, KV_CHUNK, torch.get_num_threads())
    if Hkv != H:  # per-query-head key/value gradients: sum each group
        dk = dk.view(B, Hkv, H // Hkv, S, D).sum(2)
        dv = dv.view(B, Hkv, H // Hkv, S, Dv).sum(2)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
