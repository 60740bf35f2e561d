"""How far does attention explain this model's output on this input?

Each attention-derived token importance (raw maps, rollout, flow, gradient x attention, and a
uniform-attention baseline) is compared with two references that measure what the output actually
depends on: **gradient x input** ``|sum_d x_id dF/dx_id|`` over the input embeddings and **leave-one-out
erasure** ``|F(x) - F(x without token i)|``. Agreement is the rank correlation (Spearman and Kendall's
tau-b) over the scored tokens (special tokens such as [CLS]/[SEP] are left out: erasing them is out of
distribution). A Monte-Carlo chance band says which correlations a random ranking would reach.

The explained scalar ``F`` is, depending on the model and arguments:

* ``"classifier"``: the logit of the predicted (or given) class of a sequence-classification model;
* ``"similarity"``: the cosine similarity of the sentence embedding (mean pooling) with that of ``pair``;
* ``"shift"`` (an encoder without ``pair``): how far the sentence embedding moves. Erasure is
  ``1 - cos(e(x without i), e(x))``; gradient x input is the norm of the directional derivative of the
  embedding along token i's own input vector (central difference, one batched forward pass), because the
  gradient of a similarity with itself is zero; gradient x attention needs a scalar and is not computed.

:func:`compare` does the statistics on plain tensors; :func:`evaluate` runs a Hugging Face model.

Example:
    >>> import torch
    >>> from salience.interpret.faithfulness import compare
    >>> ref = {"erasure": torch.tensor([0.1, 0.5, 0.2, 0.9])}
    >>> rep = compare({"rollout": torch.tensor([0.2, 0.4, 0.1, 0.8])}, ref)
    >>> round(rep.correlations["rollout"]["erasure"]["spearman"], 2)
    0.8
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import methods as _m

__all__ = [
    "markdown_table",
    "spearman",
    "kendall",
    "chance_band",
    "FaithfulnessReport",
    "compare",
    "evaluate",
    "KINDS",
    "METHODS",
    "REFERENCES",
    "GRADES",
    "MODERATE",
    "STRONG",
    "grade",
]

#: the explained scalars :func:`evaluate` knows
KINDS = ("classifier", "similarity", "shift")
#: attention-derived importances :func:`evaluate` computes (in table order)
METHODS = ("raw_last", "raw_mean", "rollout", "flow", "grad_attention", "uniform")
#: reference importances
REFERENCES = ("gradient_x_input", "erasure")

LABELS = {
    "raw_last": "attention, last layer",
    "raw_mean": "attention, mean of layers",
    "rollout": "rollout",
    "flow": "flow",
    "grad_attention": "gradient x attention",
    "uniform": "uniform attention (baseline)",
    "gradient_x_input": "gradient x input",
    "erasure": "leave-one-out erasure",
}


def _pair(a, b):
    """Two 1-D float64 vectors of one length (the inputs of a rank correlation)."""
    x, y = _vec(a, "a"), _vec(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length; got {x.numel()} and {y.numel()}.")
    return x, y


def _vec(x, argname: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{argname} must be 1-D (one value per token); got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        t = t.double()
    return t.double()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties averaged."""
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties get average ranks); NaN when either input is constant.

    Example:
        >>> round(spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]), 4)
        0.5
    """
    x, y = _pair(a, b)
    if x.numel() < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return math.nan if den == 0 else float((rx * ry).sum()) / den


def kendall(a, b) -> float:
    """Kendall's tau-b (accounts for ties); NaN when either input is constant. O(n^2) memory.

    Example:
        >>> round(kendall([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]), 4)
        0.3333
    """
    x, y = _pair(a, b)
    n = x.numel()
    if n < 2:
        return math.nan
    iu = torch.triu_indices(n, n, offset=1)
    dx = torch.sign(x[iu[1]] - x[iu[0]])
    dy = torch.sign(y[iu[1]] - y[iu[0]])
    s = float((dx * dy).sum())
    nx, ny = float((dx != 0).sum()), float((dy != 0).sum())
    den = math.sqrt(nx * ny)
    return math.nan if den == 0 else s / den


def chance_band(n: int, level: float = 0.95, trials: int = 2000, seed: int = 0) -> dict:
    """The ``level`` quantile of ``|Spearman|`` and ``|Kendall|`` between two random rankings of ``n`` tokens
    (Monte Carlo, fixed seed): correlations inside this band are indistinguishable from chance.

    Example:
        >>> band = chance_band(10)
        >>> 0.5 < band["spearman"] < 0.75
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"n must be an int >= 3 (the number of scored tokens); got {n!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}.")
    g = torch.Generator().manual_seed(seed)
    ref = torch.arange(n, dtype=torch.float64)
    perms = torch.argsort(torch.rand(trials, n, generator=g), dim=1).double()
    # Spearman without ties is Pearson on ranks
    rc = ref - ref.mean()
    pc = perms - perms.mean(1, keepdim=True)
    rho = (pc @ rc) / (pc.norm(dim=1) * rc.norm())
    iu = torch.triu_indices(n, n, offset=1)
    sx = torch.sign(ref[iu[1]] - ref[iu[0]])
    sy = torch.sign(perms[:, iu[1]] - perms[:, iu[0]])
    tau = (sy * sx).sum(1) / iu.shape[1]
    q = lambda v: float(torch.quantile(v.abs(), level))  # noqa: E731
    return {"n": n, "level": level, "spearman": q(rho), "kendall": q(tau)}


