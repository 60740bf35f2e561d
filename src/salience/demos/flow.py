"""Abnar & Zuidema 2020, Table 1, in shape: do raw attention, rollout and flow rank input tokens the way
blank-out and input gradients do, layer by layer?

* Task: :class:`salience.demos.agreement.Agreement` (subject-verb agreement, Linzen et al. 2016 structure).
* Model: :class:`AgreementClassifier`, salience's :class:`~salience.layers.TransformerEncoder` with the
  paper's shape (6 layers, 8 heads, 128 dimensions) plus token and learned position embeddings and a
  classifier on the [CLS] token.
* Explained scalar ``F``: the logit margin of the predicted class (``logit[pred] - logit[other]``).
* References, per evaluation example: **blank-out** ``|F(x) - F(x with token i replaced by [UNK])|`` and
  **input gradient** ``|sum_d x_id dF/dx_id|`` (gradient x input on the summed token+position embedding).
* Attention-derived importance of input token ``j`` for layer ``l`` (the [CLS] row, heads averaged):
  raw attention of layer ``l``, rollout and flow of layers ``1..l`` (``salience.interpret.methods``,
  residual 0.5 as in the paper) and gradient x attention of layers ``1..l``.
* Per layer and method: Spearman correlation over the example's tokens (all but [CLS]), mean over
  examples, 95% bootstrap interval over examples.
* The same on the bundled all-MiniLM-L6-v2 for written sentences, against deleting each token
  (``salience.interpret.faithfulness.evaluate``, kind ``"shift"``: ``1 - cos`` of the sentence embedding)
  and its gradient reference (the embedding's directional derivative along each token).

Writes ``OUT/flow.json`` and ``OUT/flow.png``. ``python -m salience.demos.flow OUT/flow.json`` prints the
markdown table docs/demo.md shows.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..interpret import methods as M
from ..interpret.capture import capture
from ..interpret.faithfulness import spearman
from ..layers import TransformerEncoder
from .agreement import UNK, Agreement, statistics

__all__ = ["PAPER", "PRESETS", "AgreementClassifier", "train", "accuracy_by_attractors", "importances",
           "layer_scores", "blank_out", "input_gradient", "correlations", "minilm_correlations", "run_flow", "markdown", "plot", "SENTENCES"]

#: Abnar & Zuidema 2020, Table 1, layer 6 (the numbers the issue quotes)
PAPER = {"blank_out": {"raw": 0.29, "rollout": 0.71, "flow": 0.70},
         "input_gradient": {"raw": 0.46, "rollout": 0.54, "flow": 0.61}}

PRESETS = {
    "full": {"train_steps": 1500, "batch": 64, "eval_examples": 300, "test_examples": 2000, "minilm_sentences": 16,
             "bootstrap": 2000},
    "quick": {"train_steps": 200, "batch": 64, "eval_examples": 40, "test_examples": 500, "minilm_sentences": 4,
              "bootstrap": 500},
}

METHODS = ("raw", "rollout", "flow", "grad_attention")
REFS = ("blank_out", "input_gradient")
LABELS = {"raw": "raw attention", "rollout": "rollout", "flow": "flow", "grad_attention": "gradient x attention",
          "blank_out": "blank-out", "input_gradient": "input gradient"}

#: sentences for the MiniLM part (written for this demo; the first ones also carry agreement attractors)
SENTENCES = [
    "The keys to the cabinet are on the table.",
    "The author of the books was sitting near the window.",
    "A man is playing a guitar on the street.",
    "The children near the old house were laughing loudly.",
    "Rain fell all night and the river flooded the fields.",
    "The doctor who treated the patients works in the city.",
    "My sister bought a red bicycle for her son.",
    "The students in the library are reading quietly.",
    "A small dog chased the cat across the garden.",
    "The painting that the visitors admired was stolen yesterday.",
    "Scientists discovered a new species of frog in the forest.",
    "The pilot of the planes has landed safely.",
    "She forgot her keys at the office again.",
    "The recipe calls for two cups of flour and some sugar.",
    "The teachers said that the test was too difficult.",
    "Trains to the airport leave every twenty minutes.",
]


class AgreementClassifier(nn.Module):
    """Token + learned position embeddings, a salience :class:`TransformerEncoder` and a linear classifier on the
    [CLS] position (position 0). ``forward(ids, lengths=None, embeds=None) -> (B, 2)`` logits."""

    def __init__(self, vocab: int, d_model: int = 128, num_heads: int = 8, num_layers: int = 6, max_len: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.encoder = TransformerEncoder(num_layers, d_model, num_heads, 4 * d_model, dropout)
        self.head = nn.Linear(d_model, 2)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))

    def forward(self, ids=None, lengths=None, embeds=None):
        x = self.embed(ids) if embeds is None else embeds
        h = self.encoder(x, key_lengths=lengths)
        return self.head(h[:, 0])

    def explicit(self, embeds: torch.Tensor):
        """The same forward pass (eval mode, no padding) with the attention weights formed explicitly and kept in
        the autograd graph: ``(logits, [weights (B, H, L, L) per layer])`` for gradient x attention."""
        x, weights = embeds, []
        for layer in self.encoder.layers:
            mha = layer.self_attn
            y = layer.norm1(x)
            B, L, _ = y.shape
            q, k, v = (p(y).view(B, L, mha.num_heads, mha.head_dim).transpose(1, 2)
                       for p in (mha.q_proj, mha.k_proj, mha.v_proj))
            scale = mha.scale if mha.scale is not None else mha.head_dim ** -0.5
            w = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
            if w.requires_grad:
                w.retain_grad()
            weights.append(w)
            a = (w @ v).transpose(1, 2).reshape(B, L, -1)
            x = x + mha.out_proj(a)
            x = x + layer.ff(layer.norm2(x))
        return self.head(self.encoder.norm(x)[:, 0]), weights


def train(task: Agreement, steps: int, batch: int = 64, seed: int = 0, lr: float = 5e-4, progress=None,
          model_kw: dict | None = None):
    """Train an :class:`AgreementClassifier` (``model_kw``: its shape, default the paper's) on fresh samples each
    step; returns ``(model, losses)``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = AgreementClassifier(task.vocab_size, **(model_kw or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / max(1, steps)))
    losses = []
    model.train()
    for step in range(steps):
        ids, lengths, labels = task.batch(task.sample(batch, g))
        loss = nn.functional.cross_entropy(model(ids, lengths), labels)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None and (step % 25 == 0 or step == steps - 1):
            progress(step + 1, steps, sum(losses[-25:]) / len(losses[-25:]))
    return model.eval(), losses


@torch.no_grad()
def accuracy_by_attractors(model, task: Agreement, examples) -> dict:
    """``{attractors: {"n": count, "accuracy": share correct}}`` plus ``"all"``."""
    correct = []
    for i in range(0, len(examples), 256):
        chunk = examples[i : i + 256]
        ids, lengths, labels = task.batch(chunk)
        correct += (model(ids, lengths).argmax(-1) == labels).tolist()
    out = {}
    for k in sorted({e.attractors for e in examples}):
        c = [ok for ok, e in zip(correct, examples, strict=True) if e.attractors == k]
        out[str(k)] = {"n": len(c), "accuracy": sum(c) / len(c)}
    out["all"] = {"n": len(correct), "accuracy": sum(correct) / len(correct)}
    return out


def _margin(logits: torch.Tensor, pred: int) -> torch.Tensor:
    return logits[:, pred] - logits[:, 1 - pred]


def blank_out(score, ids: torch.Tensor, blank: int = UNK, skip=(0,)) -> torch.Tensor:
    """Blank-out importance ``|score(x with token i replaced by blank) - score(x)|`` for each position of one
    example ``ids`` (L,), in one batched call; ``score`` maps ids (B, L) to (B,). Positions in ``skip`` get 0."""
    ids = ids.view(-1)
    L = ids.shape[0]
    pos = [i for i in range(L) if i not in set(skip)]
    batch = ids.repeat(len(pos) + 1, 1)
    batch[torch.arange(1, len(pos) + 1), torch.tensor(pos, dtype=torch.long)] = blank
    with torch.no_grad():
        f = score(batch).double()
    out = torch.zeros(L, dtype=torch.float64)
    out[pos] = (f[1:] - f[0]).abs()
    return out


def input_gradient(score, embeds: torch.Tensor) -> torch.Tensor:
    """Gradient x input ``|sum_d x_id dF/dx_id|`` per position of one example's input vectors ``embeds`` (L, E);
    ``score`` maps (B, L, E) to (B,)."""
    E = embeds.detach().view(1, *embeds.shape[-2:]).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(E).sum(), E)
    return (g[0] * E.detach()[0]).sum(-1).abs().double()


