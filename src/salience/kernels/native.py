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
step at install time and nothing is downloaded. Next to the library a manifest (``interval_<key>.json``,
written after it, atomically) records its size and sha256; a cached library is loaded only when both match
(loading a truncated one would kill the process), else it is rebuilt. Without a compiler, or if the build
fails, :func:`available` is False, :func:`status` says why, one :class:`NativeFallbackWarning` per process
says so too, and salience keeps its torch-kernel paths: same results, slower. Set ``SALIENCE_NATIVE=0`` to
turn it off (no warning).

The kernels' preconditions are met in one place (:func:`_prepare`) before every call: operands on the CPU
with the shapes below (errors name the argument), cast to the working dtype and made C-contiguous and
element-aligned only when they are not already (so strided, transposed and stride-0 expanded inputs are
correct); key intervals clipped to the keys that exist; bias indices checked against the table.

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
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..reference import _acc_dtype

__all__ = ["available", "describe", "status", "span_forward", "span_backward", "IntervalPlan",
           "dropout_multipliers", "NativeFallbackWarning", "Q_TILE", "KV_CHUNK"]

#: query rows per tile and keys per inner chunk of the compiled kernels
Q_TILE = 64
KV_CHUNK = 512

_SOURCE = Path(__file__).with_name("interval.cpp")
_ABI = 4
_LOCK = threading.Lock()
_STATE: dict = {}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MANIFEST_FORMAT = 1
_OFF_HINT = "set SALIENCE_NATIVE=0 to use torch's kernels without trying (and without this warning)"


class NativeFallbackWarning(RuntimeWarning):
    """The compiled kernels cannot be used in this process (the reason is in the message and in :func:`status`);
    salience runs its torch-kernel paths instead. Emitted once per process; not with ``SALIENCE_NATIVE=0``."""


class _Unavailable(RuntimeError):
    """A reason the compiled kernels cannot be used, worded for :func:`status` (no exception type prefix)."""


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


def _compiler() -> list:
    """The compiler command (``$CXX``, which may carry arguments, else ``g++`` or ``c++`` on PATH)."""
    env = os.environ.get("CXX", "").strip()
    if env:
        argv = shlex.split(env)
        if shutil.which(argv[0]) is None:
            where = "is not an executable file" if os.sep in argv[0] else "is not on PATH"
            raise _Unavailable(f"C++ compiler not found: $CXX={env!r} {where}; point CXX at an installed compiler "
                               "or install g++")
        return argv
    for name in ("g++", "c++"):
        found = shutil.which(name)
        if found:
            return [found]
    raise _Unavailable("no C++ compiler found: $CXX is not set and neither g++ nor c++ is on PATH; install g++ "
                       "(e.g. apt-get install g++) or set CXX to a compiler")


def _manifest(lib: Path) -> Path:
    return lib.with_suffix(".json")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, flushed to disk before
    ``os.replace``: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _verify(lib: Path):
    """None when ``lib`` matches the size and sha256 its manifest records; otherwise why it does not. Reads the
    file; never loads it."""
    man = _manifest(lib)
    try:
        meta = json.loads(man.read_text())
    except FileNotFoundError:
        return f"no manifest {man.name}"
    except (OSError, ValueError) as e:
        return f"unreadable manifest {man.name}: {e}"
    try:
        data = lib.read_bytes()
    except OSError as e:
        return f"unreadable: {e}"
    if not isinstance(meta, dict) or meta.get("format") != _MANIFEST_FORMAT:
        return f"manifest {man.name} of another format"
    if len(data) != meta.get("size"):
        return f"{len(data)} bytes where its manifest records {meta.get('size')} (truncated or damaged)"
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return "its sha256 differs from the one its manifest records (damaged)"
    return None


