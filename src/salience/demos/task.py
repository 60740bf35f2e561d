"""A generated sequence task whose difficulty grows with length: transliteration of a synthetic language.

The source is a random string over ``vocab`` symbols; the target is the same string written in a second
alphabet through a fixed, seeded one-to-one symbol table (like transliterating a name letter by letter).
With ``order="monotone"`` target position t is aligned with source position t; with ``order="reverse"``
the target is written backwards and position t is aligned with source position L - 1 - t. Either way the
task says exactly which source token each target token comes from, so the share of attention that falls
on that token can be measured.

Every token is independent of the others, so a model that squeezes the source into one fixed vector must
remember about ``L log2(vocab)`` bits: that is what makes long sequences hard without attention.

Token ids: 0 is padding, 1 is the begin-of-sequence token fed to the decoder, symbols are ``2 .. vocab+1``
in both alphabets.

Example:
    >>> import torch
    >>> from salience.demos.task import Transliteration
    >>> task = Transliteration(vocab=8, min_len=3, max_len=6, seed=0)
    >>> b = task.sample(2, 4, torch.Generator().manual_seed(0))
    >>> b.src.shape, b.tgt.shape, b.aligned.tolist()
    (torch.Size([2, 4]), torch.Size([2, 4]), [0, 1, 2, 3])
    >>> bool((task.transliterate(b.src) == b.tgt).all())
    True
    >>> task.source_symbols(b.src[0]), task.target_symbols(b.tgt[0])
    (['e', 'h', 'f', 'a'], ['C', 'G', 'F', 'E'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PAD", "BOS", "FIRST_SYMBOL", "Batch", "Transliteration", "buckets_for"]

PAD = 0
BOS = 1
FIRST_SYMBOL = 2

_ORDERS = ("monotone", "reverse")


@dataclass
class Batch:
    """One batch of equal-length examples.

    Attributes:
        src: source token ids (B, L).
        tgt: target token ids (B, L).
        aligned: (L,) index of the source token each target position is aligned with.
    """

    src: torch.Tensor
    tgt: torch.Tensor
    aligned: torch.Tensor

    @property
    def decoder_input(self) -> torch.Tensor:
        """Teacher-forcing input (B, L): BOS followed by the target shifted right by one."""
        bos = torch.full_like(self.tgt[:, :1], BOS)
        return torch.cat([bos, self.tgt[:, :-1]], dim=1)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return value


class Transliteration:
    """The synthetic transliteration task (see the module docstring).

    Args:
        vocab: number of symbols in each alphabet (>= 2).
        min_len, max_len: the range of sequence lengths (inclusive), 1 <= min_len <= max_len.
        order: ``"monotone"`` (target t from source t) or ``"reverse"`` (target t from source L - 1 - t).
        seed: seeds the symbol table.

    Example:
        >>> task = Transliteration(vocab=5, min_len=2, max_len=4, order="reverse")
        >>> task.aligned(4).tolist()
        [3, 2, 1, 0]
    """

    def __init__(self, vocab: int = 20, min_len: int = 5, max_len: int = 60, order: str = "monotone",
                 seed: int = 0):
        self.vocab = _check_int(vocab, "vocab", 2)
        self.min_len = _check_int(min_len, "min_len", 1)
        self.max_len = _check_int(max_len, "max_len", 1)
        if self.max_len < self.min_len:
            raise ValueError(f"max_len must be >= min_len; got min_len={min_len}, max_len={max_len}.")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}; got {order!r}.")
        self.order = order
        self.seed = int(seed)
        perm = torch.randperm(self.vocab, generator=torch.Generator().manual_seed(self.seed))
        #: table[i] = target symbol id of source symbol id i (ids include the offset FIRST_SYMBOL)
        self.table = torch.arange(self.vocab + FIRST_SYMBOL)
        self.table[FIRST_SYMBOL:] = perm + FIRST_SYMBOL

    @property
    def num_tokens(self) -> int:
        """Size of the token id space (padding and BOS included)."""
        return self.vocab + FIRST_SYMBOL

    def __repr__(self) -> str:
        return (f"Transliteration(vocab={self.vocab}, min_len={self.min_len}, max_len={self.max_len}, "
                f"order={self.order!r}, seed={self.seed})")

    def aligned(self, length: int) -> torch.Tensor:
        """(L,) source index aligned with each target position."""
        idx = torch.arange(_check_int(length, "length", 1))
        return idx if self.order == "monotone" else idx.flip(0)

    def transliterate(self, src: torch.Tensor) -> torch.Tensor:
        """The target (B, L) for a source (B, L) of symbol ids."""
        out = self.table[src]
        return out if self.order == "monotone" else out.flip(-1)

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> Batch:
        """``batch`` random examples of exactly ``length`` tokens.

        Args:
            batch: number of examples B (>= 1).
            length: L, any positive length (it may lie outside [min_len, max_len], e.g. to test extrapolation).
            generator: a seeded ``torch.Generator`` for reproducible data.
        """
        _check_int(batch, "batch", 1)
        _check_int(length, "length", 1)
        src = torch.randint(FIRST_SYMBOL, self.vocab + FIRST_SYMBOL, (batch, length), generator=generator)
        return Batch(src=src, tgt=self.transliterate(src), aligned=self.aligned(length))

    def source_symbols(self, ids) -> list[str]:
        """Readable names of source token ids: lowercase letters (``s<i>`` beyond 26 symbols)."""
        return [_name(int(i), self.vocab, upper=False) for i in ids]

    def target_symbols(self, ids) -> list[str]:
        """Readable names of target token ids: uppercase letters (``T<i>`` beyond 26 symbols)."""
        return [_name(int(i), self.vocab, upper=True) for i in ids]

    def random_length(self, generator: torch.Generator | None = None) -> int:
        """A length drawn uniformly from [min_len, max_len]."""
        return int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=generator))


def _name(i: int, vocab: int, upper: bool) -> str:
    if i == PAD:
        return "<pad>"
    if i == BOS:
        return "<bos>"
    j = i - FIRST_SYMBOL
    if vocab <= 26:
        return chr((65 if upper else 97) + j)
    return f"{'T' if upper else 's'}{j}"


def buckets_for(min_len: int, max_len: int, count: int) -> list[tuple[int, int]]:
    """Split [min_len, max_len] into ``count`` contiguous inclusive length buckets of near-equal width.

    Example:
        >>> buckets_for(5, 60, 4)
        [(5, 18), (19, 32), (33, 46), (47, 60)]
    """
    _check_int(count, "count", 1)
    n = max_len - min_len + 1
    if n < count:
        raise ValueError(f"cannot split lengths {min_len}..{max_len} into {count} buckets; use count <= {n}.")
    edges = [min_len + round(i * n / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(count)]
