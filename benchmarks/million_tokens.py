"""One million tokens: B=1, H=4, D=64, float32, causal sliding window of 256, forward.

    .venv/bin/python benchmarks/million_tokens.py

Times one forward in a fresh process and measures that process's peak RSS in another fresh process, then
writes benchmarks/results/million.json. The target: under 10 s, peak RSS <= 2x the bytes of q, k, v and the
output together (4 x 1 GiB here).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from salience import bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    extra = sys.argv[1:]
    argv = ["--million", "--json", os.path.join(HERE, "results", "million.json")] + extra
    ns = parser.parse_args(argv)
    ns.command_line = "salience bench --million --json benchmarks/results/million.json " + " ".join(extra)
    sys.exit(bench.run(ns))