def _compile(cxx: list, flags: list, libs: list, target: Path, source: Path = _SOURCE) -> None:
    """Build ``target`` from ``source`` and then its manifest, each replaced atomically. OSError: the cache
    directory is not usable; _Unavailable: the compiler could not build it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_so = Path(tmp) / target.name
        cmd = [*cxx, *flags, str(source), "-o", str(tmp_so), *libs]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise _Unavailable(f"the C++ compiler {shlex.join(cxx)} took over 300 s on {source.name}") from None
        except OSError as e:  # found on PATH but not runnable
            raise _Unavailable(f"the C++ compiler {shlex.join(cxx)} could not be run: {e}") from None
        if run.returncode != 0 or not tmp_so.is_file():
            said = "\n".join(x.strip() for x in (run.stdout, run.stderr) if x and x.strip())
            said = said[-800:] if said else "(it printed nothing)"
            raise _Unavailable(f"the C++ compiler {shlex.join(cxx)} failed (exit status {run.returncode}) on "
                               f"{source}: {said}")
        data = tmp_so.read_bytes()
        with open(tmp_so, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_so, target)  # atomic: concurrent builders never load a half-written file
    meta = {"format": _MANIFEST_FORMAT, "file": target.name, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    _write_atomically(_manifest(target), (json.dumps(meta, indent=1) + "\n").encode())


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def source_digest(source: Path) -> bytes:
    """The bytes a build depends on: ``source`` followed by every local header it includes with
    ``#include "name"`` (resolved next to the including file, recursively, each once), so that editing a shared
    header gives a new cache key instead of loading a library built from the old one."""
    seen, parts, todo = set(), [], [Path(source)]
    while todo:
        path = todo.pop(0).resolve()
        if path in seen:
            continue
        seen.add(path)
        data = path.read_bytes()
        parts.append(path.name.encode() + b"\0" + data)
        todo += [path.parent / m.decode() for m in _INCLUDE.findall(data)]
    return b"\0".join(parts)


def build_library(source: Path, extra_flags=(), blas: bool = True) -> ctypes.CDLL:
    """Compile ``source`` (a C++ file next to this one) into a shared library, or load the verified cached
    build, and return it; raises ``_Unavailable`` (a RuntimeError) with the reason when it cannot. The cache key
    covers the source and the local headers it includes (:func:`source_digest`), the compiler, the flags
    (``extra_flags`` appended), the torch version and the CPU flags; ``blas``: link libtorch_cpu for its BLAS.
    Used for interval.cpp and decode.cpp."""
    src = source_digest(source)
    cxx = _compiler()
    torch_lib = Path(torch.__file__).with_name("lib")
    # -fno-trapping-math lets the exp loops vectorise (their float -> int conversion); no -ffast-math: the
    # kernels rely on IEEE infinities and on their sums running in the written order
    flags = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared",
             "-std=c++17", *extra_flags]
    libs = [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"] if blas else []
    ident = "\n".join([torch.__version__, _cpu_flags(), *cxx, *flags, *libs]).encode()
    name = f"{source.stem}_{hashlib.sha256(src + ident).hexdigest()[:16]}.so"
    problems = []
    for root in _cache_dirs():
        target = root / name
        bad = _verify(target)
        if bad is not None:
            damaged = target.exists() and not bad.startswith("no manifest")
            try:
                _compile(cxx, flags, libs, target, source)
            except OSError as e:  # an unwritable cache directory: try the next one
                problems.append(f"cache directory {root} is not usable: {e}")
                continue
            except _Unavailable as e:
                if damaged:
                    raise _Unavailable(f"the cached library {target} does not verify ({bad}) and rebuilding it "
                                       f"failed: {e}") from None
                raise
            bad = _verify(target)
            if bad is not None:  # e.g. replaced meanwhile by a concurrent, different build; never load it
                problems.append(f"{target} does not verify right after it was built ({bad})")
                continue
        try:
            lib = ctypes.CDLL(str(target))  # verified just above: size and sha256 as built
            break
        except OSError as e:
            problems.append(f"loading {target} failed: {e}")
    else:
        raise _Unavailable("; ".join(problems) + "; set SALIENCE_CACHE to a writable directory")
    return lib


def _build() -> ctypes.CDLL:
    lib = build_library(_SOURCE)
    target = lib._name
    lib.salience_interval_abi.restype = ctypes.c_int
    lib.salience_interval_args_size.restype = ctypes.c_int64
    if lib.salience_interval_abi() != _ABI or lib.salience_interval_args_size() != ctypes.sizeof(_Args):
        raise _Unavailable(f"{target} does not match this version of salience (ABI); delete it to rebuild")
    for fn in ("forward_f32", "forward_f64", "backward_f32", "backward_f64"):
        f = getattr(lib, "salience_interval_" + fn)
        f.restype = None
        f.argtypes = [ctypes.POINTER(_Args)]
    i64 = ctypes.c_int64
    lib.salience_interval_dropout_f64.restype = None
    lib.salience_interval_dropout_f64.argtypes = [ctypes.c_void_p, i64, i64, i64, i64, i64, i64, ctypes.c_double]
    return lib


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside salience (so a warning points at the user's call)."""
    pkg = str(Path(__file__).resolve().parent.parent) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        level += 1
        frame = frame.f_back
    return level


