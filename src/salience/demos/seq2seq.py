"""A small Bahdanau et al. (2015) experiment: GRU encoder-decoders with and without attention.

Three models share the encoder (an embedding and a bidirectional GRU, whose outputs are the source
"annotations") and differ only in how the decoder reads the source:

* ``"none"``: the RNN encoder-decoder of Cho et al. (2014) that Bahdanau et al. compare against. The source
  is summarised in one fixed vector c (the last forward and first backward GRU states), which initialises
  the decoder and is fed to it at every step.
* ``"additive"``: Bahdanau attention (:class:`salience.layers.AdditiveAttention`). At step t the previous
  decoder state s_{t-1} scores every annotation, the context c_t (their weighted sum) is fed into the GRU
  together with the previous target token, and the output layer reads s_t, c_t and the previous token.
* ``"luong"``: Luong global attention with the ``general`` score (:class:`salience.layers.LuongAttention`).
  The GRU runs first; its state s_t scores the annotations and ``tanh(W_c [c_t; s_t])`` feeds the output.

Everything else (sizes, optimiser, data, steps, seed) is the same, so differences in accuracy come from
attention. Decoding is greedy and produces exactly as many tokens as the source has (the task's target
length), so sequence accuracy measures content, not the length prediction.

Example:
    >>> import torch
    >>> from salience.demos.seq2seq import Seq2Seq
    >>> from salience.demos.task import Transliteration
    >>> task = Transliteration(vocab=6, min_len=3, max_len=5)
    >>> model = Seq2Seq(task.num_tokens, "additive", embed_dim=8, hidden_dim=8)
    >>> b = task.sample(2, 5, torch.Generator().manual_seed(0))
    >>> logits, weights = model(b.src, b.decoder_input)
    >>> logits.shape, weights.shape
    (torch.Size([2, 5, 8]), torch.Size([2, 5, 5]))
    >>> model.greedy(b.src).tokens.shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AdditiveAttention, LuongAttention
from .task import BOS, Transliteration, buckets_for

__all__ = [
    "KINDS",
    "Seq2Seq",
    "Decoded",
    "TrainConfig",
    "TrainResult",
    "BucketMetrics",
    "train",
    "evaluate",
    "offset_mass",
    "alignment_example",
    "Comparison",
    "compare",
]

#: offsets from the aligned source token at which attention mass is reported
OFFSETS = (-2, -1, 0, 1, 2)

#: the three decoders compared, in report order
KINDS = ("none", "additive", "luong")

LABELS = {
    "none": "no attention (Cho et al. 2014)",
    "additive": "additive attention (Bahdanau)",
    "luong": "Luong attention (general)",
}


class Seq2Seq(nn.Module):
    """A GRU encoder-decoder whose decoder reads the source through ``attention`` (see the module docstring).

    Args:
        num_tokens: size of the token id space (source and target share it).
        attention: ``"none"``, ``"additive"`` or ``"luong"``.
        embed_dim: token embedding size E.
        hidden_dim: GRU size H (the encoder is bidirectional, so annotations have 2H features).

    Call: ``model(src, decoder_input)`` with src (B, S) and decoder_input (B, T) token ids returns
    ``(logits (B, T, num_tokens), weights (B, T, S) or None)`` under teacher forcing.
    """

    def __init__(self, num_tokens: int, attention: str = "additive", embed_dim: int = 32, hidden_dim: int = 64):
        super().__init__()
        if attention not in KINDS:
            raise ValueError(f"attention must be one of {KINDS}; got {attention!r}.")
        for name, v in (("num_tokens", num_tokens), ("embed_dim", embed_dim), ("hidden_dim", hidden_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}.")
        self.kind = attention
        E, H = embed_dim, hidden_dim
        self.src_embed = nn.Embedding(num_tokens, E)
        self.encoder = nn.GRU(E, H, batch_first=True, bidirectional=True)
        self.init_state = nn.Linear(2 * H, H)
        self.tgt_embed = nn.Embedding(num_tokens, E)
        if attention == "none":
            self.rnn = nn.GRU(E + 2 * H, H, batch_first=True)
            self.out = nn.Linear(H + 2 * H + E, num_tokens)
        elif attention == "additive":
            self.attn = AdditiveAttention(query_dim=H, key_dim=2 * H, hidden_dim=H)
            self.cell = nn.GRUCell(E + 2 * H, H)
            self.out = nn.Linear(H + 2 * H + E, num_tokens)
        else:
            self.rnn = nn.GRU(E, H, batch_first=True)
            self.attn = LuongAttention(query_dim=H, key_dim=2 * H, method="general", output_dim=H)
            self.out = nn.Linear(H, num_tokens)

    def encode(self, src: torch.Tensor) -> dict:
        """Run the encoder; returns the decoder's memory (annotations, summary, projected keys) and state."""
        if not isinstance(src, torch.Tensor) or src.dim() != 2 or src.dtype not in (torch.int64, torch.int32):
            seen = f"{src.dtype} {tuple(src.shape)}" if isinstance(src, torch.Tensor) else type(src).__name__
            raise TypeError(f"src must be an integer tensor of token ids (B, S); got {seen}.")
        ann, h = self.encoder(self.src_embed(src))  # ann (B, S, 2H); h (2, B, H)
        summary = torch.cat([h[0], h[1]], dim=-1)  # last forward state, first backward state
        mem = {"annotations": ann, "summary": summary, "state": torch.tanh(self.init_state(summary))}
        if self.kind == "additive":
            mem["projected_keys"] = self.attn.prepare(ann)
        return mem

    def decode(self, mem: dict, decoder_input: torch.Tensor, state: torch.Tensor):
        """Decode T steps from ``state`` (B, H) given the previous tokens (B, T).

        Returns ``(logits (B, T, V), weights (B, T, S) or None, new state (B, H))``.
        """
        y = self.tgt_embed(decoder_input)
        B, T, _ = y.shape
        ann = mem["annotations"]
        if self.kind == "none":
            c = mem["summary"].unsqueeze(1).expand(B, T, -1)
            o, h = self.rnn(torch.cat([y, c], dim=-1), state.unsqueeze(0))
            return self.out(torch.cat([o, c, y], dim=-1)), None, h[0]
        if self.kind == "luong":
            o, h = self.rnn(y, state.unsqueeze(0))
            a = self.attn(o, ann)
            return self.out(a.attentional), a.weights, h[0]
        s, feats, weights = state, [], []
        for t in range(T):
            ctx, w = self.attn(s, ann, projected_keys=mem["projected_keys"])
            s = self.cell(torch.cat([y[:, t], ctx], dim=-1), s)
            feats.append(torch.cat([s, ctx, y[:, t]], dim=-1))
            weights.append(w)
        return self.out(torch.stack(feats, dim=1)), torch.stack(weights, dim=1), s

    def forward(self, src: torch.Tensor, decoder_input: torch.Tensor):
        mem = self.encode(src)
        logits, weights, _ = self.decode(mem, decoder_input, mem["state"])
        return logits, weights

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, length: int | None = None) -> Decoded:
        """Greedy decoding of ``length`` tokens (default: the source length S), one step at a time."""
        mem = self.encode(src)
        B, S = src.shape
        T = S if length is None else int(length)
        prev = torch.full((B, 1), BOS, dtype=src.dtype, device=src.device)
        state, toks, ws = mem["state"], [], []
        for _ in range(T):
            logits, w, state = self.decode(mem, prev, state)
            prev = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(prev)
            if w is not None:
                ws.append(w)
        return Decoded(torch.cat(toks, dim=1), torch.cat(ws, dim=1) if ws else None)


