"""Sentence-pair view: sentence A and sentence B encoded **together** (``tokenizer(a, b)``), and the attention
that crosses between them.

:func:`pair_attention` encodes the pair in one input, runs the model inside a
:class:`~salience.interpret.capture` and returns a :class:`PairAttention`: the tokens, which side each belongs
to (A: the first segment with its leading special token and separator; B: the second segment and its
separator), and the maps ``(layers, heads, L, L)``. :meth:`PairAttention.cross_mass` gives, per layer and
head, the share of attention that A's queries put on B's keys and the reverse.

:meth:`PairAttention.report` writes a self-contained HTML page (no network): A's tokens in a column on the
left, B's on the right, lines from each query token to the keys on the other side weighted by attention
(direction A -> B or B -> A, a layer, a head or the mean of heads; hover a token to see its lines alone), and
a table of the cross-sentence share per layer.

Example:
    >>> import torch
    >>> a = PairAttention(tokens=["[CLS]", "x", "[SEP]", "y", "[SEP]"], side=[0, 0, 0, 1, 1],
    ...                   maps=torch.full((1, 1, 5, 5), 0.2))
    >>> a.cross_mass()["a_to_b"].tolist()     # A rows put 2 of 5 keys' worth on B
    [[0.4000000059604645]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import capture

__all__ = ["PairAttention", "pair_attention"]


@dataclass
class PairAttention:
    """Attention of one jointly encoded sentence pair.

    Attributes:
        tokens: the L tokens of the joint input.
        side: 0 (sentence A) or 1 (sentence B) per token.
        maps: ``(layers, heads, L, L)``.
        layer_names: names of the recorded layers.
    """

    tokens: list[str]
    side: list[int]
    maps: torch.Tensor
    layer_names: list[str] | None = None

    def __post_init__(self):
        L = len(self.tokens)
        if len(self.side) != L or self.maps.dim() != 4 or tuple(self.maps.shape[-2:]) != (L, L):
            raise ValueError(f"tokens ({L}), side ({len(self.side)}) and maps {tuple(self.maps.shape)} disagree; "
                             "maps must be (layers, heads, L, L).")
        if set(self.side) - {0, 1} or 0 not in self.side or 1 not in self.side:
            raise ValueError("side must mark every token 0 (sentence A) or 1 (sentence B), with both present.")

    def cross_mass(self) -> dict:
        """``{"a_to_b": (layers, heads), "b_to_a": (layers, heads)}``: mean over A's (B's) query rows of the
        attention put on B's (A's) keys."""
        s = torch.tensor(self.side)
        a, b = s == 0, s == 1
        m = self.maps.float()
        return {"a_to_b": m[:, :, a][:, :, :, b].sum(-1).mean(-1), "b_to_a": m[:, :, b][:, :, :, a].sum(-1).mean(-1)}

    def payload(self) -> dict:
        cm = self.cross_mass()
        n = self.maps.shape[0]
        return {
            "tokens": [str(t) for t in self.tokens], "side": [int(x) for x in self.side],
            "layers": n, "heads": int(self.maps.shape[1]),
            "layer_names": list(self.layer_names) if self.layer_names else [f"layer {i}" for i in range(n)],
            "maps": [[[[round(x, 5) for x in r] for r in h] for h in la] for la in self.maps.float().tolist()],
            "a_to_b": [[round(x, 5) for x in r] for r in cm["a_to_b"].tolist()],
            "b_to_a": [[round(x, 5) for x in r] for r in cm["b_to_a"].tolist()],
        }

    def as_view(self):
        """This pair as a :class:`~salience.interpret.render.html.View`: the "Sentence pair" tab of the report
        that :func:`salience.interpret.render.html.report` writes (``views=[...]``)."""
        from .render.html import View

        return View("pair", "Sentence pair", _SECTION, _CSS, _JS, "salience-pair-data", self.payload())

    def report(self, path=None, *, title: str = "salience: sentence-pair attention"):
        """Write (or return as a :class:`~salience.interpret.render.html.ReportHTML`) the view alone on a
        self-contained page."""
        from .render.html import standalone

        return standalone(self, title, path)

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()


def _sides(enc, L: int) -> list[int]:
    tt = enc.get("token_type_ids") if hasattr(enc, "get") else None
    if tt is not None and int(torch.as_tensor(tt).max()) == 1:
        return [int(x) for x in torch.as_tensor(tt)[0].tolist()]
    seq = enc.sequence_ids(0) if hasattr(enc, "sequence_ids") else None
    if seq is None:
        raise ValueError("cannot tell the two sentences apart: the tokenizer gives neither token_type_ids nor "
                         "sequence_ids (use a fast tokenizer).")
    out, cur = [], 0
    for s in seq:  # special tokens join the segment they follow (the first one joins A)
        cur = s if s is not None else cur
        out.append(int(cur))
    return out


def pair_attention(model, tokenizer, a: str, b: str, *, layers=None, heads=None, max_length: int = 256) -> PairAttention:
    """Encode ``a`` and ``b`` together (``tokenizer(a, b)``), run ``model`` under a capture, and return the
    :class:`PairAttention` (all rows of the recorded layers; inputs up to ``max_length`` tokens)."""
    enc = tokenizer(a, b, return_tensors="pt", truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    L = ids.shape[1]
    side = _sides(enc, L)
    with torch.no_grad(), capture(model, layers=layers, heads=heads) as rec:
        model(**enc)
    maps = rec.result()
    if not maps.maps:
        raise RuntimeError("no attention was recorded; run the model with salience attention "
                           "(salience.integrations.hf.enable(model)).")
    return PairAttention(tokens=tokenizer.convert_ids_to_tokens(ids[0].tolist()), side=side, maps=maps.stack(),
                         layer_names=[e["name"] for e in maps.entries if e.get("call", 0) == 0])


_SECTION = """<section id="pair-sec" data-view="pair"><h2>Sentence-pair view</h2>
<p class="intro">Sentence A and sentence B encoded together as one input. Lines go from each query token to the keys of
the other sentence; thicker and darker = more attention (hover a token to see its lines alone).</p>
<div class="controls"><label>direction <select id="pair-dir"><option value="ab">A &rarr; B (A's queries, B's keys)</option>
<option value="ba">B &rarr; A (B's queries, A's keys)</option><option value="all">all, both directions and within</option></select></label>
<label>layer <select id="pair-layer"></select></label> <label>head <select id="pair-head"></select></label></div>
<div class="cols"><div class="side"><b>Sentence A</b><div id="pair-a"></div></div>
<svg id="pair-svg" width="320" height="100"></svg>
<div class="side"><b>Sentence B</b><div id="pair-b"></div></div></div>
<h2>Cross-sentence share <small>mean over query rows of the attention on the other sentence, mean of heads</small></h2>
<table id="pair-table"></table></section>"""

_CSS = """
#pair-sec .cols{display:flex;align-items:flex-start;gap:0}#pair-sec .side{min-width:140px}
#pair-sec .side div div{height:20px;line-height:20px;padding:0 6px;font-family:ui-monospace,monospace;cursor:default;
white-space:pre}#pair-a div{text-align:right}#pair-sec .intro{color:#555;margin:2px 0 6px}
#pair-sec td,#pair-sec th{border:1px solid #ddd;padding:2px 6px;text-align:right}#pair-sec table{border-collapse:collapse}
"""

_JS = r"""
(function(){
const D=JSON.parse(document.getElementById("salience-pair-data").textContent);
const dir=document.getElementById("pair-dir"),lay=document.getElementById("pair-layer"),hd=document.getElementById("pair-head");
for(let l=0;l<D.layers;l++){const o=document.createElement("option");o.value=l;o.textContent=D.layer_names[l];lay.appendChild(o);}
{const o=document.createElement("option");o.value="mean";o.textContent="mean of heads";hd.appendChild(o);}
for(let h=0;h<D.heads;h++){const o=document.createElement("option");o.value=h;o.textContent="head "+h;hd.appendChild(o);}
const A=[],B=[];D.side.forEach((s,i)=>(s===0?A:B).push(i));
const RH=20,TOP=24,svg=document.getElementById("pair-svg");
svg.setAttribute("height",String(TOP+RH*Math.max(A.length,B.length)));
function col(id,idx){const el=document.getElementById(id);el.innerHTML="";idx.forEach(i=>{const d=document.createElement("div");d.textContent=D.tokens[i];d.dataset.i=i;
 d.onmouseenter=()=>draw(i);d.onmouseleave=()=>draw(null);el.appendChild(d);});}
col("pair-a",A);col("pair-b",B);
function w(q,k){const m=D.maps[+lay.value];if(hd.value!=="mean")return m[+hd.value][q][k];let s=0;for(const h of m)s+=h[q][k];return s/m.length;}
function y(i){const s=D.side[i],list=s===0?A:B;return TOP+RH*list.indexOf(i)+RH/2-20;}
function draw(only){
 while(svg.firstChild)svg.removeChild(svg.firstChild);
 const W=+svg.getAttribute("width"),pairs=[];
 for(let q=0;q<D.tokens.length;q++)for(let k=0;k<D.tokens.length;k++){
  const sq=D.side[q],sk=D.side[k];
  if(dir.value==="ab"&&!(sq===0&&sk===1))continue;if(dir.value==="ba"&&!(sq===1&&sk===0))continue;
  if(dir.value==="all"&&sq===sk)continue;
  if(only!==null&&q!==only)continue;pairs.push([q,k,w(q,k)]);}
 const mx=Math.max(1e-12,...pairs.map(p=>p[2]));let n=0;
 for(const [q,k,v] of pairs){if(v/mx<0.02)continue;n++;
  const l=document.createElementNS("http://www.w3.org/2000/svg","line");
  l.setAttribute("x1",D.side[q]===0?"0":String(W));l.setAttribute("x2",D.side[k]===0?"0":String(W));
  l.setAttribute("y1",String(y(q)+20));l.setAttribute("y2",String(y(k)+20));
  l.setAttribute("stroke",D.side[q]===0?"#4a78c2":"#e4572e");l.setAttribute("stroke-opacity",(v/mx).toFixed(3));
  l.setAttribute("stroke-width",(0.5+3*v/mx).toFixed(2));const t=document.createElementNS("http://www.w3.org/2000/svg","title");
  t.textContent=D.tokens[q]+" -> "+D.tokens[k]+": "+v.toFixed(4);l.appendChild(t);svg.appendChild(l);}
 svg.setAttribute("data-lines",String(n));
}
let rows="<tr><th>layer</th><th>A &rarr; B</th><th>B &rarr; A</th></tr>";
for(let l=0;l<D.layers;l++){const m=r=>r.reduce((a,b)=>a+b,0)/r.length;
 rows+="<tr><td>"+D.layer_names[l].replace(/[<&]/g,"")+"</td><td>"+m(D.a_to_b[l]).toFixed(3)+"</td><td>"+m(D.b_to_a[l]).toFixed(3)+"</td></tr>";}
document.getElementById("pair-table").innerHTML=rows;
dir.onchange=()=>draw(null);lay.onchange=()=>draw(null);hd.onchange=()=>draw(null);
draw(null);
const sec=document.getElementById("pair-sec");
if(location.hash==="#selftest"){const seen=[];for(const d of ["ab","ba","all"]){dir.value=d;draw(null);seen.push(d+"="+svg.getAttribute("data-lines"));}
 sec.setAttribute("data-selftest",seen.join(","));dir.value="ab";draw(null);}
sec.setAttribute("data-ready","1");
})();
"""
