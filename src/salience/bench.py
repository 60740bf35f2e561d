"""``salience bench``: salience against its peers on the issue's grid, with honest numbers.

For each configuration (a mask, a score_mod, a length, a dtype; B=1, H=8, D=64 unless said) the bench
times, *in one subprocess per configuration with the implementations interleaved* (so that the ratios are
measured in one run on a busy machine):

* ``salience``: :func:`salience.attention` with the default dispatch (planning included in the time);
* ``sdpa``: torch's ``scaled_dot_product_attention`` with ``is_causal`` where it applies, otherwise with the
  equivalent dense boolean mask (or a materialised float bias for ALiBi), built before timing;
* ``flex``: ``torch.nn.attention.flex_attention`` compiled (compile time reported apart, block mask built
  before timing), when ``--flex`` is given and it works on the machine;
* ``reference``: the eager textbook attention, where its L x S tensors fit in memory.

It reports the median milliseconds over repeats, useful GFLOP/s (4 * D flops per *visible* query-key pair
forward, 10 * D for the backward), each peer's time divided by salience's (> 1 = salience faster), the
peak resident memory of one call measured in a fresh subprocess per (configuration, implementation), and
the largest error against the float64 reference on a sample of query rows. Results go to JSON;
``--plot`` writes a PNG.

Examples::

    salience bench --quick                  # small grid: about 1-2.5 minutes on 2 cores
    salience bench --flex --json results.json --plot results.png
    salience bench --only window --n 16384 --dtype bf16
    salience bench --million                # the one-million-token sliding-window forward
    salience bench --model minilm           # a real model (needs the hf integration's bench)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

__all__ = ["Config", "GRID", "QUICK_GRID", "useful_flops", "add_arguments", "run", "run_config", "format_table"]

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f64": "float64", "f16": "float16"}


@dataclass
class Config:
    """One benchmark configuration (layout (B, H, N, D), self-attention)."""

    name: str
    mask: str = "none"  # none | causal | window | documents | lambda_window | checkerboard (user callables)
    mod: str = "none"  # none | alibi | softcap | bias (a float (B, H, N, N) tensor passed as bias=)
    N: int = 16384
    dtype: str = "f32"
    H: int = 8
    D: int = 64
    B: int = 1
    mode: str = "fwd"  # fwd | fwdbwd | decode (one query against a cache of N keys, extra["Hkv"] kv heads)
    #                    | compiled (a one-layer model calling salience.attention under torch.compile(fullgraph=True))
    peers: tuple = ("sdpa", "flex", "reference")
    repeats: int = 5
    window: int = 256
    docs: int = 4
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [{"window": f"window{self.window}", "lambda_window": f"lambda window{self.window}",
                  "checkerboard": "checkerboard64 & causal"}.get(self.mask, self.mask)]
        if self.mask == "documents":
            parts = [f"{self.docs} documents"]
        if self.mod != "none":
            parts.append(self.mod)
        if self.mode == "decode":
            return f"decode 1 query, {' + '.join(parts)} S={self.N} {self.dtype}"
        tail = {"fwdbwd": " fwd+bwd", "compiled": " torch.compile model"}.get(self.mode, "")
        return f"{' + '.join(parts)} N={self.N} {self.dtype}{tail}"

    @property
    def Hkv(self) -> int:
        """Key/value heads: ``extra["Hkv"]`` for decode configs (grouped-query), else H."""
        return max(1, min(self.H, int(self.extra.get("Hkv", self.H))))


def _grid(N: int, repeats: int, full: bool) -> list:
    g = []
    for dt in ("f32", "bf16"):
        g.append(Config(f"nomask_{dt}", "none", N=N, dtype=dt, repeats=repeats, peers=("sdpa", "reference")))
        g.append(Config(f"causal_{dt}", "causal", N=N, dtype=dt, repeats=repeats, peers=("sdpa", "reference")))
        g.append(Config(f"window_{dt}", "window", N=N, dtype=dt, repeats=repeats))
        g.append(Config(f"documents_{dt}", "documents", N=N, dtype=dt, repeats=repeats))
    g.append(Config("alibi_causal_f32", "causal", "alibi", N=N, repeats=max(3, repeats // 2)))
    g.append(Config("softcap_causal_f32", "causal", "softcap", N=N, repeats=max(3, repeats // 2)))
    g.append(Config("documents_alibi_f32", "documents", "alibi", N=N, repeats=max(3, repeats // 2)))
    g.append(Config("window_fwdbwd_f32", "window", N=N, mode="fwdbwd", repeats=repeats, peers=("sdpa", "reference")))
    # decoding: one query against a cache of N keys, 4 query heads per kv head (salience.attention_with_kvcache)
    for dt in ("f32", "bf16"):
        g.append(Config(f"decode_causal_{dt}", "causal", N=N, dtype=dt, mode="decode", repeats=3 * repeats,
                        peers=("sdpa", "reference"), extra={"Hkv": 2}))
    g.append(Config("decode_window_bf16", "window", N=N, dtype="bf16", mode="decode", repeats=3 * repeats,
                    peers=("sdpa", "reference"), extra={"Hkv": 2}))
    # kernels v2: user callables at the speed of their structure, float bias tensors, a compiled model
    n2 = min(N, 8192)
    g.append(Config("lambda_window_f32", "lambda_window", N=n2, repeats=repeats))
    g.append(Config("checkerboard_f32", "checkerboard", N=n2, repeats=max(3, repeats // 2), peers=("sdpa", "flex")))
    g.append(Config("bias_f32", "none", "bias", N=min(N, 2048), repeats=repeats, peers=("sdpa", "flex", "reference")))
    g.append(Config("bias_fwdbwd_f32", "none", "bias", N=min(N, 2048), mode="fwdbwd", repeats=repeats,
                    peers=("sdpa", "reference")))
    g.append(Config("compiled_window_f32", "window", N=n2, mode="compiled", repeats=repeats, peers=("sdpa", "flex")))
    if not full:
        g = [c for c in g if c.dtype == "f32" or c.mask in ("window", "documents")]
    return g


def _checkerboard(b, h, qi, ki):
    """64-blocks of a checkerboard & causal: a mask with no interval structure (a user's callable)."""
    return ((qi // 64 + ki // 64) % 2 == 0) & (qi >= ki)


def _lambda_window(w: int):
    def window(b, h, qi, ki):
        return (qi >= ki) & (qi - ki <= w)

    return window


#: the issue's grid (N = 16384)
GRID = _grid(16384, 5, True)
#: a small grid for --quick (N = 2048, float32 plus bf16 windows and documents)
QUICK_GRID = _grid(2048, 3, False)


def million_config() -> Config:
    """One million tokens, B=1, H=4, D=64, float32, causal sliding window 256, forward."""
    return Config("million_window_f32", "window", N=1 << 20, H=4, repeats=1, peers=())


# --------------------------------------------------------------------------------------- problem set-up


def _build(cfg: Config, seed: int = 0):
    import torch

    from . import masks as M
    from . import scores as Sc

    dt = getattr(torch, DTYPES[cfg.dtype])
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.B, cfg.H, cfg.N, cfg.D)
    q, k, v = (torch.randn(shape, generator=g).to(dt) for _ in range(3))
    ids = None
    align = "top_left"
    if cfg.mode == "decode":  # one query; the cache holds N keys of Hkv heads; the query is the last position
        q = q[:, :, -1:].contiguous()
        k, v = k[:, : cfg.Hkv].contiguous(), v[:, : cfg.Hkv].contiguous()
        align = "bottom_right"
    if cfg.mask == "none":
        mask = None
    elif cfg.mask == "causal":
        mask = M.causal(align=align)
    elif cfg.mask == "window":
        mask = M.sliding_window(cfg.window, align=align)
    elif cfg.mask == "documents":
        # documents of unequal lengths (shares 3:5:2:6 of N for 4 documents, cycled for other counts)
        shares = [3, 5, 2, 6] * ((cfg.docs + 3) // 4)
        shares = shares[: cfg.docs]
        bounds = [0]
        for s in shares:
            bounds.append(bounds[-1] + s)
        ids = torch.zeros(cfg.N, dtype=torch.long)
        for d in range(cfg.docs):
            ids[cfg.N * bounds[d] // bounds[-1]: cfg.N * bounds[d + 1] // bounds[-1]] = d
        mask = M.document(ids)
    elif cfg.mask == "lambda_window":
        mask = _lambda_window(cfg.window)
    elif cfg.mask == "checkerboard":
        mask = _checkerboard
    else:
        raise ValueError(f"unknown mask {cfg.mask!r}")
    if cfg.mod == "bias":  # ALiBi-like values and -inf above the diagonal: a bias with -inf structure
        i = torch.arange(cfg.N)
        d = (i.view(1, -1) - i.view(-1, 1)).float()
        slopes = Sc.alibi_slopes(cfg.H).view(-1, 1, 1)
        mod = (slopes * d).masked_fill(d > 0, float("-inf")).unsqueeze(0).expand(cfg.B, -1, -1, -1).to(dt).contiguous()
    else:
        mod = {"none": None, "alibi": Sc.alibi(cfg.H), "softcap": Sc.softcap(20.0)}[cfg.mod]
    return q, k, v, mask, mod, ids


def useful_flops(cfg: Config) -> float:
    """Useful FLOPs of one call: 4 * D per visible (query, key) pair forward (QK^T and PV), plus 10 * D for
    the backward (five matmuls)."""
    import torch

    from .structure import row_intervals

    _, _, _, mask, _, _ = _build_meta(cfg)
    L = 1 if cfg.mode == "decode" else cfg.N
    if callable(mask) and not hasattr(mask, "bind"):  # a user's callable: count its visible pairs by evaluation
        visible = cfg.B * sum(int(mask(0, 0, torch.arange(r, min(L, r + 512)).view(-1, 1),
                                       torch.arange(cfg.N).view(1, -1)).sum()) for r in range(0, L, 512))
        return float(visible) * cfg.H * 4 * cfg.D * (1 + (2.5 if cfg.mode == "fwdbwd" else 0))
    m = None if mask is None else mask.bind(L, cfg.N, None)
    lo_hi = row_intervals(m, cfg.B, L, cfg.N)
    visible = int((lo_hi[1] - lo_hi[0]).sum()) * cfg.B if lo_hi is not None else L * cfg.N * cfg.B
    per_pair = 4 * cfg.D * (1 + (2.5 if cfg.mode == "fwdbwd" else 0))
    del torch
    return float(visible) * cfg.H * per_pair


def _build_meta(cfg):
    small = Config(**{**asdict(cfg), "N": cfg.N, "H": 1, "D": 1, "mod": "none" if cfg.mod == "bias" else cfg.mod})
    return _build(small)


# ------------------------------------------------------------------------------------ implementations


def _impls(cfg: Config, q, k, v, mask, mod, ids, flex: bool, only: str | None = None):
    """name -> (callable running one call, setup seconds, note); ``only`` builds just that implementation."""
    import torch
    import torch.nn.functional as F

    import salience

    from . import reference

    out = {}
    no_error = False
    need_grad = cfg.mode == "fwdbwd"

    # the upstream gradient is an input of the backward, made once like q, k and v; gradients are reset to
    # None before each step, as ``optimizer.zero_grad()`` does
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype) if need_grad else None

    def with_grad(fn):
        if not need_grad:
            return fn
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def step():
            for t in xs:
                t.grad = None
            o = fn(*xs)
            o.backward(dout)
            return o

        return step

    def wrap(fn):
        return with_grad(fn) if need_grad else (lambda: fn(q, k, v))

    if cfg.mode == "decode":
        return _decode_impls(cfg, q, k, v, mask, mod, only)
    if cfg.mod == "bias":  # a float bias tensor: salience's bias=, SDPA's attn_mask, a score_mod reading it in Flex
        bias_t, mod = mod, None
        kw = {"bias": bias_t}
    else:
        bias_t, kw = None, {}
    if cfg.mode == "compiled" and only in (None, "salience"):
        t0 = time.perf_counter()
        fn = torch.compile(lambda a, b, c: salience.attention(a, b, c, mask=mask, score_mod=mod, **kw), fullgraph=True)
        fn(q, k, v)  # compile
        out["salience"] = (wrap(fn), time.perf_counter() - t0, "torch.compile(fullgraph=True); compile time as setup")
    elif only in (None, "salience"):
        out["salience"] = (wrap(lambda a, b, c: salience.attention(a, b, c, mask=mask, score_mod=mod, **kw)), 0.0, "")
    if need_grad and only in (None, "salience forward"):
        # salience's own forward, timed in the same run so that forward+backward / forward is one-run ratio
        fwd_only = (lambda: salience.attention(q, k, v, mask=mask, score_mod=mod, **kw))  # noqa: E731
        out["salience forward"] = (fwd_only, 0.0, "forward only, same inputs")
    if "sdpa" in cfg.peers and only in (None, "sdpa"):
        t0 = time.perf_counter()
        note = ""
        if bias_t is not None:
            fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias_t)  # noqa: E731
            note = "attn_mask = the same float bias"
        elif mask is None and mod is None:
            fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c)  # noqa: E731
        elif cfg.mask == "causal" and mod is None:
            fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
        elif mod is None:
            dense = _dense_mask(mask, cfg.N)
            fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense)  # noqa: E731
            note = f"dense bool mask {dense.numel() / 2**20:.0f} MiB"
        elif cfg.mod == "alibi":
            i = torch.arange(cfg.N)
            dist = (i.view(-1, 1) - i.view(1, -1)).abs().float()
            per_head = cfg.H * cfg.N * cfg.N * q.element_size() <= (1 << 30)
            slopes = mod.slopes.float() if per_head else mod.slopes[:1].float()
            bias = (-slopes.view(-1, 1, 1) * dist).to(q.dtype)  # (H or 1, N, N)
            del dist
            if mask is not None:
                bias.masked_fill_(~_dense_mask(mask, cfg.N)[0], float("-inf"))
            bias = bias.unsqueeze(0)
            fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias)  # noqa: E731
            mib = bias.numel() * bias.element_size() / 2**20
            note = (f"materialised per-head bias {mib:.0f} MiB" if per_head else
                    f"materialised bias {mib:.0f} MiB: one head's, broadcast (same kernel work; a per-head bias "
                    "would not fit), so its error is not reported")
            no_error = not per_head
        else:
            fn = None
        if fn is not None:
            out["sdpa"] = (wrap(fn), time.perf_counter() - t0, note)
            if no_error:
                out["sdpa"][0].no_error = True
    if "flex" in cfg.peers and flex and only in (None, "flex"):
        try:
            out["flex"] = _flex_impl(cfg, q, k, v, mask, mod if bias_t is None else bias_t, ids, wrap)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            out["flex"] = (None, 0.0, f"unavailable: {type(e).__name__}: {str(e)[:120]}")
    if "reference" in cfg.peers and only in (None, "reference"):
        elt = q.element_size() if q.dtype != torch.bfloat16 else 4
        if cfg.B * cfg.H * cfg.N * cfg.N * elt * 4 <= (2 << 30):
            out["reference"] = (wrap(lambda a, b, c: reference.attention(a, b, c, mask=mask, score_mod=mod, **kw).out),
                                0.0, "")
        else:
            out["reference"] = (None, 0.0, "does not fit: L x S tensors")
    return out