@dataclass
class Decoded:
    """Greedy output: tokens (B, T) and attention weights (B, T, S) (None without attention)."""

    tokens: torch.Tensor
    weights: torch.Tensor | None


@dataclass
class TrainConfig:
    """Everything that defines one training run (the same for the three models).

    Attributes:
        steps: optimiser steps; each step is one batch of ``batch_size`` examples of one random length.
        batch_size, lr, clip: examples per step, Adam's initial learning rate and gradient-norm clipping.
        final_lr: the learning rate decays along a cosine from ``lr`` to ``final_lr * lr`` at the last step
            (a calm end of training, so that no model is evaluated in the middle of a loss spike).
        embed_dim, hidden_dim: model sizes.
        seed: seeds the model initialisation and the training data.
        threads: torch intra-op threads while training (1 is fastest for these small GRUs on a busy machine).
    """

    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    clip: float = 1.0
    final_lr: float = 0.1
    embed_dim: int = 32
    hidden_dim: int = 64
    seed: int = 0
    threads: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "embed_dim", "hidden_dim", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int; got {v!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number; got {self.lr!r}.")
        if not (isinstance(self.final_lr, (int, float)) and 0 <= self.final_lr <= 1):
            raise ValueError(f"TrainConfig.final_lr must be a fraction in [0, 1]; got {self.final_lr!r}.")


@dataclass
class TrainResult:
    """A trained model and its training record (loss per step, wall time in seconds)."""

    kind: str
    model: Seq2Seq
    losses: list[float]
    seconds: float
    config: dict = field(default_factory=dict)


class _Threads:
    def __init__(self, n: int):
        self.n, self.old = n, None

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def train(kind: str, task: Transliteration, config: TrainConfig | None = None,
          progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train one model on ``task`` with teacher forcing and cross-entropy.

    Seeded: the same ``config.seed`` gives the same initial weights and the same batches for every ``kind``.
    ``progress(step, steps, loss)`` is called after each step (the CLI draws a progress bar with it).

    Example:
        >>> from salience.demos.task import Transliteration
        >>> r = train("luong", Transliteration(vocab=5, min_len=2, max_len=4), TrainConfig(steps=3, hidden_dim=8))
        >>> len(r.losses)
        3
    """
    cfg = config or TrainConfig()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")
    with _Threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        model = Seq2Seq(task.num_tokens, kind, cfg.embed_dim, cfg.hidden_dim)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (
            1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        t0 = time.perf_counter()
        model.train()
        for step in range(cfg.steps):
            b = task.sample(cfg.batch_size, task.random_length(gen), gen)
            logits, _ = model(b.src, b.decoder_input)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.tgt.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, cfg.steps, losses[-1])
        model.eval()
        return TrainResult(kind, model, losses, time.perf_counter() - t0, asdict(cfg))


@dataclass
class BucketMetrics:
    """Greedy-decoding metrics of one model on one length bucket.

    Attributes:
        lo, hi: the bucket's lengths (inclusive); n: examples evaluated.
        token_accuracy: share of target tokens right; sequence_accuracy: share of targets entirely right.
        aligned_mass: mean attention weight on the source token the task aligns with each target token
            (None for the model without attention); chance is 1 / length.
        chance_mass: mean of 1 / length over the bucket's examples, the aligned mass of uniform attention.
        offset_mass: ``{d: mass}`` for d in -2..2, the mean attention weight on the source token d positions
            from the aligned one (d = 0 is ``aligned_mass``); empty without attention.
    """

    lo: int
    hi: int
    n: int
    token_accuracy: float
    sequence_accuracy: float
    aligned_mass: float | None
    chance_mass: float
    offset_mass: dict[int, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.lo}-{self.hi}"


def offset_mass(weights: torch.Tensor, aligned: torch.Tensor, offsets=OFFSETS) -> dict[int, torch.Tensor]:
    """Per example, the mean over target steps of the attention weight on the source token ``d`` positions
    from the aligned one, for each ``d`` in ``offsets``; positions past either end count as weight 0.

    Args:
        weights: (B, T, S) attention weights. aligned: (T,) aligned source index of each target step.

    Returns:
        ``{d: (B,) tensor}``.

    Example:
        >>> w = torch.eye(4).unsqueeze(0)                   # perfectly aligned
        >>> m = offset_mass(w, torch.arange(4))
        >>> float(m[0][0]), float(m[1][0])
        (1.0, 0.0)
        >>> float(offset_mass(w, torch.arange(4).flip(0))[0][0])   # attends to the wrong tokens
        0.0
    """
    if weights.dim() != 3 or aligned.shape != weights.shape[1:2]:
        raise ValueError(f"weights must be (B, T, S) and aligned (T,); got {tuple(weights.shape)} and "
                         f"{tuple(aligned.shape)}.")
    pad = max(abs(o) for o in offsets)
    B, T, _ = weights.shape
    padded = F.pad(weights, (pad, pad))
    out = {}
    for off in offsets:
        idx = (aligned.to(weights.device) + off + pad).view(1, T, 1).expand(B, T, 1)
        out[off] = padded.gather(2, idx).mean(dim=(1, 2))
    return out


def evaluate(model: Seq2Seq, task: Transliteration, buckets: list[tuple[int, int]] | None = None,
             per_bucket: int = 256, seed: int = 1234, batch_size: int = 128,
             threads: int = 1) -> list[BucketMetrics]:
    """Token and sequence accuracy and aligned attention mass per length bucket, by greedy decoding.

    The test data come from their own seeded generator (``seed``), disjoint in practice from training.
    Within a bucket the lengths cycle through lo..hi so that every length is represented.

    Example:
        >>> from salience.demos.task import Transliteration
        >>> task = Transliteration(vocab=5, min_len=2, max_len=5)
        >>> m = Seq2Seq(task.num_tokens, "luong", 8, 8)
        >>> [b.label for b in evaluate(m, task, [(2, 3), (4, 5)], per_bucket=4)]
        ['2-3', '4-5']
    """
    if buckets is None:
        buckets = buckets_for(task.min_len, task.max_len, 4)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with _Threads(threads):
        for lo, hi in buckets:
            lengths = [lo + i % (hi - lo + 1) for i in range(per_bucket)]
            counts = {L: lengths.count(L) for L in sorted(set(lengths))}
            tok = seq = chance = 0.0
            ntok = 0
            offs = dict.fromkeys(OFFSETS, 0.0)
            for L, cnt in counts.items():
                for start in range(0, cnt, batch_size):
                    n = min(batch_size, cnt - start)
                    b = task.sample(n, L, gen)
                    d = model.greedy(b.src)
                    right = d.tokens == b.tgt
                    tok += float(right.sum())
                    ntok += right.numel()
                    seq += float(right.all(1).sum())
                    chance += n / L
                    if d.weights is not None:
                        for off, m in offset_mass(d.weights, b.aligned).items():
                            offs[off] += float(m.sum())
            att = model.kind != "none"
            out.append(BucketMetrics(lo, hi, per_bucket, tok / ntok, seq / per_bucket,
                                     offs[0] / per_bucket if att else None, chance / per_bucket,
                                     {o: m / per_bucket for o, m in offs.items()} if att else {}))
    return out


def alignment_example(model: Seq2Seq, task: Transliteration, length: int, seed: int = 7) -> dict:
    """One example of ``length`` tokens decoded greedily, with the (T, S) attention map for a heatmap.

    Returns a dict with ``src``, ``tgt``, ``pred`` (lists of token ids) and ``weights`` (T, S) float tensor
    (None without attention).
    """
    b = task.sample(1, length, torch.Generator().manual_seed(seed))
    d = model.greedy(b.src)
    return {
        "src": b.src[0].tolist(),
        "tgt": b.tgt[0].tolist(),
        "pred": d.tokens[0].tolist(),
        "aligned": b.aligned.tolist(),
        "weights": None if d.weights is None else d.weights[0].float(),
    }


@dataclass
class Comparison:
    """The outcome of :func:`compare`: per model kind, the metrics per bucket, the training record and one
    decoded example with its attention map."""

    task: str
    config: dict
    buckets: list[tuple[int, int]]
    metrics: dict[str, list[BucketMetrics]]
    losses: dict[str, list[float]]
    seconds: dict[str, float]
    examples: dict[str, dict]

    def longest(self, kind: str) -> BucketMetrics:
        """The metrics of ``kind`` on the longest bucket."""
        return self.metrics[kind][-1]

    def to_dict(self) -> dict:
        ex = {k: {**v, "weights": None if v["weights"] is None else v["weights"].tolist()}
              for k, v in self.examples.items()}
        return {"task": self.task, "config": self.config, "buckets": [list(b) for b in self.buckets],
                "metrics": {k: [asdict(m) for m in v] for k, v in self.metrics.items()},
                "seconds": self.seconds, "final_loss": {k: v[-1] for k, v in self.losses.items()},
                "examples": ex}


def compare(task: Transliteration, config: TrainConfig | None = None, kinds=KINDS,
            buckets: list[tuple[int, int]] | None = None, per_bucket: int = 256, example_length: int | None = None,
            progress: Callable[[str, int, int, float], None] | None = None) -> Comparison:
    """Train each of ``kinds`` with the same config and data, and evaluate them on the same test buckets.

    Args:
        task: the data. config: training settings shared by every model.
        kinds: a selection of :data:`KINDS`.
        buckets: length buckets (default: 4 equal buckets over the task's lengths).
        per_bucket: test examples per bucket.
        example_length: length of the example decoded for the heatmaps (default: the task's max_len).
        progress: ``progress(kind, step, steps, loss)`` during training.

    Example:
        >>> from salience.demos.task import Transliteration
        >>> task = Transliteration(vocab=5, min_len=2, max_len=5)
        >>> c = compare(task, TrainConfig(steps=2, hidden_dim=8, embed_dim=4), per_bucket=2)
        >>> sorted(c.metrics), len(c.metrics["none"]), c.examples["luong"]["weights"].shape
        (['additive', 'luong', 'none'], 4, torch.Size([5, 5]))
    """
    cfg = config or TrainConfig()
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}; got {tuple(kinds)!r}.")
    if buckets is None:
        buckets = buckets_for(task.min_len, task.max_len, min(4, task.max_len - task.min_len + 1))
    metrics, losses, seconds, examples = {}, {}, {}, {}
    for kind in kinds:
        cb = None if progress is None else (lambda i, n, loss, _k=kind: progress(_k, i, n, loss))
        r = train(kind, task, cfg, progress=cb)
        metrics[kind] = evaluate(r.model, task, buckets, per_bucket=per_bucket, seed=cfg.seed + 1000,
                                 threads=cfg.threads)
        with _Threads(cfg.threads):
            examples[kind] = alignment_example(r.model, task, example_length or task.max_len, seed=cfg.seed + 7)
        losses[kind], seconds[kind] = r.losses, r.seconds
    return Comparison(repr(task), asdict(cfg), list(buckets), metrics, losses, seconds, examples)
