"""BlockMask: which (query tile, key tile) pairs of a mask are empty, partial or full.

Kernels skip empty tiles, compute full tiles without evaluating the mask, and evaluate the mask only on
partial tiles. The classification is analytic for the named factories of :mod:`salience.masks` (no
``L x S`` evaluation: O(number of tiles) work) and by evaluation, one query tile at a time, for arbitrary
callables.

Example:
    >>> from salience import masks
    >>> from salience.blocks import BlockMask
    >>> bm = BlockMask.from_mask(masks.causal(), 1, 1, 8, 8, q_block=2, kv_block=2)
    >>> print(bm)
    BlockMask(causal(), L=8, S=8, tiles 2x2, 4x4 grid: 6 full, 4 partial, 6 empty, 37.5% skipped)
    +...
    #+..
    ##+.
    ###+
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import MaskMod, TileContext, as_mask_mod, check_mask_output, index_grid

__all__ = ["BlockMask", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHARS = {EMPTY: ".", PARTIAL: "+", FULL: "#"}


def _tile_edges(n: int, block: int, device):
    starts = torch.arange(0, n, block, device=device)
    ends = torch.clamp(starts + block, max=n)
    return starts, ends


@dataclass
class BlockMask:
    """Tile classes of a mask for one problem size.

    Attributes:
        classes: int8 tensor (Bm, Hm, nq, nk) with values EMPTY=0, PARTIAL=1, FULL=2, where Bm is 1 or B and
            Hm is 1 or H (size 1 when the mask does not depend on batch or head).
        q_block, kv_block: tile sizes; L, S: sequence lengths; mask: the bound MaskMod;
        analytic: whether the classes came from the mask's analytic form rather than evaluation.
    """

    classes: torch.Tensor
    q_block: int
    kv_block: int
    L: int
    S: int
    mask: MaskMod
    analytic: bool

    @classmethod
    def from_mask(cls, mask, B: int, H: int, L: int, S: int, q_block: int = 128, kv_block: int = 128,
                  device=None) -> BlockMask:
        """Classify tiles of ``mask`` for batch B, heads H, lengths L x S.

        Example:
            >>> from salience import masks
            >>> BlockMask.from_mask(masks.sliding_window(64), 1, 1, 1024, 1024).counts()
            {'empty': 49, 'partial': 15, 'full': 0}
        """
        for name, val in (("q_block", q_block), ("kv_block", kv_block), ("L", L), ("S", S), ("B", B), ("H", H)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1; got {val!r}.")
        m = as_mask_mod(mask).bind(L, S, device)
        qs, qe = _tile_edges(L, q_block, device)
        ks, ke = _tile_edges(S, kv_block, device)
        ctx = TileContext(B, H, L, S, qs.view(-1, 1), qe.view(-1, 1), ks.view(1, -1), ke.view(1, -1),
                          torch.device(device) if device is not None else qs.device)
        bounds = m.tile_bounds(ctx)
        if bounds is not None:
            any_, all_ = bounds
            any_ = torch.as_tensor(any_, device=qs.device)
            all_ = torch.as_tensor(all_, device=qs.device)
            classes = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
            while classes.dim() < 4:
                classes = classes.unsqueeze(0)
            nq, nk = qs.numel(), ks.numel()
            classes = classes.expand(classes.shape[0], classes.shape[1], nq, nk).contiguous()
            return cls(classes, q_block, kv_block, L, S, m, True)
        return cls(_evaluate_classes(m, B, H, L, S, q_block, kv_block, device), q_block, kv_block, L, S, m, False)

    # -- summaries ----------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self.classes.shape)

    def counts(self) -> dict:
        """Number of empty, partial and full tiles (summed over batch and heads when they differ)."""
        c = self.classes
        return {"empty": int((c == EMPTY).sum()), "partial": int((c == PARTIAL).sum()), "full": int((c == FULL).sum())}

    def skipped_fraction(self) -> float:
        """Share of tiles that are empty and so skipped."""
        return float((self.classes == EMPTY).float().mean())

    def kv_spans(self):
        """Per query tile, the first and one-past-last non-empty key tile, over all batches and heads:
        two int64 tensors (Bm, Hm, nq); rows with no visible tile give (0, 0)."""
        ne = self.classes != EMPTY
        nk = ne.shape[-1]
        idx = torch.arange(nk, device=ne.device)
        lo = torch.where(ne, idx, nk).amin(-1)
        hi = torch.where(ne, idx + 1, 0).amax(-1)
        lo = torch.where(hi > 0, lo, torch.zeros_like(lo))
        return lo, hi

    def is_contiguous(self) -> bool:
        """True when every query tile's non-empty key tiles form one contiguous run."""
        lo, hi = self.kv_spans()
        ne = (self.classes != EMPTY).sum(-1)
        return bool((ne == (hi - lo)).all())

    def __str__(self) -> str:
        c = self.counts()
        nq, nk = self.classes.shape[-2:]
        head = (
            f"BlockMask({self.mask.name}, L={self.L}, S={self.S}, tiles {self.q_block}x{self.kv_block}, "
            f"{nq}x{nk} grid: {c['full']} full, {c['partial']} partial, {c['empty']} empty, "
            f"{100 * self.skipped_fraction():.1f}% skipped)"
        )
        return head + "\n" + self.ascii()

    def ascii(self, b: int = 0, h: int = 0, max_size: int = 64) -> str:
        """ASCII picture of batch b, head h: '#' full, '+' partial, '.' empty (downsampled past max_size)."""
        c = self.classes[min(b, self.classes.shape[0] - 1), min(h, self.classes.shape[1] - 1)]
        nq, nk = c.shape
        sq, sk = max(1, -(-nq // max_size)), max(1, -(-nk // max_size))
        rows = []
        for i in range(0, nq, sq):
            line = []
            for j in range(0, nk, sk):
                cell = c[i : i + sq, j : j + sk]
                if bool((cell == FULL).all()):
                    line.append(_CHARS[FULL])
                elif bool((cell == EMPTY).all()):
                    line.append(_CHARS[EMPTY])
                else:
                    line.append(_CHARS[PARTIAL])
            rows.append("".join(line))
        return "\n".join(rows)

    __repr__ = __str__


def _evaluate_classes(m: MaskMod, B, H, L, S, q_block, kv_block, device) -> torch.Tensor:
    """Classify by evaluating the mask one query tile at a time: O(B*H*q_block*S) memory."""
    b, h, _, kv = index_grid(B, H, 1, S, device)
    nk = (S + kv_block - 1) // kv_block
    pad = nk * kv_block - S
    out = []
    for q0 in range(0, L, q_block):
        q = torch.arange(q0, min(q0 + q_block, L), device=device).view(1, 1, -1, 1)
        vis = check_mask_output(m(b, h, q, kv), m, (B, H, q.shape[2], S))
        any_ = torch.nn.functional.pad(vis, (0, pad), value=False).view(B, H, -1, nk, kv_block).any(-1).any(2)
        all_ = torch.nn.functional.pad(vis, (0, pad), value=True).view(B, H, -1, nk, kv_block).all(-1).all(2)
        out.append(torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8))
    return torch.stack(out, dim=2)
