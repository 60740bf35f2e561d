"""The demo's tables in docs/demo.md and README.md, rendered from a kept ``results.json``.

``salience demo --save-json benchmarks/results/demo_full.json`` (and ``--quick --save-json
benchmarks/results/demo_quick.json``) keep the file; ``benchmarks/docs_tables.py`` renders these functions'
output between the docs' ``<!-- table:demo-...:begin/end -->`` markers and its ``--check`` (run by the CI suite)
fails when a table no longer matches its JSON.

Example:
    >>> data = {"accuracy": {"buckets": [[5, 9]], "metrics": {"none": [{"token_accuracy": 0.5,
    ...         "sequence_accuracy": 0.25}]}}}
    >>> print(accuracy(data, "token_accuracy"))
    | model \\ length | 5-9 |
    |---|---:|
    | no attention (Cho et al. 2014) | 50.0 |
"""

from __future__ import annotations

import re

__all__ = ["accuracy", "accuracy_full", "offsets", "accuracy_quick", "accuracy_readme", "alignment", "efficiency",
           "efficiency_time", "efficiency_memory", "machine_line"]

#: row labels of the models (as in :data:`salience.demos.seq2seq.LABELS`, repeated so that rendering needs no torch)
LABELS = {"none": "no attention (Cho et al. 2014)", "additive": "additive attention (Bahdanau)",
          "luong": "Luong attention (general)"}
SHORT = {"none": "no attention", "additive": "additive attention", "luong": "Luong attention"}
#: column names of the efficiency tables
METHOD_NAMES = {"full": "full", "sliding_window": "sliding window", "linear": "linear", "performer": "Performer",
                "textbook": "textbook"}
MIB = 1 << 20


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _buckets(acc: dict) -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in acc["buckets"]]


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def accuracy(data: dict, what: str) -> str:
    """Rows: models; columns: length buckets; cells: ``what`` (``token_accuracy`` or ``sequence_accuracy``) in %."""
    acc = data["accuracy"]
    rows = [[LABELS.get(k, k)] + [_pct(m[what]) for m in ms] for k, ms in acc["metrics"].items()]
    return _md(["model \\ length"] + _buckets(acc), rows)


def accuracy_full(data: dict) -> str:
    """docs/demo.md: the token and the sequence accuracy tables of the full run."""
    return ("Token accuracy (%)\n\n" + accuracy(data, "token_accuracy") + "\n\nSequence accuracy (%, every token "
            "right)\n\n" + accuracy(data, "sequence_accuracy"))


def accuracy_quick(data: dict) -> str:
    """docs/demo.md: the ``--quick`` run's token / sequence accuracy in one table."""
    acc = data["accuracy"]
    rows = [[SHORT.get(k, k)] + [f"{_pct(m['token_accuracy'])} / {_pct(m['sequence_accuracy'])}" for m in ms]
            for k, ms in acc["metrics"].items()]
    return _md(["token / sequence accuracy %"] + _buckets(acc), rows)


def accuracy_readme(data: dict) -> str:
    """README: token accuracy in the shortest and the longest bucket."""
    acc = data["accuracy"]
    b = _buckets(acc)
    rows = [[SHORT.get(k, k) + (" (Bahdanau)" if k == "additive" else ""), f"{_pct(ms[0]['token_accuracy'])}%",
             f"{_pct(ms[-1]['token_accuracy'])}%"] for k, ms in acc["metrics"].items()]
    return _md(["model", f"lengths {b[0]}", f"lengths {b[-1]}"], rows)


def alignment(data: dict) -> str:
    """docs/demo.md: attention mass on the aligned source token (and +-1) per bucket, and uniform attention's."""
    acc = data["accuracy"]
    rows = []
    for k, ms in acc["metrics"].items():
        if ms[0].get("aligned_mass") is None:
            continue
        name = {"additive": "additive", "luong": "Luong"}.get(k, k)
        rows.append([f"{name}: aligned token"] + [_pct(m["aligned_mass"]) for m in ms])
        rows.append([f"{name}: aligned +-1"] + [_pct(sum(m["offset_mass"][o] for o in ("-1", "0", "1"))) for m in ms])
    first = next(iter(acc["metrics"].values()))
    rows.append(["uniform (chance)"] + [_pct(m["chance_mass"]) for m in first])
    return _md(["attention mass % \\ length"] + _buckets(acc), rows)