def importances(model: AgreementClassifier, ids: torch.Tensor) -> dict:
    """For one unpadded example ``ids`` (L,): the maps ``attn`` (layers, H, L, L) captured with
    :class:`salience.interpret.capture`, their gradients ``grads`` (from :meth:`AgreementClassifier.explicit`),
    :func:`blank_out` and :func:`input_gradient` importance (L,) of the predicted class's logit margin
    (position 0, [CLS], is 0) and the prediction."""
    ids = ids.view(1, -1)
    with torch.no_grad(), capture() as rec:
        logits = model(ids)
    pred = int(logits[0].argmax())
    attn = rec.result().stack().double()
    E = model.embed(ids).detach().requires_grad_(True)
    out, weights = model.explicit(E)
    f = _margin(out, pred)[0]
    f.backward()
    grads = torch.stack([w.grad[0] for w in weights]).double()
    explicit = torch.stack([w.detach()[0] for w in weights]).double()
    if not torch.allclose(explicit, attn, atol=1e-4):
        raise RuntimeError("the explicit forward pass disagrees with the captured maps; the demo's model changed?")
    gxi = input_gradient(lambda x: _margin(model(embeds=x), pred), E[0])
    gxi[0] = 0
    bo = blank_out(lambda x: _margin(model(x), pred), ids[0])
    return {"attn": attn, "grads": grads, "blank_out": bo, "input_gradient": gxi, "pred": pred,
            "margin": float(f.detach())}


