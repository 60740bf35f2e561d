"""One self-contained HTML report: inline CSS and JavaScript, the data embedded, no CDN, no network.

The page has four parts, all drawn on ``<canvas>`` so that it stays responsive at 2,000+ tokens:

* **model view**: every layer x head map as a thumbnail (plus the mean over heads); click one to select it;
* **head view**: queries on the left, keys on the right, a line per weight (opacity = weight); hover a token
  to keep only its lines; "all heads in colour" overlays every head of the layer, one colour per head
  (click a head's chip to hide or show it); long inputs show a window of tokens (slider) and gather the weight that leaves
  the window into the "above" / "below" markers;
* **matrix view**: the selected map as a heatmap with query tokens down the left, key tokens along the bottom
  (every token when there is room, every n-th otherwise; zooming in shows them all), a colour scale in
  weight units, zoom (mouse wheel), pan (drag), reset (double click) and the tokens and weight under the
  cursor;
* **token importance** bars (rollout, flow, gradient x input, erasure...) on a y axis with values, the
  **faithfulness table** and the per-head **entropy**.

A token that occurs more than once is labelled with its position everywhere (``the·3``), so that two
``the`` rows are never confused. In Jupyter, ``report(...)`` without a path returns a :class:`ReportHTML`
that displays inline (the same page in an ``<iframe srcdoc>``).

Maps longer than ``detail`` tokens are pooled to ``detail`` blocks per side (mean over query rows, sum over
keys, so rows keep their mass) and each map is stored as 8-bit levels of its own maximum; the page says
so. A 2,048-token, 6 x 12-head report is about 3.5 MB.

Example:
    >>> import torch, tempfile, os
    >>> from salience.interpret.render import html
    >>> attn = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    >>> path = html.report(attn, ["a", "b", "c", "d", "e"], os.path.join(tempfile.mkdtemp(), "r.html"))
    >>> path.read_text().count("<script")      # the error trap, the data, the code: nothing external
    3
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import methods as _m
from .png import pool_map, token_labels

__all__ = ["report", "payload", "DETAIL", "ReportHTML", "notebook_html", "View", "write_page", "standalone"]

#: largest map side (in tokens or token blocks) embedded at full resolution
DETAIL = 192


def _clean(v):
    if isinstance(v, float):
        return None if (math.isnan(v) or math.isinf(v)) else round(v, 6)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _clean(v.tolist())
    return v


def payload(attn, tokens: Sequence[str] | None = None, *, row_index: Sequence[int] | None = None,
            importances: dict | None = None, faithfulness=None, entropy=None, layer_names=None,
            title: str = "salience attention report", summary: str = "", detail: int = DETAIL,
            merge_wordpieces: bool = False) -> dict:
    """The JSON-ready data the page embeds (see :func:`report` for the arguments)."""
    fields = getattr(attn, "report_fields", None)  # a capture.AttentionMaps (read by protocol: no import circle)
    if callable(fields):
        f = fields()
        attn = f["attn"]
        tokens = tokens if tokens is not None else f["tokens"]
        row_index = row_index if row_index is not None else f["row_index"]
        layer_names = layer_names or f["layer_names"]
        summary = summary or f["summary"]
    a = _m.check_maps(attn).detach().cpu().float()
    n, H, R, S = a.shape
    if isinstance(detail, bool) or not isinstance(detail, int) or detail < 8:
        raise ValueError(f"detail must be an int >= 8 (cells per side); got {detail!r}.")
    if tokens is None:
        tokens = [str(i) for i in range(S)]
    tokens = [str(t) for t in tokens]
    if len(tokens) != S:
        raise ValueError(f"tokens has {len(tokens)} entries but the maps have S={S} keys; give one token per key.")
    if row_index is None:
        if R != S:
            raise ValueError(f"the maps have {R} rows and {S} keys; pass row_index (the position of each row).")
        row_index = list(range(R))
    row_index = [int(r) for r in row_index]
    if len(row_index) != R:
        raise ValueError(f"row_index has {len(row_index)} entries for {R} map rows.")
    if merge_wordpieces:
        from ..words import merge_wordpieces as _merge

        if row_index != list(range(S)):
            raise ValueError("merge_wordpieces needs every query row at full resolution (no rows=, no pooling).")
        n_tok = S
        tokens, a, importances = _merge(tokens, a, importances)
        a = a.float()
        S = R = len(tokens)
        row_index = list(range(S))
        entropy = None  # recomputed over words
        summary = (summary + "; " if summary else "") + (f"{n_tok} tokens merged into {S} words (keys summed, "
                                                         "queries averaged, importances summed)")
    pooled, block = pool_map(a, detail)
    n, H, R, S = a.shape
    Rd, Sd = pooled.shape[-2:]
    mx = pooled.amax(dim=(-2, -1)).clamp(min=1e-30)
    q = torch.round(pooled / mx[..., None, None] * 255).clamp(0, 255).to(torch.uint8)
    if entropy is None:
        entropy = _m.entropy(a)
    imps = {}
    for k, v in (importances or {}).items():
        t = torch.as_tensor(v).detach().double().reshape(-1)
        if t.numel() != S:
            raise ValueError(f"importances[{k!r}] has {t.numel()} values for {S} tokens.")
        imps[str(k)] = [None if not math.isfinite(x) else round(x, 6) for x in t.tolist()]
    faith = faithfulness.to_dict() if hasattr(faithfulness, "to_dict") else faithfulness
    if faith is not None:
        faith = {k: faith.get(k) for k in ("target", "rows", "labels", "reference_agreement", "chance", "verdict")}
    return _clean({
        "title": title,
        "summary": summary,
        "tokens": tokens,
        "labels": token_labels(tokens),
        "row_index": row_index,
        "layer_names": list(layer_names) if layer_names else [f"layer {i}" for i in range(n)],
        "maps": {"layers": n, "heads": H, "rows": Rd, "cols": Sd, "block": block, "R": R, "S": S,
                 "max": mx.reshape(-1).tolist(), "data": base64.b64encode(q.numpy().tobytes()).decode("ascii")},
        "entropy": torch.as_tensor(entropy).double().tolist(),
        "importances": imps,
        "faithfulness": faith,
    })


@dataclass
class View:
    """One more view of the report, beside its own matrix and head views: a tab and a ``<section>``.

    Attributes:
        key: the tab's name (``"pair"``, ``"generation"``, ``"cross"``); ``report.html#view=KEY`` opens it.
        label: the tab's text.
        section: the HTML fragment, one ``<section id="..." data-view="KEY">`` element.
        css: rules scoped to that section. js: the view's script (reads its data from ``data_id``).
        data_id: id of the ``<script type="application/json">`` that holds ``data``.
        data: the JSON-ready data.

    :meth:`~salience.interpret.pair.PairAttention.as_view`, :meth:`~salience.interpret.generation.
    GenerationAttention.as_view` and :meth:`~salience.interpret.seq2seq.CrossAttention.as_view` make them.

    Example:
        >>> import torch
        >>> from salience.interpret.seq2seq import CrossAttention
        >>> ca = CrossAttention(source=["a", "b"], target=["x"], maps=torch.full((1, 1, 1, 2), 0.5))
        >>> v = ca.as_view(); v.key, v.section_id
        ('cross', 'cross-sec')
        >>> page = report(torch.softmax(torch.randn(1, 1, 2, 2), -1), ["a", "b"], views=[ca])
        >>> '<section id="cross-sec" hidden' in page and "Cross-attention" in page
        True
    """

    key: str
    label: str
    section: str
    css: str
    js: str
    data_id: str
    data: dict

    @property
    def section_id(self) -> str:
        m = re.search(r'<section id="([^"]+)"', self.section)
        if m is None:
            raise ValueError(f"view {self.key!r}: its section fragment has no <section id=...>.")
        return m.group(1)


def _views(views) -> list[View]:
    out = []
    for v in views or ():
        v = v.as_view() if hasattr(v, "as_view") else v
        if not isinstance(v, View):
            raise TypeError(f"views takes View objects or objects with .as_view() (PairAttention, "
                            f"GenerationAttention, CrossAttention); got {type(v).__name__}.")
        out.append(v)
    keys = [v.key for v in out]
    if len(set(keys)) != len(keys) or set(keys) & {"matrix", "head", "overlay"}:
        raise ValueError(f"view keys must be distinct and not matrix/head/overlay; got {keys}.")
    return out


def _blob(data) -> str:
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def report(attn, tokens: Sequence[str] | None = None, path=None, *, row_index: Sequence[int] | None = None,
           importances: dict | None = None, faithfulness=None, entropy=None, layer_names=None,
           title: str = "salience attention report", summary: str = "", detail: int = DETAIL,
           merge_wordpieces: bool = False, views=None):
    """Write (or return) the HTML report.

    Args:
        attn: ``(layers, H, R, S)`` maps of one input, or an :class:`~salience.interpret.AttentionMaps`.
        tokens: one label per key (S).
        path: where to write; None returns the HTML text instead.
        row_index: the position of each map row when only some rows were recorded (default: all rows).
        importances: ``{name: (S,) values}`` for the bar chart (rollout, flow, gradient x input...).
        faithfulness: a :class:`~salience.interpret.faithfulness.FaithfulnessReport` (or its ``to_dict()``).
        entropy: ``(layers, H)``; computed from the maps when omitted.
        layer_names: labels of the layers. title, summary: page header.
        detail: maps longer than this are pooled to ``detail`` blocks per side.
        merge_wordpieces: merge ``##`` pieces into words first (:mod:`salience.interpret.words`: keys summed,
            queries averaged, importances summed); needs all rows at full resolution.
        views: more views on their own tabs beside the matrix and head views: a
            :class:`~salience.interpret.pair.PairAttention`, a
            :class:`~salience.interpret.generation.GenerationAttention`, a
            :class:`~salience.interpret.seq2seq.CrossAttention` (or any :class:`View`). A view that is not given
            has no tab and no section; the token-importance and faithfulness sections are hidden when empty.

    Returns:
        the written :class:`pathlib.Path`, or the HTML text when ``path`` is None: a :class:`ReportHTML`
        (a ``str``) that Jupyter displays inline through its ``_repr_html_``.
    """
    data = payload(attn, tokens, row_index=row_index, importances=importances, faithfulness=faithfulness,
                   entropy=entropy, layer_names=layer_names, title=title, summary=summary, detail=detail,
                   merge_wordpieces=merge_wordpieces)
    vs = _views(views)
    data["views"] = [{"key": v.key, "label": v.label, "section": v.section_id} for v in vs]
    extra = {
        "VIEWS": "\n".join(v.section.replace(f'id="{v.section_id}"', f'id="{v.section_id}" hidden', 1) for v in vs),
        "VIEWJS": "\n".join(f'<script type="application/json" id="{v.data_id}">{_blob(v.data)}</script>\n'
                            f"<script>{v.js}</script>" for v in vs),
        "BARS_HIDDEN": "" if data["importances"] else " hidden",
        "FAITH_HIDDEN": "" if data["faithfulness"] else " hidden",
    }
    return write_page(_PAGE, _CSS + "".join(v.css for v in vs), _JS, data, title, path, extra=extra)


def write_page(template: str, css: str, js: str, data, title: str, path=None, *, extra: dict | None = None):
    """Fill a self-contained page template (``__TITLE__``, ``__CSS__``, ``__DATA__`` as JSON, ``__JS__``, and the
    names in ``extra``) in one pass, so that text inside the data is never taken for a placeholder, and write it
    to ``path`` (returning the path), or return it as a :class:`ReportHTML` when ``path`` is None. Every page
    (report, and the standalone generation, sentence-pair and cross-attention views) is written through here."""
    fill = {"TITLE": _html.escape(title), "CSS": css, "DATA": _blob(data), "JS": js, **(extra or {})}
    page = re.sub(r"__([A-Z_]+)__", lambda m: fill.get(m.group(1), m.group(0)), template)
    if path is None:
        return ReportHTML(page)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_SHELL = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title><style>__CSS__</style>
<script>window.__salienceErrors=[];window.addEventListener("error",function(e){window.__salienceErrors.push(String(e.message));document.documentElement.setAttribute("data-errors",String(window.__salienceErrors.length));});</script>
</head><body>
<header><h1>__TITLE__</h1></header>
<main>__SECTION__</main>
<script type="application/json" id="__DATAID__">__DATA__</script>
<script>__JS__</script>
</body></html>
"""