def _snap(v: torch.Tensor, digits: int = 9) -> torch.Tensor:
    """Round to ``digits`` significant digits of the largest value, so that values equal up to rounding noise
    (e.g. a uniform baseline computed in floating point) tie instead of being ranked by noise."""
    finite = v[torch.isfinite(v)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if scale == 0:
        return v
    q = 10.0 ** (math.floor(math.log10(scale)) - digits + 1)
    return torch.round(v / q) * q


#: |Spearman| from which an agreement is called "moderate" and "strong" (below: "weak"); a correlation must
#: also lie outside the chance band to count at all. Stated in docs/interpret.md ("Verdict").
MODERATE, STRONG = 0.4, 0.7

#: the grades of an agreement, weakest first; "inconclusive": the two references disagree with each other
GRADES = ("undefined", "no better than chance", "inverted", "inconclusive", "weak", "moderate", "strong")

_ADVERB = {"weak": "weakly", "moderate": "moderately", "strong": "strongly", "undefined": "in no measurable way",
           "inverted": "inversely (more attention, less effect)", "no better than chance": "no better than chance",
           "inconclusive": "to an extent these references cannot settle"}


def _strength(r: float, chance: float) -> str:
    """Grade one correlation ``r`` against the chance band ``chance`` (the 95% quantile of |r| at random)."""
    if r is None or math.isnan(r):
        return "undefined"
    a = abs(r)
    if a <= chance:
        return "no better than chance"
    if r < 0:
        return "inverted"
    if a < MODERATE:
        return "weak"
    if a < STRONG:
        return "moderate"
    return "strong"


def grade(r: float, chance: float, agreement: float | None = None) -> str:
    """The verdict's grade (one of :data:`GRADES`) for a method that agrees with the primary reference at
    Spearman ``r``, when the two references agree with each other at ``agreement`` (None: one reference).

    ``r`` is graded on its own (:func:`_strength`: chance band, then the :data:`MODERATE` / :data:`STRONG`
    thresholds). A positive grade is then capped by the references' own agreement: the verdict is never
    stronger than the agreement of the two measures it is judged by, and when that agreement is itself within
    the chance band (or negative) the verdict is "inconclusive".

    Example:
        >>> grade(0.85, 0.59, 0.80), grade(0.85, 0.59, 0.63), grade(0.85, 0.59, 0.08), grade(0.3, 0.59, 0.9)
        ('strong', 'moderate', 'inconclusive', 'no better than chance')
    """
    own = _strength(r, chance)
    if own not in ("weak", "moderate", "strong") or agreement is None:
        return own
    ref = _strength(agreement, chance)
    if ref not in ("weak", "moderate", "strong"):
        return "inconclusive"
    return min(own, ref, key=GRADES.index)


@dataclass
class FaithfulnessReport:
    """Agreement of attention-derived token importance with gradient and erasure importance.

    Attributes:
        correlations: ``{method: {reference: {"spearman": r, "kendall": t}}}``.
        importances: ``{method: (L,) tensor}`` over all tokens; references likewise in ``references``.
        positions: the token positions scored (specials excluded). tokens: all tokens, or None.
        skipped: ``{method: reason}`` for methods not computed (e.g. flow refused on a long input).
        constant: methods whose importance is the same for every scored token (no ranking; their
            correlations are reported as 0).
        reference_agreement: Spearman/Kendall between the two references.
        chance: the :func:`chance_band` for this number of tokens.
        target: what scalar was explained.
        attn: the maps ``(layers, H, L, L)`` the importances came from (set by :func:`evaluate`).
    """

    correlations: dict
    importances: dict
    references: dict
    positions: list[int]
    tokens: list[str] | None = None
    skipped: dict = field(default_factory=dict)
    constant: list[str] = field(default_factory=list)
    reference_agreement: dict = field(default_factory=dict)
    chance: dict = field(default_factory=dict)
    target: str = ""
    timings: dict = field(default_factory=dict)
    attn: torch.Tensor | None = None

    def best(self, reference: str = "erasure") -> tuple[str, float] | None:
        """The method with the highest Spearman correlation against ``reference``, and that correlation."""
        vals = [(m, c[reference]["spearman"]) for m, c in self.correlations.items()
                if reference in c and m != "uniform" and not math.isnan(c[reference]["spearman"])]
        return max(vals, key=lambda t: t[1]) if vals else None

    def verdict_grade(self) -> str:
        """The grade behind :meth:`verdict` (one of :data:`GRADES`, see :func:`grade`)."""
        ref = "erasure" if "erasure" in self.references else next(iter(self.references), None)
        b = self.best(ref) if ref else None
        if b is None:
            return "undefined"
        ra = self.reference_agreement.get("spearman") if len(self.references) >= 2 else None
        return grade(b[1], self.chance.get("spearman", 0.0), ra)

    def verdict(self) -> str:
        """How far attention explains this output on this input, in words that follow the numbers.

        Names the method that ranks tokens most like leave-one-out erasure, its correlations, the sample size
        (scored tokens) and the chance band, the two references' agreement, and the :meth:`verdict_grade`
        (thresholds in :func:`grade`; "strongly" only when the method and the two references all agree
        strongly, beyond chance)."""
        ref = "erasure" if "erasure" in self.references else next(iter(self.references), None)
        b = self.best(ref) if ref else None
        if b is None:
            return "no attention-derived importance could be compared."
        m, r = b
        c = self.correlations[m][ref]
        ch = self.chance.get("spearman", 0.0)
        n = len(self.positions)
        k = sum(1 for x in self.correlations if x != "uniform")
        others = [x for x in self.references if x != ref]
        vs_other = "".join(f"; vs {LABELS.get(o, o)} {self.correlations[m][o]['spearman']:+.2f}" for o in others
                           if o in self.correlations[m] and not math.isnan(self.correlations[m][o]["spearman"]))
        text = (f"{LABELS.get(m, m)} is the closest of {k} method{'s' * (k != 1)} to {LABELS.get(ref, ref)} (Spearman "
                f"{r:+.2f}, Kendall {c['kendall']:+.2f}{vs_other}) over n = {n} tokens, where random rankings reach "
                f"|Spearman| <= {ch:.2f} (95% chance band)")
        g = self.verdict_grade()
        ra = self.reference_agreement.get("spearman") if others else None
        if g == "inconclusive":
            where = "inside the chance band" if abs(ra) <= ch else "inverted"
            text += (f"; but the two references agree only at Spearman {ra:+.2f} ({where}), so they disagree about "
                     "which tokens matter: the evidence is inconclusive, read both columns")
            return text + "."
        if ra is not None and not math.isnan(ra) and _strength(r, ch) != g and g in ("weak", "moderate"):
            text += (f"; the references agree with each other at Spearman {ra:+.2f} ({_strength(ra, ch)}), which "
                     "caps the verdict")
        return text + f": attention explains this output {_ADVERB[g]}."

    def rows(self) -> list[dict]:
        """Table rows: ``{"method", "label", "<reference>_spearman", "<reference>_kendall", "note"}``."""
        out = []
        for m in list(self.correlations) + [k for k in self.skipped if k not in self.correlations]:
            row = {"method": m, "label": LABELS.get(m, m), "note": ""}
            for ref in self.references:
                c = self.correlations.get(m, {}).get(ref)
                row[f"{ref}_spearman"] = None if c is None else c["spearman"]
                row[f"{ref}_kendall"] = None if c is None else c["kendall"]
            if m in self.skipped:
                row["note"] = self.skipped[m]
            elif m in self.constant:
                row["note"] = "same importance for every token, no ranking: shown as 0"
            out.append(row)
        return out

    def table(self) -> str:
        """Plain-text table for the terminal."""
        refs = list(self.references)
        w = max([len(LABELS.get(r["method"], r["method"])) for r in self.rows()] + [28])
        short = {"gradient_x_input": "grad x input", "erasure": "erasure"}
        head1 = " " * w + "".join(f"  {'vs ' + short.get(r, r)[:19]:^21}  " for r in refs)
        head2 = f"{'attention-derived importance':<{w}}" + "".join(f"  {'Spearman':>9} {'Kendall':>9}  " for _ in refs)
        lines = [self.target and f"explained: {self.target}", head1, head2]
        for r in self.rows():
            cells = ""
            for ref in refs:
                sp, kd = r[f"{ref}_spearman"], r[f"{ref}_kendall"]
                cells += "  " + (f"{sp:>+9.2f} {kd:>+9.2f}  " if sp is not None else f"{'n/a':>9} {'n/a':>9}  ")
            lines.append(f"{r['label']:<{w}}{cells}" + (f"  ({r['note']})" if r["note"] else ""))
        if len(refs) == 2 and self.reference_agreement:
            ra = self.reference_agreement
            lines.append(f"{'references: ' + LABELS[refs[0]] + ' vs ' + LABELS[refs[1]]}: Spearman "
                         f"{ra['spearman']:+.2f}, Kendall {ra['kendall']:+.2f}")
        if self.chance:
            lines.append(f"chance band ({self.chance['level']:.0%}, {self.chance['n']} tokens): |Spearman| <= "
                         f"{self.chance['spearman']:.2f}, |Kendall| <= {self.chance['kendall']:.2f}")
        lines.append(self.verdict())
        return "\n".join(x for x in lines if x)

    def markdown(self) -> str:
        """The table in Markdown (:func:`markdown_table` of :meth:`to_dict`)."""
        return markdown_table(self.to_dict())

    def to_dict(self) -> dict:
        """JSON-ready content (for the HTML report)."""
        def fl(t):
            return [None if (isinstance(v, float) and math.isnan(v)) else v for v in t.double().tolist()]
        return {
            "target": self.target,
            "tokens": self.tokens,
            "positions": self.positions,
            "references": {k: fl(v) for k, v in self.references.items()},
            "importances": {k: fl(v) for k, v in self.importances.items()},
            "rows": self.rows(),
            "labels": {k: LABELS.get(k, k) for k in list(self.references) + list(self.importances)},
            "reference_agreement": self.reference_agreement,
            "chance": self.chance,
            "verdict": self.verdict(),
            "verdict_grade": self.verdict_grade(),
        }


def markdown_table(d: dict, *, summary: bool = False) -> str:
    """A :meth:`FaithfulnessReport.to_dict` (e.g. kept as JSON) as a Markdown table; with ``summary``, followed by
    the chance band and the references' agreement with each other.

    Example:
        >>> import torch
        >>> rep = compare({"rollout": torch.tensor([0.1, 0.2, 0.3, 0.4])}, {"erasure": torch.tensor([1., 2., 3., 4.])})
        >>> markdown_table(rep.to_dict()).splitlines()[2]
        '| rollout | +1.00 | +1.00 |  |'
    """
    refs = list(d["references"])
    labels = d.get("labels", {})
    head = "| attention-derived importance | " + " | ".join(
        f"Spearman vs {labels.get(r, r)} | Kendall vs {labels.get(r, r)}" for r in refs) + " | note |"
    lines = [head, "|---|" + "---:|" * (2 * len(refs)) + "---|"]
    for r in d["rows"]:
        cells = []
        for ref in refs:
            sp, kd = r[f"{ref}_spearman"], r[f"{ref}_kendall"]
            cells += [f"{sp:+.2f}" if sp is not None else "n/a", f"{kd:+.2f}" if kd is not None else "n/a"]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r.get('note') or ''} |")
    text = "\n".join(lines)
    if summary:
        ch, ra = d.get("chance") or {}, d.get("reference_agreement") or {}
        if ch:
            text += (f"\n\nChance band ({ch['level']:.0%}, {ch['n']} tokens): |Spearman| <= {ch['spearman']:.2f}, "
                     f"|Kendall| <= {ch['kendall']:.2f}")
        if ra and len(refs) == 2:
            text += (f"; the two references agree with each other at Spearman {ra['spearman']:+.2f}, Kendall "
                     f"{ra['kendall']:+.2f}")
        text += f". Verdict: {d.get('verdict', '')}"
    return text