def offsets(data: dict, kind: str = "additive") -> str:
    """docs/demo.md: where a model's attention goes, by offset from the aligned token, in the longest bucket,
    with the range of the most-attended offset's share over all buckets."""
    ms = data["accuracy"]["metrics"][kind]
    last = ms[-1]["offset_mass"]
    top = max(last, key=lambda o: last[o])
    shares = [100 * m["offset_mass"][top] for m in ms]
    lo, hi = data["accuracy"]["buckets"][-1]
    def off(o) -> str:
        return f"{int(o):+d}" if int(o) else "0"

    cells = ", ".join(f"**{off(o)}: {100 * v:.1f}**" if o == top else f"{off(o)}: {100 * v:.1f}"
                      for o, v in sorted(last.items(), key=lambda x: int(x[0])))
    name = {"additive": "additive", "luong": "Luong"}.get(kind, kind)
    return (f"Where the {name} model's attention goes, by offset from the aligned token (%, {lo}-{hi} bucket; "
            f"offset {off(top)} takes {min(shares):.0f}-{max(shares):.0f} % in every bucket): {cells}.")


def _time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    ms = 1000 * s
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _bytes(b) -> str:
    if b is None:
        return "n/a"
    if b < MIB:
        return "<1 MiB"
    if b >= 1 << 30:
        return f"{b / (1 << 30):.1f} GiB"
    return f"{b / MIB:.1f} MiB" if b < 10 * MIB else f"{b / MIB:,.0f} MiB"


def _stopped(reason: str) -> tuple[int | None, str]:
    """The length a method stopped at and the cell text (``stopped: 30.3 s predicted``)."""
    n = re.search(r"N=(\d+)", reason)
    m = re.search(r"predicted at ([0-9.]+ (?:s|GiB))", reason)
    text = f"stopped: {m.group(1)} predicted" if m else ("stopped: out of memory" if "memory" in reason else "")
    return (int(n.group(1)) if n and text else None), text


def _slope(fit: dict | None) -> str:
    if not fit or fit.get("slope") is None:
        return ""
    if not fit.get("readable", True):
        return "n/r"
    s = f"{fit['slope']:.2f}"
    return f"**{s}**" if fit["slope"] >= 1.5 else s  # bold: quadratic growth


def efficiency(data: dict) -> str:
    """docs/demo.md: time and peak memory per length and method, each with its fitted slope (``n/r``: not
    readable, with the reason below the table)."""
    return efficiency_time(data) + "\n\n" + efficiency_memory(data)


def efficiency_time(data: dict) -> str:
    """The time table of :func:`efficiency` alone."""
    return _efficiency(data, "time")


def efficiency_memory(data: dict) -> str:
    """The peak-memory table of :func:`efficiency` alone."""
    return _efficiency(data, "memory")


def _efficiency(data: dict, which: str) -> str:
    eff = data["efficiency"]
    methods = list(dict.fromkeys(p["method"] for p in eff["points"]))
    by = {(p["method"], p["length"]): p for p in eff["points"]}
    stop = {m: _stopped(r) for m, r in eff.get("stopped", {}).items()}
    lengths = sorted({p["length"] for p in eff["points"]} | {n for n, _ in stop.values() if n})
    head = ["N"] + [METHOD_NAMES.get(m, m) for m in methods]
    out = []
    for key, cell, label in (("time", lambda p: _time(p["seconds"]), "time slope"),
                             ("memory", lambda p: _bytes(p["peak_bytes"]), "memory slope")):
        if key != which:
            continue
        rows = []
        for n in lengths:
            row = [f"{n:,}"]
            for m in methods:
                p = by.get((m, n))
                row.append(cell(p) if p else (stop[m][1] if key == "time" and m in stop and stop[m][0] == n else ""))
            if any(row[1:]):
                rows.append(row)
        fits = eff.get("slope_fit", {}).get(key, {})
        rows.append([f"**{label}**"] + [_slope(fits.get(m)) for m in methods])
        unread = [f"{METHOD_NAMES.get(m, m)} {key}: slope not readable ({f.get('reason', '')})"
                  for m, f in fits.items() if f.get("slope") is not None and not f.get("readable", True)]
        title = "Time per forward call" if key == "time" else (
            "Peak memory (growth of the resident set during the call; `<1` means below the 1 MiB resolution)")
        out.append(title + ":\n\n" + _md(head, rows) + ("\n\n" + "; ".join(unread) + "." if unread else ""))
    return "\n\n".join(out)


def machine_line(data: dict) -> str:
    """One line: the run's settings and, when the JSON has them, CPU and load average."""
    s = data.get("settings", {})
    m = data.get("machine") or {}
    bits = [f"seed {s.get('seed', '?')}", f"{s.get('steps', '?')} steps", f"torch {m.get('torch', '?')}"]
    if m:
        bits.append(f"{m.get('cpu', '?')}, {m.get('cpus', '?')} cores, load average {m.get('loadavg_end', ['?'])[0]} "
                    f"at the end, {m.get('wall_seconds', 0):.0f} s wall clock")
    return ", ".join(bits)