def _dense_mask(mask, N: int):
    """(1, 1, N, N) bool: a salience mask or a user's callable evaluated everywhere (torch SDPA's boolean mask)."""
    import torch

    if hasattr(mask, "to_dense"):
        return mask.to_dense(1, 1, N, N)
    i = torch.arange(N)
    return torch.as_tensor(mask(0, 0, i.view(-1, 1), i.view(1, -1))).view(1, 1, N, N)


def _decode_impls(cfg: Config, q, k, v, mask, mod, only):
    """Decoding: salience.attention_with_kvcache on the cache as it is (N keys cached), torch SDPA (GQA; a boolean
    key mask for windows), the reference."""
    import torch
    import torch.nn.functional as F

    import salience

    from . import reference

    out = {}
    gqa = cfg.Hkv != cfg.H
    if only in (None, "salience"):
        out["salience"] = (lambda: salience.attention_with_kvcache(q, k, v, cache_seqlens=cfg.N, mask=mask,
                                                                   score_mod=mod), 0.0, "attention_with_kvcache")
    if "sdpa" in cfg.peers and only in (None, "sdpa") and mod is None:
        t0 = time.perf_counter()
        if cfg.mask in ("none", "causal"):  # one bottom-right query sees every key
            fn, note = (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)), ""
        else:
            dense = mask.to_dense(1, 1, 1, cfg.N)
            fn, note = (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa),
                        "bool key mask: reads the whole cache")
        out["sdpa"] = (fn, time.perf_counter() - t0, note)
    if "reference" in cfg.peers and only in (None, "reference"):
        out["reference"] = (lambda: reference.attention(q, k, v, mask=mask, score_mod=mod).out, 0.0, "")
    del torch
    return out


