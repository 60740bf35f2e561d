"""Run the issue-4 benchmark grid and store the results.

    .venv/bin/python benchmarks/run_grid.py            # full grid, N = 16384, with compiled FlexAttention
    .venv/bin/python benchmarks/run_grid.py --quick    # the small grid (N = 2048)
    .venv/bin/python benchmarks/run_grid.py --threads 1

Writes benchmarks/results/<name>.json, .md (the table) and .png. Equivalent to
``salience bench --flex --json ... --plot ...`` plus the markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from salience import bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    p.add_argument("--name", default=None, help="result file stem (default grid / grid_quick)")
    a = p.parse_args(argv)
    name = a.name or ("grid_quick" if a.quick else "grid") + (f"_t{a.threads}" if a.threads else "")
    out = os.path.join(HERE, "results", name)
    args = ["--json", out + ".json", "--plot", out + ".png"]
    if not a.quick:
        args.append("--flex")
    else:
        args.append("--quick")
    if a.only:
        args += ["--only", a.only]
    if a.threads:
        args += ["--threads", str(a.threads)]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    ns = parser.parse_args(args)
    root = os.path.dirname(HERE)
    ns.command_line = "salience bench " + " ".join(os.path.relpath(a, root) if a.startswith(root) else a for a in args)
    rc = bench.run(ns)
    with open(out + ".json") as f:
        data = json.load(f)
    with open(out + ".md", "w") as f:
        f.write(f"Command: `{ns.command_line}` (via `benchmarks/run_grid.py`)\n\n")
        f.write(f"Machine: {data['meta']['cpu_count']} CPUs, torch {data['meta']['torch']}, load average at the end "
                f"{data['meta']['loadavg']}\n\n")
        f.write(bench.format_table(data["results"]) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