def compare(importances: dict, references: dict, positions: Sequence[int] | None = None, tokens=None,
            target: str = "", skipped: dict | None = None, level: float = 0.95) -> FaithfulnessReport:
    """Rank-correlate each attention-derived importance with each reference over ``positions``.

    Args:
        importances: ``{method: (L,) values}`` (None values are listed as skipped).
        references: ``{name: (L,) values}``, e.g. gradient x input and erasure.
        positions: token positions to score (default all).
        tokens: token strings for display.
        target: description of the explained scalar.
        skipped: ``{method: reason}`` for methods that were not computed.

    Returns:
        :class:`FaithfulnessReport`.
    """
    if not references:
        raise ValueError("references is empty; pass at least one reference importance, e.g. {'erasure': ...}.")
    refs = {k: _vec(v, f"references[{k!r}]") for k, v in references.items()}
    L = next(iter(refs.values())).numel()
    imps = {}
    skipped = dict(skipped or {})
    for k, v in importances.items():
        if v is None:
            skipped.setdefault(k, "not computed")
            continue
        imps[k] = _vec(v, f"importances[{k!r}]")
    for name, v in list(refs.items()) + list(imps.items()):
        if v.numel() != L:
            raise ValueError(f"{name} has {v.numel()} values but the first reference has {L}; give one per token.")
    pos = list(range(L)) if positions is None else [int(p) for p in positions]
    if len(pos) < 3:
        raise ValueError(
            f"need at least 3 scored tokens for a rank correlation; got {len(pos)} (positions={pos}). Use a longer "
            "input."
        )
    if any(not 0 <= p < L for p in pos):
        raise ValueError(f"positions {pos} out of range for {L} tokens.")
    idx = torch.tensor(pos)
    refs = {k: _snap(v) for k, v in refs.items()}
    imps = {k: _snap(v) for k, v in imps.items()}
    corr, constant = {}, []
    for m, v in imps.items():
        vs = v[idx]
        is_const = bool((vs == vs[0]).all())
        if is_const:
            constant.append(m)
        corr[m] = {}
        for r, rv in refs.items():
            if is_const:
                corr[m][r] = {"spearman": 0.0, "kendall": 0.0}
            else:
                corr[m][r] = {"spearman": spearman(vs, rv[idx]), "kendall": kendall(vs, rv[idx])}
    agree = {}
    if len(refs) >= 2:
        (_, a), (_, b) = list(refs.items())[:2]
        agree = {"spearman": spearman(a[idx], b[idx]), "kendall": kendall(a[idx], b[idx])}
    return FaithfulnessReport(
        correlations=corr, importances=imps, references=refs, positions=pos, tokens=tokens, skipped=skipped,
        constant=constant, reference_agreement=agree, chance=chance_band(len(pos), level), target=target,
    )