def _flex_impl(cfg, q, k, v, mask, mod, ids, wrap):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    W = cfg.window
    if cfg.mask == "none":
        mm = None
    elif cfg.mask == "causal":
        def mm(b, h, qi, ki):
            return qi >= ki
    elif cfg.mask == "window":
        def mm(b, h, qi, ki):
            return (qi - ki >= 0) & (qi - ki <= W)
    elif cfg.mask == "documents":
        def mm(b, h, qi, ki):
            return ids[qi] == ids[ki]
    elif cfg.mask in ("lambda_window", "checkerboard"):
        mm = mask  # the same user callable salience gets
    sm = None
    if cfg.mod == "alibi":
        slopes = mod.slopes.to(torch.float32)

        def sm(score, b, h, qi, ki):
            return score - slopes[h] * (qi - ki).abs()
    elif cfg.mod == "softcap":
        def sm(score, b, h, qi, ki):
            return torch.tanh(score / 20.0) * 20.0
    elif cfg.mod == "bias":
        bias = mod

        def sm(score, b, h, qi, ki):
            return score + bias[b, h, qi, ki]
    t0 = time.perf_counter()
    bm = None if mm is None else create_block_mask(mm, 1, 1, cfg.N, cfg.N, device="cpu")
    compiled = torch.compile(flex_attention)

    def fn(a, b, c):
        return compiled(a, b, c, score_mod=sm, block_mask=bm)

    runner = wrap(fn)
    runner()  # compile
    return runner, time.perf_counter() - t0, "compiled; block mask built before timing"