def layer_scores(attn: torch.Tensor, grads: torch.Tensor | None, query, flow_sources=None) -> dict:
    """``{method: (layers, L)}``: each method's token importance read at ``query`` (an int row, or "mean") after
    each layer: raw attention of that layer, rollout / flow / gradient x attention of layers ``1..l``."""
    n = attn.shape[0]
    out = {m: [] for m in METHODS if m != "grad_attention" or grads is not None}
    for layer in range(n):
        out["raw"].append(M.token_importance(M.fuse_heads(attn[layer : layer + 1])[0].double(), query))
        out["rollout"].append(M.token_importance(M.rollout(attn, end_layer=layer + 1), query))
        src = [query] if isinstance(query, int) else flow_sources
        f = M.flow(attn, end_layer=layer + 1, sources=src, max_seconds=None)
        out["flow"].append(M.token_importance(f, 0 if isinstance(query, int) else "mean"))
        if grads is not None:
            out["grad_attention"].append(M.token_importance(M.gradient_x_attention(attn, grads, end_layer=layer + 1),
                                                            query))
    return {m: torch.stack(v) for m, v in out.items()}


def _spearman(a, b) -> float:
    r = spearman(a, b)
    return 0.0 if math.isnan(r) else r


def _summary(values: list[float], reps: int, seed: int) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(t), (reps, len(t)), generator=g)
    boots = t[idx].mean(1)
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(t.mean()), "lo": lo, "hi": hi, "n": len(t)}