def load_once(state: dict, lock, build, what: str, fallback: str) -> None:
    """Fill ``state["lib"]`` (a library or None) and ``state["why"]`` once per process: ``build()`` unless
    ``SALIENCE_NATIVE=0`` or not Linux; one :class:`NativeFallbackWarning` naming ``what`` and ``fallback`` when it
    cannot be built (none when turned off). Shared by the interval and decode kernels."""
    if "lib" in state:
        return
    with lock:
        if "lib" in state:
            return
        lib, why = None, ""
        if os.environ.get("SALIENCE_NATIVE", "1") == "0":
            why = "turned off by SALIENCE_NATIVE=0"
        elif not sys.platform.startswith("linux"):
            why = f"the compiled kernels are built for Linux only (this is {sys.platform})"
        else:
            try:
                lib, why = build(), "compiled"
            except _Unavailable as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001 - reported by status(); the torch paths are used
                why = f"{type(e).__name__}: {e}"
        state["why"], state["lib"] = why, lib
        if lib is None and why != "turned off by SALIENCE_NATIVE=0" and not state.get("warned"):
            state["warned"] = True  # once per process
            warnings.warn(f"salience: {what} unavailable, so {fallback} used (same results, slower): {why}. Fix "
                          f"that, or {_OFF_HINT}.", NativeFallbackWarning, stacklevel=_caller_stacklevel())


def _lib():
    load_once(_STATE, _LOCK, _build, "the compiled interval kernels are", "torch's kernels are")
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


