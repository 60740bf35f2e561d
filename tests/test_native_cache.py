"""The compiled kernels at their edges: the cached library is verified before it is loaded (a damaged one is
rebuilt, never loaded), status() and a one-time warning name the real cause of a fallback, and the kernels'
preconditions (shapes, strides, dtype, device, alignment) are checked or met in one place, so that strided
inputs give the reference's results through every native path.

Loading a damaged library can kill the process (SIGBUS inside ``ctypes.CDLL``), so those cases run in one
child process, over a library built once per module into a temporary ``SALIENCE_CACHE``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tests.test_kernels import IDS, IDS2

import salience
from salience import masks as M
from salience import reference, structure
from salience import scores as Sc
from salience.kernels import native
from salience.testing import assert_rel_close

HAS_CXX = shutil.which(os.environ.get("CXX") or "g++") is not None
needs_native = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on this machine: the compiled kernels "
                                  "cannot be built")


@pytest.fixture
def fresh_state(monkeypatch):
    """A process that has not decided yet whether the compiled kernels are usable (nor warned about it)."""
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.delenv("SALIENCE_NATIVE", raising=False)


def _status_and_warnings():
    """native.status() in a fresh state, and the messages of the warnings it emitted."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        why = native.status()
    return why, [str(w.message) for w in got if "compiled interval kernels" in str(w.message)]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------------------------- the cached library

DAMAGE = ["half", "4KiB", "garbage", "half_and_rebuild_fails"]

_CHILD = r"""
import json, os, sys, torch
from salience import masks as M, reference
from salience.kernels import native
for d in json.loads(sys.argv[1]):
    os.environ["SALIENCE_CACHE"] = d
    if d.endswith("rebuild_fails"):  # the stand-in compiler now fails
        open(os.path.join(os.path.dirname(d), "compiler_broken"), "w").close()
    native._STATE.clear()
    why = native.status()
    ok = None
    if native._STATE["lib"] is not None:  # the rebuilt library computes
        q = torch.randn(1, 2, 70, 8, dtype=torch.float64)
        lo, hi = torch.zeros(1, 70, dtype=torch.long), torch.arange(1, 71).view(1, 70)
        out, lse = native.span_forward(q, q, q, lo, hi, 0.3)
        r = reference.attention(q, q, q, mask=M.causal(), scale=0.3)
        ok = bool(torch.allclose(out, r.out, rtol=1e-10, atol=1e-11))
    print(json.dumps([d, why, ok]), flush=True)
"""


def _copying_compiler(path: Path, flag: Path) -> Path:
    """A stand-in compiler that "builds" by copying the library this process built (fast, same bytes) and
    fails, printing an error, once ``flag`` exists."""
    if native._lib() is None:
        pytest.skip(f"the compiled kernels are not built here: {native.status()}")
    good = Path(native._lib()._name)
    return _script(path, f'if [ -e "{flag}" ]; then echo "cxx.sh: licence server unreachable" >&2; exit 1; fi\n'
                   'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
                   f'exec cp "{good}" "$out"\n')


@pytest.fixture(scope="module")
def damaged_caches(tmp_path_factory):
    """Per damage: the cache directory, what the child process said about it (status, whether the library it
    loaded computes) and the good library's bytes."""
    root = tmp_path_factory.mktemp("native_cache")
    flag = root / "compiler_broken"
    cxx = str(_copying_compiler(root / "cxx.sh", flag))
    with pytest.MonkeyPatch.context() as mp:  # one good cache entry, made the normal way
        mp.setenv("SALIENCE_CACHE", str(root / "base"))
        mp.setenv("CXX", cxx)
        mp.setattr(native, "_STATE", {})
        assert native.status() == "compiled"
    (good,) = (root / "base").glob("interval_*.so")
    data = good.read_bytes()
    cases = {}
    for mode in DAMAGE:
        d = root / mode
        shutil.copytree(good.parent, d)
        lib = d / good.name
        if mode.startswith("half"):
            lib.write_bytes(data[: len(data) // 2])
        elif mode == "4KiB":
            lib.write_bytes(data[:4096])
        else:  # the right size, the wrong bytes
            lib.write_bytes(bytes((i * 37 + 11) % 256 for i in range(len(data))))
        cases[mode] = d
    env = {k: v for k, v in os.environ.items() if k != "SALIENCE_NATIVE"}
    env["CXX"] = cxx
    arg = json.dumps([str(d) for d in cases.values()])
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHILD, arg], capture_output=True, text=True,
                         env=env, timeout=300)
    said = {}
    for line in run.stdout.splitlines():
        d, why, ok = json.loads(line)
        said[d] = (why, ok)
    return {mode: (d, said.get(str(d)), data, run) for mode, d in cases.items()}


