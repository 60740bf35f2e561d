"""The measured tables in README.md and docs/*.md, rendered from the result files the benchmarks write.

    .venv/bin/python benchmarks/docs_tables.py --check   # exit 1 if a table differs from what its JSON renders
    .venv/bin/python benchmarks/docs_tables.py --write   # rewrite every table from its JSON
    .venv/bin/python benchmarks/docs_tables.py --list    # which table comes from which file

A generated block sits between two markers in the markdown file:

    <!-- table:NAME:begin -->
    ...generated; do not edit by hand...
    <!-- table:NAME:end -->

and NAME is a key of ``TABLES`` below, which names the result file under ``benchmarks/results/`` and the
function that renders it. Numbers are never edited in the docs: rerun the benchmark (it rewrites the JSON),
then ``--write``. ``tests/test_docs_tables.py`` runs ``--check``, so a table that no longer matches its JSON
fails the CI suite. A marker whose NAME is not in ``TABLES`` fails the check too. A few figures quoted
inside prose (``FIGURES``) are checked as phrases: ``--check`` fails when the JSON no longer gives that phrase,
and the prose is then edited by hand to the JSON's figures.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

MARKER = re.compile(r"<!-- table:([A-Za-z0-9_.-]+):begin -->(.*?)<!-- table:\1:end -->", re.S)


def _load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------- grid.json
def _by_name(data: dict) -> dict:
    return {r["config"]["name"]: r for r in data["results"] if "impls" in r}


def _ms(x: float) -> str:
    """Three significant figures for the README: 1833, 621, 55.7, 8.1."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _ratio(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _vs(impls: dict, peer: str, missing: str = "") -> str:
    e = impls.get(peer)
    if not e or e.get("speedup_vs_salience") is None:
        return missing
    r = e["speedup_vs_salience"]
    return f"salience {_ratio(r)}x faster" if r >= 1 else f"{_ratio(1 / r)}x faster than salience"


def render_readme_grid(data: dict) -> str:
    """README's forward-ratio table (N=16384) from grid.json."""
    g = _by_name(data)
    head = ("| config | salience ms | torch SDPA (with the equivalent dense mask or bias) | FlexAttention (compiled; "
            "compile time apart) |\n|---|---:|---:|---:|")
    rows = [head]
    for name, label, note in (("nomask", "no mask", " (same fused kernel)"), ("causal", "causal", "")):
        a, b = g[f"{name}_f32"]["impls"], g[f"{name}_bf16"]["impls"]
        rows.append(f"| {label}, fp32 / bf16 | {_ms(a['salience']['median_ms'])} / {_ms(b['salience']['median_ms'])} "
                    f"| {a['sdpa']['speedup_vs_salience']:.2f}x / {b['sdpa']['speedup_vs_salience']:.2f}x{note} | |")
    for name, label in (("window_f32", "sliding window 256, fp32"), ("window_bf16", "sliding window 256, bf16"),
                        ("documents_f32", "4 documents, fp32"), ("documents_bf16", "4 documents, bf16"),
                        ("alibi_causal_f32", "causal + ALiBi, fp32 (no L x S tensor)"),
                        ("softcap_causal_f32", "causal + softcap, fp32"),
                        ("documents_alibi_f32", "4 documents + ALiBi, fp32")):
        e = g[name]["impls"]
        rows.append(f"| {label} | {_ms(e['salience']['median_ms'])} | {_vs(e, 'sdpa', '(no SDPA equivalent)')} | "
                    f"{_vs(e, 'flex', '(not measured)')} |")
    e = g["window_fwdbwd_f32"]["impls"]
    s, d = e["salience"], e["sdpa"]
    rows.append(f"| sliding window 256, fwd+bwd, fp32 | {_ms(s['median_ms'])} | {_vs(e, 'sdpa')}; peak "
                f"{s['peak_mib']:.0f} MiB vs {d['with_setup_mib']:.0f} MiB with its mask ({d['peak_mib']:.0f} "
                f"without) | {_vs(e, 'flex', '(no backward on CPU)')} |")
    return "\n".join(rows)


_LABEL = (("none", "no mask"), ("window256", "window 256"), ("causal + alibi", "ALiBi + causal"),
          ("causal + softcap", "softcap + causal"), ("4 documents + alibi", "4 documents + ALiBi"))


