"""Output of ``salience demo``: terminal tables and progress bars, PNG figures and an HTML page.

* :class:`Progress`: a one-line progress bar (redrawn in place on a terminal, a few lines in a log file).
* :func:`accuracy_table`, :func:`alignment_table`, :func:`efficiency_table`: plain-text tables.
* :func:`plot_accuracy`, :func:`plot_alignment`, :func:`plot_heatmaps`, :func:`plot_training`,
  :func:`plot_efficiency`: matplotlib figures written as PNG (the ``viz`` extra).
* :func:`write_html`: ``index.html``, one self-contained page (figures inlined) with every table; the
  alignment maps also go to ``attention.html`` through :func:`salience.interpret.render.html.report`.

Example:
    >>> from salience.demos.report import table
    >>> print(table(["model", "acc"], [["a", "0.50"], ["bb", "1.00"]]))
    model   acc
    -----  ----
    a      0.50
    bb     1.00
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

from .efficiency import MEMORY_RESOLUTION, METHODS, SLOPE_MAX_STEP_DEVIATION, SLOPE_MIN_R2, SweepResult
from .seq2seq import LABELS, Comparison

__all__ = [
    "Progress",
    "table",
    "accuracy_table",
    "alignment_table",
    "offset_table",
    "efficiency_table",
    "plot_accuracy",
    "plot_alignment",
    "plot_heatmaps",
    "plot_training",
    "plot_efficiency",
    "write_html",
    "write_json",
    "write_interactive",
]

_COLORS = {"none": "#7f7f7f", "additive": "#d62728", "luong": "#1f77b4",
           "full": "#7f7f7f", "sliding_window": "#2ca02c", "linear": "#ff7f0e", "performer": "#9467bd",
           "textbook": "#8c564b"}


class Progress:
    """A progress bar on ``stream``: redrawn in place on a terminal; elsewhere one line per 25 %.

    Example:
        >>> import io
        >>> s = io.StringIO()
        >>> p = Progress(stream=s, tty=False)
        >>> for i in range(1, 5):
        ...     p.update("train", i, 4, "loss 0.1")
        >>> s.getvalue().count("train")
        4
    """

    def __init__(self, stream=None, width: int = 28, tty: bool | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._label = None
        self._next = 0.0
        self._t0 = time.perf_counter()

    def update(self, label: str, done: int, total: int, extra: str = "") -> None:
        if label != self._label:
            self._label, self._next, self._t0 = label, 0.0, time.perf_counter()
        frac = done / total if total else 1.0
        if not self.tty and frac < self._next and done != total:
            return
        filled = int(round(self.width * frac))
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{label:<28} [{bar}] {done:>5}/{total:<5} {time.perf_counter() - self._t0:6.1f}s {extra}"
        if self.tty:
            self.stream.write("\r" + line.ljust(110)[:140])
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(line.rstrip() + "\n")
            while self._next <= frac:
                self._next += 0.25
        self.stream.flush()


def table(headers, rows) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    cols = list(zip(*([headers] + [list(map(str, r)) for r in rows])))
    w = [max(len(str(c)) for c in col) for col in cols]

    def fmt(r):
        return "  ".join(str(c).ljust(w[0]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r)).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * x for x in w)] + [fmt(r) for r in rows])


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def accuracy_table(c: Comparison, what: str = "token_accuracy") -> str:
    """Rows: models; columns: length buckets; cells: accuracy in percent."""
    labels = [f"{lo}-{hi}" for lo, hi in c.buckets]
    rows = [[LABELS[k]] + [_pct(getattr(m, what)) for m in c.metrics[k]] for k in c.metrics]
    return table(["model \\ length"] + labels, rows)


def alignment_table(c: Comparison) -> str:
    """Attention mass on the aligned source token per bucket, the chance level and the +-1 neighbourhood."""
    labels = [f"{lo}-{hi}" for lo, hi in c.buckets]
    rows = []
    for k, ms in c.metrics.items():
        if ms[0].aligned_mass is None:
            continue
        rows.append([LABELS[k] + ": aligned"] + [_pct(m.aligned_mass) for m in ms])
        rows.append([LABELS[k] + ": aligned +-1"] + [_pct(sum(m.offset_mass[o] for o in (-1, 0, 1))) for m in ms])
    first = next(iter(c.metrics.values()))
    rows.append(["uniform attention (chance)"] + [_pct(m.chance_mass) for m in first])
    return table(["attention mass % \\ length"] + labels, rows)


def offset_table(c: Comparison) -> str:
    """Where the attention goes relative to the aligned source token (offset 0), per attention model and
    bucket: the mass at offsets -2..+2. A bidirectional encoder's annotation of a neighbour also carries the
    aligned token, so a model may read it from there."""
    rows = []
    for k, ms in c.metrics.items():
        if ms[0].aligned_mass is None:
            continue
        for m in ms:
            rows.append([f"{LABELS[k]}, length {m.label}"] + [_pct(m.offset_mass[o]) for o in sorted(m.offset_mass)])
    offs = sorted(next(m for ms in c.metrics.values() for m in ms if m.offset_mass).offset_mass) if rows else []
    return table(["attention mass % at offset"] + [f"{o:+d}" for o in offs], rows)


def _fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    if b < MEMORY_RESOLUTION:
        return "<1 MiB"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def _fmt_s(s) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def efficiency_table(r: SweepResult) -> str:
    """Rows: lengths; columns: time and peak memory per method; last rows: the fitted slopes."""
    methods = list(dict.fromkeys(p.method for p in r.points))
    lengths = sorted({p.length for p in r.points})
    by = {(p.method, p.length): p for p in r.points}
    headers = ["N"] + [f"{m} time" for m in methods] + [f"{m} mem" for m in methods]
    rows = []
    for n in lengths:
        row = [n]
        row += [_fmt_s(by[m, n].seconds) if (m, n) in by else "-" for m in methods]
        row += [_fmt_bytes(by[m, n].peak_bytes) if (m, n) in by else "-" for m in methods]
        rows.append(row)
    st, sm = r.slope_fits("seconds"), r.slope_fits("peak_bytes")
    rows.append(["slope"] + [_slope(st.get(m)) for m in methods] + [_slope(sm.get(m)) for m in methods])
    text = table(headers, rows)
    unread = [f"{m} {what}: slope not readable ({f.reason})" for what, fits in (("time", st), ("mem", sm))
              for m in methods if (f := fits.get(m)) is not None and not f.readable and f.n >= 2]
    if unread:
        text += ("\nn/r = not readable: fewer than 3 points above the resolution, R^2 of the log-log fit below "
                 f"{SLOPE_MIN_R2}, or a doubling step off the fit by more than {SLOPE_MAX_STEP_DEVIATION}\n"
                 + "\n".join(unread))
    return text


def _slope(f) -> str:
    if f is None or f.slope is None:
        return "-"
    return f"{f.slope:.2f}" if f.readable else "n/r"


# ------------------------------------------------------------------------------------------- figures


def _figure(w: float, h: float):
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the demo's figures need matplotlib: pip install 'salience[viz]'") from e
    return Figure(figsize=(w, h))


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _centres(c: Comparison):
    return [(lo + hi) / 2 for lo, hi in c.buckets]


def plot_accuracy(c: Comparison, path) -> Path:
    """Token and sequence accuracy against length (bucket centres), one line per model."""
    fig = _figure(10, 4)
    x = _centres(c)
    for i, (what, title) in enumerate((("token_accuracy", "token accuracy"),
                                       ("sequence_accuracy", "sequence accuracy (all tokens right)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for k, ms in c.metrics.items():
            ax.plot(x, [100 * getattr(m, what) for m in ms], "o-", color=_COLORS[k], label=LABELS[k])
        ax.set_xlabel("sequence length (bucket centre)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{c.task}: greedy decoding, same budget for every model", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_alignment(c: Comparison, path) -> Path:
    """Attention mass on the aligned source token (solid) and within +-1 of it (dashed) against length."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    x = _centres(c)
    for k, ms in c.metrics.items():
        if ms[0].aligned_mass is None:
            continue
        ax.plot(x, [100 * m.aligned_mass for m in ms], "o-", color=_COLORS[k], label=f"{LABELS[k]}: aligned token")
        ax.plot(x, [100 * sum(m.offset_mass[o] for o in (-1, 0, 1)) for m in ms], "s--", color=_COLORS[k],
                alpha=0.6, label=f"{LABELS[k]}: aligned +-1")
    first = next(iter(c.metrics.values()))
    ax.plot(x, [100 * m.chance_mass for m in first], ":", color="k", label="uniform attention (chance)")
    ax.set_xlabel("sequence length (bucket centre)")
    ax.set_ylabel("% of attention mass")
    ax.set_ylim(-3, 103)
    ax.set_title("share of attention on the source token the task aligns")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmaps(c: Comparison, task, path) -> Path | None:
    """The attention map (target step x source position) of each attention model on one example."""
    kinds = [k for k, e in c.examples.items() if e["weights"] is not None]
    if not kinds:
        return None
    fig = _figure(5.2 * len(kinds), 5.4)
    for i, k in enumerate(kinds):
        e = c.examples[k]
        w = e["weights"].numpy()
        ax = fig.add_subplot(1, len(kinds), i + 1)
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1, aspect="equal", interpolation="nearest")
        S, T = len(e["src"]), len(e["pred"])
        step = max(1, math.ceil(max(S, T) / 30))
        ax.set_xticks(range(0, S, step), task.source_symbols(e["src"])[::step], fontsize=6)
        ax.set_yticks(range(0, T, step), task.target_symbols(e["pred"])[::step], fontsize=6)
        right = sum(int(a == b) for a, b in zip(e["pred"], e["tgt"]))
        ax.set_xlabel("source token")
        ax.set_ylabel("predicted target token")
        ax.set_title(f"{LABELS[k]}\n{right}/{T} tokens right", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_training(c: Comparison, path) -> Path:
    """Training loss (moving average over 25 steps) per model."""
    fig = _figure(6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for k, losses in c.losses.items():
        t = torch.tensor(losses)
        n = min(25, len(losses))
        sm = torch.nn.functional.avg_pool1d(t.view(1, 1, -1), n, stride=1).view(-1) if n > 1 else t
        ax.plot(range(n, len(losses) + 1), sm.tolist(), color=_COLORS[k], label=LABELS[k])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_efficiency(r: SweepResult, path) -> Path:
    """Time and peak memory against N on log-log axes; the legend (below each plot, so that it hides no
    curve) gives each method's fitted slope, or says "slope not readable (R^2=..)" where the points do not
    support one (:func:`salience.demos.efficiency.slope_fit`)."""
    fig = _figure(11, 5.6)
    st, sm = r.slope_fits("seconds"), r.slope_fits("peak_bytes")
    for i, (what, slopes, ylabel) in enumerate((("seconds", st, "forward time (s)"),
                                                ("peak_bytes", sm, "peak memory (MiB)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for m in dict.fromkeys(p.method for p in r.points):
            floor = MEMORY_RESOLUTION if what == "peak_bytes" else 0
            pts = [(p.length, getattr(p, what)) for p in r.of(m) if getattr(p, what) and getattr(p, what) >= floor]
            if not pts:
                continue
            ys = [y / 2**20 if what == "peak_bytes" else y for _, y in pts]
            f = slopes.get(m)
            lab = METHODS[m] + ("" if f is None or f.n < 2 else f"  (slope {f.label()})")
            ax.plot([x for x, _ in pts], ys, "o-", color=_COLORS.get(m), label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.get_lines():
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
        else:
            ax.text(0.5, 0.5, "nothing above the 1 MiB resolution", ha="center", transform=ax.transAxes)
    c = r.config
    fig.suptitle(f"B={c['batch']} H={c['heads']} D={c['head_dim']} {c['dtype']}, window {c['window']}, "
                 f"{c['features']} Performer features, {c['threads']} thread(s)\nslope = fitted exponent over "
                 f"the last 4 points, shown only with >= 3 points, R^2 >= {SLOPE_MIN_R2} and every doubling step "
                 f"within {SLOPE_MAX_STEP_DEVIATION} of it; memory below 1 MiB not shown", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legends below the axes
    return path


# ---------------------------------------------------------------------------------------------- html


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>' \
           f'{html.escape(Path(path).name)}</figcaption></figure>'


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1150px;padding:10px 24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}img{max-width:100%}
figure{margin:10px 0}figcaption{font-size:11px;color:#777}.note{color:#555}code{background:#f0f0f0}"""


def write_html(out: Path, *, command: str, comparison: Comparison | None = None, task=None,
               sweep: SweepResult | None = None, figures: dict | None = None, interactive: Path | None = None,
               notes: list[str] | None = None) -> Path:
    """Write ``out/index.html``: every table and figure of the run on one page, no external resources."""
    figures = figures or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>salience demo</title>"
             f"<style>{_CSS}</style></head><body><h1>salience demo: evidence for attention's benefits</h1>",
             f"<p class='note'>Reproduce with <code>{html.escape(command)}</code> (seeded). torch "
             f"{html.escape(torch.__version__)}.</p>"]
    for n in notes or []:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    if comparison is not None:
        c = comparison
        cfg = c.config
        parts.append("<h2>1. Accuracy on long sequences</h2>")
        parts.append(f"<p>Task: {html.escape(c.task)}. Three GRU encoder-decoders (embedding {cfg['embed_dim']}, "
                     f"hidden {cfg['hidden_dim']}, bidirectional encoder) trained for {cfg['steps']} steps of "
                     f"{cfg['batch_size']} examples each, same seed and data; greedy decoding on "
                     f"{c.metrics[next(iter(c.metrics))][0].n} fresh examples per length bucket.</p>")
        parts.append("<h3>Token accuracy (%)</h3>" + _pre(accuracy_table(c, "token_accuracy")))
        parts.append("<h3>Sequence accuracy (%)</h3>" + _pre(accuracy_table(c, "sequence_accuracy")))
        parts.append(_img(figures.get("accuracy"), "accuracy per length"))
        parts.append(_img(figures.get("training"), "training loss"))
        parts.append("<h2>2. Interpretability: does attention point at the aligned source token?</h2>")
        parts.append("<p>The task says which source token each target token comes from. The table gives the "
                     "mean attention weight on that token (and within one position of it) per bucket; uniform "
                     "attention would put 1/length there.</p>")
        parts.append(_pre(alignment_table(c)))
        parts.append("<p>Where the rest goes: the mass at each offset from the aligned token. The encoder is "
                     "bidirectional, so the annotation of a neighbouring position also encodes the aligned token; "
                     "a model that attends there reads the right information through a shifted pointer. "
                     "Attention weights show where a model reads, not by themselves what it reads.</p>")
        parts.append(_pre(offset_table(c)))
        parts.append(_img(figures.get("alignment"), "aligned attention mass"))
        parts.append(_img(figures.get("heatmaps"), "alignment heatmaps"))
        if interactive is not None:
            parts.append(f"<p>Interactive view of these maps (head view, zoomable matrix): "
                         f"<a href='{html.escape(interactive.name)}'>{html.escape(interactive.name)}</a>. "
                         "Each attention model is one 'layer'; rows are labelled with the source token they "
                         "should align to.</p>")
    if sweep is not None:
        cfg = sweep.config
        parts.append("<h2>3. Efficiency: time and memory as the length doubles</h2>")
        parts.append(f"<p>Forward pass, q = k = v of shape (B={cfg['batch']}, H={cfg['heads']}, N, "
                     f"D={cfg['head_dim']}), {cfg['dtype']}, {cfg['threads']} thread(s). Peak memory is the "
                     "growth of the resident set during the call. The slope is the fitted exponent p of "
                     "cost ~ N^p over each method's last 4 lengths; 'n/r' (not readable) where the points do not "
                     f"support one: fewer than 3 of them, R^2 of the fit below {SLOPE_MIN_R2}, or a doubling step "
                     f"off the fit by more than {SLOPE_MAX_STEP_DEVIATION} (short calls on a shared machine, "
                     "memory near the 1 MiB resolution). Before each memory call the heap is trimmed "
                     "(malloc_trim), so memory freed by earlier calls does not hide a peak.</p>")
        parts.append(_pre(efficiency_table(sweep)))
        stops = "\n".join(f"{m}: {why}" for m, why in sweep.stopped.items())
        backends = "\n".join(f"{m}: {b}" for m, b in dict.fromkeys((p.method, p.backend) for p in sweep.points))
        parts.append("<h3>Where each method stopped</h3>" + _pre(stops))
        parts.append("<h3>Path taken</h3>" + _pre(backends))
        parts.append(_img(figures.get("efficiency"), "efficiency"))
    parts.append("<p class='note'>All numbers in results.json.</p></body></html>")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text("\n".join(p for p in parts if p), encoding="utf-8")
    return path


def write_json(out: Path, **parts) -> Path:
    """``out/results.json`` with each part's ``to_dict()``."""
    data = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in parts.items() if v is not None}
    path = Path(out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    json.dump(data, buf, indent=1, default=str)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


#: short model names for the interactive page's grid (its layer labels must stay under 12 characters)
SHORT_LABELS = {"none": "no attention", "additive": "Bahdanau", "luong": "Luong"}


def _demo_payload_page(page: str, data: dict) -> str:
    """``page`` with its embedded JSON replaced by ``data`` (as the renderer escapes it)."""
    import re

    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    pat = re.compile(r'(<script type="application/json" id="salience-data">)(.*?)(</script>)', re.S)
    return pat.sub(lambda m: m.group(1) + blob + m.group(3), page, count=1)


def _hide_section(page: str, sid: str) -> str:
    return page.replace(f'<section id="{sid}">', f'<section id="{sid}" hidden>', 1)


def write_interactive(c: Comparison, task, out: Path) -> Path | None:
    """``out/attention.html`` from :func:`salience.interpret.render.html.report`: each attention model's map
    of the example as one "layer" named after the model.

    Axes of the seq2seq maps: rows (queries) are the decoder's steps, labelled with the target token it
    produced and its position (``"B (t3)"``); columns (keys) are the source tokens (``"b (s3)"``). The
    sections the demo has no data for (token importance, faithfulness) are hidden rather than left empty.
    None without attention models."""
    from ..interpret.render import html as render_html

    kinds = [k for k, e in c.examples.items() if e["weights"] is not None]
    if not kinds:
        return None
    e0 = c.examples[kinds[0]]
    maps = torch.stack([c.examples[k]["weights"] for k in kinds]).unsqueeze(1)  # (models, 1, T, S)
    T, S = maps.shape[-2:]
    src = [f"{t} (s{i})" for i, t in enumerate(task.source_symbols(e0["src"]))]
    tgt = [f"{t} (t{i})" for i, t in enumerate(task.target_symbols(e0["pred"][:T]))]
    tgt += [f"? (t{i})" for i in range(len(tgt), T)]
    names = [SHORT_LABELS.get(k, k)[:11] for k in kinds]
    models = "; ".join(f"{n} = {LABELS[k]}" for n, k in zip(names, kinds))
    title = "salience demo: cross-attention maps of the trained seq2seq models"
    summary = (f"{c.task}; one example of length {len(e0['src'])}. Models (one row each in the grid): {models}. "
               f"Queries (rows, left in the head view) are the {T} target tokens the decoder produced, one per "
               f"step; keys (columns, right) are the {S} source tokens. Labels give the position: t3 = target "
               "step 3, s3 = source token 3.")
    kw = dict(layer_names=names, title=title, summary=summary)
    page = render_html.report(maps, src, None, **kw)
    if max(T, S) <= render_html.DETAIL:
        # the renderer labels rows with tokens[row_index[r]] (one token list for both axes): append the target
        # tokens after the source tokens and point each row at its own target token
        data = render_html.payload(maps, src, **kw)
        data["tokens"] = src + tgt
        data["row_index"] = list(range(S, S + T))
        page = _demo_payload_page(page, data)
    for sid in ("bars-sec", "faith-sec"):
        page = _hide_section(page, sid)
    path = Path(out) / "attention.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