_SHELL_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
header{padding:10px 20px;background:#20232a;color:#eee}header h1{margin:0;font-size:20px}main{padding:10px 20px}
small{color:#777;font-weight:normal}[hidden]{display:none!important}
"""


def standalone(view, title: str, path=None):
    """One view alone on a self-contained page (what ``PairAttention.report`` and the others write): ``view`` is a
    :class:`View` or an object with ``as_view()``; returns the written path, or a :class:`ReportHTML` when ``path``
    is None.

    Example:
        >>> import torch
        >>> from salience.interpret.seq2seq import CrossAttention
        >>> page = standalone(CrossAttention(["a", "b"], ["x"], torch.full((1, 1, 1, 2), 0.5)), "one view")
        >>> page.count('id="cross-sec"'), "<h1>one view</h1>" in page
        (1, True)
    """
    v = _views([view])[0]
    return write_page(_SHELL, _SHELL_CSS + v.css, v.js, v.data, title, path,
                      extra={"SECTION": v.section, "DATAID": v.data_id})


def notebook_html(page: str, height: int = 1500) -> str:
    """The page for a Jupyter output cell: the same self-contained HTML in an ``<iframe srcdoc=...>``, so that
    its element ids, styles and script stay apart from the notebook's and from other reports (no network)."""
    return (f'<iframe srcdoc="{_html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
            'border:1px solid #ddd" title="salience attention report"></iframe>')


class ReportHTML(str):
    """The report's HTML text (a ``str``); in Jupyter it displays inline (:meth:`_repr_html_`), and
    :meth:`save` writes it to a file.

    Example:
        >>> import torch
        >>> page = report(torch.softmax(torch.randn(1, 1, 3, 3), -1), ["a", "b", "a"])
        >>> page._repr_html_().startswith("<iframe srcdoc=")
        True
    """

    __slots__ = ()

    def _repr_html_(self) -> str:
        return notebook_html(str(self))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(self), encoding="utf-8")
        return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
<script>window.__salienceErrors=[];window.addEventListener("error",function(e){window.__salienceErrors.push(String(e.message));document.documentElement.setAttribute("data-errors",String(window.__salienceErrors.length));});</script>
</head><body>
<header><h1 id="title"></h1><p id="summary"></p><p class="note" id="note"></p></header>
<nav id="tabs" aria-label="views"></nav>
<main>
<section id="model"><h2>Model view <small>layer x head; click to select, last column: mean of heads</small></h2><div id="grid"></div></section>
<section id="views">
 <div class="panel" id="hv-panel"><h2>Head view <small id="hv-sel"></small></h2>
  <div class="controls"><label>window <input type="range" id="hv-offset" min="0" max="0" value="0"></label> <span id="hv-range"></span>
  <label id="hv-all-l"> <input type="checkbox" id="hv-all"> all heads in colour</label> <span id="hv-heads"></span></div>
  <canvas id="hv" width="560" height="400"></canvas></div>
 <div class="panel" id="mx-panel"><h2>Matrix view <small>wheel: zoom, drag: pan, double click: reset</small></h2>
  <canvas id="mx" width="680" height="600"></canvas><div id="mx-info" class="info">&nbsp;</div></div>
</section>
__VIEWS__
<section id="bars-sec"__BARS_HIDDEN__><h2>Token importance <select id="series"></select></h2>
 <canvas id="bars" width="1100" height="260"></canvas><div id="bars-info" class="info">&nbsp;</div><p id="top"></p></section>
<section id="faith-sec"__FAITH_HIDDEN__><h2>Faithfulness <small id="faith-target"></small></h2><div id="faith"></div></section>
<section id="ent-sec"><h2>Entropy per head <small>mean over rows, nats; low = focused</small></h2><div id="ent"></div></section>
</main>
<script type="application/json" id="salience-data">__DATA__</script>
<script>__JS__</script>
__VIEWJS__
</body></html>
"""

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#fafafa;color:#222}
header{padding:12px 20px;background:#20232a;color:#eee}header h1{margin:0;font-size:20px}
header p{margin:4px 0}.note{color:#bbb;font-size:12px}
main{padding:10px 20px}section{margin:14px 0}h2{font-size:16px;margin:6px 0}h2 small,small{font-weight:normal;color:#777}
#grid{display:grid;gap:3px;align-items:center;overflow-x:auto}
#grid canvas{border:2px solid transparent;cursor:pointer;image-rendering:auto}
#grid canvas.sel{border-color:#e4572e}#grid .lab{font-size:11px;color:#555;text-align:right;padding-right:4px}
#grid .hl{font-size:11px;color:#555;text-align:center}
#views{display:flex;flex-wrap:wrap;gap:20px}.panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
canvas{display:block}.info{font-size:12px;color:#444;min-height:1.4em;font-family:ui-monospace,monospace}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td.l{text-align:left}.controls{font-size:12px;margin-bottom:4px}
#bars{background:#fff;border:1px solid #ddd;max-width:100%}
#tabs{padding:6px 20px 0;background:#fff;border-bottom:1px solid #ddd;position:sticky;top:0;z-index:2}
#tabs button{font:inherit;border:1px solid #ccc;border-bottom:none;background:#f3f3f3;padding:4px 12px;margin-right:3px;
border-radius:5px 5px 0 0;cursor:pointer}#tabs button.on{background:#20232a;color:#fff;border-color:#20232a}
[hidden]{display:none!important}
.chip{display:inline-block;color:#fff;font-size:11px;padding:0 4px;margin:0 1px;border-radius:3px;cursor:pointer}
"""

_JS = r"""
(function(){
"use strict";
var D = JSON.parse(document.getElementById("salience-data").textContent);
var M = D.maps, nL = M.layers, nH = M.heads, R = M.rows, C = M.cols, B = M.block;
function b64(s){var bin = atob(s), a = new Uint8Array(bin.length);for (var i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);return a;}
var Q = b64(M.data);
var VIR = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
function color(t){t = Math.max(0, Math.min(1, t));var x = t * 4, i = Math.min(3, Math.floor(x)), f = x - i, a = VIR[i], b = VIR[i+1];
 return [Math.round(a[0]+(b[0]-a[0])*f), Math.round(a[1]+(b[1]-a[1])*f), Math.round(a[2]+(b[2]-a[2])*f)];}
var cache = {};
function mapAt(l, h){ // Float32Array R*C of weights (h == nH: mean of heads)
 var key = l + ":" + h; if (cache[key]) return cache[key];
 var out = new Float32Array(R*C);
 if (h < nH){var base = (l*nH + h)*R*C, s = M.max[l*nH + h]/255;for (var i = 0; i < R*C; i++) out[i] = Q[base+i]*s;}
 else {for (var hh = 0; hh < nH; hh++){var m = mapAt(l, hh);for (var j = 0; j < R*C; j++) out[j] += m[j]/nH;}}
 cache[key] = out; return out;}
function maxOf(a){var m = 0;for (var i = 0; i < a.length; i++) if (a[i] > m) m = a[i];return m || 1;}
var offs = {};
function offscreen(l, h){ // canvas C x R with the map coloured by its own maximum
 var key = l + ":" + h; if (offs[key]) return offs[key];
 var m = mapAt(l, h), mx = maxOf(m), cv = document.createElement("canvas"); cv.width = C; cv.height = R;
 var ctx = cv.getContext("2d"), img = ctx.createImageData(C, R);
 for (var i = 0; i < R*C; i++){var c = color(m[i]/mx);img.data[4*i] = c[0];img.data[4*i+1] = c[1];img.data[4*i+2] = c[2];img.data[4*i+3] = 255;}
 ctx.putImageData(img, 0, 0); offs[key] = cv; return cv;}
// repeated tokens carry their position ("the\u00b73"); computed here as well when a caller edited D.tokens
var LAB = (D.labels && D.labels.length === D.tokens.length) ? D.labels : (function(){var n = {};
 D.tokens.forEach(function(t){n[t] = (n[t] || 0) + 1;});
 return D.tokens.map(function(t, i){return n[t] > 1 ? t + "\u00b7" + i : t;});})();
function tok(i){return LAB[i] === undefined ? "?" : LAB[i];}
function colLabel(c){if (B === 1) return tok(c);var a = c*B, b = Math.min(D.tokens.length, a + B) - 1;return tok(a) + "\u2026" + tok(b) + " [" + a + "-" + b + "]";}
function rowLabel(r){if (B === 1) return tok(D.row_index[r]);var a = r*B, b = Math.min(D.row_index.length, a + B) - 1;
 return tok(D.row_index[a]) + "\u2026" + tok(D.row_index[b]) + " [rows " + a + "-" + b + "]";}
var st = {layer: nL - 1, head: nH > 1 ? nH : 0, q: null, k: null, off: 0, view: null};
function headName(h){return h === nH ? "mean of heads" : "head " + h;}

// ---- header
document.getElementById("title").textContent = D.title;
document.getElementById("summary").textContent = D.summary || (D.tokens.length + " tokens, " + nL + " layers x " + nH + " heads");
document.getElementById("note").textContent = (B > 1 ? "Maps pooled to blocks of " + B + " tokens (" + R + " x " + C + " cells: mean over query rows, sum over keys). " : "")
 + "Weights stored as 8-bit levels of each map's maximum (values shown are approximate).";

// ---- model view
var grid = document.getElementById("grid"), thumbs = [], TS = Math.max(36, Math.min(72, Math.floor(900/(nH + 2))));
grid.style.gridTemplateColumns = "70px repeat(" + (nH + (nH > 1 ? 1 : 0)) + ", " + (TS + 4) + "px)";
grid.appendChild(document.createElement("div"));
for (var h = 0; h < nH + (nH > 1 ? 1 : 0); h++){var d = document.createElement("div");d.className = "hl";d.textContent = h === nH ? "mean" : "h" + h;grid.appendChild(d);}
for (var l = 0; l < nL; l++){
 var lab = document.createElement("div"); lab.className = "lab"; lab.textContent = D.layer_names[l] && D.layer_names[l].length < 12 ? D.layer_names[l] : "L" + l;
 lab.title = D.layer_names[l] || ""; grid.appendChild(lab);
 for (var h2 = 0; h2 < nH + (nH > 1 ? 1 : 0); h2++){
  var cv = document.createElement("canvas"); cv.width = TS; cv.height = TS; cv.dataset.l = l; cv.dataset.h = h2;
  var e = (h2 < nH && D.entropy[l]) ? " entropy " + D.entropy[l][h2].toFixed(2) : "";
  cv.title = "layer " + l + ", " + headName(h2) + e;
  cv.addEventListener("click", function(ev){st.layer = +ev.target.dataset.l; st.head = +ev.target.dataset.h; st.view = null; drawAll();});
  grid.appendChild(cv); thumbs.push(cv);}}
function drawThumbs(){
 thumbs.forEach(function(cv){var l = +cv.dataset.l, h = +cv.dataset.h, ctx = cv.getContext("2d");
  ctx.imageSmoothingEnabled = true; ctx.drawImage(offscreen(l, h), 0, 0, cv.width, cv.height);
  cv.className = (l === st.layer && h === st.head) ? "sel" : "";});}

// ---- head view
var hv = document.getElementById("hv"), hctx = hv.getContext("2d"), ROWH = 18, WR = Math.min(R, 40), WC = Math.min(C, 40), WIN = Math.max(WR, WC);
var slider = document.getElementById("hv-offset");
slider.max = String(Math.max(0, R - WR, C - WC));
slider.addEventListener("input", function(){st.off = +slider.value; drawHead();});
hv.height = 40 + ROWH*WIN;
// all heads at once, one colour per head (click a head's chip to hide or show it)
var PAL = [[228,26,28],[55,126,184],[77,175,74],[152,78,163],[255,127,0],[166,86,40],[247,129,191],[120,120,120],
 [23,190,207],[188,189,34],[31,60,140],[140,20,60]];
var hvAll = document.getElementById("hv-all"), hvHeads = document.getElementById("hv-heads"), headOn = [], chips = [];
if (nH < 2) document.getElementById("hv-all-l").style.display = "none";
for (var hc = 0; hc < nH; hc++){var chip = document.createElement("span"); headOn.push(true); chip.className = "chip";
 chip.textContent = "h" + hc; chip.dataset.h = hc; chip.style.background = "rgb(" + PAL[hc % PAL.length].join(",") + ")";
 chip.addEventListener("click", function(ev){var h = +ev.target.dataset.h; headOn[h] = !headOn[h]; ev.target.style.opacity = headOn[h] ? 1 : 0.25; drawHead();});
 hvHeads.appendChild(chip); chips.push(chip);}
hvHeads.style.display = "none";
hvAll.addEventListener("change", function(){hvHeads.style.display = hvAll.checked ? "" : "none"; drawHead();});
function drawHead(){
 var m = mapAt(st.layer, st.head), mx = maxOf(m), W = hv.width, X0 = 215, X1 = 345, top = 28;
 hctx.clearRect(0, 0, W, hv.height); hctx.font = "12px system-ui, sans-serif";
 var r0 = Math.min(st.off, R - WR), c0 = Math.min(st.off, C - WC);
 var r1 = r0 + WR, c1 = c0 + WC;
 var overlay = hvAll.checked && nH > 1, hs = [];
 if (overlay){for (var hh0 = 0; hh0 < nH; hh0++) if (headOn[hh0]) hs.push(hh0);} else hs.push(st.head);
 hv.setAttribute("data-heads", overlay ? hs.join(",") : "");
 document.getElementById("hv-sel").textContent = "layer " + st.layer + ", " + (overlay ? hs.length + " heads in colour" : headName(st.head)) + " (hover a token)";
 document.getElementById("hv-range").textContent = "rows " + r0 + "-" + (r1-1) + " of " + R + ", keys " + c0 + "-" + (c1-1) + " of " + C;
 hctx.fillStyle = "#777"; hctx.fillText("queries", X0 - 60, 14); hctx.fillText("keys", X1 + 8, 14);
 var yAbove = top - 8, yBelow = top + ROWH*WC + 2;
 if (c0 > 0){hctx.fillText("\u25b2 above", X1 + 8, yAbove + 4);} if (c1 < C){hctx.fillText("\u25bc below", X1 + 8, yBelow + 4);}
 hs.forEach(function(hh){
 var m = mapAt(st.layer, hh), mx = maxOf(m), rgb = overlay ? PAL[hh % PAL.length].join(",") : "228,87,46";
 for (var r = r0; r < r1; r++){
  if (st.q !== null && st.q !== r) continue;
  var y = top + (r - r0)*ROWH + ROWH/2, above = 0, below = 0;
  for (var c = 0; c < C; c++){
   var w = m[r*C + c]; if (w <= 0) continue;
   if (st.k !== null && st.k !== c) continue;
   if (c < c0){above += w; continue;} if (c >= c1){below += w; continue;}
   if (w <= 0.02*mx && st.q === null) continue;
   var yk = top + (c - c0)*ROWH + ROWH/2;
   hctx.strokeStyle = "rgba(" + rgb + "," + Math.min(1, w/mx).toFixed(3) + ")"; hctx.lineWidth = st.q !== null ? 2.5 : 1.5;
   hctx.beginPath(); hctx.moveTo(X0, y); hctx.lineTo(X1, yk); hctx.stroke();}
  if (st.k === null && !overlay){
   if (above > 0){hctx.strokeStyle = "rgba(60,60,200," + Math.min(1, above).toFixed(3) + ")"; hctx.beginPath(); hctx.moveTo(X0, y); hctx.lineTo(X1, yAbove); hctx.stroke();}
   if (below > 0){hctx.strokeStyle = "rgba(60,60,200," + Math.min(1, below).toFixed(3) + ")"; hctx.beginPath(); hctx.moveTo(X0, y); hctx.lineTo(X1, yBelow); hctx.stroke();}}}});
 hctx.textAlign = "right";
 for (var r2 = r0; r2 < r1; r2++){hctx.fillStyle = r2 === st.q ? "#e4572e" : "#222"; hctx.fillText(rowLabel(r2).slice(0, 30), X0 - 6, top + (r2 - r0)*ROWH + ROWH/2 + 4);}
 hctx.textAlign = "left";
 for (var c2 = c0; c2 < c1; c2++){
  var wq = st.q !== null ? m[st.q*C + c2] : null;
  hctx.fillStyle = c2 === st.k ? "#e4572e" : "#222";
  hctx.fillText(colLabel(c2).slice(0, 24) + (wq !== null ? "  " + wq.toFixed(3) : ""), X1 + 6, top + (c2 - c0)*ROWH + ROWH/2 + 4);}
}
hv.addEventListener("mousemove", function(ev){
 var rect = hv.getBoundingClientRect(), x = (ev.clientX - rect.left)*hv.width/rect.width, y = (ev.clientY - rect.top)*hv.height/rect.height;
 var r0 = Math.min(st.off, R - WR), c0 = Math.min(st.off, C - WC), i = Math.floor((y - 28)/ROWH);
 var q = null, k = null;
 if (i >= 0){if (x < 280 && i < WR) q = r0 + i; else if (x >= 280 && i < WC) k = c0 + i;}
 if (q !== st.q || k !== st.k){st.q = q; st.k = k; drawHead();}});
hv.addEventListener("mouseleave", function(){st.q = null; st.k = null; drawHead();});

// ---- matrix view
var mxc = document.getElementById("mx"), mctx = mxc.getContext("2d"), info = document.getElementById("mx-info");
function fullView(){return {x0: 0, y0: 0, x1: C, y1: R};}
var ML = 100, MT = 10, MR = 80, MB = 90, PW = mxc.width - ML - MR, PH = mxc.height - MT - MB;
function drawMatrix(){
 if (!st.view) st.view = fullView();
 var v = st.view; mctx.imageSmoothingEnabled = false; mctx.fillStyle = "#fff"; mctx.fillRect(0, 0, mxc.width, mxc.height);
 mctx.drawImage(offscreen(st.layer, st.head), v.x0, v.y0, v.x1 - v.x0, v.y1 - v.y0, ML, MT, PW, PH);
 mctx.strokeStyle = "#999"; mctx.lineWidth = 1; mctx.strokeRect(ML - 0.5, MT - 0.5, PW + 1, PH + 1);
 // token labels on both axes: every cell when there is room, else every n-th
 mctx.font = "11px system-ui, sans-serif"; mctx.fillStyle = "#222"; mctx.textBaseline = "middle";
 var cw = PW/(v.x1 - v.x0), ch = PH/(v.y1 - v.y0), sc = Math.max(1, Math.ceil(12/cw)), sr = Math.max(1, Math.ceil(12/ch));
 var xs = [], ys = [];
 mctx.textAlign = "right";
 for (var c = Math.floor(v.x0); c < v.x1; c++){if (c % sc) continue; var x = ML + (c + 0.5 - v.x0)*cw; if (x < ML || x > ML + PW) continue;
  var t = colLabel(c).slice(0, 14); mctx.save(); mctx.translate(x, MT + PH + 4); mctx.rotate(-Math.PI/2); mctx.fillText(t, 0, 0); mctx.restore(); xs.push(t);}
 for (var r = Math.floor(v.y0); r < v.y1; r++){if (r % sr) continue; var y = MT + (r + 0.5 - v.y0)*ch; if (y < MT || y > MT + PH) continue;
  var t2 = rowLabel(r).slice(0, 14); mctx.fillText(t2, ML - 4, y); ys.push(t2);}
 mctx.fillStyle = "#777"; mctx.textAlign = "left"; mctx.fillText("keys \u2192", ML, mxc.height - 8);
 mctx.save(); mctx.translate(10, MT + PH/2); mctx.rotate(-Math.PI/2); mctx.textAlign = "center"; mctx.fillText("queries \u2192", 0, 0); mctx.restore();
 // colour scale: the map is coloured by its own maximum
 var mx = maxOf(mapAt(st.layer, st.head)), LX = ML + PW + 12, LW = 14, ticks = [];
 for (var i = 0; i < PH; i++){var col = color(1 - i/(PH - 1)); mctx.fillStyle = "rgb(" + col.join(",") + ")"; mctx.fillRect(LX, MT + i, LW, 1);}
 mctx.strokeStyle = "#999"; mctx.strokeRect(LX - 0.5, MT - 0.5, LW + 1, PH + 1); mctx.fillStyle = "#222"; mctx.textAlign = "left";
 for (var k = 0; k <= 4; k++){var val = mx*k/4, yy = MT + PH - k/4*(PH - 1); mctx.fillRect(LX + LW, yy, 4, 1);
  var s = val === 0 ? "0" : val.toPrecision(2); mctx.fillText(s, LX + LW + 6, yy); ticks.push(s);}
 mctx.save(); mctx.translate(LX + LW + 8, MT + PH + 30); mctx.fillStyle = "#777"; mctx.fillText("weight", -10, 0); mctx.restore();
 mctx.textBaseline = "alphabetic";
 mxc.setAttribute("data-xlabels", xs.join("|")); mxc.setAttribute("data-ylabels", ys.join("|")); mxc.setAttribute("data-legend", ticks.join("|"));}
function cellAt(ev){var rect = mxc.getBoundingClientRect(), v = st.view;
 var fx = ((ev.clientX - rect.left)*mxc.width/rect.width - ML)/PW, fy = ((ev.clientY - rect.top)*mxc.height/rect.height - MT)/PH;
 return {fx: fx, fy: fy, c: v.x0 + fx*(v.x1 - v.x0), r: v.y0 + fy*(v.y1 - v.y0)};}
mxc.addEventListener("wheel", function(ev){ev.preventDefault(); var p = cellAt(ev), v = st.view, f = ev.deltaY < 0 ? 0.8 : 1.25;
 var w = Math.max(2, Math.min(C, (v.x1 - v.x0)*f)), hgt = Math.max(2, Math.min(R, (v.y1 - v.y0)*f));
 var x0 = Math.max(0, Math.min(C - w, p.c - p.fx*w)), y0 = Math.max(0, Math.min(R - hgt, p.r - p.fy*hgt));
 st.view = {x0: x0, y0: y0, x1: x0 + w, y1: y0 + hgt}; drawMatrix();}, {passive: false});
var drag = null;
mxc.addEventListener("mousedown", function(ev){drag = {x: ev.clientX, y: ev.clientY, v: st.view};});
window.addEventListener("mouseup", function(){drag = null;});
mxc.addEventListener("mousemove", function(ev){
 if (drag){var rect = mxc.getBoundingClientRect(), v = drag.v, w = v.x1 - v.x0, hgt = v.y1 - v.y0;
  var dx = (ev.clientX - drag.x)*mxc.width/rect.width/PW*w, dy = (ev.clientY - drag.y)*mxc.height/rect.height/PH*hgt;
  var x0 = Math.max(0, Math.min(C - w, v.x0 - dx)), y0 = Math.max(0, Math.min(R - hgt, v.y0 - dy));
  st.view = {x0: x0, y0: y0, x1: x0 + w, y1: y0 + hgt}; drawMatrix(); return;}
 var p = cellAt(ev), r = Math.floor(p.r), c = Math.floor(p.c);
 if (r >= 0 && r < R && c >= 0 && c < C){var w2 = mapAt(st.layer, st.head)[r*C + c];
  info.textContent = rowLabel(r) + "  \u2192  " + colLabel(c) + "   weight \u2248 " + w2.toFixed(4);}});
mxc.addEventListener("dblclick", function(){st.view = fullView(); drawMatrix();});
mxc.addEventListener("click", function(ev){var p = cellAt(ev), r = Math.floor(p.r);
 if (r >= 0 && r < R){st.off = Math.max(0, r - Math.floor(WR/2)); slider.value = String(st.off); drawHead();}});

// ---- importance bars
var series = Object.keys(D.importances || {}), sel = document.getElementById("series");
series.forEach(function(s){var o = document.createElement("option"); o.value = s; o.textContent = s; sel.appendChild(o);});
var bars = document.getElementById("bars"), bctx = bars.getContext("2d"), binfo = document.getElementById("bars-info");
function binned(){var v = D.importances[sel.value] || [], n = v.length, nb = Math.min(n, 550), bs = Math.ceil(n/Math.max(1, nb));
 var out = []; for (var b = 0; b*bs < n; b++){var m = 0, arg = b*bs;
  for (var i = b*bs; i < Math.min(n, (b+1)*bs); i++){var x = Math.abs(v[i] || 0); if (x > m){m = x; arg = i;}}
  out.push({v: m, a: b*bs, b: Math.min(n, (b+1)*bs) - 1, arg: arg});} return out;}
var YL = 64;
function drawBars(){
 bctx.clearRect(0, 0, bars.width, bars.height);
 if (!series.length){bctx.fillStyle = "#777"; bctx.fillText("no token importance given", 10, 20); return;}
 var bs = binned(), mx = 0; bs.forEach(function(b){if (b.v > mx) mx = b.v;}); mx = mx || 1;
 var labels = bs.length <= 120 && bs[0] && bs[0].a === bs[0].b, H0 = labels ? 160 : 235, T0 = 12, bw = (bars.width - YL - 10)/bs.length;
 var neg = (D.importances[sel.value] || []).some(function(x){return x !== null && x < 0;});
 // y axis with values
 bctx.font = "11px system-ui, sans-serif"; bctx.strokeStyle = "#999"; bctx.fillStyle = "#222"; bctx.textAlign = "right"; bctx.textBaseline = "middle";
 bctx.beginPath(); bctx.moveTo(YL - 0.5, T0); bctx.lineTo(YL - 0.5, H0); bctx.lineTo(bars.width - 10, H0); bctx.stroke();
 var ticks = [];
 for (var k = 0; k <= 4; k++){var val = mx*k/4, y = H0 - k/4*(H0 - T0), s = val === 0 ? "0" : val.toPrecision(2);
  bctx.strokeStyle = "#eee"; bctx.beginPath(); bctx.moveTo(YL, y); bctx.lineTo(bars.width - 10, y); bctx.stroke();
  bctx.fillRect(YL - 5, y, 4, 1); bctx.fillText(s, YL - 7, y); ticks.push(s);}
 bctx.save(); bctx.translate(12, (H0 + T0)/2); bctx.rotate(-Math.PI/2); bctx.textAlign = "center"; bctx.fillStyle = "#777";
 bctx.fillText(neg ? "|" + sel.value + "|" : sel.value, 0, 0); bctx.restore();
 bars.setAttribute("data-yticks", ticks.join("|"));
 bctx.fillStyle = "#3b528b";
 bs.forEach(function(b, i){var h = (b.v/mx)*(H0 - T0); bctx.fillRect(YL + i*bw, H0 - h, Math.max(1, bw - 1), h);});
 bctx.textBaseline = "alphabetic"; bctx.textAlign = "left";
 if (labels){bctx.save(); bctx.fillStyle = "#222";
  bs.forEach(function(b, i){bctx.save(); bctx.translate(YL + i*bw + bw/2 + 4, H0 + 4); bctx.rotate(Math.PI/2); bctx.fillText(tok(b.a).slice(0, 14), 0, 0); bctx.restore();});
  bctx.restore();}
 var v = D.importances[sel.value], idx = v.map(function(x, i){return i;}).filter(function(i){return v[i] !== null;});
 idx.sort(function(a, b){return Math.abs(v[b]) - Math.abs(v[a]);});
 document.getElementById("top").textContent = "top tokens: " + idx.slice(0, 10).map(function(i){return tok(i) + " (" + (+v[i]).toPrecision(3) + ")";}).join(", ");}
sel.addEventListener("change", drawBars);
bars.addEventListener("mousemove", function(ev){var bs = binned(); if (!bs.length) return; var rect = bars.getBoundingClientRect();
 var i = Math.floor(((ev.clientX - rect.left)*bars.width/rect.width - YL)/((bars.width - YL - 10)/bs.length));
 if (i >= 0 && i < bs.length){var b = bs[i]; binfo.textContent = (b.a === b.b ? tok(b.a) + " [" + b.a + "]" : "tokens " + b.a + "-" + b.b + ", max at " + tok(b.arg) + " [" + b.arg + "]") + "  " + (+b.v).toPrecision(4);}});

// ---- faithfulness table
function faith(){var F = D.faithfulness, el = document.getElementById("faith");
 if (!F){el.textContent = "not computed for this report."; return;}
 document.getElementById("faith-target").textContent = F.target || "";
 var refs = Object.keys(F.labels || {}).filter(function(k){return F.rows.length && (k + "_spearman") in F.rows[0];});
 var t = document.createElement("table"), hd = "<tr><th>attention-derived importance</th>";
 refs.forEach(function(r){hd += "<th>Spearman vs " + F.labels[r] + "</th><th>Kendall vs " + F.labels[r] + "</th>";});
 hd += "<th>note</th></tr>"; var body = "";
 function fmt(x){return x === null || x === undefined ? "n/a" : (x >= 0 ? "+" : "") + x.toFixed(2);}
 function esc(s){var d = document.createElement("div"); d.textContent = s; return d.innerHTML;}
 F.rows.forEach(function(r){body += "<tr><td class='l'>" + esc(r.label) + "</td>";
  refs.forEach(function(ref){body += "<td>" + fmt(r[ref + "_spearman"]) + "</td><td>" + fmt(r[ref + "_kendall"]) + "</td>";});
  body += "<td class='l'>" + esc(r.note || "") + "</td></tr>";});
 t.innerHTML = hd + body; el.appendChild(t);
 var p = document.createElement("p"); var ch = F.chance || {};
 p.textContent = (ch.n ? "Chance band (" + Math.round(100*ch.level) + "%, " + ch.n + " tokens): |Spearman| \u2264 " + ch.spearman.toFixed(2) + ", |Kendall| \u2264 " + ch.kendall.toFixed(2) + ". " : "") + (F.verdict || "");
 el.appendChild(p);}

// ---- entropy table
function ent(){var E = D.entropy, el = document.getElementById("ent"); if (!E || !E.length){el.textContent = "n/a"; return;}
 var mx = 0; E.forEach(function(r){r.forEach(function(x){if (x > mx) mx = x;});}); mx = mx || 1;
 var s = "<tr><th></th>"; for (var h = 0; h < E[0].length; h++) s += "<th>h" + h + "</th>"; s += "</tr>";
 E.forEach(function(r, l){s += "<tr><th>L" + l + "</th>"; r.forEach(function(x){var c = color(x/mx);
  s += "<td style='background:rgb(" + c.join(",") + ");color:" + (x/mx > 0.6 ? "#000" : "#fff") + "'>" + x.toFixed(2) + "</td>";}); s += "</tr>";});
 var t = document.createElement("table"); t.innerHTML = s; el.appendChild(t);}

function drawAll(){drawThumbs(); drawHead(); drawMatrix();}

// ---- view switcher: one tab per view that has data (matrix, head view, all heads in colour, and the views
// given to report(): sentence pair, generation, cross-attention); the other views' sections are hidden
var VIEWS = [["matrix", "Matrix"], ["head", "Head view"]].concat(nH > 1 ? [["overlay", "All heads in colour"]] : [])
 .concat((D.views || []).map(function(v){return [v.key, v.label];}));
var tabs = document.getElementById("tabs"), tabBtn = {};
VIEWS.forEach(function(v){var b = document.createElement("button"); b.type = "button"; b.textContent = v[1]; b.dataset.view = v[0];
 b.addEventListener("click", function(){show(v[0]);}); tabs.appendChild(b); tabBtn[v[0]] = b;});
function show(key){
 if (!tabBtn[key]) key = "matrix";
 var own = key === "matrix" || key === "head" || key === "overlay";
 document.getElementById("model").hidden = !own; document.getElementById("views").hidden = !own;
 document.getElementById("mx-panel").hidden = key !== "matrix"; document.getElementById("hv-panel").hidden = !own || key === "matrix";
 if (key !== "matrix" && own){var want = key === "overlay"; if (hvAll.checked !== want){hvAll.checked = want; hvAll.dispatchEvent(new Event("change"));}}
 (D.views || []).forEach(function(v){var el = document.getElementById(v.section); if (el) el.hidden = v.key !== key;});
 VIEWS.forEach(function(v){tabBtn[v[0]].className = v[0] === key ? "on" : "";});
 document.body.setAttribute("data-view", key);
 return key;}
var hashView = /view=([a-z]+)/.exec(location.hash);
show(hashView ? hashView[1] : "matrix");
tabs.setAttribute("data-tabs", VIEWS.map(function(v){return v[0];}).join(","));
drawAll(); drawBars(); faith(); ent();
document.body.setAttribute("data-render-ms", String(Math.round(performance.now())));
document.body.setAttribute("data-ready", "1");

// ---- self test (open the page with #selftest): drive every handler once, as a user would
// (after the load event, so that the views' own scripts below this one have run)
if (location.hash === "#selftest") window.addEventListener("load", function(){
 var ev = function(el, type, x, y, extra){var r = el.getBoundingClientRect(), o = {bubbles: true, cancelable: true,
  clientX: r.left + x*r.width, clientY: r.top + y*r.height}; for (var k in (extra || {})) o[k] = extra[k];
  el.dispatchEvent(type === "wheel" ? new WheelEvent(type, o) : new MouseEvent(type, o));};
 show("matrix");
 var w0 = st.view.x1 - st.view.x0;
 ev(mxc, "wheel", 0.5, 0.5, {deltaY: -120}); ev(mxc, "wheel", 0.5, 0.5, {deltaY: -120});
 var zoomed = (st.view.x1 - st.view.x0) < w0 || C <= 2;
 ev(mxc, "mousemove", 0.3, 0.3); ev(mxc, "mousedown", 0.3, 0.3); ev(mxc, "mousemove", 0.5, 0.5); ev(window.document.body, "mouseup", 0, 0);
 ev(mxc, "dblclick", 0.5, 0.5); ev(mxc, "click", 0.5, 0.9);
 show("head");
 ev(hv, "mousemove", 0.2, 40/hv.height); ev(hv, "mousemove", 0.8, 40/hv.height); ev(hv, "mouseleave", 0, 0);
 if (nH > 1){hvAll.checked = true; hvAll.dispatchEvent(new Event("change")); ev(chips[0], "click", 0.5, 0.5);
  ev(hv, "mousemove", 0.2, 40/hv.height); ev(hv, "mouseleave", 0, 0);}
 var okOverlay = nH < 2 || hv.getAttribute("data-heads") === Array.from({length: nH - 1}, function(_, i){return i + 1;}).join(",");
 if (nH > 1){hvAll.checked = false; hvAll.dispatchEvent(new Event("change"));}
 ev(thumbs[0], "click", 0.5, 0.5);
 slider.value = slider.max; slider.dispatchEvent(new Event("input"));
 if (series.length > 1){sel.value = series[series.length - 1]; sel.dispatchEvent(new Event("change"));}
 ev(bars, "mousemove", 0.5, 0.5);
 var okSel = st.layer === 0 && st.head === 0, text = info.textContent.length > 3;
 // every tab shows its own section(s), with a height, and hides the others
 var own = {matrix: ["model", "mx-panel"], head: ["model", "hv-panel"], overlay: ["model", "hv-panel"]}, seen = [], okViews = true;
 (D.views || []).forEach(function(v){own[v.key] = [v.section];});
 var all = ["model", "mx-panel", "hv-panel"].concat((D.views || []).map(function(v){return v.section;}));
 VIEWS.forEach(function(v){tabBtn[v[0]].click();
  var vis = all.filter(function(id){var el = document.getElementById(id); return el.getClientRects().length > 0 && el.offsetHeight > 0;});
  var ok = vis.join(",") === all.filter(function(id){return own[v[0]].indexOf(id) >= 0;}).join(",")
   && (v[0] !== "overlay" || hvAll.checked);
  okViews = okViews && ok; seen.push(v[0] + ":" + (ok ? "ok" : "fail[" + vis.join("+") + "]"));});
 show("matrix");
 document.body.setAttribute("data-selftest", (zoomed && okSel && text && okOverlay && okViews ? "ok" : "fail") + " zoomed=" + zoomed +
  " select=" + okSel + " tooltip=" + text + " overlay=" + okOverlay + " views=" + seen.join(","));
});
})();
"""