@needs_native
@pytest.mark.parametrize("mode", DAMAGE[:3])
def test_a_damaged_cached_library_is_detected_and_rebuilt(mode, damaged_caches):
    d, said, data, run = damaged_caches[mode]
    assert said is not None, (f"the child process died before reporting on the {mode} library "
                              f"(rc {run.returncode}): {run.stderr[-1500:]}")
    why, ok = said
    assert why == "compiled" and ok, said
    (lib,) = d.glob("interval_*.so")
    assert lib.stat().st_size == len(data)  # rebuilt whole (the compiler is deterministic)
    assert native._verify(lib) is None


@needs_native
def test_a_damaged_library_that_cannot_be_rebuilt_falls_back_without_loading_it(damaged_caches):
    d, said, data, run = damaged_caches["half_and_rebuild_fails"]
    assert said is not None, f"the child process died (rc {run.returncode}): {run.stderr[-1500:]}"
    why, ok = said
    assert ok is None  # no library loaded: the torch paths are used
    assert "does not verify" in why and "licence server unreachable" in why, why
    (lib,) = d.glob("interval_*.so")
    assert native._verify(lib) is not None


@needs_native
def test_manifest_is_written_next_to_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(_copying_compiler(tmp_path.parent / f"{tmp_path.name}-cxx.sh", tmp_path / "no")))
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    assert native.status() == "compiled"
    (lib,) = tmp_path.glob("interval_*.so")
    meta = json.loads(lib.with_suffix(".json").read_text())
    assert meta["size"] == lib.stat().st_size and len(meta["sha256"]) == 64
    assert native._verify(lib) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([lib.name, lib.with_suffix(".json").name])
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte: same size, another hash
    tmp = tmp_path / "damaged"
    tmp.write_bytes(data)
    os.replace(tmp, lib)  # a new file: this process has the old one mapped
    assert "sha256" in native._verify(lib)


# -------------------------------------------------------------------------------------- status, warning


def test_missing_compiler_named_in_status(tmp_path, fresh_state, monkeypatch):
    missing = tmp_path / "no-such-compiler"
    monkeypatch.setenv("CXX", str(missing))
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    why, warned = _status_and_warnings()
    assert "C++ compiler" in why and str(missing) in why and "not found" in why, why
    assert "cache directory" not in why, why  # not blamed on the cache
    assert len(warned) == 1 and why in warned[0], warned
    assert not native.available(torch.zeros(1))


