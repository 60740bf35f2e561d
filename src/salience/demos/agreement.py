"""A generated subject-verb agreement task with the structure of Linzen et al. 2016.

A sentence prefix runs up to (not including) the main verb; the label is the number the verb must take,
which is the number of the head noun of the subject. Between the subject and the verb come zero or more
phrases (prepositional phrases and object relative clauses), each with a noun; a noun of the other number
than the subject is an **attractor** (Linzen et al.'s term). An optional preamble (``i think that``,
``the teachers said that`` ...) moves the subject away from a fixed position, so the model cannot read the
number off one slot; a preamble noun comes before the subject and is not counted as an attractor.

Grammar (the vocabulary is :data:`NOUNS`, :data:`RC_VERBS` ...)::

    S        -> [CLS] PREAMBLE? NP_subj PHRASE* ADVERB?          label = number(NP_subj)
    NP       -> DET ADJ? NOUN            DET agrees in number ('the' is either)
    PHRASE   -> PREP NP  |  'that' NP RC_VERB     RC_VERB agrees with its own NP
    PREAMBLE -> 'i think that' | 'everyone knows that' | 'it seems that' | 'yesterday ,' | DET NOUN 'said that'

Token ids: 0 padding, 1 [UNK] (the blank used by blank-out), 2 [CLS], words from 3.

Example:
    >>> import torch
    >>> from salience.demos.agreement import Agreement
    >>> task = Agreement(seed=0)
    >>> ex = task.example(torch.Generator().manual_seed(3))
    >>> ex.tokens[0], ex.label in (0, 1), ex.attractors <= ex.phrases
    ('[CLS]', True, True)
    >>> task.decode(task.encode(ex.tokens)) == ex.tokens
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PAD", "UNK", "CLS", "SINGULAR", "PLURAL", "NOUNS", "RC_VERBS", "Example", "Agreement", "statistics"]

PAD, UNK, CLS = 0, 1, 2
SINGULAR, PLURAL = 0, 1

NOUNS = [("dog", "dogs"), ("cat", "cats"), ("boy", "boys"), ("girl", "girls"), ("teacher", "teachers"),
         ("student", "students"), ("doctor", "doctors"), ("farmer", "farmers"), ("king", "kings"),
         ("queen", "queens"), ("author", "authors"), ("pilot", "pilots"), ("car", "cars"), ("house", "houses"),
         ("tree", "trees"), ("book", "books"), ("key", "keys"), ("table", "tables"), ("window", "windows"),
         ("garden", "gardens"), ("city", "cities"), ("river", "rivers"), ("painting", "paintings"),
         ("letter", "letters")]
RC_VERBS = [("likes", "like"), ("sees", "see"), ("knows", "know"), ("admires", "admire"), ("visits", "visit"),
            ("follows", "follow")]
DETS = (["a", "this", "every"], ["these", "some", "many"])
PREPS = ["near", "behind", "beside", "with", "from", "of", "under", "above"]
ADJS = ["old", "new", "small", "big", "red", "happy"]
ADVERBS = ["often", "always", "really", "never"]
PREAMBLES = [["i", "think", "that"], ["everyone", "knows", "that"], ["it", "seems", "that"], ["yesterday", ","]]
#: the main verb's forms, for display only (the verb itself is what the model predicts)
MAIN_VERB = ("is", "are")


@dataclass
class Example:
    """One sentence prefix: ``tokens`` (with [CLS] first), ``label`` (0 singular, 1 plural), the subject's
    position, the positions of all intervening nouns and of the attractors among them."""

    tokens: list[str]
    label: int
    subject: int
    phrases: int
    attractors: int
    noun_positions: list[int]
    attractor_positions: list[int]

    def sentence(self) -> str:
        """The prefix with the verb the label asks for, e.g. ``the dog near the cars [is]``."""
        return " ".join(self.tokens[1:] + [f"[{MAIN_VERB[self.label]}]"])


class Agreement:
    """The generator. ``phrase_probs[k]`` is the chance of ``k`` intervening phrases; each phrase's noun is an
    attractor with probability ``attractor_p``; ``rc_p`` is the share of relative clauses among phrases.
    """

    def __init__(self, phrase_probs=(0.3, 0.3, 0.2, 0.12, 0.08), attractor_p: float = 0.5, rc_p: float = 0.3,
                 preamble_p: float = 0.5, adj_p: float = 0.2, adverb_p: float = 0.2, the_p: float = 0.6,
                 seed: int = 0):
        if abs(sum(phrase_probs) - 1.0) > 1e-6 or any(p < 0 for p in phrase_probs):
            raise ValueError(f"phrase_probs must be non-negative and sum to 1; got {phrase_probs}.")
        self.phrase_probs = torch.tensor(phrase_probs, dtype=torch.float64)
        self.attractor_p, self.rc_p, self.preamble_p = attractor_p, rc_p, preamble_p
        self.adj_p, self.adverb_p, self.the_p, self.seed = adj_p, adverb_p, the_p, seed
        words = ["the", "that", "said"] + [w for p in PREAMBLES for w in p]
        words += [w for pair in NOUNS for w in pair] + [w for pair in RC_VERBS for w in pair]
        words += DETS[0] + DETS[1] + PREPS + ADJS + ADVERBS
        self.words = ["[PAD]", "[UNK]", "[CLS]"] + list(dict.fromkeys(words))
        self.index = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def max_phrases(self) -> int:
        return len(self.phrase_probs) - 1

    def __repr__(self) -> str:
        return (f"Agreement(vocab={self.vocab_size}, phrases 0..{self.max_phrases}, attractor_p={self.attractor_p}, "
                f"rc_p={self.rc_p}, preamble_p={self.preamble_p})")

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(t, UNK) for t in tokens]

    def decode(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids if int(i) != PAD]

    # ------------------------------------------------------------------ sampling
    def _u(self, g) -> float:
        return float(torch.rand((), generator=g, dtype=torch.float64))

    def _pick(self, seq, g):
        return seq[int(torch.randint(len(seq), (), generator=g))]

    def _np(self, number: int, g) -> tuple[list[str], int]:
        """``(words, offset of the noun)``."""
        det = "the" if self._u(g) < self.the_p else self._pick(DETS[number], g)
        out = [det]
        if self._u(g) < self.adj_p:
            out.append(self._pick(ADJS, g))
        out.append(self._pick(NOUNS, g)[number])
        return out, len(out) - 1

    def example(self, g: torch.Generator, phrases: int | None = None) -> Example:
        """One example; ``phrases`` fixes the number of intervening phrases (default: drawn)."""
        toks = ["[CLS]"]
        if self._u(g) < self.preamble_p:
            k = int(torch.randint(len(PREAMBLES) + 1, (), generator=g))
            if k < len(PREAMBLES):
                toks += PREAMBLES[k]
            else:
                w, _ = self._np(int(self._u(g) < 0.5), g)
                toks += w + ["said", "that"]
        label = int(self._u(g) < 0.5)
        w, off = self._np(label, g)
        subject = len(toks) + off
        toks += w
        n = int(torch.multinomial(self.phrase_probs, 1, generator=g)) if phrases is None else int(phrases)
        nouns, attr = [], []
        for _ in range(n):
            is_attr = self._u(g) < self.attractor_p
            num = 1 - label if is_attr else label
            if self._u(g) < self.rc_p:
                toks.append("that")
                w, off = self._np(num, g)
                pos = len(toks) + off
                toks += w + [self._pick(RC_VERBS, g)[num]]
            else:
                toks.append(self._pick(PREPS, g))
                w, off = self._np(num, g)
                pos = len(toks) + off
                toks += w
            nouns.append(pos)
            if is_attr:
                attr.append(pos)
        if self._u(g) < self.adverb_p:
            toks.append(self._pick(ADVERBS, g))
        return Example(toks, label, subject, n, len(attr), nouns, attr)

    def sample(self, n: int, g: torch.Generator) -> list[Example]:
        return [self.example(g) for _ in range(n)]

    def batch(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids (B, Lmax) right-padded with 0, lengths (B,), labels (B,))``."""
        L = max(len(e.tokens) for e in examples)
        ids = torch.zeros(len(examples), L, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e.tokens)] = torch.tensor(self.encode(e.tokens))
        lengths = torch.tensor([len(e.tokens) for e in examples])
        labels = torch.tensor([e.label for e in examples])
        return ids, lengths, labels


def statistics(examples: list[Example]) -> dict:
    """Lengths (tokens including [CLS]) and counts by number of attractors / phrases and by label."""
    lens = torch.tensor([len(e.tokens) for e in examples], dtype=torch.float64)
    by_attr: dict[int, int] = {}
    by_phr: dict[int, int] = {}
    for e in examples:
        by_attr[e.attractors] = by_attr.get(e.attractors, 0) + 1
        by_phr[e.phrases] = by_phr.get(e.phrases, 0) + 1
    return {"examples": len(examples), "length_min": int(lens.min()), "length_max": int(lens.max()),
            "length_mean": round(float(lens.mean()), 2), "length_median": float(lens.median()),
            "by_attractors": {str(k): by_attr[k] for k in sorted(by_attr)},
            "by_phrases": {str(k): by_phr[k] for k in sorted(by_phr)},
            "plural_share": round(sum(e.label for e in examples) / max(1, len(examples)), 3),
            "subject_positions": sorted({e.subject for e in examples})}
