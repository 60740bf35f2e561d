"""``salience explain "TEXT"``: what a model attends to, as an HTML report, PNGs and a terminal summary.

Runs the model once with salience attention while :class:`salience.interpret.capture` records the maps
(no eager attention), then computes rollout, flow (when short enough), entropy and head roles, the
faithfulness table (attention importance vs gradient x input and leave-one-out erasure), and writes:

* ``DIR/report.html``: one self-contained page (model view, head view, matrix view, bars, tables);
* ``DIR/grid.png``, ``DIR/last_layer.png``, ``DIR/importance.png``, ``DIR/entropy.png``;
* ``DIR/maps.npz``: the recorded :class:`~salience.interpret.AttentionMaps`.

The default model is the embedded all-MiniLM-L6-v2 (``--model minilm``); ``--model PATH`` loads a local
transformers encoder, sequence classifier, causal LM (GPT-2, Llama...) or encoder-decoder model (T5, BART...).
Nothing is downloaded. The report switches between views on tabs: matrix, head view, all heads in colour, and
when they apply:

* **Sentence pair** (``--pair B``, encoders): A and B encoded together, cross-sentence attention;
* **Generation** (``--generate N``, causal LMs): each of N greedily generated tokens' attention over the prompt
  and the earlier output, step by step;
* **Cross-attention** (encoder-decoder models): decoder tokens (the model's greedy output, or ``--target``)
  by encoder tokens; the matrix and head views then show the encoder's self-attention.

Example:
    >>> from salience.explain import build_parser
    >>> args = build_parser().parse_args(["The cat sat.", "--layers", "0,5", "--method", "rollout,entropy"])
    >>> args.layers, args.method
    ([0, 5], ['rollout', 'entropy'])
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

__all__ = ["add_arguments", "run", "build_parser", "METHODS", "parse_layers", "parse_methods", "Progress", "model_kind"]

#: what ``--method`` accepts
METHODS = ("raw", "rollout", "flow", "grad", "entropy", "roles", "faithfulness")


def parse_layers(text: str):
    """``"all"`` -> None; ``"0,2,5"`` -> [0, 2, 5]; ``"1-3"`` -> [1, 2, 3]; negative indices count from the end."""
    if text is None or text.strip().lower() == "all":
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        try:
            out += list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--layers takes 'all', a comma list (0,2,5) or a range (1-3); got {text!r}.") from None
    if not out:
        raise argparse.ArgumentTypeError(f"--layers selects nothing: {text!r}.")
    return out


def parse_methods(text: str) -> list[str]:
    """``"all"`` or a comma list of :data:`METHODS`."""
    if text.strip().lower() == "all":
        return list(METHODS)
    out = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"--method takes 'all' or a comma list of {', '.join(METHODS)}; got {text!r}.")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the input text")
    p.add_argument("--model", default="minilm",
                   help="'minilm' (the embedded all-MiniLM-L6-v2, default) or a local transformers model directory: an "
                        "encoder, a classifier, a causal LM (see --generate) or an encoder-decoder model such as T5 "
                        "or BART (cross-attention view)")
    p.add_argument("--out", default="salience-report", help="output directory (default: ./salience-report)")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="layers to record: all (default), a list 0,2,5 or a range 1-3 (negative: from the end)")
    p.add_argument("--heads", type=parse_layers, default=None, help="heads to record (default all)")
    p.add_argument("--method", type=parse_methods, default=list(METHODS),
                   help=f"comma list of {', '.join(METHODS)}, or all (default)")
    p.add_argument("--pair", default=None,
                   help="a second sentence: explain the embedding similarity with it (encoders), and draw the pair encoded "
                        "together with its cross-sentence attention on report.html's Sentence pair tab (default: none)")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="generative models: greedy-decode N tokens after TEXT; a causal LM gets the step-by-step "
                        "Generation view, an encoder-decoder model the Cross-attention view over its output "
                        "(default: none for causal LMs, 20 for encoder-decoder models)")
    p.add_argument("--target", default=None,
                   help="encoder-decoder models: show cross-attention for this decoder text (teacher-forced) instead "
                        "of the model's own greedy output (default: none)")
    p.add_argument("--label", type=int, default=None, help="class to explain (classifiers; default: predicted)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage precision of the recorded maps")
    p.add_argument("--pool", type=int, default=1, help="store maps pooled over blocks of this many tokens")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="longest input for the faithfulness table (erasure costs one pass per token)")
    p.add_argument("--flow-seconds", type=float, default=10.0, help="refuse attention flow beyond this estimate")
    p.add_argument("--no-png", action="store_true", help="skip the matplotlib PNGs")
    p.add_argument("--words", action="store_true", help="report.html: merge ## wordpieces into words (keys summed, queries averaged, importances summed; default off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salience explain", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 24, stream=None):
        self.total, self.done, self.enabled, self.width = total, 0, enabled, width
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        n = int(self.width * self.done / self.total)
        bar = "#" * n + "." * (self.width - n)
        line = f"[{bar}] {self.done}/{self.total} {label} ({time.perf_counter() - self.t0:.1f} s)"
        if self.tty:
            self.stream.write("\r" + line.ljust(78) + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _check_model_arg(model_arg: str) -> None:
    if model_arg == "minilm":
        return
    path = Path(model_arg)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise SystemExit(
            f"salience explain: --model must be 'minilm' or a local transformers model directory with config.json; "
            f"got {model_arg!r} (nothing is downloaded)."
        )


def _check_indices(args, model) -> None:
    """``--layers`` and ``--heads`` against the model's counts (from its config), negative ones resolved from the
    end; a ValueError names the option, the model's count and the valid range."""
    cfg = getattr(model, "config", None)
    counts = {"layers": ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
              "heads": ("heads per layer", ("num_attention_heads", "n_head", "num_heads"))}
    for opt, (what, keys) in counts.items():
        sel = getattr(args, opt)
        n = next((getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), int)), None)
        if sel is None or n is None:
            continue
        bad = [i for i in sel if not -n <= i < n]
        if bad:
            raise ValueError(f"--{opt} {','.join(map(str, bad))} out of range: the model ({args.model}) has {n} "
                             f"{what}; use 0-{n - 1} (or -{n}..-1 from the end), e.g. --{opt} {n - 1}.")
        if opt == "layers":
            args.layers = sorted({i % n for i in sel})


