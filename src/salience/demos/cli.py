"""``salience demo``: evidence for attention's benefits, measured on this machine in minutes.

1. Accuracy on long sequences: GRU encoder-decoders without attention, with additive (Bahdanau) and with
   Luong attention, trained alike on a synthetic transliteration task (:mod:`salience.demos.task`);
   token and sequence accuracy per length bucket.
2. Interpretability: the share of each model's attention on the source token the task aligns.
3. Efficiency: time and peak memory of exact full, exact sliding-window, linear and Performer attention
   (and the textbook computation) as the length doubles, with fitted log-log slopes.
4. Attention flow (``--parts flow``, not run by default): Abnar & Zuidema 2020's Table 1 in shape, on a
   generated subject-verb agreement task and on MiniLM (:mod:`salience.demos.flow`; ``OUT/flow.json``, ``flow.png``).

Writes ``OUT/index.html`` (tables and figures, self-contained), ``OUT/attention.html`` (interactive maps),
PNGs and ``OUT/results.json``, and prints the tables. Seeded. ``--quick`` runs in about a minute.

Example:
    >>> import argparse
    >>> from salience.demos.cli import add_arguments, settings
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> s = settings(p.parse_args(["--quick"]))
    >>> s["max_len"], s["eff_max_len"]
    (40, 4096)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import report
from .efficiency import METHODS, SweepResult, sweep
from .seq2seq import KINDS, LABELS, Comparison, TrainConfig, compare
from .task import Transliteration, buckets_for

__all__ = ["add_arguments", "run", "settings", "run_demo", "DemoResult", "PRESETS"]

#: defaults of the full run (about 5 to 10 minutes on 2 cores) and of --quick (about a minute)
PRESETS = {
    "full": {"min_len": 5, "max_len": 60, "buckets": 6, "steps": 2000, "per_bucket": 256,
             "eff_min_len": 512, "eff_max_len": 65536, "time_limit": 30.0, "memory_limit_gib": 4.0},
    "quick": {"min_len": 5, "max_len": 40, "buckets": 4, "steps": 500, "per_bucket": 96,
              "eff_min_len": 512, "eff_max_len": 4096, "time_limit": 2.0, "memory_limit_gib": 1.0},
}

_PARTS = ("accuracy", "efficiency", "flow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``salience demo`` options (None = the preset's value)."""
    parser.add_argument("--quick", action="store_true", help="smaller run, about a minute; still shows the effect")
    parser.add_argument("--out", default="salience-demo", help="report directory (default: salience-demo)")
    parser.add_argument("--parts", default="accuracy,efficiency",
                        help="comma-separated parts to run: accuracy (includes interpretability), efficiency, flow "
                             "(attention flow vs blank-out, Abnar & Zuidema 2020) (default: accuracy,efficiency)")
    parser.add_argument("--save-json", default=None, metavar="PATH",
                        help="also write results.json to PATH; the docs' demo tables render from "
                             "benchmarks/results/demo_full.json and demo_quick.json (benchmarks/docs_tables.py) "
                             "(default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models, data and random features")
    g = parser.add_argument_group("accuracy experiment")
    g.add_argument("--min-len", type=int, default=None, help="shortest sequence (default 5)")
    g.add_argument("--max-len", type=int, default=None, help="longest sequence (default 60, quick 40)")
    g.add_argument("--buckets", type=int, default=None, help="number of length buckets (default 6, quick 4)")
    g.add_argument("--steps", type=int, default=None, help="training steps per model (default 2000, quick 500)")
    g.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    g.add_argument("--hidden", type=int, default=64, help="GRU size (default 64)")
    g.add_argument("--vocab", type=int, default=20, help="symbols in the synthetic alphabet (default 20)")
    g.add_argument("--order", choices=("monotone", "reverse"), default="monotone",
                   help="target order: monotone transliteration or reversed (default monotone)")
    g.add_argument("--per-bucket", type=int, default=None, help="test examples per bucket (default 256, quick 96)")
    g.add_argument("--models", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    g.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    e = parser.add_argument_group("efficiency sweep")
    e.add_argument("--eff-min-len", type=int, default=None, help="first length (default 512)")
    e.add_argument("--eff-max-len", type=int, default=None, help="last length (default 65536, quick 4096)")
    e.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    e.add_argument("--time-limit", type=float, default=None,
                   help="stop a method when its next call is predicted slower than this, in s (default 30, quick 2)")
    e.add_argument("--memory-limit-gib", type=float, default=None,
                   help="stop a method when its next call is predicted to need more, in GiB (default 4, quick 1)")
    e.add_argument("--eff-threads", type=int, default=1, help="torch threads for the sweep (default 1)")


def _csv(value: str, allowed, argname: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{argname} must be a comma-separated subset of {','.join(allowed)}; got {value!r}.")
    return items


def settings(args) -> dict:
    """The effective settings: the preset (full or quick) overridden by the options given."""
    s = dict(PRESETS["quick" if args.quick else "full"])
    for k in list(s):
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for the report.")
    s["parts"] = _csv(args.parts, _PARTS, "--parts")
    s["models"] = _csv(args.models, KINDS, "--models")
    s["methods"] = _csv(args.methods, tuple(METHODS), "--methods")
    for k in ("seed", "batch_size", "hidden", "vocab", "order", "threads", "eff_threads", "out", "quick"):
        s[k] = getattr(args, k)
    s["save_json"] = getattr(args, "save_json", None)
    for k in ("min_len", "max_len", "buckets", "steps", "per_bucket", "eff_min_len", "eff_max_len", "batch_size",
              "hidden", "vocab", "threads", "eff_threads"):
        if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer; got {s[k]!r}.")
    if s["max_len"] < s["min_len"]:
        raise ValueError(f"--max-len ({s['max_len']}) must be >= --min-len ({s['min_len']}).")
    if s["buckets"] > s["max_len"] - s["min_len"] + 1:
        raise ValueError(f"--buckets {s['buckets']} is more than the {s['max_len'] - s['min_len'] + 1} lengths "
                         f"in {s['min_len']}..{s['max_len']}; use fewer buckets or a wider range.")
    if s["eff_max_len"] < s["eff_min_len"]:
        raise ValueError(f"--eff-max-len ({s['eff_max_len']}) must be >= --eff-min-len ({s['eff_min_len']}).")
    if not s["time_limit"] > 0 or not s["memory_limit_gib"] > 0:
        raise ValueError(f"--time-limit and --memory-limit-gib must be > 0; got {s['time_limit']} and "
                         f"{s['memory_limit_gib']}.")
    return s


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the experiments' results and the written files."""

    comparison: Comparison | None
    sweep: SweepResult | None
    files: dict[str, Path]
    seconds: float
    flow: dict | None = None


_DEFAULTS = {"seed": 0, "batch_size": 32, "hidden": 64, "vocab": 20, "order": "monotone", "threads": 1,
             "eff_threads": 1, "parts": ["accuracy", "efficiency"], "models": list(KINDS), "methods": list(METHODS)}


def _command(s: dict) -> str:
    """The command line that reproduces settings ``s``: every value that differs from the preset."""
    cmd = ["salience", "demo"] + (["--quick"] if s["quick"] else []) + ["--out", str(s["out"])]
    preset = PRESETS["quick" if s["quick"] else "full"]
    for k, default in {**preset, **_DEFAULTS}.items():
        if s.get(k) != default:
            v = ",".join(s[k]) if isinstance(s[k], list) else str(s[k])
            cmd += [f"--{k.replace('_', '-')}", v]
    return " ".join(shlex.quote(c) for c in cmd)


def run_demo(s: dict, stream=None) -> DemoResult:
    """Run the parts in ``s`` (see :func:`settings`), print tables to ``stream`` and write the report."""
    stream = sys.stdout if stream is None else stream
    bar = report.Progress(stream=sys.stderr if stream is sys.stdout else stream)
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0, c0, load0 = time.perf_counter(), time.process_time(), _loadavg()
    files: dict[str, Path] = {}
    figures: dict[str, Path] = {}
    notes: list[str] = []
    comp = task = res = interactive = None

    def say(text=""):
        stream.write(text + "\n")
        stream.flush()

    say(f"salience demo{' --quick' if s['quick'] else ''}: report in {out}/")
    if "accuracy" in s["parts"]:
        task = Transliteration(vocab=s["vocab"], min_len=s["min_len"], max_len=s["max_len"], order=s["order"],
                               seed=s["seed"])
        cfg = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], hidden_dim=s["hidden"], seed=s["seed"],
                          threads=s["threads"])
        say(f"\n1. Accuracy: {task}, {cfg.steps} steps x {cfg.batch_size} examples per model")

        def prog(kind, i, n, loss):
            bar.update(f"train {kind}", i, n, f"loss {loss:.3f}")

        comp = compare(task, cfg, kinds=s["models"], buckets=buckets_for(s["min_len"], s["max_len"], s["buckets"]),
                       per_bucket=s["per_bucket"], progress=prog)
        say("\nToken accuracy (%), greedy decoding:")
        say(report.accuracy_table(comp, "token_accuracy"))
        say("\nSequence accuracy (%):")
        say(report.accuracy_table(comp, "sequence_accuracy"))
        say("\nTraining time: " + ", ".join(f"{k} {comp.seconds[k]:.1f}s" for k in comp.seconds))
        if any(m[0].aligned_mass is not None for m in comp.metrics.values()):
            say("\n2. Interpretability: attention mass (%) on the source token the task aligns:")
            say(report.alignment_table(comp))
            say("\nAttention mass (%) by offset from the aligned source token:")
            say(report.offset_table(comp))
        figures["accuracy"] = report.plot_accuracy(comp, out / "accuracy.png")
        figures["training"] = report.plot_training(comp, out / "training.png")
        if any(m[0].aligned_mass is not None for m in comp.metrics.values()):
            figures["alignment"] = report.plot_alignment(comp, out / "alignment.png")
            figures["heatmaps"] = report.plot_heatmaps(comp, task, out / "heatmaps.png")
            try:
                interactive = report.write_interactive(comp, task, out)
            except ImportError as e:
                notes.append(f"attention.html not written: {e}")
            if interactive is not None:
                files["attention_html"] = interactive
    if "efficiency" in s["parts"]:
        say(f"\n3. Efficiency: forward time and peak memory, N = {s['eff_min_len']} .. {s['eff_max_len']}")

        lengths = [n for n in (s["eff_min_len"] * 2**i for i in range(40)) if n <= s["eff_max_len"]]

        def eprog(method, n, pt):
            if pt is not None:
                mem = "n/a" if pt.peak_bytes is None else f"{pt.peak_bytes / 2**20:.1f} MiB"
                bar.update(f"measure {method}", lengths.index(n) + 1, len(lengths),
                           f"N={n}: {pt.seconds * 1000:.1f} ms, {mem}")

        res = sweep(methods=s["methods"], min_len=s["eff_min_len"], max_len=s["eff_max_len"],
                    time_limit=s["time_limit"], memory_limit=int(s["memory_limit_gib"] * 2**30),
                    threads=s["eff_threads"], seed=s["seed"], progress=eprog)
        say(report.efficiency_table(res))
        for m, why in res.stopped.items():
            say(f"  {m}: {why}")
        figures["efficiency"] = report.plot_efficiency(res, out / "efficiency.png")
    flow_res = None
    if "flow" in s["parts"]:
        import torch

        from .flow import run_flow

        old = torch.get_num_threads()
        torch.set_num_threads(s["threads"])
        try:
            flow_res = run_flow(quick=s["quick"], seed=s["seed"], out=out, say=say,
                                progress=lambda i, n, loss: bar.update("train agreement", i, n, f"loss {loss:.3f}"))
        finally:
            torch.set_num_threads(old)
        files.update({k: Path(v) for k, v in flow_res.get("files", {}).items()})
        notes.append("Attention flow (Abnar & Zuidema 2020): tables in flow.json, plot in flow.png.")
    files.update({k: v for k, v in figures.items() if v is not None})
    secs = time.perf_counter() - t0
    machine = _machine(secs, time.process_time() - c0, load0)
    files["json"] = report.write_json(out, accuracy=comp, efficiency=res, flow=flow_res, machine=machine,
                                      command=_command(s), settings={k: str(v) for k, v in s.items()})
    if s.get("save_json"):
        keep = Path(s["save_json"])
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(files["json"].read_text(encoding="utf-8"), encoding="utf-8")
        files["kept json"] = keep
    files["html"] = report.write_html(out, command=_command(s), comparison=comp, task=task, sweep=res,
                                      figures=figures, interactive=interactive, notes=notes)
    if comp is not None and "none" in comp.metrics:
        base = comp.longest("none")
        for k in comp.metrics:
            if k != "none":
                m = comp.longest(k)
                say(f"\nLongest bucket ({m.label}): {LABELS[k]} {100 * m.token_accuracy:.1f}% tokens / "
                    f"{100 * m.sequence_accuracy:.1f}% sequences vs no attention {100 * base.token_accuracy:.1f}% / "
                    f"{100 * base.sequence_accuracy:.1f}%")
    say(f"\nDone in {secs:.0f}s. Open {files['html']}")
    return DemoResult(comp, res, files, secs, flow_res)


def _loadavg() -> list[float] | None:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine(wall: float, cpu: float, load_start) -> dict:
    """Where and how the run was measured: CPU model, cores, torch, load average at start and end, times."""
    import os
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_start": load_start,
            "loadavg_end": _loadavg(), "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def run(args) -> int:
    """Entry point of ``salience demo``."""
    try:
        s = settings(args)
    except ValueError as e:
        print(f"salience demo: error: {e}", file=sys.stderr)
        return 2
    run_demo(s)
    return 0
