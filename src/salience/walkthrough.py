"""``salience walkthrough``: attention step by step on a handful of tokens, in the terminal.

Every number printed is computed by :mod:`salience.reference` (and checked against
:func:`salience.attention`): token vectors, the projections Q, K and V, raw scores, scaled scores,
softmax weights and the weighted sum; then the same with a causal mask, with additive (Bahdanau) scoring
and with two heads. Seeded, so the same words give the same numbers; the words are yours.

Example:
    >>> from salience.walkthrough import walkthrough
    >>> text = walkthrough("the cat sat", dim=4, seed=0)
    >>> "softmax" in text and "causal" in text
    True
"""

from __future__ import annotations

import argparse
import hashlib

import torch

from . import masks, reference
from .functional import attention
from .scores import Additive

__all__ = ["walkthrough", "add_arguments", "run"]

DEFAULT_TEXT = "the cat sat on the mat"


def _word_vector(word: str, dim: int, seed: int) -> torch.Tensor:
    """A fixed pseudo-embedding per word (same word, same vector), from a hash of the word and seed."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{word.lower()}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(h % (2**63))
    return torch.randn(dim, generator=g, dtype=torch.float64)


def _table(title: str, explain: str, mat: torch.Tensor, rows, cols, fmt: str = "{:7.3f}") -> str:
    width = max(7, max(len(c) for c in cols))
    rw = max(len(r) for r in rows)
    lines = [f"\n{title}", f"  {explain}"]
    lines.append(" " * (rw + 2) + " ".join(c.rjust(width) for c in cols))
    for r, row in zip(rows, mat.tolist()):
        cells = []
        for x in row:
            cells.append(("-inf" if x == float("-inf") else fmt.format(x)).strip().rjust(width))
        lines.append(f"  {r.ljust(rw)}" + " ".join(cells))
    return "\n".join(lines)


def walkthrough(text: str = DEFAULT_TEXT, dim: int = 4, seed: int = 0) -> str:
    """Return the walkthrough for ``text`` as a string (``run`` prints it).

    Args:
        text: a few words (2 to 12 tokens read best).
        dim: head dimension D of the tiny example.
        seed: seed for embeddings and projections.
    """
    tokens = text.split()
    if not tokens:
        raise ValueError("text must contain at least one word; e.g. 'the cat sat'.")
    if dim < 1:
        raise ValueError(f"dim must be >= 1; got {dim}.")
    L = len(tokens)
    g = torch.Generator().manual_seed(seed)
    X = torch.stack([_word_vector(w, dim, seed) for w in tokens])  # (L, D)
    Wq, Wk, Wv = (torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5 for _ in range(3))
    Q, K, V = X @ Wq, X @ Wk, X @ Wv
    dims = [f"d{i}" for i in range(dim)]
    out = []
    out.append(f"Attention, step by step, on {L} tokens: {' '.join(tokens)!r} (D={dim}, seed={seed})")
    out.append("Each token is a vector; attention lets every token gather information from the others.")
    out.append(_table("1. Token vectors X", "one row per token (a fixed pseudo-embedding of the word)", X, tokens, dims))
    out.append(_table("2. Queries Q = X Wq", "what each token is looking for", Q, tokens, dims))
    out.append(_table("3. Keys K = X Wk", "what each token offers to be found by", K, tokens, dims))
    out.append(_table("4. Values V = X Wv", "what each token hands over when attended to", V, tokens, dims))
    raw = Q @ K.T
    out.append(_table("5. Raw scores Q K^T", "row i, column j: how well query i matches key j (dot product)",
                      raw, tokens, tokens))
    scale = 1.0 / dim**0.5
    out.append(_table(f"6. Scaled scores Q K^T / sqrt(D) = Q K^T x {scale:.3f}",
                      "scaling keeps scores from growing with D, so the softmax does not saturate",
                      raw * scale, tokens, tokens))
    q4, k4, v4 = (t.view(1, 1, L, dim) for t in (Q, K, V))
    r = reference.attention(q4, k4, v4)
    out.append(_table("7. Softmax weights", "exp(score) / sum over the row: each row is >= 0 and sums to 1",
                      r.weights[0, 0], tokens, tokens))
    out.append(_table("8. Output = weights V", "each token's new vector: a weighted average of the values",
                      r.out[0, 0], tokens, dims))
    top = r.weights[0, 0].argmax(-1).tolist()
    out.append("  Most attended: " + ", ".join(f"{t} -> {tokens[j]}" for t, j in zip(tokens, top)))
    fast = attention(q4, k4, v4)
    out.append(f"  Check: salience.attention gives the same output (max difference {float((fast - r.out).abs().max()):.1e}).")

    rc = reference.attention(q4, k4, v4, mask=masks.causal())
    sc = reference.scores(q4, k4, mask=masks.causal())[0, 0]
    out.append(_table("9. With a causal mask: scores", "a token may only look at itself and earlier tokens: "
                      "later keys get -inf", sc, tokens, tokens))
    out.append(_table("10. Causal softmax weights", "-inf becomes weight 0; the first token can only attend to itself",
                      rc.weights[0, 0], tokens, tokens))

    torch.manual_seed(seed)
    add = Additive(dim, dim, hidden=dim).double()
    ra = reference.attention(q4, k4, v4, compatibility=add)
    out.append(_table("11. Additive (Bahdanau) scores v^T tanh(Wq q + Wk k)",
                      "a small learned network scores each pair instead of a dot product",
                      add(q4, k4)[0, 0].detach(), tokens, tokens))
    out.append(_table("12. Additive softmax weights", "same softmax, different notion of match",
                      ra.weights[0, 0].detach(), tokens, tokens))

    if dim >= 2:
        h = dim // 2
        q2 = Q.view(L, 2, h).transpose(0, 1).unsqueeze(0)
        k2 = K.view(L, 2, h).transpose(0, 1).unsqueeze(0)
        v2 = V.view(L, 2, h).transpose(0, 1).unsqueeze(0)
        r2 = reference.attention(q2, k2, v2)
        out.append(f"\n13. Two heads: Q, K and V split into 2 heads of {h} dims; each head has its own weights")
        for i in range(2):
            out.append(_table(f"    head {i} weights", f"head {i} compares dims d{i * h}..d{i * h + h - 1} only",
                              r2.weights[0, i], tokens, tokens))
        diff = float((r2.weights[0, 0] - r2.weights[0, 1]).abs().max())
        out.append(f"  The heads disagree by up to {diff:.3f} in weight: each can attend to a different relation.")
        out.append("  Their outputs are concatenated back to D dims: "
                   f"{tuple(r2.out.transpose(1, 2).reshape(L, dim).shape)}.")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="*", default=[DEFAULT_TEXT],
                        help=f"your words, quoted or not (default: {DEFAULT_TEXT!r})")
    parser.add_argument("--dim", type=int, default=4, help="head dimension of the example (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed for embeddings and projections")


def run(args) -> int:
    args.text = " ".join(args.text) if isinstance(args.text, list) else args.text
    if not args.text.split():
        raise ValueError("TEXT is empty; pass a few words in quotes, e.g. salience walkthrough \"the cat sat\" "
                         "(or none for the default sentence).")
    if args.dim < 1:
        raise ValueError(f"--dim must be >= 1 (the head dimension; 4 to 8 reads best); got {args.dim}.")
    print(walkthrough(args.text, dim=args.dim, seed=args.seed))
    return 0
