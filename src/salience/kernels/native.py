"""Compiled kernels for interval masks: work in proportion to the visible keys, forward and backward.

torch's CPU flash kernels compute every key of every call. For masks whose visible keys form one interval
``[lo_i, hi_i)`` per query row, ``interval.cpp`` (next to this file) instead walks tiles of 64 query rows
over the union of their rows' key intervals only, with an optional additive bias that depends on the head
and ``kv_idx - q_idx`` (ALiBi, T5 buckets):

* :func:`span_backward` is the backward of every span plan (sliding windows, packed documents, padding,
  prefix-LM, with or without such a bias): the probabilities are recomputed from the logsumexp, and the key
  and value gradients accumulate in place (no per-window gradient buffers);
* :func:`span_forward` plus :func:`span_backward` form :class:`IntervalPlan`, which runs interval masks
  with a relative bias that the strided-bias span plans do not cover (prefix-LM, documents with per-batch
  ids), instead of the blockwise kernel.

The C++ file is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``; about 1 s), against
the BLAS that libtorch exports, and cached under ``$SALIENCE_CACHE`` (default ``~/.cache/salience``, else a
temporary directory), keyed by the source, the flags, the torch version and the CPU flags. There is no build
step at install time and nothing is downloaded. Without a compiler, or if the build fails, :func:`available`
is False, :func:`status` says why, and salience keeps its torch-kernel paths: same results, slower. Set
``SALIENCE_NATIVE=0`` to turn it off.

Example:
    >>> import torch
    >>> from salience.kernels import native
    >>> q = torch.randn(1, 2, 8, 16)
    >>> native.status() == "compiled" or not native.available(q)  # status() gives the reason otherwise
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

from ..reference import _acc_dtype

__all__ = ["available", "describe", "status", "span_forward", "span_backward", "IntervalPlan",
           "dropout_multipliers", "Q_TILE", "KV_CHUNK"]

#: query rows per tile and keys per inner chunk of the compiled kernels
Q_TILE = 64
KV_CHUNK = 512

_SOURCE = Path(__file__).with_name("interval.cpp")
_ABI = 4
_LOCK = threading.Lock()
_STATE: dict = {}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _Args(ctypes.Structure):
    """Mirror of ``SalienceIntervalArgs`` in interval.cpp (every field 8 bytes: no padding)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "out", "dout", "lse", "dlse", "lo", "hi")] + [
        ("lo_batch_stride", ctypes.c_int64), ("bias", ctypes.c_void_p), ("bias_b_stride", ctypes.c_int64),
        ("bias_h_stride", ctypes.c_int64), ("bias_offset", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("dq", "dk", "dv", "out_w", "lse_w")] + [
        (name, ctypes.c_int64) for name in ("B", "H", "Hkv", "L", "S", "D", "Dv")] + [
        ("scale", ctypes.c_double), ("tile", ctypes.c_int64), ("kv_chunk", ctypes.c_int64),
        ("nthreads", ctypes.c_int64), ("dropout_p", ctypes.c_double), ("seed", ctypes.c_int64)]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cache_dirs() -> list:
    env = os.environ.get("SALIENCE_CACHE")
    if env:
        return [Path(env)]
    return [Path(os.path.expanduser("~")) / ".cache" / "salience",
            Path(tempfile.gettempdir()) / f"salience-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]


def _compile(cxx: str, flags: list, libs: list, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_so = Path(tmp) / target.name
        run = subprocess.run([cxx, *flags, str(_SOURCE), "-o", str(tmp_so), *libs], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed: {run.stderr.strip()[-600:]}")
        os.replace(tmp_so, target)  # atomic: concurrent builders never load a half-written file


def _build() -> ctypes.CDLL:
    src = _SOURCE.read_bytes()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    torch_lib = Path(torch.__file__).with_name("lib")
    # -fno-trapping-math lets the exp loops vectorise (their float -> int conversion); no -ffast-math: the
    # kernels rely on IEEE infinities and on their sums running in the written order
    flags = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared",
             "-std=c++17"]
    libs = [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    ident = "\n".join([torch.__version__, _cpu_flags(), cxx, *flags, *libs]).encode()
    name = f"interval_{hashlib.sha256(src + ident).hexdigest()[:16]}.so"
    errors = []
    for root in _cache_dirs():
        target = root / name
        try:
            if not target.exists():
                _compile(cxx, flags, libs, target)
            lib = ctypes.CDLL(str(target))
            break
        except OSError as e:  # an unwritable cache directory: try the next one
            errors.append(f"{root}: {e}")
    else:
        raise RuntimeError("no usable cache directory: " + "; ".join(errors))
    lib.salience_interval_abi.restype = ctypes.c_int
    lib.salience_interval_args_size.restype = ctypes.c_int64
    if lib.salience_interval_abi() != _ABI or lib.salience_interval_args_size() != ctypes.sizeof(_Args):
        raise RuntimeError(f"{target} does not match this version of salience (ABI)")
    for fn in ("forward_f32", "forward_f64", "backward_f32", "backward_f64"):
        f = getattr(lib, "salience_interval_" + fn)
        f.restype = None
        f.argtypes = [ctypes.POINTER(_Args)]
    i64 = ctypes.c_int64
    lib.salience_interval_dropout_f64.restype = None
    lib.salience_interval_dropout_f64.argtypes = [ctypes.c_void_p, i64, i64, i64, i64, i64, i64, ctypes.c_double]
    return lib


def _lib():
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                lib, why = None, ""
                if os.environ.get("SALIENCE_NATIVE", "1") == "0":
                    why = "turned off by SALIENCE_NATIVE=0"
                elif not sys.platform.startswith("linux"):
                    why = f"the compiled kernels are built for Linux only (this is {sys.platform})"
                else:
                    try:
                        lib = _build()
                        why = "compiled"
                    except Exception as e:  # noqa: BLE001 - reported by status(); the torch paths are used
                        why = f"{type(e).__name__}: {e}"
                _STATE["why"] = why
                _STATE["lib"] = lib
    return _STATE["lib"]


def status() -> str:
    """Why the compiled kernels are or are not in use ("compiled" when they are); builds them if needed."""
    _lib()
    return _STATE["why"]


def available(q: torch.Tensor) -> bool:
    """True when the compiled kernels can run on tensors like ``q`` (a CPU float tensor, and the kernels
    built; this builds them on first call)."""
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


def _common(q, k, v, lo, hi, scale, bias, keep, dropout):
    """The ctypes argument block shared by both kernels; ``keep`` collects tensors that must outlive the call."""
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the compiled interval kernels are unavailable: {status()}")
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if lo.shape != hi.shape or lo.dim() != 2 or lo.shape[0] not in (1, B) or lo.shape[1] != L:
        raise ValueError(f"lo and hi: expected int64 (1 or B={B}, L={L}); got {tuple(lo.shape)} and {tuple(hi.shape)}")
    lo = lo.to(device="cpu", dtype=torch.int64).contiguous()
    hi = hi.to(device="cpu", dtype=torch.int64).contiguous()
    a = _Args(lo=lo.data_ptr(), hi=hi.data_ptr(), lo_batch_stride=0 if lo.shape[0] == 1 else L, B=B, H=H, Hkv=Hkv,
              L=L, S=S, D=D, Dv=Dv, scale=float(scale), tile=Q_TILE, kv_chunk=KV_CHUNK,
              nthreads=torch.get_num_threads())
    if dropout is not None:
        p, seed = dropout
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout: p must be in [0, 1); got {p}")
        a.dropout_p, a.seed = float(p), int(seed)
    keep += [lo, hi]
    if bias is not None:
        g, offset = bias
        if g.dim() != 2 or g.shape[0] not in (1, H, B * H):
            raise ValueError(f"bias: expected a (1, H={H} or B*H={B * H}, n) table of offsets; got {tuple(g.shape)}")
        g = g.to(_acc_dtype(q.dtype)).contiguous()
        n = g.shape[1]
        a.bias = g.data_ptr()
        a.bias_offset = int(offset)
        a.bias_b_stride = H * n if g.shape[0] == B * H and B > 1 else 0
        a.bias_h_stride = n if g.shape[0] > 1 else 0
        keep.append(g)
    return lib, a


def span_forward(q, k, v, lo, hi, scale: float, bias=None, dropout=None):
    """Exact attention for interval masks: ``(out, lse)``.

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv). float32 and float64 run as they are;
            bfloat16 and float16 are computed in float32.
        lo, hi: int64 (1 or B, L): row i sees keys ``lo[i] <= j < hi[i]``.
        scale: the factor on q k^T.
        bias: None, or ``(g, offset)``: a bias that depends only on the head and ``j - i``, added to the
            scaled scores; ``g`` is (1, n), (H, n) or (B * H, n) and the bias of row i, key j is
            ``g[row, j - i + offset]`` (indices must stay in ``[0, n)`` for every visible pair).
        dropout: None, or ``(p, seed)``: each weight is kept with probability 1 - p and scaled by 1 / (1 - p),
            the decision a hash of (seed, b * H + h, i, j) (see :func:`dropout_multipliers`); lse stays that
            of the undropped weights. The backward must get the same ``(p, seed)``.

    Returns:
        out (B, H, L, Dv) in q's dtype, lse (B, H, L) float32 (float64 for float64); rows with no visible
        key get out 0 and lse -inf.

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 1, 4, 8, dtype=torch.float64)
        >>> lo = torch.zeros(1, 4, dtype=torch.long); hi = torch.arange(1, 5).view(1, 4)  # causal
        >>> if available(q):
        ...     out, lse = span_forward(q, k, v, lo, hi, 0.35)
        ...     assert torch.allclose(out[0, 0, 0], v[0, 0, 0])  # the first row sees only the first key
    """
    keep: list = []
    lib, a = _common(q, k, v, lo, hi, scale, bias, keep, dropout)
    B, H, L, _ = q.shape
    dt = _acc_dtype(q.dtype)
    q_, k_, v_ = (t.to(dt).contiguous() for t in (q, k, v))
    out = torch.empty(B, H, L, v.shape[-1], dtype=dt)
    lse = torch.empty(B, H, L, dtype=dt)
    a.q, a.k, a.v, a.out_w, a.lse_w = q_.data_ptr(), k_.data_ptr(), v_.data_ptr(), out.data_ptr(), lse.data_ptr()
    (lib.salience_interval_forward_f32 if dt == torch.float32 else lib.salience_interval_forward_f64)(a)
    return out.to(q.dtype), lse


def span_backward(q, k, v, out, lse, dout, dlse, lo, hi, scale: float, bias=None, dropout=None):
    """Gradients of interval-masked attention, recomputed from the logsumexp.

    Args:
        q, k, v, lo, hi, scale, bias, dropout: as for :func:`span_forward`.
        out, dout: (B, H, L, Dv), the forward's output and its gradient.
        lse: (B, H, L) logsumexp of the forward (-inf on rows with no visible key); dlse: its gradient or None.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v. Rows with no visible key get zero gradients.

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 1, 4, 8, dtype=torch.float64)
        >>> lo = torch.zeros(1, 4, dtype=torch.long); hi = torch.arange(1, 5).view(1, 4)  # causal
        >>> if available(q):
        ...     out, lse = span_forward(q, k, v, lo, hi, 0.35)
        ...     dq, dk, dv = span_backward(q, k, v, out, lse, torch.ones_like(out), None, lo, hi, 0.35)
        ...     assert dq.shape == q.shape and dk.shape == k.shape
    """
    keep: list = []
    lib, a = _common(q, k, v, lo, hi, scale, bias, keep, dropout)
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dt = _acc_dtype(q.dtype)
    ins = [t.to(dt).contiguous() for t in (q, k, v, out, dout, lse)]
    dl = None if dlse is None else dlse.to(dt).contiguous()
    dq = torch.zeros(B, H, L, D, dtype=dt)
    dk = torch.zeros(B, H, S, D, dtype=dt)
    dv = torch.zeros(B, H, S, Dv, dtype=dt)
    a.q, a.k, a.v, a.out, a.dout, a.lse = (t.data_ptr() for t in ins)
    a.dlse = None if dl is None else dl.data_ptr()
    a.dq, a.dk, a.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    (lib.salience_interval_backward_f32 if dt == torch.float32 else lib.salience_interval_backward_f64)(a)
    if Hkv != H:  # per-query-head key/value gradients: sum each group
        dk = dk.view(B, Hkv, H // Hkv, S, D).sum(2)
        dv = dv.view(B, Hkv, H // Hkv, S, Dv).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def dropout_multipliers(seed: int, bh: int, rows: range, keys: range, p: float) -> torch.Tensor:
    """The dropout multipliers (0 or 1 / (1 - p)) the kernels apply to the weights of head row ``bh`` (= b * H + h),
    query rows ``rows`` and keys ``keys``: float64 (len(rows), len(keys)). For tests and inspection.

    Example:
        >>> z = dropout_multipliers(7, 0, range(4), range(1000), 0.25) if available(torch.zeros(1)) else None
        >>> z is None or (set(z.unique().tolist()) <= {0.0, 1 / 0.75} and abs(float((z > 0).double().mean()) - 0.75) < 0.05)
        True
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the compiled interval kernels are unavailable: {status()}")
    if rows.step != 1 or keys.step != 1:
        raise ValueError("rows and keys: contiguous ranges (step 1)")
    z = torch.empty(len(rows), len(keys), dtype=torch.float64)
    lib.salience_interval_dropout_f64(z.data_ptr(), len(rows), len(keys), int(seed), int(bh), rows.start,
                                      keys.start, float(p))
    return z


class IntervalPlan:
    """An interval mask with an optional additive relative bias and optional dropout, both directions on the
    compiled kernels.

    Args:
        lo, hi: int64 (1 or B, L) row intervals (local key coordinates), as from ``spans.row_spans``.
        bias_fn: None, or ``bias_fn(d) -> (H or 1, n)`` float tensor, the bias at global offsets
            ``d = kv_idx - q_idx``.
        B, H, L, S, q_offset, kv_offset: the block in the global problem.
        dropout_p: dropout on the weights; the plan draws its seed from torch's default generator when it is
            made, so every run of one plan drops the same weights (``salience.attention`` makes a plan per call).

    Example:
        >>> import torch
        >>> from salience import masks, scores
        >>> from salience.kernels import spans
        >>> q = torch.randn(2, 2, 16, 8)
        >>> lo, hi = spans.row_spans(masks.prefix_lm(4).bind(16, 16), 2, 16, 16)
        >>> slopes = scores.alibi(2).slopes
        >>> p = IntervalPlan(lo, hi, lambda d: -slopes.view(-1, 1) * d.abs(), 2, 2, 16, 16)
        >>> if available(q):
        ...     out, lse = p.forward(q, q, q, 0.35)
        ...     assert out.shape == q.shape
    """

    def __init__(self, lo, hi, bias_fn, B, H, L, S, *, q_offset=0, kv_offset=0, dtype=torch.float32, device=None,
                 dropout_p: float = 0.0):
        self.lo, self.hi = lo, hi
        self.bias = None
        if bias_fn is not None:
            dmin = kv_offset - q_offset - L + 1
            g = bias_fn(torch.arange(dmin, dmin + L + S - 1, device=device))
            g = (g if g.dim() == 2 else g.unsqueeze(0)).to(_acc_dtype(dtype))
            self.bias = (g, L - 1)  # local (i, j) -> g[:, j - i + L - 1]
        self.dropout = None
        if dropout_p > 0:
            self.dropout = (float(dropout_p), int(torch.randint(0, 2**62, (1,)).item()))
        self.computed = int((hi - lo).clamp(min=0).sum()) * (B // lo.shape[0])

    def summary(self) -> dict:
        out = {"kernel": "compiled interval kernel", "q_tile": Q_TILE}
        if self.dropout is not None:
            out["dropout_p"] = self.dropout[0]
        return out

    def forward(self, q, k, v, scale: float):
        return span_forward(q, k, v, self.lo, self.hi, scale, bias=self.bias, dropout=self.dropout)

    def backward(self, q, k, v, out, lse, dout, dlse, scale: float):
        return span_backward(q, k, v, out, lse, dout, dlse, self.lo, self.hi, scale, bias=self.bias,
                             dropout=self.dropout)