def _operand(name: str, t, dims: str, want: tuple, dt: torch.dtype) -> torch.Tensor:
    """``t`` as the kernels read it: a CPU tensor of shape ``want`` (None: any size), in ``dt``, C-contiguous and
    aligned to its element size. Copies only what is not so already (a cast, then ``.contiguous()``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {dims}; got {type(t).__name__}")
    if t.dim() != len(want):
        raise ValueError(f"{name}: expected {len(want)} dimensions {dims}; got shape {tuple(t.shape)}")
    if any(w is not None and w != n for w, n in zip(want, t.shape)):
        shown = ", ".join(dims.strip("()").split(", ")[i] if w is None else str(w) for i, w in enumerate(want))
        raise ValueError(f"{name}: expected {dims} = ({shown}); got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: expected a floating-point tensor (float32, float64, bfloat16 or float16); got "
                         f"{t.dtype}; convert it with .float()")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the compiled kernels take CPU tensors; got one on {t.device}; move it with "
                         ".cpu(), or call salience.attention, which picks a path for the device")
    t = t.to(dt).contiguous()  # strided, transposed or stride-0 expanded views become dense (B, H, N, D) rows
    if t.numel() and t.data_ptr() % t.element_size():  # e.g. torch.frombuffer at an odd offset
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _prepare(q, k, v, lo, hi, scale, bias, dropout, *, out=None, dout=None, lse=None, dlse=None, backward=False):
    """The one place where the kernels' preconditions are checked or met, before any ctypes call.

    The kernels read q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) and, in the backward, out and dout
    (B, H, L, Dv), lse and dlse (B, H, L) as dense C-contiguous CPU arrays of the working dtype (float64 for
    float64, else float32), with H a multiple of Hkv and D, Dv >= 1; lo and hi as dense int64 (1 or B, L) with
    0 <= lo, hi <= S; the bias as a dense (1, H or B*H, n) table whose index ``j - i + offset`` lies in [0, n)
    for every visible (i, j). Operands are converted (cast, made contiguous, intervals clipped to the keys that
    exist) only where needed; what cannot be met raises ValueError naming the argument, what was seen and the fix.

    Returns ``(lib, args, ops)``: ``ops`` maps each operand's name to the tensor whose pointer is in ``args``
    (keep it alive over the call).
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the compiled interval kernels are unavailable: {status()}")
    ops, (B, H, Hkv, L, S, D, Dv) = _tensors(q, k, v, out, dout, lse, dlse, backward)
    lo, hi = _intervals(lo, hi, B, L, S)
    ops["lo"], ops["hi"] = lo, hi
    a = _Args(lo=lo.data_ptr(), hi=hi.data_ptr(), lo_batch_stride=0 if lo.shape[0] == 1 else L, B=B, H=H, Hkv=Hkv,
              L=L, S=S, D=D, Dv=Dv, scale=float(scale), tile=Q_TILE, kv_chunk=KV_CHUNK,
              nthreads=max(1, torch.get_num_threads()))
    if dropout is not None:
        p, seed = dropout
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout: p must be in [0, 1); got {p}")
        a.dropout_p, a.seed = float(p), int(seed)
    if bias is not None:
        g, offset = _bias_table(bias, lo, hi, B, H, ops["q"].dtype)
        a.bias, a.bias_offset = g.data_ptr(), offset
        a.bias_b_stride = H * g.shape[1] if g.shape[0] == B * H and B > 1 else 0
        a.bias_h_stride = g.shape[1] if g.shape[0] > 1 else 0
        ops["bias"] = g
    return lib, a, ops


