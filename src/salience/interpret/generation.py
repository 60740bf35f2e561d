"""Attention during generation for causal language models: each generated token's attention over the prompt
and the earlier output, step by step, recorded from the decoding steps themselves.

:func:`generation_attention` runs ``model.generate(...)`` (greedy by default, with the KV cache) on a
transformers model running ``attn_implementation="salience"`` inside a :class:`~salience.interpret.capture`
that keeps only the **last query row** of each attention call. The prefill call's last row is the row of the
last prompt position (the one that predicts the first new token); each later decoding step has one query row,
the position of the token fed back. So step ``t`` holds, per layer and head, the attention of position
``prompt_length - 1 + t`` over keys ``0 .. prompt_length - 1 + t``, the distribution that produced generated
token ``t``. These rows equal the rows of ``output_attentions`` of one eager forward pass over the final
sequence (tested).

:meth:`GenerationAttention.report` writes a self-contained HTML page (no network): a step slider, the
generated text with the current token marked, and that token's attention over all earlier tokens (layer and
head chosen, or the mean of heads), drawn as shaded tokens and as a bar row. Batch size 1 only.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> import salience.integrations.hf as shf
    >>> from salience.interpret.generation import generation_attention
    >>> cfg = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    >>> model = shf.enable(GPT2LMHeadModel(cfg).eval())
    >>> g = generation_attention(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    >>> len(g.steps), g.steps[0].shape, g.steps[-1].shape      # (layers, heads, keys)
    (4, torch.Size([2, 2, 3]), torch.Size([2, 2, 6]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import capture

__all__ = ["GenerationAttention", "generation_attention"]


@dataclass
class GenerationAttention:
    """Attention recorded while generating.

    Attributes:
        tokens: labels of every token of the final sequence (prompt, then generated).
        ids: the final sequence's token ids.
        prompt_length: number of prompt tokens P.
        steps: one ``(layers, heads, P + t)`` tensor per generated token t: the attention row of position
            ``P - 1 + t`` (the query that produced token ``P + t``) over all earlier positions.
        layer_names: the recorded attention modules, in layer order.
    """

    tokens: list[str]
    ids: list[int]
    prompt_length: int
    steps: list[torch.Tensor]
    layer_names: list[str] = field(default_factory=list)

    def row_position(self, step: int) -> int:
        """Sequence position of the query row recorded at ``step``."""
        return self.prompt_length - 1 + step

    def payload(self) -> dict:
        return {
            "tokens": [str(t) for t in self.tokens],
            "prompt_length": int(self.prompt_length),
            "layer_names": list(self.layer_names),
            "layers": int(self.steps[0].shape[0]) if self.steps else 0,
            "heads": int(self.steps[0].shape[1]) if self.steps else 0,
            # steps[t][layer][head] -> list of P + t weights, rounded for the page
            "steps": [[[[round(x, 5) for x in h] for h in lay] for lay in s.float().tolist()] for s in self.steps],
        }

    def as_view(self):
        """This generation as a :class:`~salience.interpret.render.html.View`: the "Generation" tab of the report
        that :func:`salience.interpret.render.html.report` writes (``views=[...]``)."""
        from .render.html import View

        return View("generation", "Generation", _SECTION, _CSS, _JS, "salience-gen-data", self.payload())

    def report(self, path=None, *, title: str = "salience: attention during generation"):
        """Write (or return as a :class:`~salience.interpret.render.html.ReportHTML`) the view alone on a
        self-contained page."""
        from .render.html import standalone

        return standalone(self, title, path)

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()


def generation_attention(model, prompt, tokenizer=None, *, max_new_tokens: int = 16, layers=None, heads=None,
                         dtype=torch.float32, **generate_kwargs) -> GenerationAttention:
    """Generate from ``prompt`` and record each generated token's attention (see the module docstring).

    Args:
        model: a transformers causal LM running ``attn_implementation="salience"``
            (``salience.integrations.hf.enable(model)``).
        prompt: a ``(1, P)`` tensor of input ids, a list of ids, or a string (then ``tokenizer`` is required).
        tokenizer: used to encode a string prompt and to label tokens (ids are shown without one).
        max_new_tokens: tokens to generate.
        layers, heads, dtype: as in :class:`~salience.interpret.capture` (what to keep and how to store it).
        **generate_kwargs: passed to ``model.generate`` (default greedy: ``do_sample=False``).

    Raises:
        ValueError: a batch of more than one prompt, or a model not running salience attention.
        NotImplementedError: an encoder-decoder model (its decoder's cross-attention is not split out here).
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            "generation_attention records decoder-only models; step-by-step generation of encoder-decoder models is "
            "not built. For their cross-attention, run salience.interpret.seq2seq.cross_attention on the generated "
            "sequence (teacher-forced: the same rows as during generation)."
        )
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a string prompt needs a tokenizer (or pass input ids).")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"generation_attention takes one prompt (batch size 1); got input ids of shape "
                         f"{tuple(ids.shape)}.")
    P = ids.shape[1]
    if P < 1:
        raise ValueError("the prompt is empty.")
    kw = {"do_sample": False, "use_cache": True, "max_new_tokens": int(max_new_tokens)}
    kw.update(generate_kwargs)
    if kw.get("pad_token_id") is None and getattr(model.generation_config, "pad_token_id", None) is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        kw["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad(), capture(model, layers=layers, heads=heads, rows=[-1], dtype=dtype) as rec:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    maps = rec.result()
    seq = out[0].tolist()
    n_new = len(seq) - P
    by_call: dict[int, list[tuple[int, str, torch.Tensor]]] = {}
    for m, e in zip(maps.maps, maps.entries):
        by_call.setdefault(e["call"], []).append((e["layer"], e["name"], m[0, :, 0, :]))
    steps, names = [], []
    for t in range(n_new):
        if t not in by_call:
            raise RuntimeError(f"no attention call was recorded for decoding step {t}; is the model running "
                               "salience attention with a KV cache?")
        parts = sorted(by_call[t], key=lambda x: x[0])
        keys = {p[2].shape[-1] for p in parts}
        if keys != {P + t}:
            raise RuntimeError(f"decoding step {t} attended over {sorted(keys)} keys; expected {P + t} "
                               "(a model with a sliding-window cache or a non-standard cache is not supported).")
        steps.append(torch.stack([p[2] for p in parts]))
        names = [p[1] for p in parts]
    if tokenizer is not None:
        tokens = [tokenizer.decode([i]) for i in seq]
    else:
        tokens = [str(i) for i in seq]
    return GenerationAttention(tokens=tokens, ids=seq, prompt_length=P, steps=steps, layer_names=names)


_SECTION = """<section id="gen-sec" data-view="generation"><h2>Generation view <small id="gen-sel"></small></h2>
<p class="intro">Each generated token's attention over the prompt and the earlier output, one decoding step at a time
(the query is the position before the marked token). Darker = more attention; prompt tokens are underlined.</p>
<div class="controls"><label>step <input type="range" id="gen-step" min="0" max="0" value="0"></label>
<label>layer <select id="gen-layer"></select></label> <label>head <select id="gen-head"></select></label></div>
<div id="gen-text" class="text"></div>
<canvas id="gen-bars" width="1100" height="200"></canvas>
<table id="gen-top"></table></section>"""

_CSS = """
#gen-sec .text{background:#fff;border:1px solid #ddd;padding:10px;line-height:2;font-family:ui-monospace,monospace}
#gen-sec .tok{padding:2px 3px;margin:1px;border-radius:3px;white-space:pre}#gen-sec .tok.prompt{border-bottom:2px solid #999}
#gen-sec .tok.cur{outline:2px solid #e4572e}#gen-sec .tok.future{color:#bbb}#gen-sec .intro{color:#555;margin:2px 0 6px}
#gen-sec td,#gen-sec th{border:1px solid #ddd;padding:2px 6px}#gen-sec table{border-collapse:collapse;margin-top:6px}
#gen-sec canvas{background:#fff;max-width:100%}
"""

_JS = r"""
(function(){
const D=JSON.parse(document.getElementById("salience-gen-data").textContent);
const step=document.getElementById("gen-step"),lay=document.getElementById("gen-layer"),hd=document.getElementById("gen-head");
step.max=String(Math.max(0,D.steps.length-1));
for(let l=0;l<D.layers;l++){const o=document.createElement("option");o.value=l;o.textContent=(D.layer_names[l]||("layer "+l));lay.appendChild(o);}
{const o=document.createElement("option");o.value="mean";o.textContent="mean of heads";hd.appendChild(o);}
for(let h=0;h<D.heads;h++){const o=document.createElement("option");o.value=h;o.textContent="head "+h;hd.appendChild(o);}
function row(t){const s=D.steps[t][+lay.value];if(hd.value!=="mean")return s[+hd.value];
 const n=s[0].length,r=new Array(n).fill(0);for(const h of s)for(let i=0;i<n;i++)r[i]+=h[i]/s.length;return r;}
function draw(){
 const t=+step.value,P=D.prompt_length,r=row(t),mx=Math.max(...r,1e-12),gen=P+t;
 document.getElementById("gen-sel").textContent="step "+t+": generating "+JSON.stringify(D.tokens[gen])+" (position "+gen+"), query = position "+(gen-1);
 const box=document.getElementById("gen-text");box.innerHTML="";
 D.tokens.forEach((tok,i)=>{const s=document.createElement("span");s.className="tok"+(i<P?" prompt":"")+(i===gen?" cur":"")+(i>gen?" future":"");
  s.textContent=tok;if(i<r.length){const a=r[i]/mx;s.style.background="rgba(30,90,200,"+a.toFixed(3)+")";s.style.color=a>0.6?"#fff":"";s.title="position "+i+": "+r[i].toFixed(4);}
  box.appendChild(s);});
 const c=document.getElementById("gen-bars"),g=c.getContext("2d");g.clearRect(0,0,c.width,c.height);
 const w=(c.width-40)/Math.max(1,D.tokens.length);g.fillStyle="#444";g.font="10px sans-serif";
 g.fillText(mx.toFixed(3),0,12);g.fillText("0",0,c.height-40);
 r.forEach((v,i)=>{const h=(c.height-50)*v/mx;g.fillStyle=i<P?"#4a78c2":"#e4572e";g.fillRect(40+i*w,c.height-40-h,Math.max(1,w-2),h);});
 g.fillStyle="#333";D.tokens.forEach((tok,i)=>{g.save();g.translate(40+i*w+w/2,c.height-36);g.rotate(Math.PI/4);g.fillText(tok.slice(0,10),0,0);g.restore();});
 const order=r.map((v,i)=>[v,i]).sort((a,b)=>b[0]-a[0]).slice(0,5);
 document.getElementById("gen-top").innerHTML="<tr><th>top keys</th>"+order.map(([v,i])=>"<td>"+i+": "+D.tokens[i].replace(/[<&]/g,"")+" "+v.toFixed(3)+"</td>").join("")+"</tr>";
 c.setAttribute("data-step",String(t));c.setAttribute("data-keys",String(r.length));
}
step.oninput=draw;lay.onchange=draw;hd.onchange=draw;
if(D.steps.length){draw();}
const sec=document.getElementById("gen-sec");
if(location.hash==="#selftest"){const seen=[];for(let t=0;t<D.steps.length;t++){step.value=t;draw();seen.push(document.getElementById("gen-bars").getAttribute("data-keys"));}
 sec.setAttribute("data-selftest","keys="+seen.join(","));step.value=0;draw();}
sec.setAttribute("data-ready","1");
})();
"""