# ------------------------------------------------------------------------------------------ with a model


def _is_classifier(model) -> bool:
    name = type(model).__name__
    return name.endswith("ForSequenceClassification")


def _uniform_like(attn: torch.Tensor) -> torch.Tensor:
    """Uniform weights over the keys each row could see (nonzero weight), (layers, H, L, S)."""
    vis = (attn > 0).double()
    return vis / vis.sum(-1, keepdim=True).clamp(min=1)


def attention_importances(attn: torch.Tensor, query, grads: torch.Tensor | None = None,
                          methods: Sequence[str] = METHODS, flow_max_seconds: float = _m.FLOW_MAX_SECONDS):
    """``({method: (L,) importance}, {method: reason skipped})`` from one input's maps ``(layers, H, L, L)``.

    ``query`` is the row read by the output: an int (0 for [CLS]-pooled classifiers) or ``"mean"``
    (mean-pooled encoders); ``grads`` (same shape as ``attn``) enables gradient x attention.
    """
    a = _m.check_maps(attn, square=True).double()
    out, skipped = {}, {}
    L = a.shape[-1]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}.")
        if m == "raw_last":
            out[m] = _m.token_importance(_m.fuse_heads(a[-1:])[0], query)
        elif m == "raw_mean":
            out[m] = _m.token_importance(_m.fuse_heads(a).mean(0), query)
        elif m == "rollout":
            out[m] = _m.token_importance(_m.rollout(a), query)
        elif m == "flow":
            sources = None if query == "mean" else [query]
            est = _m.flow_cost(a.shape[0], L, L if sources is None else 1)
            if flow_max_seconds is not None and est > flow_max_seconds:
                skipped[m] = (f"refused: exact max-flow over {L} tokens x {a.shape[0]} layers would take ~{est:.0f} s "
                              f"(> {flow_max_seconds:g} s); see methods.flow")
                continue
            f = _m.flow(a, sources=sources, max_seconds=None)
            out[m] = _m.token_importance(f, "mean" if sources is None else 0)
        elif m == "grad_attention":
            if grads is None:
                skipped[m] = "needs gradients of a scalar output (classifier, or a pair for similarity)"
                continue
            # R - I: the identity (residual stream) is the same for every token and would swamp attention's part
            out[m] = _m.token_importance(_m.gradient_x_attention(a, grads, include_identity=False), query)
        elif m == "uniform":
            out[m] = _m.token_importance(_m.rollout(_uniform_like(a)), query)
    return out, skipped