def correlations(per_example: list[dict], positions_of, reps: int = 1000, seed: int = 0) -> dict:
    """``{ref: {method: [summary per layer]}}`` from per-example ``{"scores": {method: (layers, L)}, ref: (L,)}``;
    ``positions_of(i)`` gives the scored token positions of example ``i``."""
    methods = list(per_example[0]["scores"])
    n_layers = per_example[0]["scores"][methods[0]].shape[0]
    out = {}
    for ref in REFS:
        out[ref] = {}
        for m in methods:
            out[ref][m] = []
            for layer in range(n_layers):
                vals = []
                for i, ex in enumerate(per_example):
                    pos = positions_of(i)
                    vals.append(_spearman(ex["scores"][m][layer, pos], ex[ref][pos]))
                out[ref][m].append(_summary(vals, reps, seed))
    # share of an example's scored tokens tied at its maximum (flow saturates at the source's capacity, 1)
    out["tied_at_max"] = {m: [sum(float((v := ex["scores"][m][layer, positions_of(i)]).ge(v.max() - 1e-6).double().mean())
                                  for i, ex in enumerate(per_example)) / len(per_example) for layer in range(n_layers)]
                          for m in methods}
    out["references"] = _summary([_spearman(ex["blank_out"][positions_of(i)], ex["input_gradient"][positions_of(i)])
                                  for i, ex in enumerate(per_example)], reps, seed)
    return out


def minilm_correlations(sentences, reps: int = 1000, seed: int = 0) -> dict:
    """The same per-layer table on all-MiniLM-L6-v2 (mean-pooled sentence embedding): references from
    :func:`salience.interpret.faithfulness.evaluate` (kind ``"shift"``), maps captured by it."""
    import salience.models

    from ..interpret.faithfulness import evaluate

    model, tok = salience.models.minilm()
    per, positions, lengths = [], [], []
    for s in sentences:
        rep = evaluate(model, tok, s, kind="shift", methods=("raw_last",))
        attn = rep.attn.double()
        per.append({"scores": layer_scores(attn, None, "mean"), "blank_out": rep.references["erasure"],
                    "input_gradient": rep.references["gradient_x_input"]})
        positions.append(torch.tensor(rep.positions))
        lengths.append(attn.shape[-1])
    res = correlations(per, lambda i: positions[i], reps, seed)
    res["sentences"] = list(sentences)
    res["tokens"] = {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)}
    return res