def _perf_label(label: str) -> str:
    label = label.replace(" N=16384", "")
    for a, b in _LABEL:
        if label.startswith(a + " "):
            label = b + label[len(a):]
            break
    return label


def render_performance_grid(data: dict) -> str:
    """docs/performance.md's grid table from grid.json (reference rows omitted; the notes folded into names)."""
    rows = ["| config | impl | median ms | useful GFLOP/s | time / salience | peak MiB | working MiB | "
            "peak with set-up MiB | max err |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        if "impls" not in r:
            continue
        label = _perf_label(r["label"])
        for name, e in r["impls"].items():
            if name == "reference":
                continue

            def f(key, fmt, e=e, blank="—"):
                return format(e[key], fmt) if e.get(key) is not None else blank

            config, impl, blank, star = label, name, "—", ""
            note = e.get("note", "")
            if name == "salience forward":
                config, impl, blank = label.replace(" fwd+bwd", " forward, same run"), "salience", ""
            elif name == "sdpa" and "dense bool mask" in note:
                impl = "sdpa + bool mask"
            elif name == "sdpa" and "materialised bias" in note:
                impl, star = "sdpa + materialised bias", "*"
            elif name == "flex" and e.get("setup_s"):
                impl = f"flex (compile {e['setup_s']:.1f} s)"
            setup = f("with_setup_mib", ".1f", blank=blank)
            rows.append(f"| {config} | {impl} | {f('median_ms', '.1f')} | {f('gflops_useful', '.1f')} | "
                        f"{f('speedup_vs_salience', '.2f')} | {f('peak_mib', '.1f', blank=blank)} | "
                        f"{f('working_mib', '.1f', blank=blank)} | {setup}{star if setup != blank else ''} | "
                        f"{f('max_err', '.1e')} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------- edges_cost.json
def render_edges_cost(data: dict) -> str:
    """docs/kernels.md's cost of the input guards, from benchmarks/edges_cost.py's JSON."""
    meta = data["meta"]
    lines = [f"| problem (N={meta['N']}) | path | with guards ms | without ms | ratio |", "|---|---|---:|---:|---:|"]
    for r in data["results"]:
        lines.append(f"| {r['problem']} | {r['backend']} | {r['guarded_ms']:.1f} | {r['unguarded_ms']:.1f} | "
                     f"{r['ratio']:.3f} |")
    load = ", ".join(f"{x:.2f}" for x in meta["loadavg"])
    lines.append("")
    lines.append(f"CPU: {meta['cpu']['model']} ({meta['cpu']['flags']}), {meta['cpu']['threads']} threads, torch "
                 f"{meta['torch']}; load average during the run {load}. Command: `{meta['command']}`. The last "
                 "row compares a strided q (`x[..., ::2]`, copied once per call) with the same values contiguous.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- flow_full.json
def render_flow(data: dict) -> str:
    """docs/demo.md's attention-flow tables: ``salience.demos.flow.markdown`` of the kept full run."""
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from salience.demos import flow

    return flow.markdown(data)


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render_targets(data: dict) -> str:
    """docs/performance.md's "against the issue's targets" table from grid.json and million.json."""
    g = {n: r["impls"] for n, r in _by_name(data).items()}

    def sp(name, peer):
        return g[name][peer]["speedup_vs_salience"]

    rows = ["| target | measured | |", "|---|---|---|"]
    same = [sp(n, "sdpa") for n in ("nomask_f32", "causal_f32", "nomask_bf16", "causal_bf16")]
    rows.append("| no mask and causal, f32 and bf16: >= 0.97x SDPA's speed | "
                + ", ".join(f"{x:.2f}" for x in same) + f" | {_met(min(same) >= 0.97)} |")
    w = sp("window_f32", "sdpa")
    rows.append(f"| window 256, N=16384, f32: >= 25x SDPA + bool mask | {w:.1f}x | {_met(w >= 25)} |")
    wf = sp("window_f32", "flex")
    rows.append(f"| ... and >= 1.5x compiled Flex | {wf:.2f}x (compile {g['window_f32']['flex']['setup_s']:.1f} s "
                f"apart) | {_met(wf >= 1.5)} |")
    wb = sp("window_bf16", "flex")
    rows.append("| window 256 bf16: within 1.5x of Flex | "
                + (f"{wb:.2f}x *faster* than Flex" if wb >= 1 else f"{1 / wb:.2f}x slower than Flex")
                + f" | {_met(wb >= 1 / 1.5)} |")
    ds = [sp("documents_f32", "sdpa"), sp("documents_bf16", "sdpa")]
    rows.append(f"| 4 documents: >= 4x SDPA + bool mask, f32 and bf16 | {ds[0]:.2f}x, {ds[1]:.2f}x | "
                f"{_met(min(ds) >= 4)} |")
    df = [sp("documents_f32", "flex"), sp("documents_bf16", "flex")]
    rows.append(f"| ... and faster than Flex | {df[0]:.2f}x, {df[1]:.2f}x | {_met(min(df) > 1)} |")
    a = [sp("alibi_causal_f32", "sdpa"), sp("alibi_causal_f32", "flex")]
    rows.append(f"| ALiBi + causal f32: >= 1.5x SDPA + materialised bias and Flex | {a[0]:.2f}x, {a[1]:.2f}x (the "
                f"compiled interval kernel); salience allocates no L x S tensor (peak "
                f"{g['alibi_causal_f32']['salience']['peak_mib']:.1f} MiB) | {_met(min(a) >= 1.5)} |")
    s = sp("softcap_causal_f32", "flex")
    rows.append(f"| softcap + causal f32: >= 1.5x Flex | {s:.2f}x (no L x S tensor: peak "
                f"{g['softcap_causal_f32']['salience']['peak_mib']:.1f} MiB) | {_met(s >= 1.5)} |")
    fb = g["window_fwdbwd_f32"]
    step, fwd = fb["salience"]["median_ms"], fb["salience forward"]["median_ms"]
    rows.append(f"| fwd+bwd window 256 at 16K: <= 4x its own forward | {step:.1f} / {fwd:.1f} = **{step / fwd:.2f}x** "
                f"in one run | {_met(step / fwd <= 4)} |")
    sal, sd = fb["salience"], fb["sdpa"]
    with_mask, alone = sal["with_setup_mib"] / sd["with_setup_mib"], sal["peak_mib"] / sd["peak_mib"]
    verdict = ("met" if alone <= 0.1 else "met counting SDPA's mask") if with_mask <= 0.1 else "**not met**"
    rows.append(f"| ... peak memory <= 1/10 of SDPA + bool mask | {sal['with_setup_mib']:.1f} MiB against SDPA's "
                f"{sd['with_setup_mib']:.0f} MiB with its mask = **{with_mask:.3f}**; against SDPA's call alone (mask "
                f"built beforehand, {sd['peak_mib']:.0f} MiB) {alone:.3f}, where {sal['qkvo_mib']:.0f} / "
                f"{sd['peak_mib']:.0f} = {sal['qkvo_mib'] / sd['peak_mib']:.3f} is the floor for any implementation "
                f"(dq, dk, dv and the output); working memory {sal['working_mib']:.1f} / {sd['working_mib']:.0f} MiB "
                f"| {verdict} |")
    m = _load("million.json")["results"][0]["impls"]["salience"]
    rows.append(f"| 1M tokens (H=4, f32, causal window 256): forward < 10 s | {m['median_ms'] / 1000:.2f} s | "
                f"{_met(m['median_ms'] < 10000)} |")
    rows.append(f"| ... peak RSS <= 2x bytes of q, k, v, out | {m['process_peak_mib']:.0f} MiB = "
                f"{m['process_peak_mib'] / m['qkvo_mib']:.2f}x of {m['qkvo_mib']:.0f} MiB | "
                f"{_met(m['process_peak_mib'] <= 2 * m['qkvo_mib'])} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------- grid_quick.json, million.json
def render_quick(data: dict) -> str:
    """docs/performance.md's small-size sentence from grid_quick.json."""
    g = _by_name(data)
    w, d, a, c = (g[n]["impls"] for n in ("window_f32", "documents_f32", "alibi_causal_f32", "causal_f32"))
    return (f"`benchmarks/results/grid_quick.json` ({data['meta']['seconds']:.0f} s): at this size Python overhead "
            f"matters more and the gaps shrink: window 256 f32 {w['salience']['median_ms']:.1f} ms vs SDPA + mask "
            f"{w['sdpa']['median_ms']:.1f} ms ({w['sdpa']['speedup_vs_salience']:.1f}x), documents f32 "
            f"{d['sdpa']['speedup_vs_salience']:.1f}x, ALiBi {a['sdpa']['speedup_vs_salience']:.2f}x over SDPA with "
            f"a per-head bias, causal {c['sdpa']['speedup_vs_salience']:.2f}x of SDPA "
            f"({c['salience']['median_ms']:.1f} vs {c['sdpa']['median_ms']:.1f} ms).")


def _e(x: float) -> str:
    m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def render_million(data: dict) -> str:
    """docs/performance.md's one-million-token paragraph from million.json."""
    r = data["results"][0]
    c, s = r["config"], r["impls"]["salience"]
    plan = r["plan"]
    backend = re.search(r"backend='([^']+)'", plan).group(1)
    skipped = float(re.search(r"skipped=([0-9.]+)", plan).group(1))
    calls = re.search(r"fused_calls=(\d+)", plan)
    how = f"{calls.group(1)} fused calls, " if calls else ""
    mask = f"`sliding_window({c['window']})`" if c["mask"] == "window" else f"`{c['mask']}`"
    dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}[c["dtype"]]
    return (f"`benchmarks/results/million.json`: B={c['B']}, H={c['H']}, L=S={c['N']:,}, D={c['D']}, {dtype}, {mask}:\n"
            f"forward {s['median_ms'] / 1000:.2f} s ({s['gflops_useful']:.0f} useful GFLOP/s), plan `{backend}` ({how}"
            f"{100 * skipped:.2f}% of the L x S grid skipped),\nprocess peak RSS {s['process_peak_mib']:.0f} MiB for q, k, "
            f"v and the output of {s['qkvo_mib']:.0f} MiB together ({s['process_peak_mib'] / s['qkvo_mib']:.2f}x); max "
            f"error against the\nfloat64 reference on sampled rows {_e(s['max_err'])}.")


# ------------------------------------------------------------------------------------ import_time.json
def render_import_time(data: dict) -> str:
    """README's start-up figures from benchmarks/import_time.py's JSON."""
    m, r, h, b = (data["median_s"], data["ratio_import_salience_to_torch"], data["help_minus_import_torch_s"],
                  data["budgets"])
    cpu = data["cpu_model"].split("(R)")[0] + (" Xeon" if "Xeon" in data["cpu_model"] else "")
    return (f"Start-up, measured by `python benchmarks/import_time.py` (medians of {data['repeats']} fresh processes, "
            f"interleaved, on {data['cpu_count']} {cpu.replace('Intel ', '').strip()} cores at load average "
            f"{data['loadavg'][0]:.1f}; `benchmarks/results/import_time.json`): `import salience` "
            f"{m['import salience']['wall']:.2f} s against `import torch` {m['import torch']['wall']:.2f} s "
            f"({r['wall']:.2f}x; CPU time {r['cpu']:.2f}x; budget {b['ratio_import_salience_to_torch']}x), and "
            f"`salience --help` `import torch` + {h['wall']:.2f} s (budget + {b['help_minus_import_torch_s']} s).")


# ------------------------------------------------------------------------------------------ decode.json
def render_decode(data: dict) -> str:
    """docs/kernels.md's decoding table from benchmarks/decode_bench.py's JSON."""
    m, c = data["machine"], data["copy_bandwidth"]
    load = ", ".join(f"{x:.1f}" for x in m["loadavg"])
    out = [f"`{data['command']}` on {m['cpu_count']} cores ({m['cpu_model']}; {' '.join(m['cpu_flags'])}), torch "
           f"{m['torch']} with {m['torch_threads']} threads, decode kernel {m['decode_kernel']}; load average {load} "
           f"(a machine shared with other work). Copy bandwidth measured in the same run: {c['gb_per_s']:.1f} GB/s "
           "(bytes read + written by a large tensor copy) at the start"
           + (", and for each row with the copy taking turns with its calls (the share is of that figure)"
              if all("copy_gb_per_s" in r for r in data["results"] if "impls" not in r) else "")
           + f". Medians of {data['repeats']} calls; K,V bytes = the keys and values the rows can see.", "",
           "| case | salience ms | K,V read | GB/s | of copy bandwidth | torch SDPA ms | SDPA / salience | path |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    gen = []
    for r in data["results"]:
        if "impls" in r:
            s, t = r["impls"]["salience"], r["impls"]["sdpa"]
            gen.append(f"{r['name']} (2 layers, hidden 256, 8 heads / 2 kv heads, {r['config']['new_tokens']} new "
                       f"tokens, {r['config']['cache']}): salience {s['tokens_per_s']:.1f} tokens/s against sdpa "
                       f"{t['tokens_per_s']:.1f} ({r['speedup_vs_sdpa']:.2f}x; prefill {s['prefill_ms']:.0f} ms "
                       f"against {t['prefill_ms']:.0f} ms; same tokens: {'yes' if r['same_tokens'] else 'no'}).")
            continue
        ms = r["median_ms"]
        sd = f"{ms['sdpa']:.1f}" if "sdpa" in ms else "—"
        ratio = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "—"
        share = f"{100 * r['ratio_to_copy']:.0f}%" + (f" of {r['copy_gb_per_s']:.1f}" if "copy_gb_per_s" in r else "")
        out.append(f"| {r['name']} | {ms['salience']:.1f} | {r['kv_bytes_read'] / 2**20:.0f} MiB | "
                   f"{r['gb_per_s']:.1f} | {share} | {sd} | {ratio} | {r['plan']} |")
    return "\n".join(out + [""] + gen)


# ------------------------------------------------------------------------------------ decode_overhead.json
def render_decode_dispatch(data: dict) -> str:
    """docs/kernels.md's per-call table of a decoding step through the dispatcher, before and after its fast
    paths: the ``dispatch-before-N`` / ``dispatch-after-N`` runs of benchmarks/decode_overhead.py."""
    runs = {k: v for k, v in data["runs"].items() if k.startswith("dispatch-")}
    labels = sorted(runs, key=lambda k: (k.split("-")[-1], "after" in k))
    m = runs[labels[0]]["machine"]
    out = [f"`{runs[labels[0]]['command']}` (before-N: the same script with PYTHONPATH at the previous commit's "
           f"src), alternating, on {m['cpu']} ({m['flags']}), torch {m['torch']}, {m['threads']} thread; "
           f"{data.get('dispatch_note', '')} Microseconds per call: Python alone (the kernel replaced by a no-op; "
           "minimum over repeats, the steadier figure for Python-bound calls; at S=256 salience.attention runs torch's "
           "fused kernel, which the no-op does not replace) and with the kernel (median).", "",
           "| run | S | salience.attention, Python alone | attention_with_kvcache, Python alone | "
           "salience.attention with the kernel | its path | torch SDPA |", "|---|---:|---:|---:|---:|---|---:|"]
    for label in labels:
        r = runs[label]
        py = {row["S"]: row["us_per_call_min"] for row in r["python_only"]}
        for row in r["calls"]:
            S = row["S"]
            if S not in py:
                continue
            us = row["us_per_call"]
            out.append(f"| {label[len('dispatch-'):]} | {S} | {py[S]['salience.attention']:.0f} | "
                       f"{py[S]['attention_with_kvcache']:.0f} | {us['salience.attention']:.0f} | "
                       f"{row['salience_attention_route']} | {us['sdpa']:.0f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------- bias.json, callables.json
def render_bias(data: dict) -> str:
    """docs/kernels.md's bias-tensor table from benchmarks/bias_bench.py's JSON."""
    m, sh = data["machine"], data["shape"]
    out = [f"`{data['command']}` (B={sh['B']}, H={sh['H']}, N={sh['N']}, D={sh['D']}, {sh['dtype']}; {m['cpu']}, "
           f"{m['flags']}, torch {m['torch']}; load: {m['uptime'].split('load average:')[1].strip()}; "
           "SDPA = `F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`; medians):", "",
           "| bias | clock | forward salience / SDPA (ms) | SDPA ÷ salience | fwd+bwd salience / SDPA (ms) | SDPA ÷ salience |",
           "|---|---|---|---|---|---|"]
    clocks = {"cpu1": "CPU time, 1 thread", "wall": f"wall, {m['threads']} threads"}
    for r in data["rows"]:
        case = r["case"] + (f" (skipped {r['skipped']:.2f})" if r.get("skipped") else "")
        f, b = r.get("forward_ms"), r["fwd_bwd_ms"]
        fwd = (f"{f['salience']:.0f} / {f['sdpa']:.0f} | {f['sdpa_over_salience']:.2f}" if f else "- | -")
        sd = b.get("sdpa", b.get("sdpa_math"))
        out.append(f"| {case} | {clocks.get(r['clock'], r['clock'])} | {fwd} | {b['salience']:.0f} / {sd:.0f} | "
                   f"{b['sdpa_over_salience']:.2f} |")
    return "\n".join(out)


def render_callables(data: dict) -> str:
    """docs/kernels.md's table of user mask callables from benchmarks/callables_bench.py's JSON."""
    e, c = data["env"], data["config"]
    out = [f"`python benchmarks/callables_bench.py --n {c['N']} --repeats {c['repeats']}` (B={c['B']}, H={c['H']}, "
           f"D={c['D']}, {c['dtype']}, forward, after the first call; {e['cpu']}, {' '.join(e['flags'])}, "
           f"{e['threads']} threads, torch {e['torch']}; load: {e['uptime'].split('load average:')[1].strip()}; "
           "medians; ratios are the other's time over salience's):", "",
           "| mask (a user's callable) | salience ms | first call s | structure | named mask | SDPA dense bool mask | "
           "FlexAttention compiled | Flex create_block_mask + compile s |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, r in data["cases"].items():
        ms = r["median_ms"]
        base = ms["salience derived"]

        def ratio(key, ms=ms, base=base):
            return f"{ms[key]:.0f} ms ({ms[key] / base:.2f}x)" if key in ms else "—"

        flex_s = (f"{r['create_block_mask_s']:.1f} + {r['compile_and_first_call_s']:.1f}"
                  if "compile_and_first_call_s" in r else "—")
        out.append(f"| {name} N={r['N']} | {base:.0f} | {r['salience_first_call_s']:.2f} | "
                   f"{r['structure']['structure']} | {ratio('salience named')} | "
                   f"{ratio('torch SDPA dense bool mask')} | {ratio('FlexAttention compiled')} | {flex_s} |")
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Table:
    result: str                          # file under benchmarks/results/
    render: Callable[[dict], str]
    command: str                         # what writes the result file


TABLES: dict[str, Table] = {
    "grid-ratios": Table("grid.json", render_readme_grid, "python benchmarks/run_grid.py"),
    "grid": Table("grid.json", render_performance_grid, "python benchmarks/run_grid.py"),
    "edges-cost": Table("edges_cost.json", render_edges_cost,
                        "python benchmarks/edges_cost.py --json benchmarks/results/edges_cost.json"),
    "targets": Table("grid.json", render_targets, "python benchmarks/run_grid.py; python benchmarks/million_tokens.py "
                     "(also reads million.json)"),
    "grid-quick": Table("grid_quick.json", render_quick, "python benchmarks/run_grid.py --quick"),
    "million": Table("million.json", render_million, "python benchmarks/million_tokens.py"),
    "import-time": Table("import_time.json", render_import_time, "python benchmarks/import_time.py"),
    "flow-full": Table("flow_full.json", render_flow,
                       "salience demo --parts flow, then copy flow.json to benchmarks/results/flow_full.json"),
    "decode": Table("decode.json", render_decode, "python benchmarks/decode_bench.py"),
    "decode-dispatch": Table("decode_overhead.json", render_decode_dispatch,
                             "python benchmarks/decode_overhead.py --no-compile --label dispatch-after-N"),
    "bias": Table("bias.json", render_bias, "python benchmarks/bias_bench.py --n 2048 --repeats 5"),
    "callables": Table("callables.json", render_callables, "python benchmarks/callables_bench.py --n 8192"),
}


# ------------------------------------------------------------------------- demo_full.json, demo_quick.json
def _demo_renderer(name: str) -> Callable[[dict], str]:
    """A renderer from ``salience.demos.markdown`` (the demo's tables from its kept results.json)."""

    def render(data: dict) -> str:
        sys.path.insert(0, os.path.join(ROOT, "src"))
        from salience.demos import markdown

        return getattr(markdown, name)(data)

    render.__name__ = render.__qualname__ = f"render_demo_{name}"
    return render


def _faithfulness_md(data: dict) -> str:
    """docs/interpret.md's faithfulness table of MiniLM, from the kept ``FaithfulnessReport.to_dict()``."""
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from salience.interpret.faithfulness import markdown_table

    return markdown_table(data, summary=True)


_DEMO_FULL = "salience demo --save-json benchmarks/results/demo_full.json"
TABLES.update({
    "demo-accuracy": Table("demo_full.json", _demo_renderer("accuracy_full"), _DEMO_FULL),
    "demo-alignment": Table("demo_full.json", _demo_renderer("alignment"), _DEMO_FULL),
    "demo-offsets": Table("demo_full.json", _demo_renderer("offsets"), _DEMO_FULL),
    "demo-efficiency": Table("demo_full.json", _demo_renderer("efficiency"), _DEMO_FULL),
    "readme-accuracy": Table("demo_full.json", _demo_renderer("accuracy_readme"), _DEMO_FULL),
    "interpret-faithfulness": Table("faithfulness_minilm.json", lambda d: _faithfulness_md(d),
                                    "python -m salience.interpret.faithfulness 'A man is playing a guitar on the "
                                    "street.' --pair 'Someone plays music on an instrument.' --json "
                                    "benchmarks/results/faithfulness_minilm.json"),
    "demo-quick-accuracy": Table("demo_quick.json", _demo_renderer("accuracy_quick"),
                                 "salience demo --quick --save-json benchmarks/results/demo_quick.json"),
})


def _fig_million(data: dict) -> str:
    s = data["results"][0]["impls"]["salience"]
    return (f"take {s['median_ms'] / 1000:.2f} s forward with peak RSS {s['process_peak_mib'] / s['qkvo_mib']:.2f}x "
            "the bytes of q, k, v and the output")


def _fig_fwdbwd(data: dict) -> str:
    e = _by_name(data)["window_fwdbwd_f32"]["impls"]
    return (f"Forward+backward of the window is {e['salience']['median_ms'] / e['salience forward']['median_ms']:.2f}x "
            "its own forward in the grid run")


def _fig_docs_alibi(data: dict) -> str:
    e = _by_name(data)["documents_alibi_f32"]["impls"]
    return (f"4 documents + ALiBi (bidirectional within each document) {e['sdpa']['speedup_vs_salience']:.2f}x faster "
            f"than SDPA with a materialised bias and {e['flex']['speedup_vs_salience']:.2f}x faster than Flex")


def _fig_demo_window(data: dict) -> str:
    e = data["efficiency"]
    fits = e["slope_fit"]["time"]
    n = max(p["length"] for p in e["points"] if p["method"] == "full")
    t = {p["method"]: p["seconds"] for p in e["points"] if p["length"] == n}
    return (f"time slope {fits['sliding_window']['slope']:.2f} vs {fits['full']['slope']:.2f} for full attention; "
            f"{1000 * t['sliding_window']:.0f} ms vs {t['full']:.1f} s at {n:,} tokens")


@dataclass(frozen=True)
class Figure:
    """A measured phrase inside prose: checked (whitespace-insensitive) but not rewritten by ``--write``."""
    doc: str
    result: str
    render: Callable[[dict], str]


FIGURES: list[Figure] = [
    Figure("README.md", "million.json", _fig_million),
    Figure("README.md", "grid.json", _fig_fwdbwd),
    Figure("docs/performance.md", "grid.json", _fig_docs_alibi),
    Figure("README.md", "demo_full.json", _fig_demo_window),
]


def check_figures(root: str | None = None) -> list[str]:
    root = root or ROOT
    problems = []
    for f in FIGURES:
        path = os.path.join(root, f.doc)
        with open(path) as fh:
            text = " ".join(fh.read().split())
        phrase = " ".join(f.render(_load(f.result)).split())
        if phrase not in text:
            problems.append(f"{f.doc}: the sentence with figures from benchmarks/results/{f.result} no longer reads "
                            f"\"{phrase}\" (edit the prose to the JSON's figures)")
    return problems


def check_grid_md() -> list[str]:
    """benchmarks/results/grid.md (README links it) holds ``salience.bench.format_table`` of grid.json."""
    path = os.path.join(RESULTS, "grid.md")
    if not os.path.exists(path):
        return []
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from salience import bench

    with open(path) as f:
        text = f.read()
    if bench.format_table(_load("grid.json")["results"]) in text:
        return []
    return ["benchmarks/results/grid.md: its table differs from salience.bench.format_table(grid.json); rerun "
            "`python benchmarks/run_grid.py` (it writes both)"]


def docs(root: str = ROOT) -> list[str]:
    out = [os.path.join(root, "README.md")]
    d = os.path.join(root, "docs")
    out += sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".md"))
    return [p for p in out if os.path.exists(p)]


def block(name: str, data: dict | None = None) -> str:
    """The text that goes between the markers of table NAME (with its leading and trailing newline)."""
    t = TABLES[name]
    return "\n" + t.render(data if data is not None else _load(t.result)) + "\n"


def process(path: str, write: bool = False, cache: dict | None = None) -> list[str]:
    """Check (or rewrite) every marked table in one file; returns one message per table that differs."""
    cache = {} if cache is None else cache
    with open(path) as f:
        text = f.read()
    problems: list[str] = []
    rel = os.path.relpath(path, ROOT)

    def sub(m: re.Match) -> str:
        name, old = m.group(1), m.group(2)
        if name not in TABLES:
            problems.append(f"{rel}: table '{name}' has markers but no renderer in benchmarks/docs_tables.py")
            return m.group(0)
        if name not in cache:
            cache[name] = block(name)
        new = cache[name]
        if old != new:
            diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                f"{rel} (table {name})", f"rendered from benchmarks/results/"
                                                f"{TABLES[name].result}", n=0))
            problems.append(f"{rel}: table '{name}' differs from benchmarks/results/{TABLES[name].result}\n{diff}")
        return f"<!-- table:{name}:begin -->{new}<!-- table:{name}:end -->"

    new_text = MARKER.sub(sub, text)
    if write and new_text != text:
        with open(path, "w") as f:
            f.write(new_text)
    return problems


def found(paths: list[str]) -> dict[str, list[str]]:
    """Table name -> the files that hold it."""
    out: dict[str, list[str]] = {}
    for p in paths:
        with open(p) as f:
            for m in MARKER.finditer(f.read()):
                out.setdefault(m.group(1), []).append(os.path.relpath(p, ROOT))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="exit 1 if a marked table differs from its JSON")
    g.add_argument("--write", action="store_true", help="rewrite every marked table from its JSON")
    g.add_argument("--list", action="store_true", help="print each table, its result file and where it is")
    a = p.parse_args(argv)
    paths = docs()
    if a.list:
        where = found(paths)
        for name, t in TABLES.items():
            print(f"{name:12s} benchmarks/results/{t.result:16s} {', '.join(where.get(name, ['(no markers)']))}"
                  f"  <- {t.command}")
        return 0
    cache: dict = {}
    problems = [m for path in paths for m in process(path, write=a.write, cache=cache)]
    figures = check_figures() + check_grid_md()
    unused = sorted(set(TABLES) - set(found(paths)))
    if a.write:
        print(f"rewrote the tables in {len(paths)} files" + (f"; changed: {len(problems)}" if problems else ""))
        for m in problems:
            print(m.splitlines()[0])
        for m in figures:
            print(m)
        return 1 if figures else 0
    for m in problems + figures:
        print(m, file=sys.stderr)
    for name in unused:
        print(f"table '{name}' is registered but no file has its markers", file=sys.stderr)
    if problems or figures or unused:
        print("fix: rerun the benchmark that writes the JSON, then `python benchmarks/docs_tables.py --write`",
              file=sys.stderr)
        return 1
    print(f"{sum(len(v) for v in found(paths).values())} tables and {len(FIGURES)} figures in prose match their "
          "result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