def evaluate(model, tokenizer, text: str, *, pair: str | None = None, kind: str | None = None,
             label: int | None = None, methods: Sequence[str] = METHODS, max_tokens: int = 128,
             flow_max_seconds: float = _m.FLOW_MAX_SECONDS, eps: float = 1e-2) -> FaithfulnessReport:
    """Run the faithfulness comparison for one input of a Hugging Face model.

    Args:
        model: a transformers encoder (``last_hidden_state``; e.g. :func:`salience.models.minilm`) or a
            ``...ForSequenceClassification`` model. It is switched to salience attention if needed.
        tokenizer: its tokenizer.
        text: the input.
        pair: a second sentence: explain the cosine similarity of the two mean-pooled embeddings.
        kind: ``"classifier"``, ``"similarity"`` or ``"shift"`` (default: from the model and ``pair``).
        label: the class explained by a classifier (default: the predicted one).
        methods: attention-derived importances to compute (see :data:`METHODS`).
        max_tokens: longest input accepted (erasure runs one forward pass per token, batched).
        eps: relative step of the central difference used by the ``"shift"`` kind.

    Returns:
        :class:`FaithfulnessReport` with references ``gradient_x_input`` and ``erasure``.

    Example:
        >>> import salience.models
        >>> from salience.interpret.faithfulness import evaluate
        >>> model, tok = salience.models.minilm()
        >>> rep = evaluate(model, tok, "A man is playing a guitar.", pair="Someone plays music.")
        >>> sorted(rep.references)
        ['erasure', 'gradient_x_input']
    """
    import time


    t0 = time.perf_counter()
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string; got {text!r}.")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise ValueError(f"pair must be a non-empty string or None; got {pair!r}.")
    if kind is None:
        kind = "classifier" if _is_classifier(model) else ("similarity" if pair is not None else "shift")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")
    if kind == "similarity" and pair is None:
        raise ValueError("kind='similarity' needs pair= (the second sentence).")
    if kind == "classifier" and not _is_classifier(model):
        raise ValueError(f"kind='classifier' needs a ...ForSequenceClassification model; got {type(model).__name__}.")
    if getattr(model.config, "_attn_implementation", None) != "salience":
        from ..integrations import hf as _hf

        _hf.enable(model)
    enc = tokenizer(text, return_tensors="pt", truncation=True)
    ids, am = enc["input_ids"], enc["attention_mask"]
    L = ids.shape[1]
    if L > max_tokens:
        raise ValueError(
            f"text has {L} tokens, above max_tokens={max_tokens}: erasure needs one forward pass per token "
            "and gradient x attention materialises every layer's L x L weights. Shorten the text or raise max_tokens."
        )
    special = tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True)
    positions = [i for i in range(L) if not special[i]]
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    emb_layer = model.get_input_embeddings()
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    from ..models import mean_pool

    def run(E, mask, **kw):
        ex = {k: v.expand(E.shape[0], -1)[:, : E.shape[1]] for k, v in extra.items()}
        return model(inputs_embeds=E, attention_mask=mask, **ex, **kw)

    def sentence(E, mask):
        return torch.nn.functional.normalize(mean_pool(run(E, mask).last_hidden_state, mask), dim=-1)

    with torch.no_grad():
        E0 = emb_layer(ids).detach()
    other = None
    if kind == "similarity":
        penc = tokenizer(pair, return_tensors="pt", truncation=True)
        with torch.no_grad():
            other = torch.nn.functional.normalize(
                mean_pool(model(**penc).last_hidden_state, penc["attention_mask"]), dim=-1)

    def scalar(E, mask):
        if kind == "classifier":
            return run(E, mask).logits[:, label_]
        return (sentence(E, mask) * other).sum(-1)

    label_ = label
    if kind == "classifier":
        with torch.no_grad():
            logits = run(E0, am).logits[0]
        if label_ is None:
            label_ = int(logits.argmax())
        elif isinstance(label_, bool) or not isinstance(label_, int) or not 0 <= label_ < logits.numel():
            raise ValueError(f"label must be a class index in [0, {logits.numel()}); got {label!r}.")
    # gradients for the input and the attention only: parameters are frozen for the duration
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _evaluate(model, kind, label_, methods, flow_max_seconds, eps, E0, am, L, positions, tokens, pair,
                         sentence, scalar, t0)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _evaluate(model, kind, label_, methods, flow_max_seconds, eps, E0, am, L, positions, tokens, pair, sentence,
              scalar, t0):
    import time

    from .capture import capture, capture_with_grad

    want_grad_attn = "grad_attention" in methods and kind != "shift"
    grads_a = None
    timings = {}
    # 1) the forward pass with gradients: F, dF/dE and (if asked) dF/dA
    if kind == "shift":
        with torch.no_grad(), capture(model) as rec:
            e0 = sentence(E0, am)
        attn = rec.result().stack()
        # directional derivative of the embedding along each token's own input vector, central difference
        n = len(positions)
        Eb = E0.expand(2 * n, -1, -1).clone()
        for r, p in enumerate(positions):
            Eb[r, p] *= 1 + eps
            Eb[n + r, p] *= 1 - eps
        with torch.no_grad():
            eb = sentence(Eb, am.expand(2 * n, -1))
        d = (eb[:n] - eb[n:]) / (2 * eps)
        gxi = torch.zeros(L, dtype=torch.float64)
        gxi[positions] = d.norm(dim=-1).double()
        f0 = None
    else:
        E = E0.clone().requires_grad_(True)
        if want_grad_attn:
            with capture_with_grad(model) as grec:
                f = scalar(E, am)[0]
                f.backward()
            attn = grec.maps()
            grads_a = torch.stack([g[0] for g in grec.grads()])
        else:
            with capture(model) as rec:
                f = scalar(E, am)[0]
            f.backward()
            attn = rec.result().stack()
        gxi = (E.grad[0] * E0[0]).sum(-1).abs().double()
        f0 = float(f.detach())
    timings["gradient"] = time.perf_counter() - t0
    # 2) leave-one-out erasure, one batched forward pass
    t1 = time.perf_counter()
    keep = torch.ones(len(positions), L, dtype=torch.bool)
    for r, p in enumerate(positions):
        keep[r, p] = False
    Ed = E0.expand(len(positions), -1, -1)[keep].view(len(positions), L - 1, -1)
    amd = am.expand(len(positions), -1)[keep].view(len(positions), L - 1)
    with torch.no_grad():
        if kind == "shift":
            vals = 1 - (sentence(Ed, amd) * e0).sum(-1)
        else:
            vals = (scalar(Ed, amd) - f0).abs()
    erasure = torch.zeros(L, dtype=torch.float64)
    erasure[positions] = vals.double()
    timings["erasure"] = time.perf_counter() - t1
    # 3) attention-derived importances and the table
    t2 = time.perf_counter()
    query = 0 if kind == "classifier" else "mean"
    imps, skipped = attention_importances(attn, query, grads_a, methods, flow_max_seconds)
    if "grad_attention" in methods and kind == "shift":
        skipped["grad_attention"] = ("needs a scalar with a gradient: pass pair= (similarity) or use a classifier; "
                                     "the embedding-shift target has zero gradient at the input")
    timings["methods"] = time.perf_counter() - t2
    if kind == "classifier":
        names = getattr(model.config, "id2label", {}) or {}
        target = f"logit of class {label_} ({names.get(label_, label_)})"
    elif kind == "similarity":
        target = f"cosine similarity with {pair!r} (f = {f0:.3f})"
    else:
        target = "sentence-embedding shift (erasure: 1 - cos; gradient: |d embedding / d token scale|)"
    rep = compare(imps, {"gradient_x_input": gxi, "erasure": erasure}, positions=positions, tokens=tokens,
                  target=target, skipped=skipped)
    rep.timings = timings
    rep.attn = attn
    return rep