def run_flow(quick: bool = False, seed: int = 0, out=None, say=print, progress=None, minilm: bool = True,
             model_kw: dict | None = None, **overrides) -> dict:
    """Run the whole experiment; returns the JSON-ready result (also written to ``out/flow.json`` and
    ``out/flow.png`` when ``out`` is given). ``overrides`` replace preset values (train_steps, eval_examples...);
    ``model_kw`` changes the model's shape (tests only: the default is the paper's)."""
    p = {**PRESETS["quick" if quick else "full"], **{k: v for k, v in overrides.items() if v is not None}}
    t0 = time.perf_counter()
    task = Agreement(seed=seed)
    g_test = torch.Generator().manual_seed(seed + 1000)
    test = task.sample(p["test_examples"], g_test)
    evals = task.sample(p["eval_examples"], torch.Generator().manual_seed(seed + 2000))
    stats = {"test": statistics(test), "evaluation": statistics(evals)}
    say(f"\n4. Attention flow (Abnar & Zuidema 2020, Table 1): {task}")
    say(f"   test set: {stats['test']['examples']} sentences, length {stats['test']['length_min']}.."
        f"{stats['test']['length_max']} tokens (mean {stats['test']['length_mean']}), by attractors "
        f"{stats['test']['by_attractors']}")
    say("   e.g. " + "; ".join(e.sentence() for e in test[:3]))
    t1 = time.perf_counter()
    model, losses = train(task, p["train_steps"], p["batch"], seed, progress=progress, model_kw=model_kw)
    train_s = time.perf_counter() - t1
    acc = accuracy_by_attractors(model, task, test)
    say(f"   trained {p['train_steps']} steps x {p['batch']} in {train_s:.0f}s; test accuracy by attractors: " +
        ", ".join(f"{k}: {100 * v['accuracy']:.1f}% (n={v['n']})" for k, v in acc.items()))
    t2 = time.perf_counter()
    per = []
    for e in evals:
        ids = torch.tensor(task.encode(e.tokens))
        imp = importances(model, ids)
        imp["scores"] = layer_scores(imp["attn"], imp["grads"], 0)
        imp["correct"] = imp["pred"] == e.label
        del imp["attn"], imp["grads"]
        per.append(imp)
    lens = [len(e.tokens) for e in evals]
    corr = correlations(per, lambda i: torch.arange(1, lens[i]), p["bootstrap"], seed)
    analysis_s = time.perf_counter() - t2
    result = {
        "paper": PAPER, "settings": {"quick": quick, "seed": seed, **p},
        "task": {"description": repr(task), "statistics": stats, "examples": [e.sentence() for e in test[:5]]},
        "model": {"layers": len(model.encoder.layers), "heads": model.encoder.layers[0].self_attn.num_heads,
                  "d_model": model.head.in_features, "dim_feedforward": 4 * model.head.in_features, "dropout": 0.0,
                  "parameters": sum(q.numel() for q in model.parameters()),
                  "final_loss": sum(losses[-50:]) / len(losses[-50:])},
        "accuracy": acc, "agreement": corr,
        "evaluation_correct": sum(x["correct"] for x in per) / len(per),
        "seconds": {"train": train_s, "analysis": analysis_s},
    }
    say("   " + table(result, "agreement").replace("\n", "\n   "))
    if minilm:
        t3 = time.perf_counter()
        try:
            result["minilm"] = minilm_correlations(SENTENCES[: p["minilm_sentences"]], p["bootstrap"], seed)
        except (ImportError, FileNotFoundError) as e:  # the hf extra is optional
            result["minilm_skipped"] = str(e)
            say(f"   MiniLM part skipped: {e}")
        else:
            result["seconds"]["minilm"] = time.perf_counter() - t3
            say("   MiniLM (all-MiniLM-L6-v2, sentence embedding):")
            say("   " + table(result, "minilm").replace("\n", "\n   "))
    result["seconds"]["total"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "flow.json").write_text(json.dumps(result, indent=1))
        result_files = {"flow_json": out / "flow.json"}
        try:
            result_files["flow_png"] = plot(result, out / "flow.png")
        except ImportError as e:
            say(f"   flow.png not written: {e}")
        result["files"] = {k: str(v) for k, v in result_files.items()}
    return result


# ------------------------------------------------------------------------------------------ reporting
def _cell(s: dict) -> str:
    return f"{s['mean']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]"


