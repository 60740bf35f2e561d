"""The ``salience`` command line: one subcommand per module.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
``COMMANDS`` maps the name to the module and a one-line help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "walkthrough": ("salience.walkthrough", "step through attention on a tiny example in the terminal"),
    "demo": ("salience.demos.cli", "evidence for attention: accuracy on long sequences, alignment, time and memory"),
    "explain": ("salience.explain", "what a model attends to: HTML report, PNGs, faithfulness table"),
    "bench": ("salience.bench", "time and memory of salience against torch SDPA, FlexAttention and the reference"),
    "ring": ("salience.distributed.launch",
             "ring attention across processes: time and memory per rank, checked against one process"),
    "measure-layers": ("salience.layers.measure", "error and cost of the efficient attention layers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salience", description="Attention that is correct, fast and inspectable.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod_name, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=mod_name)
        importlib.import_module(mod_name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