def _tensors(q, k, v, out, dout, lse, dlse, backward):
    """The dense operands of the working dtype, and the sizes (B, H, Hkv, L, S, D, Dv)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q: expected 4 dimensions (B, H, L, D); got {got}")
    B, H, L, D = q.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: expected a floating-point tensor (float32, float64, bfloat16 or float16); got {q.dtype}; "
                         "convert it with .float()")
    dt = _acc_dtype(q.dtype)
    ops = {"q": _operand("q", q, "(B, H, L, D)", (B, H, L, D), dt)}
    ops["k"] = _operand("k", k, "(B, Hkv, S, D)", (B, None, None, D), dt)
    Hkv, S = ops["k"].shape[1], ops["k"].shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k: the query heads H={H} must be a multiple of Hkv={Hkv}, the key/value heads (query "
                         f"head i uses key head i // (H // Hkv)); got k of shape {tuple(k.shape)}")
    ops["v"] = _operand("v", v, "(B, Hkv, S, Dv)", (B, Hkv, S, None), dt)
    Dv = ops["v"].shape[3]
    if D < 1 or Dv < 1:
        raise ValueError(f"q, v: the compiled kernels need head dims D >= 1 and Dv >= 1; got D={D}, Dv={Dv}")
    if backward:
        ops["out"] = _operand("out", out, "(B, H, L, Dv)", (B, H, L, Dv), dt)
        ops["dout"] = _operand("dout", dout, "(B, H, L, Dv)", (B, H, L, Dv), dt)
        ops["lse"] = _operand("lse", lse, "(B, H, L)", (B, H, L), dt)
        if dlse is not None:
            ops["dlse"] = _operand("dlse", dlse, "(B, H, L)", (B, H, L), dt)
    return ops, (B, H, Hkv, L, S, D, Dv)


def _intervals(lo, hi, B: int, L: int, S: int):
    """The row intervals as dense int64 CPU (1 or B, L) tables, clipped to the keys that exist."""
    if not (isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor)) or lo.shape != hi.shape \
            or lo.dim() != 2 or lo.shape[0] not in (1, B) or lo.shape[1] != L:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (lo, hi)]
        raise ValueError(f"lo and hi: expected int64 (1 or B={B}, L={L}); got {shapes[0]} and {shapes[1]}")
    if lo.dtype.is_floating_point or lo.dtype.is_complex or lo.dtype == torch.bool or \
            hi.dtype.is_floating_point or hi.dtype.is_complex or hi.dtype == torch.bool:
        raise ValueError(f"lo and hi: expected integer tensors; got {lo.dtype} and {hi.dtype}; the interval bounds are "
                         "key indices (use .long())")
    # keys outside [0, S) do not exist: clipping is what [lo, hi) means, and keeps every read inside k and v
    lo = lo.to(device="cpu", dtype=torch.int64).clamp(0, S).contiguous()
    hi = hi.to(device="cpu", dtype=torch.int64).clamp(0, S).contiguous()
    return lo, hi


def _bias_table(bias, lo, hi, B: int, H: int, dt):
    """``(table, offset)``: the (1, H or B*H, n) bias table of the working dtype, checked to cover every visible
    ``j - i + offset``."""
    g, offset = bias
    if not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[0] not in (1, H, B * H):
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"bias: expected a (1, H={H} or B*H={B * H}, n) table of offsets; got {got}")
    if not g.dtype.is_floating_point:
        raise ValueError(f"bias: expected a floating-point table; got {g.dtype}")
    g = g.to(device="cpu", dtype=dt).contiguous()
    n, offset = g.shape[1], int(offset)
    rows = (hi > lo).nonzero()  # every visible (i, j) must index the table: lo - i + offset >= 0, hi - 1 - i
    if rows.numel():            # + offset < n (the extremes of j - i on each row)
        i = rows[:, 1]
        first, last = lo[rows[:, 0], i] - i + offset, hi[rows[:, 0], i] - 1 - i + offset
        bad = (first < 0) | (last >= n)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            idx = int(first[r]) if int(first[r]) < 0 else int(last[r])
            raise ValueError(f"bias: the table has n={n} offsets, but row {int(i[r])} (keys {int(lo[rows[r, 0], i[r]])}"
                             f"..{int(hi[rows[r, 0], i[r]]) - 1}) needs index {idx} = j - i + offset {offset}; "
                             "give a table that covers every visible j - i (n >= L + S - 1 with offset L - 1 "
                             "covers all)")
    return g, offset


def span_forward(q, k, v, lo, hi, scale: float, bias=None, dropout=None):
    """Exact attention for interval masks: ``(out, lse)``.

    Args:
        q: (B, H, L, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv). float32 and float64 run as they are;
            bfloat16 and float16 are computed in float32.
        lo, hi: int64 (1 or B, L): row i sees keys ``lo[i] <= j < hi[i]`` (of those that exist: bounds outside
            ``[0, S]`` are clipped).
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
    lib, a, ops = _prepare(q, k, v, lo, hi, scale, bias, dropout)
    B, H, L, _ = q.shape
    dt = ops["q"].dtype
    out = torch.empty(B, H, L, ops["v"].shape[-1], dtype=dt)
    lse = torch.empty(B, H, L, dtype=dt)
    a.q, a.k, a.v = ops["q"].data_ptr(), ops["k"].data_ptr(), ops["v"].data_ptr()
    a.out_w, a.lse_w = out.data_ptr(), lse.data_ptr()
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
    lib, a, ops = _prepare(q, k, v, lo, hi, scale, bias, dropout, out=out, dout=dout, lse=lse, dlse=dlse,
                           backward=True)
    B, H, L, D = q.shape
    Hkv, S, Dv = ops["k"].shape[1], ops["k"].shape[2], ops["v"].shape[-1]
    dt = ops["q"].dtype
    dq = torch.zeros(B, H, L, D, dtype=dt)
    dk = torch.zeros(B, H, S, D, dtype=dt)
    dv = torch.zeros(B, H, S, Dv, dtype=dt)
    a.q, a.k, a.v, a.out, a.dout, a.lse = (ops[n].data_ptr() for n in ("q", "k", "v", "out", "dout", "lse"))
    a.dlse = ops["dlse"].data_ptr() if "dlse" in ops else None
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
