"""Start-up cost of salience: ``import torch``, ``import salience`` and ``salience --help`` as fresh processes.

Each command runs ``--repeats`` times (default 7), interleaved (torch, salience, --help, torch, ...) so that load
on the machine hits them alike; the medians of wall time and of CPU time (user + system of the child) are
reported with the ratios the issue sets as budgets: ``import salience`` at most 1.3x ``import torch``, and
``salience --help`` at most ``import torch`` + 0.5 s. Also records which heavy modules ``import salience``
loads (it should load none of torch._dynamo, transformers, matplotlib, flex_attention).

Usage::

    python benchmarks/import_time.py [--repeats 7] [--json benchmarks/results/import_time.json]

Exit status 0 when both budgets hold on the medians of wall time, 1 otherwise (a benchmark, not a test: the
figures depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch._dynamo", "transformers", "matplotlib", "torch.nn.attention.flex_attention")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commands() -> dict[str, list[str]]:
    exe = sys.executable
    script = shutil.which("salience", path=str(Path(exe).parent)) or shutil.which("salience")
    helpcmd = [script, "--help"] if script else [exe, "-m", "salience.cli", "--help"]
    return {"import torch": [exe, "-c", "import torch"],
            "import salience": [exe, "-c", "import salience"],
            "salience --help": helpcmd}


def _time(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run of ``cmd``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def heavy_modules() -> list[str]:
    """The modules of :data:`HEAVY` that a fresh ``import salience`` loads."""
    code = f"import sys, salience; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    return [m for m in out.split(",") if m]


def measure(repeats: int = 7) -> dict:
    cmds = _commands()
    for cmd in cmds.values():  # warm the file cache once, untimed
        _time(cmd)
    runs: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            w, c = _time(cmd)
            runs[name]["wall"].append(w)
            runs[name]["cpu"].append(c)
    med = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")} for k, v in runs.items()}
    torch_w, torch_c = med["import torch"]["wall"], med["import torch"]["cpu"]
    res = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "repeats": repeats,
        "median_s": med,
        "runs_s": runs,
        "ratio_import_salience_to_torch": {"wall": med["import salience"]["wall"] / torch_w,
                                           "cpu": med["import salience"]["cpu"] / torch_c},
        "help_minus_import_torch_s": {"wall": med["salience --help"]["wall"] - torch_w,
                                      "cpu": med["salience --help"]["cpu"] - torch_c},
        "heavy_modules_loaded_by_import_salience": heavy_modules(),
        "budgets": {"ratio_import_salience_to_torch": 1.3, "help_minus_import_torch_s": 0.5},
    }
    try:
        import torch

        res["torch"] = torch.__version__
    except ImportError:
        pass
    res["within_budget"] = (res["ratio_import_salience_to_torch"]["wall"] <= 1.3
                            and res["help_minus_import_torch_s"]["wall"] <= 0.5)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="runs of each command (default: 7)")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "import_time.json"),
                   help="where to write the results (default: benchmarks/results/import_time.json)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1; got {args.repeats}")
    r = measure(args.repeats)
    print(f"CPU: {r['cpu_model']} ({r['cpu_count']} cores, load {r['loadavg']}); median of {r['repeats']} "
          "fresh processes, interleaved")
    print(f"{'command':<18}{'wall s':>9}{'CPU s':>9}")
    for k, v in r["median_s"].items():
        print(f"{k:<18}{v['wall']:>9.2f}{v['cpu']:>9.2f}")
    ra, hm = r["ratio_import_salience_to_torch"], r["help_minus_import_torch_s"]
    print(f"import salience / import torch: {ra['wall']:.2f}x wall, {ra['cpu']:.2f}x CPU (budget 1.3x)")
    print(f"salience --help - import torch: {hm['wall']:+.2f} s wall, {hm['cpu']:+.2f} s CPU (budget +0.5 s)")
    print(f"heavy modules loaded by import salience: {', '.join(r['heavy_modules_loaded_by_import_salience']) or 'none'}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if r["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
