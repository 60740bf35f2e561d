"""Merge WordPiece pieces (``play``, ``##ing``) into words, and attention maps over them.

The rule, chosen so that a merged map is still attention (each row sums to 1):

* **keys are summed**: the weight a query gives to a word is the total it gives to the word's pieces;
* **queries are averaged**: a word's row is the mean of its pieces' rows;
* **importances are summed**: a word's importance is the total of its pieces' (attention received,
  rollout, gradient x input, erasure all add up over the positions that make up the word).

A piece starting with ``##`` joins the token before it; every other token (``[CLS]``, punctuation) starts
a word of its own.

Example:
    >>> import torch
    >>> words, groups = word_groups(["[CLS]", "play", "##ing", "ball", "[SEP]"])
    >>> words, groups
    (['[CLS]', 'playing', 'ball', '[SEP]'], [[0], [1, 2], [3], [4]])
    >>> a = torch.full((1, 1, 5, 5), 0.2)
    >>> [round(x, 3) for x in merge_maps(a, groups)[0, 0, 1].tolist()]  # "playing": keys summed, rows averaged
    [0.2, 0.4, 0.2, 0.2]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["word_groups", "merge_maps", "merge_importance", "merge_wordpieces"]


def word_groups(tokens: Sequence[str], prefix: str = "##") -> tuple[list[str], list[list[int]]]:
    """``(words, groups)``: the merged labels and, for each word, the token positions it covers."""
    words: list[str] = []
    groups: list[list[int]] = []
    for i, t in enumerate(str(t) for t in tokens):
        if t.startswith(prefix) and len(t) > len(prefix) and groups:
            words[-1] += t[len(prefix):]
            groups[-1].append(i)
        else:
            words.append(t)
            groups.append([i])
    return words, groups


def _matrix(groups: list[list[int]], n: int, dtype) -> torch.Tensor:
    g = torch.zeros(len(groups), n, dtype=dtype)  # (words, tokens): 1 where the token belongs to the word
    for w, idx in enumerate(groups):
        g[w, idx] = 1
    if g.sum() != n or (g.sum(0) != 1).any():
        raise ValueError(f"groups must cover each of the {n} tokens exactly once.")
    return g


def merge_maps(attn: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """``(..., L, L)`` maps over tokens -> ``(..., W, W)`` over words: keys summed, queries averaged."""
    a = torch.as_tensor(attn)
    L, S = a.shape[-2:]
    if L != S:
        raise ValueError(f"merging needs square maps (every query row recorded); got {L} rows and {S} keys.")
    g = _matrix(groups, S, a.dtype)
    rows = g / g.sum(1, keepdim=True)
    return rows @ a @ g.T


def merge_importance(values, groups: list[list[int]]) -> torch.Tensor:
    """``(L,)`` token importance -> ``(W,)``: summed over each word's pieces."""
    v = torch.as_tensor(values).double().reshape(-1)
    return _matrix(groups, v.numel(), v.dtype) @ v


def merge_wordpieces(tokens: Sequence[str], attn: torch.Tensor, importances: dict | None = None):
    """``(words, merged maps, merged importances)``; see the module docstring for the rule."""
    words, groups = word_groups(tokens)
    imps = {k: merge_importance(v, groups) for k, v in (importances or {}).items()}
    return words, merge_maps(attn, groups), imps