def test_no_compiler_on_path_named_in_status(tmp_path, fresh_state, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, no c++
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    why, warned = _status_and_warnings()
    assert "g++" in why and "PATH" in why and "CXX" in why, why
    assert len(warned) == 1 and why in warned[0], warned


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_failing_compiler_output_in_status(stream, tmp_path, fresh_state, monkeypatch):
    redirect = " >&2" if stream == "stderr" else ""
    cxx = _script(tmp_path / "badcc", f'echo "badcc: something went wrong"\necho "badcc: error: no licence"{redirect}\n'
                  "exit 1\n")
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    why, warned = _status_and_warnings()
    assert "badcc: error: no licence" in why and "exit status 1" in why and str(cxx) in why, why
    assert len(warned) == 1 and why in warned[0], warned
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_the_fallback_warns_once_naming_the_reason_and_the_fix(tmp_path, fresh_state, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    q = torch.randn(1, 2, 80, 8, requires_grad=True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(3):
            native.status()
            assert not native.available(q)
            salience.attention(q, q, q, mask=M.sliding_window(9), score_mod=Sc.alibi(2)).sum().backward()
    ours = [w for w in got if issubclass(w.category, native.NativeFallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in got]
    msg = str(ours[0].message)
    assert "no-such-compiler" in msg and "SALIENCE_NATIVE=0" in msg and "torch" in msg, msg
    assert ours[0].filename == __file__  # attributed to the caller, not to salience's internals


def test_turned_off_does_not_warn(fresh_state, monkeypatch):
    monkeypatch.setenv("SALIENCE_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.status() == "turned off by SALIENCE_NATIVE=0"


# ------------------------------------------------------------------------------- preconditions and strides

L0 = 80


def _every_other(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view with stride(-1) == 2 (differentiable)."""
    return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]


def _transposed(x: torch.Tensor, a: int = -1, b: int = -2) -> torch.Tensor:
    """x's values stored with dimensions a and b swapped: (B, H, D, S) storage for a (B, H, S, D) key."""
    return x.transpose(a, b).contiguous().transpose(a, b)


def _expanded(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """(1, 1, N, D) expanded to (B, H, N, D) with stride 0 on batch and heads."""
    return x.expand(B, H, *x.shape[2:])


def _layouts(dtype, seed=0, B=2, H=4, L=L0, D=8, Dv=12):
    """float64 bases and a function making (q, k, v, dout, dlse) in ``dtype`` with odd strides from them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    v1 = torch.randn(1, 1, L, Dv, generator=g, dtype=torch.float64)  # one value head, expanded
    do = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    dl = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    return q, k, v1, do, dl


def _strided_run(fn, bases, dtype):
    """fn(q, k, v) -> (out, lse) on strided views in ``dtype``; gradients to the bases through odd-strided
    upstream gradients."""
    q, k, v1, do, dl = bases
    B, H = q.shape[:2]
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v1)]  # fresh leaves per run
    qs, ks, vs = _every_other(leaves[0]), _transposed(leaves[1]), _expanded(leaves[2], B, H)
    assert qs.stride(-1) == 2 and ks.stride(-1) == ks.shape[2] and vs.stride(0) == 0 and vs.stride(1) == 0
    out, lse = fn(qs, ks, vs)
    dout = _every_other(do.to(out.dtype))
    dlse = _transposed(dl.to(lse.dtype), 0, 1)
    finite = torch.isfinite(lse)
    torch.autograd.backward([out, torch.where(finite, lse, torch.zeros_like(lse))],
                            [dout, torch.where(finite, dlse, torch.zeros_like(dlse))])
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _check_strided(mask, mod, dtype, expect_reason=None):
    bases = _layouts(dtype)
    q, k, v1, _, _ = bases
    v = _expanded(v1, *q.shape[:2])
    if expect_reason is not None:
        plan = salience.plan(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask, score_mod=mod)
        assert plan.backend == "spans" and expect_reason in (plan.reason + str(plan.details)), plan

    def fast(a, b, c):
        r = salience.attention(a, b, c, mask=mask, score_mod=mod, return_lse=True)
        return r.out, r.lse

    def ref(a, b, c):
        r = reference.attention(a, b, c, mask=mask, score_mod=mod)
        return r.out, r.lse

    got = _strided_run(fast, bases, dtype)
    ref64 = _strided_run(ref, bases, torch.float64)
    ref_t = ref64 if dtype == torch.float64 else _strided_run(ref, bases, dtype)
    what = f"{mask!r} {mod!r} {dtype}"
    assert_rel_close(got[0], ref_t[0], ref64[0], what="out " + what)
    assert_rel_close(got[1], ref_t[1], ref64[1], what="lse " + what)
    for name, a, b, c in zip("qkv", got[2], ref_t[2], ref64[2]):
        assert_rel_close(a, b, c, what=f"d{name} " + what)


STRIDED_CASES = [
    ("window_alibi", M.sliding_window(13), Sc.alibi(4), "compiled interval kernel"),
    ("documents_alibi", M.document(IDS[:L0]) & M.causal(), Sc.alibi(4), "compiled interval kernel"),
    ("documents_2d_alibi", M.document(IDS2[:, :L0]), Sc.alibi(4), "compiled interval kernel"),
    ("prefix_lm_alibi", M.prefix_lm(30), Sc.alibi(4), "compiled interval kernel"),
    ("window", M.sliding_window(13), None, "compiled interval kernel"),  # torch forward, compiled backward
]


# every mask in float64 (the layouts are met before the dtype matters), the first two in float32 too
STRIDED_PARAMS = [pytest.param(c, torch.float64, id=f"{c[0]}-f64") for c in STRIDED_CASES] + [
    pytest.param(c, torch.float32, id=f"{c[0]}-f32") for c in STRIDED_CASES[:2]]


@needs_native
@pytest.mark.parametrize("case,dtype", STRIDED_PARAMS)
def test_strided_inputs_through_the_public_api(case, dtype):
    """q with stride(-1) == 2, k stored (B, H, D, S), v expanded over batch and heads (stride 0), and odd-strided
    upstream gradients, through IntervalPlan (with ALiBi) or the span plan's compiled backward."""
    _, mask, mod, reason = case
    _check_strided(mask, mod, dtype, reason)


@needs_native
def test_strided_inputs_bfloat16_window_alibi():
    """bfloat16: torch's strided-bias forward with the compiled interval backward."""
    _check_strided(M.sliding_window(13), Sc.alibi(4), torch.bfloat16)


def _plan_inputs(B=2, H=4, Hkv=2, L=70, S=70, D=8, Dv=12):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*s, generator=g, dtype=torch.float64)
            for s in ((B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv), (B, H, L, Dv), (B, H, L))]


@needs_native
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["exact", "dropout"])
def test_interval_plan_gives_the_same_on_strided_and_contiguous_inputs(dropout_p):
    """IntervalPlan.forward/backward directly, every operand in an odd layout (including lo/hi expanded over the
    batch and a non-contiguous bias table): bit-for-bit the contiguous inputs' results."""
    q, k, v, do, dl = _plan_inputs()
    B, H, L, _ = q.shape
    S = k.shape[2]
    lo, hi = structure.row_intervals(M.prefix_lm(20).bind(L, S), B, L, S)
    slopes = Sc.alibi(H).slopes.double().view(-1, 1)
    torch.manual_seed(5)
    plain = native.IntervalPlan(lo, hi, lambda d: -slopes * d.abs().double(), B, H, L, S, dtype=torch.float64,
                                dropout_p=dropout_p)
    torch.manual_seed(5)
    odd = native.IntervalPlan(lo.expand(B, L), hi.expand(B, L),  # stride 0 over the batch
                              lambda d: (-slopes * d.abs().double()).t().contiguous().t(), B, H, L, S,
                              dtype=torch.float64, dropout_p=dropout_p)
    assert odd.lo.stride(0) == 0 and not odd.bias[0].is_contiguous()
    o1, l1 = plain.forward(q, k, v, 0.3)
    o2, l2 = odd.forward(_every_other(q), _transposed(k), _transposed(v), 0.3)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    g1 = plain.backward(q, k, v, o1, l1, do, dl, 0.3)
    g2 = odd.backward(_transposed(q), _every_other(k), _every_other(v), _transposed(o1), _transposed(l1, 0, 2),
                      _every_other(do), _transposed(dl, 1, 2), 0.3)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@needs_native
def test_misaligned_inputs_are_copied_before_the_kernel():
    q, k, v, _, _ = _plan_inputs(B=1, H=2, Hkv=2)
    buf = bytearray(q.numel() * 8 + 4)
    qm = torch.frombuffer(buf, dtype=torch.float64, offset=4, count=q.numel()).view(q.shape)
    qm.copy_(q)
    assert qm.data_ptr() % 8 != 0
    lo = torch.zeros(1, q.shape[2], dtype=torch.long)
    hi = torch.arange(1, q.shape[2] + 1).view(1, -1)
    a = native.span_forward(q, k, v, lo, hi, 0.3)
    b = native.span_forward(qm, k, v, lo, hi, 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_native
def test_intervals_outside_the_keys_mean_the_keys_that_exist():
    """lo < 0 or hi > S: the kernels read only keys [0, S) (the intervals are clipped), same as the reference."""
    q, k, v, _, _ = _plan_inputs(B=1)
    L, S = q.shape[2], k.shape[2]
    i = torch.arange(L).view(1, L)
    lo, hi = i - 40, i + 60  # reaches past both ends
    out, lse = native.span_forward(q, k, v, lo, hi, 0.3)
    allowed = ((torch.arange(S).view(1, S) >= lo.view(L, 1)) & (torch.arange(S).view(1, S) < hi.view(L, 1)))
    ref = reference.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask=allowed, scale=0.3)
    torch.testing.assert_close(out, ref.out, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(lse, ref.lse, rtol=1e-10, atol=1e-11)


@needs_native
def test_kernel_preconditions_are_checked_naming_the_argument():
    q, k, v, do, dl = _plan_inputs()
    B, H, L, _ = q.shape
    lo = torch.zeros(1, L, dtype=torch.long)
    hi = torch.full((1, L), k.shape[2], dtype=torch.long)
    out, lse = native.span_forward(q, k, v, lo, hi, 0.3)
    cases = [
        (dict(k=k[:1]), r"k: expected \(B, Hkv, S, D\) = \(2, Hkv, S, 8\)"),
        (dict(k=k[..., :5]), r"k: expected \(B, Hkv, S, D\) = \(2, Hkv, S, 8\)"),
        (dict(k=torch.cat([k, k[:, :1]], 1), v=torch.cat([v, v[:, :1]], 1)), r"H=4 .*multiple of Hkv=3"),
        (dict(v=v[:, :, :50]), r"v: expected \(B, Hkv, S, Dv\) = \(2, 2, 70, Dv\)"),
        (dict(q=q[0]), r"q: expected 4 dimensions \(B, H, L, D\)"),
        (dict(q=q.long()), r"q: expected a floating-point tensor .*got torch.int64"),
        (dict(k=k.to("meta")), r"k: the compiled kernels take CPU tensors; got one on meta"),
        (dict(bias=(torch.zeros(H, 10), 5)), r"bias: the table has n=10 offsets, .*needs index"),
        (dict(lo=lo.double(), hi=hi.double()), r"lo and hi: expected integer tensors; got torch.float64"),
    ]
    for kw, pattern in cases:
        args = dict(q=q, k=k, v=v, lo=lo, hi=hi)
        args.update({n: t for n, t in kw.items() if n != "bias"})
        with pytest.raises(ValueError, match=pattern):
            native.span_forward(args["q"], args["k"], args["v"], args["lo"], args["hi"], 0.3, bias=kw.get("bias"))
    bwd = [(dict(out=out[..., :5]), r"out: expected \(B, H, L, Dv\) = \(2, 4, 70, 12\)"),
           (dict(dout=do[:1]), r"dout: expected \(B, H, L, Dv\) = \(2, 4, 70, 12\)"),
           (dict(lse=lse[..., :-1]), r"lse: expected \(B, H, L\) = \(2, 4, 70\)"),
           (dict(dlse=dl[..., 1:]), r"dlse: expected \(B, H, L\) = \(2, 4, 70\)"),
           (dict(dlse=dl[0]), r"dlse: expected 3 dimensions \(B, H, L\)")]
    for kw, pattern in bwd:
        args = dict(out=out, lse=lse, dout=do, dlse=dl)
        args.update(kw)
        with pytest.raises(ValueError, match=pattern):
            native.span_backward(q, k, v, args["out"], args["lse"], args["dout"], args["dlse"], lo, hi, 0.3)


@needs_native
@pytest.mark.parametrize("mod", [None, Sc.alibi(4)], ids=["window", "window_alibi"])
def test_keys_of_batch_one_against_a_batch_of_queries(mod):
    """k and v of batch 1 broadcast over the queries' batch (the public API allows it) through the native paths."""
    q, k, v, do, _ = _plan_inputs(B=2, H=4, Hkv=2)
    k, v = k[:1], v[:1]
    got, ref = [], []
    for fn, store in ((salience.attention, got), (lambda *a, **kw: reference.attention(*a, **kw).out, ref)):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*xs, mask=M.sliding_window(11), score_mod=mod)
        out.backward(do)
        store += [out.detach()] + [x.grad for x in xs]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_cache_key_covers_included_headers(tmp_path):
    """Editing a local header that a kernel includes changes the bytes the cache key hashes (so the library is
    rebuilt, never loaded stale), while an unrelated file next to it does not; headers are followed recursively
    and each is read once even when included twice."""
    (tmp_path / "a.h").write_text('#pragma once\n#include "b.h"\ninline int a() { return b() + 1; }\n')
    (tmp_path / "b.h").write_text("#pragma once\ninline int b() { return 1; }\n")
    (tmp_path / "other.h").write_text("int unrelated;\n")
    src = tmp_path / "k.cpp"
    src.write_text('#include "a.h"\n#include "b.h"\nint f() { return a(); }\n')
    before = native.source_digest(src)
    assert before.count(b"inline int b()") == 1
    (tmp_path / "other.h").write_text("int unrelated_changed;\n")
    assert native.source_digest(src) == before
    (tmp_path / "b.h").write_text("#pragma once\ninline int b() { return 2; }\n")
    after = native.source_digest(src)
    assert after != before and b"return 2" in after


def test_shipped_kernels_hash_the_shared_math_header():
    """interval.cpp and decode.cpp both include fastmath.h, and their cache keys cover it."""
    header = Path(native.__file__).with_name("fastmath.h").read_bytes()
    for name in ("interval.cpp", "decode.cpp"):
        assert header in native.source_digest(Path(native.__file__).with_name(name))