def _sample_rows(N: int, H: int = 1, n: int = 24):
    n = max(2, min(n, (1 << 25) // max(1, H * N)))
    step = max(1, N // n)
    rows = sorted(set(list(range(0, N, step))[:n] + [N - 1]))
    return rows


def _ref_rows(q, k, v, mask, mod, rows):
    """float64 reference output for a sample of query rows (B, H, len(rows), D)."""
    import torch

    from ._layout import expand_kv
    from .reference import scores, softmax_from_scores

    r = torch.tensor(rows)
    q64 = q.double()[:, :, r]
    k64, v64 = expand_kv(k.double(), q.shape[1]), expand_kv(v.double(), q.shape[1])
    kw = {"bias": mod.double()} if isinstance(mod, torch.Tensor) else {"score_mod": mod}
    s = scores(q64, k64, mask=mask, rows=r, L=q.shape[2], **kw)
    w, _ = softmax_from_scores(s)
    return w @ v64


# ------------------------------------------------------------------------------------------------ workers


def _worker_time(cfg: Config, flex: bool) -> dict:
    """Time every implementation of one config, interleaved; errors on sampled rows."""
    import torch

    q, k, v, mask, mod, ids = _build(cfg)
    impls = _impls(cfg, q, k, v, mask, mod, ids, flex)
    res = {"config": asdict(cfg), "label": cfg.label, "impls": {}, "threads": torch.get_num_threads()}
    rows = [0] if cfg.mode == "decode" else _sample_rows(cfg.N, cfg.H * cfg.B)
    ref = _ref_rows(q, k, v, mask, mod, rows)
    times = {}
    for name, (fn, setup, note) in impls.items():
        entry = {"note": note, "setup_s": round(setup, 3)}
        res["impls"][name] = entry
        if fn is None:
            continue
        out = fn()  # warm-up (and the compile for flex, done earlier)
        if ref is not None and not getattr(fn, "no_error", False):
            o = out.detach()[:, :, rows].double()
            entry["max_err"] = float((o - ref).abs().max())
        times[name] = []
    for _ in range(cfg.repeats):
        for name in times:
            t0 = time.perf_counter()
            impls[name][0]()
            times[name].append(time.perf_counter() - t0)
    flops = useful_flops(cfg)
    for name, ts in times.items():
        ts.sort()
        med = ts[len(ts) // 2]
        e = res["impls"][name]
        e["median_ms"] = med * 1e3
        e["min_ms"] = ts[0] * 1e3
        e["max_ms"] = ts[-1] * 1e3
        e["gflops_useful"] = flops / med / 1e9
    if "salience" in times:
        base = res["impls"]["salience"]["median_ms"]
        for name in times:
            res["impls"][name]["speedup_vs_salience"] = res["impls"][name]["median_ms"] / base
        if "salience forward" in times:
            ratio = base / res["impls"]["salience forward"]["median_ms"]
            res["fwdbwd_over_forward"] = ratio
            res["impls"]["salience"]["note"] = f"forward+backward = {ratio:.2f} x its forward".strip()
    if "salience" in res["impls"]:
        import salience

        if cfg.mode == "decode":
            from . import kvcache

            res["plan"] = str(kvcache.plan(q, k, v, cache_seqlens=cfg.N, mask=mask, score_mod=mod))
        elif isinstance(mod, torch.Tensor):
            res["plan"] = str(salience.plan(q, k, v, mask=mask, bias=mod))
        else:
            res["plan"] = str(salience.plan(q, k, v, mask=mask, score_mod=mod))
    return res


def _rss_kib():
    """(current RSS, peak RSS) of this process in KiB, from /proc (ru_maxrss as a fallback)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def _reset_peak() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker_memory(cfg: Config, impl: str, flex: bool) -> dict:
    """Peak RSS increase (KiB) of one call of one implementation, measured in a fresh process.

    The implementation first runs once on a small problem (N=256) so that code loaded on first use is not
    counted. Then the full-size inputs are made (q, k, v and, for forward+backward, the upstream gradient),
    the implementation is set up (the dense mask or bias for SDPA, the compiled kernel and block mask for
    FlexAttention; salience has no set-up) and the peak mark is reset. Reported: ``peak_kib``, the call's
    peak above that point; ``working_kib``, the same less what every implementation must hold when it
    returns (the output, plus dq, dk and dv for forward+backward); ``setup_kib``, the resident memory the
    set-up left (the dense mask, which SDPA needs while it runs); ``with_setup_kib`` = ``peak_kib +
    setup_kib``."""
    import gc

    if not (impl == "flex" and flex):
        small = Config(**{**asdict(cfg), "N": min(cfg.N, 256)})
        sq, sk, sv, smask, smod, sids = _build(small)
        warm = _impls(small, sq, sk, sv, smask, smod, sids, False, only=impl).get(impl, (None,))[0]
        if warm is not None:
            warm()
        del warm, sq, sk, sv
    q, k, v, mask, mod, ids = _build(cfg)
    gc.collect()
    start, _ = _rss_kib()
    impls = _impls(cfg, q, k, v, mask, mod, ids, flex and impl == "flex", only=impl)
    fn = impls.get(impl, (None,))[0]
    if fn is None:
        return {"impl": impl, "peak_kib": None}
    gc.collect()
    exact = _reset_peak()
    before, _ = _rss_kib()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    _, peak = _rss_kib()
    nbytes = sum(t.numel() * t.element_size() for t in (q, k, v)) * 4 // 3  # q, k, v and the output
    held = q.numel() * q.element_size() * (4 if cfg.mode == "fwdbwd" else 1)
    # the set-up's own resident memory, less what the fwd+bwd set-up copies: q, k, v (to require grad) and the
    # upstream gradient
    copies = q.numel() * q.element_size() * 4 if cfg.mode == "fwdbwd" else 0
    setup = max(0, before - start - copies // 1024)
    return {"impl": impl, "peak_kib": peak - before, "working_kib": peak - before - held // 1024,
            "setup_kib": setup, "with_setup_kib": peak - before + setup, "process_peak_kib": peak,
            "qkvo_kib": nbytes // 1024, "seconds": dt, "peak_reset": exact}


def _spawn(args: list, timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, "-m", "salience.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(lines[-1])


def run_config(cfg: Config, *, flex: bool = False, memory: bool | str = True, timeout: float = 3600,
               threads: int | None = None) -> dict:
    """Time one configuration (one subprocess) and measure each implementation's memory (one subprocess
    each). Returns the result dict stored in the JSON file."""
    th = ["--threads", str(threads)] if threads else []
    res = _spawn(["--worker", "time", "--config", json.dumps(asdict(cfg))] + (["--flex"] if flex else []) + th,
                 timeout)
    if memory == "fwdbwd":
        memory = cfg.mode == "fwdbwd"
    if memory and "impls" in res:
        for name, e in res["impls"].items():
            if "median_ms" not in e or name == "salience forward":
                continue
            m = _spawn(["--worker", "memory", "--impl", name, "--config", json.dumps(asdict(cfg))]
                       + (["--flex"] if flex else []) + th, timeout)
            if m.get("peak_kib") is not None:
                e["peak_mib"] = m["peak_kib"] / 1024
                e["working_mib"] = m["working_kib"] / 1024
                e["with_setup_mib"] = m["with_setup_kib"] / 1024
                e["process_peak_mib"] = m["process_peak_kib"] / 1024
                e["qkvo_mib"] = m["qkvo_kib"] / 1024
    return res


# ------------------------------------------------------------------------------------------------- output


def format_table(results: list) -> str:
    """A markdown table: one row per (config, implementation)."""
    head = ("| config | impl | median ms | useful GFLOP/s | time / salience | peak MiB | working MiB | "
            "peak with set-up MiB | max err | note |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = [head]
    for r in results:
        if "impls" not in r:
            rows.append(f"| {r.get('label', '?')} | error | | | | | | | | {r.get('error', '')[:80]!r} |")
            continue
        for name, e in r["impls"].items():
            def f(key, fmt, e=e):
                return format(e[key], fmt) if e.get(key) is not None else "—"
            note = e.get("note", "")
            if name == "flex" and e.get("setup_s"):
                note = (note + f"; compile {e['setup_s']:.1f} s").strip("; ")
            rows.append(f"| {r['label']} | {name} | {f('median_ms', '.1f')} | {f('gflops_useful', '.1f')} | "
                        f"{f('speedup_vs_salience', '.2f')} | {f('peak_mib', '.1f')} | {f('working_mib', '.1f')} | "
                        f"{f('with_setup_mib', '.1f')} | "
                        f"{f('max_err', '.1e')} | "
                        f"{note} |")
    return "\n".join(rows)


def _plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "impls" in r]
    labels = [r["label"] for r in ok]
    names = []
    for r in ok:
        names += [n for n, e in r["impls"].items() if n not in names and e.get("gflops_useful")]
    series = {n: [(r["impls"].get(n) or {}).get("gflops_useful") or 0.0 for r in ok] for n in names}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("useful GFLOP/s (higher is better)")
    ax.set_title("salience bench")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small grid (N=2048; memory measured on the fwd+bwd config only): 49 s on 2 quiet cores, 151 s on loaded ones")
    parser.add_argument("--only", default=None, help="comma-separated substrings of config names to run (default: all)")
    parser.add_argument("--n", type=int, default=None, help="sequence length for every config (default: each config's own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="only this dtype (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation (default: each config's own)")
    parser.add_argument("--flex", action="store_true", help="include compiled FlexAttention (slow to compile)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory runs")
    parser.add_argument("--million", action="store_true",
                        help="one million tokens (H=4, D=64, float32) with a causal sliding window of 256")
    parser.add_argument("--json", default=None, help="write results to this JSON file (default: none written)")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart to this path (default: none written)")
    parser.add_argument("--model", default=None, help="benchmark a real model (minilm) via the hf integration (default: none; the kernel grid runs)")
    parser.add_argument("--lengths", default="128,512,2048", help="sequence lengths for --model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)


def _select(args) -> list:
    grid = QUICK_GRID if args.quick else GRID
    out = []
    for c in grid:
        c = Config(**{**asdict(c)})
        if args.n is not None:
            c.N = args.n
        if args.repeats is not None:
            c.repeats = args.repeats
        if args.dtype is not None and c.dtype != args.dtype:
            continue
        if args.only and not any(s.strip() and s.strip() in c.name for s in args.only.split(",")):
            continue
        out.append(c)
    return out


def _check(args) -> None:
    """The options' values, before anything runs: a ValueError names the option and what it takes."""
    for name in ("n", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1; got {v}.")
    if args.model is not None:
        try:
            lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        except ValueError:
            lengths = []
        if not lengths or min(lengths) < 1:
            raise ValueError(f"--lengths takes a comma list of positive lengths, e.g. 128,512,2048; got {args.lengths!r}.")


def run(args) -> int:
    if not args.worker:
        _check(args)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        cfg = Config(**json.loads(args.config))
        res = _worker_time(cfg, args.flex) if args.worker == "time" else _worker_memory(cfg, args.impl, args.flex)
        print(json.dumps(res))
        return 0
    if args.model:
        try:
            from .integrations.hf_bench import run_model_bench
        except ImportError as e:
            print(f"salience bench --model needs salience.integrations.hf_bench (the Hugging Face integration's "
                  f"benchmark), which could not be imported: {e}. Install the 'hf' extra: pip install 'salience[hf]'.",
                  file=sys.stderr)
            return 2
        lengths = [int(x) for x in args.lengths.split(",") if x]
        from .cli import quiet_transformers

        with quiet_transformers():  # transformers' "Loading weights" bars would mix into the table
            res = run_model_bench(args.model, lengths)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2, default=str)
        return 0
    configs = [million_config()] if args.million else _select(args)
    if not configs:
        names = ", ".join(dict.fromkeys(c.name for c in (QUICK_GRID if args.quick else GRID)))
        print(f"salience bench: error: no configuration matches --only {args.only!r} and --dtype {args.dtype}; "
              f"names: {names}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = []
    for cfg in configs:
        print(f"[{time.perf_counter() - t0:6.1f} s] {cfg.label} ...", file=sys.stderr, flush=True)
        th = ["--threads", str(args.threads)] if args.threads else []
        if args.million:
            res = _spawn(["--worker", "time", "--config", json.dumps(asdict(cfg))] + th, 3600)
            if "impls" in res and not args.no_memory:
                m = _spawn(["--worker", "memory", "--impl", "salience", "--config", json.dumps(asdict(cfg))] + th, 3600)
                e = res["impls"]["salience"]
                if m.get("peak_kib") is not None:
                    e["peak_mib"] = m["peak_kib"] / 1024
                    e["process_peak_mib"] = m["process_peak_kib"] / 1024
                    e["qkvo_mib"] = m["qkvo_kib"] / 1024
                    e["note"] = (f"process peak RSS {e['process_peak_mib']:.0f} MiB = "
                                 f"{e['process_peak_mib'] / e['qkvo_mib']:.2f} x bytes of q, k, v, out")
        else:
            memory = False if args.no_memory else ("fwdbwd" if args.quick else True)
            res = run_config(cfg, flex=args.flex, memory=memory, threads=args.threads)
        results.append(res)
    table = format_table(results)
    print(table)
    total = time.perf_counter() - t0
    print(f"\n{len(configs)} configs in {total:.0f} s; median of repeats; 'time / salience' > 1 means salience is "
          "faster; peak MiB = peak RSS increase of one call in a fresh process (after set-up and a small warm-up "
          "call); working MiB = that minus the output (and, fwd+bwd, dq, dk, dv), which every implementation "
          "holds; peak with set-up adds what the set-up keeps resident (SDPA's dense mask or bias); fwd+bwd "
          "takes the upstream gradient as an input, like q, k and v.")
    cmd = getattr(args, "command_line", None) or "salience bench " + " ".join(a for a in sys.argv[2:] if a)
    meta = {"command": cmd, "seconds": total,
            "threads": args.threads,
            "torch": __import__("torch").__version__, "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if args.plot:
        _plot(results, args.plot)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="salience bench")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
