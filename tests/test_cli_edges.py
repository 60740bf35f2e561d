"""The command line's edges: a mistake gives one line, ``salience <command>: error: ...`` naming the option,
and exit status 2 (never a traceback); every option's help states its default; ``import salience`` loads none
of the heavy modules (torch._dynamo, transformers, matplotlib, FlexAttention). The import *time* is measured by
``benchmarks/import_time.py``, not here.

Subprocesses cost a Python start-up each (2-3 s on two cores), so the fresh-process cases run together in one
child that calls ``salience.cli.main`` per case with stderr captured; two real subprocesses check the exit
status and stderr of the console entry point itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from salience import cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV.pop("SALIENCE_TRACEBACK", None)

#: (argv, words the one-line message must contain); none of these runs any attention
CASES = [
    (["ring", "--seq", "1001", "--layout", "zigzag"], ["--seq", "multiple of 4", "--seq 1000"]),
    (["ring", "--mask", "foo", "--seq", "64"], ["--mask", "sliding:W"]),
    (["ring", "--layout", "spiral"], ["--layout", "invalid choice"]),
    (["ring", "--nproc", "0"], ["--nproc"]),
    (["ring", "--kv-heads", "3"], ["--kv-heads", "divide"]),
    (["ring", "--seq", "abc"], ["--seq", "invalid int"]),
    (["walkthrough", ""], ["TEXT is empty"]),
    (["walkthrough", "--dim", "0"], ["--dim", ">= 1"]),
    (["demo", "--mask", "foo"], ["unrecognized arguments: --mask foo"]),
    (["demo", "--parts", "foo"], ["--parts", "accuracy,efficiency"]),
    (["demo", "--max-len", "3", "--min-len", "5"], ["--max-len", "--min-len"]),
    (["demo", "--steps", "0"], ["--steps", "positive"]),
    (["explain", "The cat sat.", "--layers", "x"], ["--layers takes"]),
    (["explain", "The cat sat.", "--method", "lime"], ["--method takes"]),
    (["explain", "   "], ["TEXT is empty"]),
    (["explain", "The cat sat.", "--pool", "0"], ["--pool"]),
    (["explain", "The cat sat.", "--model", "/no/such/dir"], ["--model", "config.json"]),
    (["bench", "--n", "0"], ["--n", ">= 1"]),
    (["bench", "--dtype", "f8"], ["--dtype", "invalid choice"]),
    (["bench", "--model", "minilm", "--lengths", "x"], ["--lengths"]),
    (["bench", "--only", "no-such-config"], ["--only", "window"]),
    (["measure-layers", "--threads", "0"], ["--threads"]),
    (["measure-layers", "--repeats", "0"], ["--repeats"]),
    (["explain", "The cat sat.", "--out", "a_file"], ["--out", "directory"]),
    (["demo", "--out", "a_file"], ["--out", "directory"]),
    (["no-such-command"], ["invalid choice", "walkthrough"]),
]

_CHILD = r"""
import contextlib, io, json, sys
from salience import cli
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")  # explain/demo would write their default output directories here
    (cwd / "a_file").write_text("not a directory")
    argvs = [a for a, _ in CASES]
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=300, env=ENV, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(a)[:40] for a, _ in CASES])
def test_mistake_is_one_line_with_status_2(results, i):
    argv, words = CASES[i]
    rc, err = results[i]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    cmd = argv[0] if argv[0] in cli.COMMANDS else None
    assert lines[0].startswith(f"salience {cmd}: error: " if cmd else "salience: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_console_entry_point_exit_status_and_stderr():
    """The real process: exit status 2, one stderr line, nothing on stdout; ``--help`` exits 0."""
    r = subprocess.run([sys.executable, "-m", "salience.cli", "ring", "--seq", "1001", "--layout", "zigzag"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("salience ring: error: --seq 1001"), r.stderr
    h = subprocess.run([sys.executable, "-m", "salience.cli", "--help"], capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert h.returncode == 0 and all(name in h.stdout for name in cli.COMMANDS), h


def test_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("SALIENCE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--dim"):
        cli.main(["walkthrough", "--dim", "0"])


def test_every_option_has_help_and_states_its_default():
    subs: dict = {}
    cli.build_parser(_subs=subs)
    missing = []
    for name, p in subs.items():
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings or a.dest}: no help")
                continue
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or a.required:
                continue  # flags are off unless given; a required argument has no default
            text = fmt._get_help_string(a) % {"default": a.default}
            if "default" not in text.lower():
                missing.append(f"{name} {a.option_strings or a.dest}: no default in {text!r}")
    assert not missing, missing
    assert "(default: 3)" in subs["ring"].format_help()  # --repeat: the formatter appends it


def test_help_of_one_command_imports_only_that_command():
    """``build_parser(only=...)`` is what ``main`` uses: the other commands' modules stay unimported."""
    code = ("import sys; from salience import cli; cli.build_parser(only='walkthrough'); "
            "print(sorted(m for m, _ in cli.COMMANDS.values() if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['salience.walkthrough']"


def test_import_salience_loads_no_heavy_module():
    heavy = ("torch._dynamo", "transformers", "matplotlib", "torch.nn.attention.flex_attention")
    code = f"import sys, salience; print([m for m in {heavy!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_quiet_transformers_restores_settings():
    tlog = pytest.importorskip("transformers.utils.logging")
    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    with cli.quiet_transformers():
        assert not tlog.is_progress_bar_enabled() and tlog.get_verbosity() == tlog.ERROR
    assert tlog.is_progress_bar_enabled() == bars and tlog.get_verbosity() == level


def test_no_transformers_bars_while_a_command_runs():
    """Every command runs inside ``no_transformers_bars``: transformers imported inside it has no bars, and
    they come back after (here in a fresh process, where transformers is not imported before)."""
    pytest.importorskip("transformers")
    code = ("import os; os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None)\n"
            "from salience import cli\n"
            "with cli.no_transformers_bars():\n"
            "    from transformers.utils import logging as tlog\n"
            "    inside = tlog.is_progress_bar_enabled()\n"
            "print(inside, tlog.is_progress_bar_enabled(), 'HF_HUB_DISABLE_PROGRESS_BARS' in os.environ)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "False"], r.stdout
