"""Benchmark a real model with eager, SDPA and salience attention: ``salience bench --model minilm``.

:func:`run_model_bench` loads all-MiniLM-L6-v2 offline (:func:`salience.models.minilm`), builds batches of
real English text at each requested sequence length, runs the same forward pass with each attention
implementation (interleaved, so that load on the machine hits them alike) and reports the median time,
tokens per second, the speed relative to SDPA and the largest difference of the sentence embeddings from
SDPA's.

Text: short paragraphs written for this benchmark (below), joined and cut at the target length. Each batch
mixes full-length rows with shorter ones (about 60-100% of the length), so the padding mask is exercised as
in real batched inference.

Example:
    >>> from salience.integrations.hf_bench import run_model_bench
    >>> rows = run_model_bench(lengths=(16,), batch_size=2, repeats=1, warmup=0, show=False)
    >>> sorted({r["impl"] for r in rows})
    ['eager', 'salience', 'sdpa']

Command line (until ``salience bench --model minilm`` is wired):
``python -m salience.integrations.hf_bench --lengths 128 512``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

__all__ = ["MODELS", "IMPLS", "TEXT", "make_batch", "run_model_bench", "format_table", "main"]

MODELS = ("minilm",)
IMPLS = ("eager", "sdpa", "salience")

#: paragraphs written for this benchmark (plain English on varied topics)
TEXT = (
    "Attention lets a network decide which parts of its input matter for the word it is producing. "
    "Each query is compared with every key, the scores become weights through a softmax, and the output "
    "is the weighted sum of the values.",
    "The river had risen overnight, and by morning the lower fields were under a sheet of brown water. "
    "Farmers gathered at the bridge to watch the current carry branches, fence posts and a lost boat downstream.",
    "She opened the old notebook and found her grandfather's recipes written in pencil, the margins full of "
    "corrections. Some dishes needed ingredients that no shop in town had sold for thirty years.",
    "A good benchmark measures one thing at a time, repeats the measurement, and reports the spread as well "
    "as the median. Numbers without the command that produced them are hard to trust.",
    "The train left the station ten minutes late, but the driver made up the time on the long straight "
    "stretch past the lake. Most passengers were asleep before the first tunnel.",
    "Volcanic soils are often fertile because they release minerals slowly as they weather. Vineyards on "
    "the slopes of old volcanoes are prized for the character of their wines.",
    "When the library moved to the new building, volunteers carried boxes of books along the high street "
    "for two whole days. Children helped by sorting the picture books by colour.",
    "Memory bandwidth, not arithmetic, limits many programs on modern processors. Reorganising loops so "
    "that data is reused while it is still in cache can make code several times faster.",
    "The committee postponed its decision until the spring, asking for a clearer estimate of costs and a "
    "survey of the residents who would be affected by the new road.",
    "Bees communicate the direction and distance of flowers through a dance on the comb. The angle of the "
    "dance relative to vertical encodes the angle of the flowers relative to the sun.",
    "He practised the same four bars of the sonata every evening for a month, slowly at first and then at "
    "tempo, until his fingers found the notes without thinking.",
    "Sentence embeddings map a piece of text to a vector so that texts with similar meaning lie close "
    "together. They are used for search, clustering and finding duplicate questions.",
    "The storm knocked out power across the valley, and for three nights the village cooked on camping "
    "stoves and read by candlelight. Nobody complained about the quiet.",
    "Glaciers carve wide U-shaped valleys, while rivers cut narrow V-shaped ones. Geologists read the "
    "history of a landscape from these shapes and the rocks left behind.",
    "The museum's new exhibition pairs medieval maps with satellite images of the same coastlines, showing "
    "how harbours have silted up and islands have joined the mainland.",
    "Cooking rice well is mostly about the ratio of water to grain and about leaving the lid on. Letting "
    "the pot rest for ten minutes after the heat is off finishes the job.",
)


def _corpus() -> list[str]:
    return [p.strip() for p in TEXT]


def make_batch(tokenizer, length: int, batch_size: int, seed: int = 0, padded: bool = True):
    """A batch (dict of (B, length) tensors) of real text: the first half of the rows have ``length`` tokens,
    the rest 60-100% of ``length`` followed by padding (``padded=False``: every row full length).

    Example:
        >>> from transformers import AutoTokenizer
        >>> from salience.models import minilm_path
        >>> tok = AutoTokenizer.from_pretrained(minilm_path())
        >>> make_batch(tok, 32, 4)["input_ids"].shape
        torch.Size([4, 32])
    """
    if length < 4:
        raise ValueError(f"length must be >= 4 tokens; got {length}.")
    g = torch.Generator().manual_seed(seed)
    paras = _corpus()
    texts, targets = [], []
    for i in range(batch_size):
        start = int(torch.randint(len(paras), (1,), generator=g))
        short = padded and i >= (batch_size + 1) // 2
        target = int(length * (0.6 + 0.4 * float(torch.rand(1, generator=g)))) if short else length
        words, j, count = [], start, 0
        while count < target:  # count paragraph by paragraph (each well under the model's 512 limit)
            words.append(paras[j % len(paras)])
            count += len(tokenizer(words[-1], add_special_tokens=False)["input_ids"])
            j += 1
        texts.append(" ".join(words))
        targets.append(max(4, target))
    enc = [tokenizer(t, truncation=True, max_length=n, return_tensors="pt") for t, n in zip(texts, targets)]
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    mask = torch.zeros(batch_size, length, dtype=torch.long)
    tt = torch.zeros(batch_size, length, dtype=torch.long)
    pad_id = tokenizer.pad_token_id or 0
    ids.fill_(pad_id)
    for i, e in enumerate(enc):
        n = e["input_ids"].shape[1]
        ids[i, :n] = e["input_ids"][0]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def _embed(hidden, mask):
    m = mask.to(hidden.dtype).unsqueeze(-1)
    e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e.float(), dim=-1)


def run_model_bench(
    model: str = "minilm",
    lengths=(128, 512),
    batch_size: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    impls=IMPLS,
    dtype: str = "float32",
    threads: int | None = None,
    show: bool = True,
    out: str | None = None,
    padded: bool = True,
) -> list[dict]:
    """Time one forward pass of ``model`` per attention implementation and sequence length.

    Args:
        model: ``"minilm"`` (all-MiniLM-L6-v2, bundled offline).
        lengths: sequence lengths in tokens (<= 512 for MiniLM).
        batch_size: rows per batch; default ``max(1, 4096 // length)`` (same tokens per batch).
        repeats: timed forward passes per implementation (median reported); warmup: untimed passes first.
        impls: any of ``"eager"``, ``"sdpa"``, ``"salience"``.
        dtype: ``"float32"`` or ``"bfloat16"``.
        threads: torch threads (default: leave torch's setting).
        show: print the table; out: also write the rows as JSON to this path.
        padded: mix full-length and shorter rows (real batched inference); False: every row full length,
            so no padding mask is needed.

    Returns:
        One dict per (length, impl): model, impl, length, batch, padded, real_tokens, dtype, threads, ms_median,
        ms_min, ms_max, tokens_per_s, vs_sdpa (SDPA time / this time: > 1 is faster than SDPA) and
        max_abs_diff_vs_sdpa of the sentence embeddings.
    """
    from ..models import minilm

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}; got {model!r}.")
    impls = tuple(impls)
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        raise ValueError(f"impls must be a non-empty subset of {IMPLS}; got {impls!r}.")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16'; got {dtype!r}.")
    lengths = tuple(int(n) for n in lengths)
    if not lengths or any(n < 4 or n > 512 for n in lengths):
        raise ValueError(f"lengths must be between 4 and 512 tokens for MiniLM; got {lengths}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}.")
    if threads is not None:
        torch.set_num_threads(int(threads))

    from . import hf  # noqa: F401  (registers "salience")

    net, tok = minilm("eager", dtype=dt)
    rows = []
    for length in lengths:
        bs = batch_size or max(1, 4096 // length)
        batch = make_batch(tok, length, bs, padded=padded)
        times = {i: [] for i in impls}
        emb = {}
        with torch.inference_mode():
            for r in range(warmup + repeats):
                for impl in impls:
                    net.set_attn_implementation(impl)
                    t0 = time.perf_counter()
                    h = net(**batch).last_hidden_state
                    t1 = time.perf_counter()
                    if r >= warmup:
                        times[impl].append((t1 - t0) * 1e3)
                    emb[impl] = _embed(h, batch["attention_mask"])
        ref = emb.get("sdpa")
        sdpa_ms = statistics.median(times["sdpa"]) if "sdpa" in times else None
        real = int(batch["attention_mask"].sum())
        for impl in impls:
            med = statistics.median(times[impl])
            rows.append({
                "model": model, "impl": impl, "length": length, "batch": bs, "padded": bool(padded), "real_tokens": real,
                "dtype": dtype, "threads": torch.get_num_threads(), "ms_median": round(med, 2),
                "ms_min": round(min(times[impl]), 2), "ms_max": round(max(times[impl]), 2),
                "tokens_per_s": round(real / (med / 1e3), 1),
                "vs_sdpa": round(sdpa_ms / med, 3) if sdpa_ms else None,
                "max_abs_diff_vs_sdpa": float((emb[impl] - ref).abs().max()) if ref is not None else None,
            })
    net.set_attn_implementation("eager")
    if show:
        print(format_table(rows))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`run_model_bench` as a fixed-width table."""
    head = f"{'model':<7} {'len':>4} {'batch':>5} {'pad':>3} {'impl':<9} {'median ms':>10} {'min ms':>8} {'tok/s':>9} " \
           f"{'vs sdpa':>8} {'emb diff':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r['vs_sdpa']:.2f}x" if r["vs_sdpa"] is not None else "-"
        diff = f"{r['max_abs_diff_vs_sdpa']:.1e}" if r["max_abs_diff_vs_sdpa"] is not None else "-"
        lines.append(f"{r['model']:<7} {r['length']:>4} {r['batch']:>5} {'yes' if r.get('padded') else 'no':>3} {r['impl']:<9} {r['ms_median']:>10.1f} "
                     f"{r['ms_min']:>8.1f} {r['tokens_per_s']:>9.0f} {vs:>8} {diff:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m salience.integrations.hf_bench [--lengths 128 512] [--repeats 5] ...``"""
    p = argparse.ArgumentParser(prog="python -m salience.integrations.hf_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm", choices=MODELS)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--no-padding", action="store_true", help="every row full length (no padding mask)")
    a = p.parse_args(argv)
    run_model_bench(a.model, a.lengths, a.batch_size, a.repeats, a.warmup, a.impls, a.dtype, a.threads, True, a.out,
                    padded=not a.no_padding)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