def main(argv=None) -> int:
    """``python -m salience.interpret.faithfulness TEXT [--pair B] --json PATH``: the faithfulness table of the
    embedded MiniLM for one input, kept as JSON (docs/interpret.md's table renders from it)."""
    import argparse
    import json
    import os
    import platform
    import time

    p = argparse.ArgumentParser(prog="python -m salience.interpret.faithfulness", description=main.__doc__)
    p.add_argument("text")
    p.add_argument("--pair", default=None, help="second sentence (cosine similarity of the embeddings)")
    p.add_argument("--json", required=True, help="where to write the result")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..cli import quiet_transformers
    from ..models import minilm

    with quiet_transformers():
        model, tok = minilm()
    t0, c0 = time.perf_counter(), time.process_time()
    rep = evaluate(model, tok, a.text, pair=a.pair)
    d = rep.to_dict()
    d["meta"] = {"command": "python -m salience.interpret.faithfulness " + " ".join(
                     repr(x) if " " in x else x for x in (argv if argv is not None else __import__("sys").argv[1:])),
                 "text": a.text, "pair": a.pair, "seconds": round(time.perf_counter() - t0, 3),
                 "cpu_seconds": round(time.process_time() - c0, 3), "torch": torch.__version__,
                 "machine": platform.machine(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(d, f, indent=1)
    print(markdown_table(d, summary=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
