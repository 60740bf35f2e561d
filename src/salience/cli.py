"""The ``salience`` command line: one subcommand per module.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
``COMMANDS`` maps the name to the module and a one-line help. Only the module of the command being run is
imported (``salience --help`` imports none of them), and every option's help shows its default.

Mistakes get one line on stderr and exit status 2, argparse style: ``salience <command>: error: <what was
wrong and the fix>``. That holds for argparse's own errors and for the ``ValueError``/``TypeError`` (and
``SystemExit("message")``) a command raises while checking its arguments. Set ``SALIENCE_TRACEBACK=1`` to get
the full traceback instead.

Example:
    >>> main(["walkthrough", "--dim", "0"])
    2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
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

#: errors a command raises on a bad argument value; shown as one line (SALIENCE_TRACEBACK=1 re-raises them)
USAGE_ERRORS = (ValueError, TypeError, argparse.ArgumentTypeError, ImportError, OSError)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already state its default.

    Flags (``store_true``) are off unless given and show nothing; an option whose default is ``None`` must say
    in words what happens when it is not given (``tests/test_cli_edges.py`` checks every option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS)
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)`` and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(only: str | None = None, _subs: dict | None = None) -> argparse.ArgumentParser:
    """The ``salience`` parser; with ``only``, just that command's options are added (its module imported)."""
    parser = Parser(prog="salience", description="Attention that is correct, fast and inspectable.",
                    epilog="Run 'salience COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (mod_name, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        p.set_defaults(_module=mod_name)
        if only is None or only == name:
            importlib.import_module(mod_name).add_arguments(p)
        if _subs is not None:
            _subs[name] = p
    return parser


def _command_of(argv) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), or None."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def _one_line(command: str, err) -> str:
    """``salience <command>: error: <message>``, from an exception or a ``SystemExit`` message."""
    text = " ".join(str(err).split()) or type(err).__name__
    for prefix in (f"salience {command}: error: ", f"salience {command}: ", "error: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    return f"salience {command}: error: {text}"


def _enable_bars(tlog) -> None:
    import warnings

    with warnings.catch_warnings():  # huggingface_hub imported with HF_HUB_DISABLE_PROGRESS_BARS=1 keeps its own
        warnings.simplefilter("ignore")  # bars off and warns so; transformers' bars come back
        tlog.enable_progress_bar()


@contextlib.contextmanager
def quiet_transformers():
    """Inside: transformers' own progress bars ("Loading weights") and info/warning logs off, so they do not
    mix into salience's progress output; both restored on exit. Imports transformers' logging only if
    transformers is installed; call it around model loading in command-line paths."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        yield
        return
    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            _enable_bars(tlog)


@contextlib.contextmanager
def no_transformers_bars():
    """Inside: no transformers / huggingface_hub progress bars (such as "Loading weights"), whether transformers
    is imported before or inside; the state before is restored on exit. Costs nothing when transformers is not
    used (it sets ``HF_HUB_DISABLE_PROGRESS_BARS``, which both read at import). A value the user set wins."""
    key = "HF_HUB_DISABLE_PROGRESS_BARS"
    if key in os.environ:
        yield
        return
    os.environ[key] = "1"
    tlog = sys.modules.get("transformers.utils.logging")
    before = tlog.is_progress_bar_enabled() if tlog is not None else True
    if tlog is not None:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        os.environ.pop(key, None)
        tlog = sys.modules.get("transformers.utils.logging")
        if tlog is not None and before:
            _enable_bars(tlog)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    subs: dict = {}
    parser = build_parser(only=command or "", _subs=subs)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra:
        subs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    debug = os.environ.get("SALIENCE_TRACEBACK", "") not in ("", "0")
    try:
        with no_transformers_bars():  # they would mix into salience's own progress lines
            return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"salience {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:
            print(_one_line(args.command, e.code), file=sys.stderr)
            return 2
        raise
    except USAGE_ERRORS as e:
        if debug:
            raise
        print(_one_line(args.command, e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