#: how the messages name each kind of model
KIND_WORDS = {"encoder": "an encoder", "causal": "a causal LM", "seq2seq": "an encoder-decoder model"}


def model_kind(model) -> str:
    """``"seq2seq"`` (config.is_encoder_decoder), ``"causal"`` (class or config architecture ending in
    ``ForCausalLM`` / ``LMHeadModel``: GPT-2, Llama...) or ``"encoder"`` (encoders and classifiers).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> model_kind(NS(config=NS(is_encoder_decoder=True))), model_kind(NS(config=NS(architectures=["GPT2LMHeadModel"])))
        ('seq2seq', 'causal')
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        return "seq2seq"
    names = [type(model).__name__] + list(getattr(cfg, "architectures", None) or [])
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "causal"
    return "encoder"


def _generation_view(model, tok, inputs, args):
    from .interpret.generation import generation_attention

    cfg = model.config
    room = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(getattr(cfg, k, None), int)), None)
    P = inputs["input_ids"].shape[1]
    if room is not None and P + args.generate > room:
        raise ValueError(f"--generate {args.generate} after the {P} tokens of TEXT needs {P + args.generate} "
                         f"positions; the model ({args.model}) has {room}. Use --generate {max(1, room - P)} or less.")

    return generation_attention(model, inputs["input_ids"], tok, max_new_tokens=args.generate, layers=args.layers,
                                heads=args.heads)


def _generation_lines(g) -> list[str]:
    """Terminal lines: the generated text, and per step the earlier tokens the last recorded layer (mean of heads)
    attended to most."""
    out = [f"\ngenerated (greedy, {len(g.steps)} tokens): " + " ".join(repr(t) for t in g.tokens[g.prompt_length:]),
           f"each generated token's most-attended earlier tokens ({g.layer_names[-1] if g.layer_names else 'last layer'}, "
           "mean of heads):"]
    for t, s in enumerate(g.steps):
        r = s[-1].float().mean(0)
        top = torch.argsort(r, descending=True)[:3].tolist()
        out.append(f"  step {t:>2} {g.tokens[g.prompt_length + t]!r:>12}: "
                   + ", ".join(f"{g.tokens[j]!r} (pos {j}) {float(r[j]):.2f}" for j in top))
    return out


def _cross_view(model, tok, inputs, args):
    """The decoder's cross-attention over the encoder tokens: for ``--target`` teacher-forced on it, otherwise on
    the model's greedy output; row t is the decoder step that produced token t (labelled with that token)."""
    from .interpret.seq2seq import cross_attention

    ids = inputs["input_ids"]
    if args.target:
        tgt = tok(args.target, return_tensors="pt")["input_ids"][0]
        start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError(f"{args.model} has no decoder_start_token_id in its config; --target cannot be "
                             "teacher-forced (leave --target out to show the model's own output).")
        dec, produced = torch.cat([torch.tensor([int(start)]), tgt[:-1]])[None], tgt.tolist()
        how = "--target, teacher-forced"
    else:
        n = args.generate or 20
        kw = {}
        if getattr(model.generation_config, "pad_token_id", None) is None:
            eos = getattr(model.generation_config, "eos_token_id", None)
            kw["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)
        dec, produced = seq[:, :-1], seq[0, 1:].tolist()
        how = f"the model's greedy output, {len(produced)} token(s)"
    ca = cross_attention(model, dec, ids, tokenizer=tok, attention_mask=inputs.get("attention_mask"))
    ca.target = tok.convert_ids_to_tokens(produced)
    ca.note = f"rows: the decoder step that produced each token ({how}); columns: the encoder's tokens"
    return ca


def _cross_lines(ca) -> list[str]:
    r = ca.maps[-1].float().mean(0)  # (T, S), last decoder layer, mean of heads
    out = ["\ndecoder output: " + " ".join(ca.target),
           f"cross-attention, most-attended source token per decoder token ({ca.layer_names[-1]}, mean of heads):"]
    for t, row in enumerate(r):
        j = int(torch.argmax(row))
        out.append(f"  {t:>2} {ca.target[t]!r:>12} <- {ca.source[j]!r} (pos {j}) {float(row[j]):.2f}")
    return out


def _load(model_arg: str):
    from .cli import quiet_transformers

    with quiet_transformers():
        return _load_model(model_arg)


def _load_model(model_arg: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .integrations import hf

    if model_arg == "minilm":
        from .models import minilm

        return minilm()
    _check_model_arg(model_arg)
    path = Path(model_arg)
    import json

    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(cfg, "is_encoder_decoder", False):
        cls = AutoModelForSeq2SeqLM
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        cls = AutoModelForCausalLM
    elif any(a.endswith("ForSequenceClassification") for a in arch):
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModel
    model = cls.from_pretrained(str(path), attn_implementation="salience", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    hf.name_modules(model)
    return model, tok


def run(args) -> int:
    from .interpret import capture
    from .interpret import methods as M
    from .interpret.faithfulness import evaluate
    from .interpret.render import html

    text = args.text
    if not isinstance(text, str) or not text.strip():
        print("salience explain: error: TEXT is empty; pass the text to explain in quotes.", file=sys.stderr)
        return 2
    if args.pool < 1:
        print(f"salience explain: error: --pool must be >= 1; got {args.pool}.", file=sys.stderr)
        return 2
    if args.max_tokens < 1 or not args.flow_seconds >= 0:
        raise ValueError(f"--max-tokens must be >= 1 and --flow-seconds >= 0; got {args.max_tokens} and "
                         f"{args.flow_seconds}.")
    gen, target = getattr(args, "generate", None), getattr(args, "target", None)
    if gen is not None and gen < 1:
        raise ValueError(f"--generate takes the number of tokens to generate, at least 1; got {gen}.")
    if target is not None and not target.strip():
        raise ValueError("--target is empty; give the decoder text in quotes (or leave it out to show the model's "
                         "own greedy output).")
    _check_model_arg(args.model)
    methods = args.method
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for the report (default: salience-report).")
    out.mkdir(parents=True, exist_ok=True)
    steps = 4 + ("faithfulness" in methods or "grad" in methods) + (not args.no_png)
    bar = Progress(steps, enabled=not args.quiet)

    model, tok = _load(args.model)
    kind = model_kind(model)
    if gen is not None and kind == "encoder":
        raise ValueError(f"--generate needs a causal LM or an encoder-decoder model; {args.model} is an encoder "
                         f"({type(model).__name__}). Leave --generate out, or pass --model DIR of a generative model.")
    if target is not None and kind != "seq2seq":
        raise ValueError(f"--target is the decoder text of an encoder-decoder model; {args.model} is {KIND_WORDS[kind]}.")
    if kind != "encoder":  # faithfulness is built for encoders and classifiers; the view step replaces it
        bar.total += 1 - ("faithfulness" in methods or "grad" in methods)
    _check_indices(args, model)
    bar.step(f"loaded {args.model}")

    limit = getattr(tok, "model_max_length", None)
    limit = limit if isinstance(limit, int) and limit < 10**6 else getattr(model.config, "max_position_embeddings", None)
    enc = tok(text, return_tensors="pt", truncation=limit is not None, max_length=limit)
    ids = enc["input_ids"]
    L = ids.shape[1]
    if args.pool > L:
        raise ValueError(f"--pool {args.pool} is more than the {L} tokens of the input; use at most --pool {L} "
                         "(or the default 1 for rollout, flow and faithfulness).")
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    n_text = len(tok(text)["input_ids"]) if limit is not None else L
    # generative models take only ids and mask (a BERT tokenizer adds token_type_ids); an encoder-decoder model's
    # encoder runs alone here (its self-attention is the report's main maps)
    inputs = enc if kind == "encoder" else {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    runner = model.get_encoder() if kind == "seq2seq" else model
    with torch.no_grad(), capture(model, layers=args.layers, heads=args.heads, dtype=args.dtype,
                                  pool=args.pool) as rec:
        runner(**inputs)
    blocks = [" ".join(tokens[i:i + args.pool]) for i in range(0, L, args.pool)]  # --pool: one label per block
    maps = rec.result(tokens=tokens if args.pool == 1 else blocks)
    if not maps.maps:
        print("salience explain: no attention was recorded (check --layers).", file=sys.stderr)
        return 1
    maps.save(out / "maps.npz")
    attn = maps.stack()  # (layers, H, L', S')
    names = [e["name"] for e in maps.entries]
    layer_ids = [e["layer"] for e in maps.entries]
    bar.step(f"captured {len(maps.maps)} layer(s), {L} tokens")

    # --------------------------------------------------------------------------------- methods
    importances, notes = {}, []
    square = attn.shape[-1] == attn.shape[-2] and args.pool == 1
    special = set()
    if hasattr(tok, "get_special_tokens_mask"):
        sm = tok.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True)
        special = {i for i, s in enumerate(sm) if s}
    if square and "rollout" in methods:
        importances["rollout"] = M.token_importance(M.rollout(attn), "mean")
    if square and "flow" in methods:
        est = M.flow_cost(attn.shape[0], attn.shape[-1], attn.shape[-1])
        if est <= args.flow_seconds:
            importances["flow"] = M.token_importance(M.flow(attn, max_seconds=None), "mean")
        else:
            notes.append(f"flow: refused, estimated {est:.0f} s for {L} tokens (> --flow-seconds {args.flow_seconds:g}); "
                         "rollout shown instead")
    if not square and ("rollout" in methods or "flow" in methods):
        notes.append("rollout/flow need all rows of every layer at full resolution (no --pool)")
    received = M.fuse_heads(attn).mean(1)  # (layers, S): attention each key receives
    importances["attention received (mean)"] = received.mean(0)
    ent = M.entropy(attn)
    roles = M.head_roles(attn) if ("roles" in methods and square) else None
    bar.step("methods")

    faith = None
    if ("faithfulness" in methods or "grad" in methods) and kind != "encoder":
        notes.append(f"faithfulness: not computed for {KIND_WORDS[kind]} (built for encoders and classifiers)")
    elif ("faithfulness" in methods or "grad" in methods) and args.pool == 1:
        if L > args.max_tokens:
            notes.append(f"faithfulness: skipped, {L} tokens > --max-tokens {args.max_tokens}")
        else:
            fm = ["raw_last", "raw_mean", "rollout", "uniform"]
            fm += ["flow"] if "flow" in methods else []
            fm += ["grad_attention"] if ("grad" in methods or "faithfulness" in methods) else []
            fm = [m for m in ("raw_last", "raw_mean", "rollout", "flow", "grad_attention", "uniform") if m in fm]
            try:
                faith = evaluate(model, tok, text, pair=args.pair, label=args.label, methods=fm,
                                 max_tokens=args.max_tokens, flow_max_seconds=args.flow_seconds)
            except ValueError as e:
                notes.append(f"faithfulness: skipped ({e})")
            if faith is not None:
                for k in ("gradient_x_input", "erasure"):
                    importances[k] = faith.references[k]
                if "grad_attention" in faith.importances:
                    importances["gradient x attention"] = faith.importances["grad_attention"]
        bar.step("faithfulness")

    # ---------------------------------------------------------------------------------- files
    files = [out / "maps.npz"]
    if not args.no_png:
        try:
            from .interpret.render import png

            files.append(png.save(png.layer_head_grid(attn, title="attention per layer x head",
                                                      layer_names=[f"L{i}" for i in layer_ids]), out / "grid.png"))
            files.append(png.save(png.head_heatmap(M.fuse_heads(attn[-1:])[0], tokens=tokens if square else None,
                                                   title=f"{names[-1]}: mean of heads"), out / "last_layer.png"))
            bars_ = {k: v for k, v in importances.items() if k in ("rollout", "flow", "gradient_x_input", "erasure")}
            files.append(png.save(png.importance_bars(bars_ or importances, tokens=tokens,
                                                      title="token importance (each scaled to its max)"),
                                  out / "importance.png"))
            files.append(png.save(png.head_matrix(ent, title="entropy per head (nats)", label="nats"),
                                  out / "entropy.png"))
        except ImportError as e:
            notes.append(f"PNGs skipped: {e}")
        bar.step("PNGs")
    summary = f"{L} tokens" + (f" (truncated from {n_text})" if n_text > L else "") + f"; {maps.summary()}"
    if kind == "seq2seq":
        summary += "; matrix and head views: the encoder's self-attention"
    views, lines = [], []
    if args.pair and kind != "encoder":
        notes.append(f"pair view: built for encoders (sentence pairs), not {KIND_WORDS[kind]}; skipped")
    elif args.pair:  # the pair encoded together (tokenizer(text, pair)): A and B side by side, cross attention
        from .interpret.pair import pair_attention

        try:
            views.append(pair_attention(model, tok, text, args.pair, layers=args.layers, heads=args.heads))
        except ValueError as e:
            notes.append(f"pair view: skipped ({e})")
    if kind == "causal" and gen:
        g = _generation_view(model, tok, inputs, args)
        views.append(g)
        lines = _generation_lines(g)
        bar.step(f"generated {len(g.steps)} token(s)")
    elif kind == "causal":
        bar.step("no generation (add --generate N for the Generation view)")
    if kind == "seq2seq":
        ca = _cross_view(model, tok, inputs, args)
        views.append(ca)
        lines = _cross_lines(ca)
        bar.step(f"cross-attention, {len(ca.target)} decoder token(s)")
    files.insert(0, html.report(maps, maps.tokens, out / "report.html", importances=importances, faithfulness=faith,
                                entropy=ent, layer_names=names, title=f"salience explain: {text[:80]}",
                                summary=summary, merge_wordpieces=bool(getattr(args, "words", False)) and square,
                                views=views))
    bar.step("HTML report")

    # ------------------------------------------------------------------------------ terminal
    p = print
    p(f"\n{args.model}: {summary}")
    p("\nmost-attended tokens per layer (attention received, mean over heads and rows):")
    for i, la in enumerate(layer_ids):
        r = received[i]
        top = torch.argsort(r, descending=True)[:4].tolist()
        blk = args.pool
        lab = [f"{tokens[j * blk] if j * blk < len(tokens) else j}{'*' if j * blk in special else ''} {float(r[j]):.2f}"
               for j in top]
        p(f"  layer {la:>2}: " + ", ".join(lab))
    if special:
        p("  (* special token)")
    p("\nentropy per head (nats; low = focused):")
    p("          " + " ".join(f"{'h' + str(h):>5}" for h in range(ent.shape[1])))
    for i, la in enumerate(layer_ids):
        p(f"  layer {la:>2} " + " ".join(f"{float(x):5.2f}" for x in ent[i]))
    if roles is not None:
        best = roles.best(0.5)
        if best:
            p("\nhead roles (score >= 0.5):")
            p("  " + ", ".join(f"L{layer_ids[la]}.h{h} {role} {s:.2f}" for la, h, role, s in best[:12]))
    if "rollout" in importances:
        r = importances["rollout"]
        top = [j for j in torch.argsort(r, descending=True).tolist() if j not in special][:5]
        p("\nrollout, top tokens: " + ", ".join(f"{tokens[j]} {float(r[j]):.3f}" for j in top))
    if "gradient x attention" in importances:
        r = importances["gradient x attention"]
        top = [j for j in torch.argsort(r, descending=True).tolist() if j not in special][:5]
        p("gradient x attention (the part attention adds, R - I), top tokens: "
          + ", ".join(f"{tokens[j]} {float(r[j]):.2g}" for j in top))
    if faith is not None:
        p("\nfaithfulness:")
        p(faith.table())
    for line in lines:
        p(line)
    if views:
        p("report.html views: matrix, head view" + ", all heads in colour" * (ent.shape[1] > 1) + "".join(
            f", {v.as_view().label.lower()}" for v in views))
    for n in notes:
        p(f"note: {n}")
    p("\nwrote: " + ", ".join(str(f) for f in files))
    return 0