def table(result: dict, part: str = "agreement") -> str:
    """Plain-text table: per layer, each method's mean Spearman [95% bootstrap] against each reference."""
    c = result[part]
    lines = []
    for ref in REFS:
        ms = list(c[ref])
        lines.append(f"vs {LABELS[ref]}:  " + " | ".join(f"{LABELS[m]:>22}" for m in ms))
        for layer in range(len(c[ref][ms[0]])):
            lines.append(f"  layer {layer + 1}:        " + " | ".join(f"{_cell(c[ref][m][layer]):>22}" for m in ms))
        if part == "agreement":
            lines.append("  paper, layer 6: " + " | ".join(f"{PAPER[ref].get(m, float('nan')):>22.2f}" for m in ms))
    lines.append(f"blank-out vs input gradient: {_cell(c['references'])}")
    if "tied_at_max" in c:
        lines.append("share of tokens tied at the maximum, per layer: " + "; ".join(
            f"{LABELS[m]} " + " ".join(f"{v:.2f}" for v in c["tied_at_max"][m]) for m in c["tied_at_max"]))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The docs/demo.md tables from a flow.json result."""
    out = []
    st = result["task"]["statistics"]["test"]
    acc = result["accuracy"]
    out.append(f"Task: {st['examples']} test sentences, {st['length_min']}..{st['length_max']} tokens "
               f"(mean {st['length_mean']}, with [CLS]); by number of attractors {st['by_attractors']}. "
               f"Evaluation examples: {result['task']['statistics']['evaluation']['examples']}, by attractors "
               f"{result['task']['statistics']['evaluation']['by_attractors']}. "
               f"Trained {result['settings']['train_steps']} steps x {result['settings']['batch']}.")
    out.append("")
    out.append("| attractors | " + " | ".join(acc) + " |")
    out.append("|---|" + "---|" * len(acc))
    out.append("| test accuracy | " + " | ".join(f"{100 * v['accuracy']:.1f}% (n={v['n']})" for v in acc.values())
               + " |")
    for part, title in (("agreement", "Agreement model"), ("minilm", "all-MiniLM-L6-v2 (sentence embedding)")):
        if part not in result:
            continue
        c = result[part]
        n = c["references"]["n"]
        out.append("")
        out.append(f"{title}: Spearman correlation, mean over {n} "
                   f"{'sentences' if part == 'minilm' else 'evaluation examples'} [95% bootstrap interval]"
                   + (", paper's layer-6 value in the last row" if part == "agreement" else ""))
        for ref in REFS:
            ms = list(c[ref])
            out.append("")
            out.append(f"| vs {LABELS[ref]} | " + " | ".join(LABELS[m] for m in ms) + " |")
            out.append("|---|" + "---|" * len(ms))
            for layer in range(len(c[ref][ms[0]])):
                out.append(f"| layer {layer + 1} | " + " | ".join(_cell(c[ref][m][layer]) for m in ms) + " |")
            if part == "agreement":
                out.append("| paper, layer 6 | " + " | ".join(
                    f"{PAPER[ref][m]:.2f}" if m in PAPER[ref] else "-" for m in ms) + " |")
        out.append("")
        out.append(f"Blank-out vs input gradient (agreement of the two references): {_cell(c['references'])}.")
        if "tied_at_max" in c:
            out.append("")
            out.append("Share of an example's tokens tied at its maximum value, layers 1..6 (ties carry no ranking): "
                       + "; ".join(f"{LABELS[m]} " + " ".join(f"{v:.2f}" for v in c["tied_at_max"][m])
                                   for m in c["tied_at_max"]) + ".")
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """Correlation against layer: one panel per (model, reference), one line per method with its interval; the
    paper's layer-6 values as crosses."""
    from .report import _figure

    parts = [p for p in ("agreement", "minilm") if p in result]
    fig = _figure(11, 4 * len(parts))
    colors = {"raw": "tab:blue", "rollout": "tab:orange", "flow": "tab:green", "grad_attention": "tab:purple"}
    for r, part in enumerate(parts):
        c = result[part]
        for k, ref in enumerate(REFS):
            ax = fig.add_subplot(len(parts), 2, 2 * r + k + 1)
            for m, s in c[ref].items():
                x = list(range(1, len(s) + 1))
                ax.plot(x, [v["mean"] for v in s], marker="o", color=colors[m], label=LABELS[m])
                ax.fill_between(x, [v["lo"] for v in s], [v["hi"] for v in s], color=colors[m], alpha=0.15)
                if part == "agreement" and m in PAPER[ref]:
                    ax.plot([6], [PAPER[ref][m]], marker="x", markersize=10, color=colors[m], linestyle="none")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel("layer")
            ax.set_ylabel("Spearman (mean, 95% CI)")
            name = "agreement model" if part == "agreement" else "MiniLM"
            ax.set_title(f"{name}: vs {LABELS[ref]}" + (" (x = paper)" if part == "agreement" else ""))
            ax.set_ylim(-0.6, 1.0)
            if r == 0 and k == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":  # python -m salience.demos.flow OUT/flow.json: the markdown tables
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
