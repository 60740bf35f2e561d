"""Encoder-decoder cross-attention (BART, T5, Marian, Whisper-style models running salience attention):
decoder (query) tokens on one axis, encoder (key) tokens on the other.

:func:`cross_attention` runs one teacher-forced forward pass (``model(input_ids=..., decoder_input_ids=...)``
or, for audio encoders, any encoder keyword such as ``input_features``) inside a
:class:`~salience.interpret.capture` that keeps only the decoder's cross-attention calls (module names
containing ``encoder_attn`` (BART, Marian, Whisper) or ``EncDecAttention`` (T5)), and returns a
:class:`CrossAttention` with maps ``(layers, heads, T, S)``: T decoder positions by S encoder positions.
They equal eager ``cross_attentions`` (tested on a tiny random BART).

:meth:`CrossAttention.report` writes a self-contained HTML page: a heatmap with the decoder tokens down the
left (queries) and the encoder tokens along the top (keys), a layer and head (or mean of heads) choice, and
the value under the pointer.

Example:
    >>> import torch
    >>> ca = CrossAttention(source=["a", "b", "c"], target=["x", "y"], maps=torch.full((1, 1, 2, 3), 1 / 3))
    >>> ca.maps.shape
    torch.Size([1, 1, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import capture

__all__ = ["CrossAttention", "cross_attention", "CROSS_NAMES"]

#: parts of module names that mark a decoder's cross-attention
CROSS_NAMES = ("encoder_attn", "EncDecAttention")


@dataclass
class CrossAttention:
    """Cross-attention of one example: ``source`` (S encoder tokens), ``target`` (T decoder tokens, one label per
    query row) and ``maps`` ``(layers, heads, T, S)``; ``note`` says on the page what the rows are (e.g. "row t:
    the decoder step that produced token t"). Tokens that occur more than once are shown with their position."""

    source: list[str]
    target: list[str]
    maps: torch.Tensor
    layer_names: list[str] | None = None
    note: str = ""

    def __post_init__(self):
        if self.maps.dim() != 4 or tuple(self.maps.shape[-2:]) != (len(self.target), len(self.source)):
            raise ValueError(f"maps {tuple(self.maps.shape)} must be (layers, heads, T={len(self.target)}, "
                             f"S={len(self.source)}).")

    def payload(self) -> dict:
        from .render.png import token_labels

        n = self.maps.shape[0]
        return {
            "source": token_labels(self.source), "target": token_labels(self.target), "note": self.note,
            "layers": n, "heads": int(self.maps.shape[1]),
            "layer_names": list(self.layer_names) if self.layer_names else [f"layer {i}" for i in range(n)],
            "maps": [[[[round(x, 5) for x in r] for r in h] for h in la] for la in self.maps.float().tolist()],
        }

    def as_view(self):
        """This cross-attention as a :class:`~salience.interpret.render.html.View`: the "Cross-attention" tab of
        the report that :func:`salience.interpret.render.html.report` writes (``views=[...]``)."""
        from .render.html import View

        return View("cross", "Cross-attention", _SECTION, _CSS, _JS, "salience-cross-data", self.payload())

    def report(self, path=None, *, title: str = "salience: encoder-decoder cross-attention"):
        """Write (or return as a :class:`~salience.interpret.render.html.ReportHTML`) the view alone on a
        self-contained page."""
        from .render.html import standalone

        return standalone(self, title, path)

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()


def cross_attention(model, decoder_input_ids, input_ids=None, *, tokenizer=None, layers=None, heads=None,
                    **encoder_inputs) -> CrossAttention:
    """Record the decoder's cross-attention for one teacher-forced pass (batch size 1).

    Args:
        model: a transformers encoder-decoder model running ``attn_implementation="salience"``.
        decoder_input_ids: ``(1, T)`` decoder ids (e.g. the shifted target).
        input_ids: ``(1, S)`` encoder ids; for audio models pass ``input_features=...`` instead.
        tokenizer: labels both sides (ids, or encoder positions for non-text inputs, without one).
        layers, heads: decoder layers and heads to keep (as in :class:`~salience.interpret.capture`).
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError("cross_attention needs an encoder-decoder model (config.is_encoder_decoder); for a "
                         "decoder-only model use generation_attention, for an encoder capture().")
    dec = torch.as_tensor(decoder_input_ids, dtype=torch.long)
    dec = dec[None] if dec.dim() == 1 else dec
    kw = dict(encoder_inputs)
    if input_ids is not None:
        enc = torch.as_tensor(input_ids, dtype=torch.long)
        kw["input_ids"] = enc[None] if enc.dim() == 1 else enc
    if dec.shape[0] != 1 or any(isinstance(v, torch.Tensor) and v.shape[0] != 1 for v in kw.values()):
        raise ValueError("cross_attention takes one example (batch size 1).")
    with torch.no_grad(), capture(model, layers=list(CROSS_NAMES), heads=heads) as rec:
        model(decoder_input_ids=dec, **kw)
    res = rec.result()
    idx = [i for i, e in enumerate(res.entries) if layers is None or e["layer"] in
           ([layers] if isinstance(layers, int) else list(layers))]
    if not idx:
        raise RuntimeError("no cross-attention call was recorded (module names containing "
                           f"{' or '.join(CROSS_NAMES)}); is the model running salience attention?")
    idx.sort(key=lambda i: res.entries[i]["layer"])
    maps = torch.stack([res.maps[i][0] for i in idx])
    S, T = maps.shape[-1], dec.shape[1]

    def labels(ids):
        if tokenizer is None:
            return [str(i) for i in ids]
        return tokenizer.convert_ids_to_tokens(ids)

    src = labels(kw["input_ids"][0].tolist()) if "input_ids" in kw else [f"frame {i}" for i in range(S)]
    if len(src) != S:
        src = [f"enc {i}" for i in range(S)]
    return CrossAttention(source=src, target=labels(dec[0].tolist())[:T], maps=maps,
                          layer_names=[res.entries[i]["name"] for i in idx])


_SECTION = """<section id="cross-sec" data-view="cross"><h2>Cross-attention view <small id="cx-sel"></small></h2>
<p class="intro">Rows: decoder tokens (queries). Columns: encoder tokens (keys). Each row sums to 1; darker = more
attention.</p>
<div class="controls"><label>layer <select id="cx-layer"></select></label> <label>head <select id="cx-head"></select></label></div>
<canvas id="cx" width="700" height="500"></canvas><div id="cx-info" class="info">&nbsp;</div></section>"""

_CSS = """
#cross-sec canvas{background:#fff;border:1px solid #ddd}#cross-sec .intro{color:#555;margin:2px 0 6px}
#cross-sec .info{font-family:ui-monospace,monospace;font-size:12px;min-height:1.4em}
"""

_JS = r"""
(function(){
const D=JSON.parse(document.getElementById("salience-cross-data").textContent);
const lay=document.getElementById("cx-layer"),hd=document.getElementById("cx-head"),c=document.getElementById("cx"),g=c.getContext("2d");
for(let l=0;l<D.layers;l++){const o=document.createElement("option");o.value=l;o.textContent=D.layer_names[l];lay.appendChild(o);}
{const o=document.createElement("option");o.value="mean";o.textContent="mean of heads";hd.appendChild(o);}
for(let h=0;h<D.heads;h++){const o=document.createElement("option");o.value=h;o.textContent="head "+h;hd.appendChild(o);}
const T=D.target.length,S=D.source.length,LX=110,TY=90;
const cw=Math.max(4,Math.min(40,(c.width-LX-80)/S)),ch=Math.max(4,Math.min(30,(c.height-TY-10)/T));
c.height=Math.ceil(Math.max(TY+T*ch+12,TY+150));
function m(){const a=D.maps[+lay.value];if(hd.value!=="mean")return a[+hd.value];
 return a[0].map((r,i)=>r.map((_,j)=>a.reduce((s,h)=>s+h[i][j],0)/a.length));}
function every(n,room){return Math.max(1,Math.ceil(n*12/room));}
function draw(){
 const M=m();g.clearRect(0,0,c.width,c.height);let mx=1e-12;M.forEach(r=>r.forEach(v=>{if(v>mx)mx=v;}));
 for(let i=0;i<T;i++)for(let j=0;j<S;j++){const a=M[i][j]/mx;const v=Math.round(255*(1-a));g.fillStyle="rgb("+v+","+v+",255)";g.fillRect(LX+j*cw,TY+i*ch,cw,ch);}
 g.fillStyle="#222";g.font="11px sans-serif";const xs=[],ys=[];const ex=every(S,S*cw),ey=every(T,T*ch);
 for(let j=0;j<S;j+=ex){xs.push(D.source[j]);g.save();g.translate(LX+j*cw+cw/2,TY-4);g.rotate(-Math.PI/3);g.fillText(D.source[j].slice(0,14),0,0);g.restore();}
 g.textAlign="right";for(let i=0;i<T;i+=ey){ys.push(D.target[i]);g.fillText(D.target[i].slice(0,14),LX-4,TY+i*ch+ch/2+4);}
 g.textAlign="left";g.fillText("encoder (keys) \u2192",LX,12);g.save();g.translate(12,TY+40);g.rotate(Math.PI/2);g.fillText("decoder (queries) \u2192",0,0);g.restore();
 // colour scale: each map is shaded by its own maximum
 const GX=LX+S*cw+14,GH=Math.max(60,T*ch),ticks=[];
 for(let y=0;y<GH;y++){const v=Math.round(255*(y/(GH-1)));g.fillStyle="rgb("+v+","+v+",255)";g.fillRect(GX,TY+y,12,1);}
 g.strokeStyle="#999";g.strokeRect(GX-0.5,TY-0.5,13,GH+1);g.fillStyle="#222";g.textAlign="left";
 for(const f of [1,0.5,0]){const t=(mx*f).toPrecision(2);ticks.push(t);g.fillText(f?t:"0",GX+16,TY+(1-f)*(GH-1)+4);}
 g.fillStyle="#777";g.fillText("weight",GX-2,TY-8);
 c.setAttribute("data-xlabels",xs.join("|"));c.setAttribute("data-ylabels",ys.join("|"));c.setAttribute("data-max",mx.toFixed(5));
 c.setAttribute("data-legend",ticks.join("|"));
}
c.onmousemove=e=>{const r=c.getBoundingClientRect(),j=Math.floor((e.clientX-r.left-LX)/cw),i=Math.floor((e.clientY-r.top-TY)/ch);
 document.getElementById("cx-info").textContent=(i>=0&&i<T&&j>=0&&j<S)?(D.target[i]+" (dec "+i+") -> "+D.source[j]+" (enc "+j+"): "+m()[i][j].toFixed(4)):"\u00a0";};
document.getElementById("cx-sel").textContent=D.note||"";
lay.onchange=draw;hd.onchange=draw;draw();
document.getElementById("cross-sec").setAttribute("data-ready","1");
})();
"""
