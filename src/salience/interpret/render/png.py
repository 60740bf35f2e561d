"""Static figures with matplotlib (the ``viz`` extra): PNG, SVG or PDF by file suffix.

* :func:`head_heatmap`: one head's ``(L, S)`` map with token labels (repeated tokens carry their
  position, ``the·3``; figure and type sized so every shown label is readable at 100 %);
* :func:`layer_head_grid`: every layer x head map of one input as thumbnails, with a colour bar;
* :func:`importance_bars`: one or more token-importance vectors as bars (each scaled to its maximum);
* :func:`head_matrix`: a ``(layers, H)`` score (entropy, importance, a role) as a labelled matrix;
* :func:`save`: write a figure, format from the suffix.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state, no display needed). Long
inputs are pooled to at most ``max_cells`` rows and columns (mean over rows, sum over keys) and label
every n-th token.

Example:
    >>> import torch, tempfile, os
    >>> from salience.interpret.render import png
    >>> fig = png.head_heatmap(torch.softmax(torch.randn(4, 4), -1), tokens=["a", "b", "c", "d"])
    >>> path = png.save(fig, os.path.join(tempfile.mkdtemp(), "head.svg"))
    >>> path.suffix
    '.svg'
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["FORMATS", "head_heatmap", "layer_head_grid", "importance_bars", "head_matrix", "save", "pool_map",
           "token_labels"]

#: file formats :func:`save` writes
FORMATS = (".png", ".svg", ".pdf")


def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("pictures need matplotlib: pip install 'salience[viz]'") from e
    return Figure


def _as_2d(m, argname: str) -> torch.Tensor:
    t = torch.as_tensor(m).detach().cpu()
    if t.dim() != 2:
        raise ValueError(f"{argname} must be a 2-D map (L, S); got shape {tuple(t.shape)}. Pick one layer and head.")
    return t.float()


def pool_map(m: torch.Tensor, max_cells: int) -> tuple[torch.Tensor, int]:
    """Pool a ``(..., L, S)`` map to at most ``max_cells`` per side: mean over blocks of rows, sum over blocks
    of keys (rows keep their mass). Returns ``(pooled, block)``."""
    L, S = m.shape[-2:]
    p = max(1, math.ceil(max(L, S) / max_cells))
    if p == 1:
        return m, 1
    lead = m.shape[:-2]
    x = m.reshape(-1, L, S).float()
    Lp, Sp = math.ceil(L / p), math.ceil(S / p)
    x = torch.nn.functional.pad(x, (0, Sp * p - S, 0, Lp * p - L))
    x = x.view(-1, Lp, p, Sp, p).sum((2, 4))
    counts = torch.full((Lp,), float(p))
    counts[-1] = L - (Lp - 1) * p
    return (x / counts.view(1, Lp, 1)).view(*lead, Lp, Sp), p


def token_labels(tokens: Sequence) -> list[str]:
    """Labels that tell repeated tokens apart: a token that occurs more than once carries its position
    (``["the", "cat", "the"]`` -> ``["the\u00b70", "cat", "the\u00b72"]``); unique tokens are unchanged.

    Example:
        >>> token_labels(["the", "cat", "saw", "the", "dog"])
        ['the·0', 'cat', 'saw', 'the·3', 'dog']
    """
    toks = [str(t) for t in tokens]
    counts = Counter(toks)
    return [f"{t}\u00b7{i}" if counts[t] > 1 else t for i, t in enumerate(toks)]


def _labels(tokens, n: int, block: int, max_labels: int = 60):
    if tokens is None:
        return None, None
    toks = list(tokens)
    if block == 1:
        toks = token_labels(toks)
    if block > 1:
        toks = [f"{toks[i * block]}..({i * block})" if i * block < len(toks) else "" for i in range(n)]
    toks = toks[:n] + [""] * max(0, n - len(toks))
    step = max(1, math.ceil(n / max_labels))
    idx = list(range(0, n, step))
    return idx, [toks[i] if len(toks[i]) <= 18 else toks[i][:17] + "\u2026" for i in idx]


def _tick_font(n: int, max_labels: int) -> tuple[int, float]:
    """(label step, font size in points) for ``n`` cells: at most ``max_labels`` labels, smaller type when many."""
    step = max(1, math.ceil(n / max_labels))
    shown = math.ceil(n / step)
    return step, (9.0 if shown <= 40 else 8.0 if shown <= 70 else 7.0)


def head_heatmap(m, tokens: Sequence[str] | None = None, key_tokens: Sequence[str] | None = None,
                 title: str = "", max_cells: int = 256, cmap: str = "viridis"):
    """One head's map ``(L, S)`` as a heatmap (rows: queries, columns: keys).

    Args:
        m: the map (L, S). tokens: query labels (and key labels when ``key_tokens`` is None).
        title: figure title. max_cells: pool longer inputs to this many cells per side.
    """
    Figure = _mpl()
    a = _as_2d(m, "m")
    a, block = pool_map(a, max_cells)
    L, S = a.shape
    # the figure grows with the number of labels so that each tick label gets its own line at 100 %:
    # a label takes about 1.45 x its font size, at most 100 labels per axis, 7-9 pt type
    step, fs = _tick_font(max(L, S), 100)
    shown = math.ceil(max(L, S) / step)
    side = min(22.0, max(4.5, 2.0 + shown * fs * 1.45 / 72))
    fig = Figure(figsize=(side + 1.6, side + 0.6))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(a.numpy(), cmap=cmap, aspect="auto", interpolation="nearest", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="weight" + (f" (blocks of {block})" if block > 1 else ""))
    yi, yl = _labels(tokens, L, block, max_labels=100)
    xi, xl = _labels(key_tokens if key_tokens is not None else tokens, S, block, max_labels=100)
    if yi is not None:
        ax.set_yticks(yi, yl, fontsize=fs)
    if xi is not None:
        ax.set_xticks(xi, xl, fontsize=fs, rotation=90)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def layer_head_grid(attn, title: str = "", max_cells: int = 48, layer_names: Sequence[str] | None = None,
                    cmap: str = "viridis"):
    """All maps of one input ``(layers, H, L, S)`` as a layer x head grid of thumbnails (each scaled to its
    own maximum so that sharp and diffuse heads are both visible), drawn as one mosaic image."""
    Figure = _mpl()
    a = torch.as_tensor(attn).detach().cpu().float()
    if a.dim() != 4:
        raise ValueError(f"attn must be (layers, H, L, S); got shape {tuple(a.shape)}.")
    a, _ = pool_map(a, max_cells)
    n, H, r, c = a.shape
    a = a / a.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    gap = max(1, max(r, c) // 12)
    mosaic = torch.full((n * (r + gap) - gap, H * (c + gap) - gap), float("nan"))
    for la in range(n):
        for h in range(H):
            mosaic[la * (r + gap): la * (r + gap) + r, h * (c + gap): h * (c + gap) + c] = a[la, h]
    cell = 0.9 if H <= 12 else 0.7
    fig = Figure(figsize=(2.2 + cell * H, max(2.0, 0.8 + cell * n * r / max(c, 1))))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mosaic.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="weight / that map's maximum")
    ax.set_xticks([h * (c + gap) + c / 2 - 0.5 for h in range(H)], [f"h{h}" for h in range(H)], fontsize=8)
    ax.set_yticks([la * (r + gap) + r / 2 - 0.5 for la in range(n)],
                  list(layer_names) if layer_names else [f"L{la}" for la in range(n)], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.92 if title else 0.97, bottom=0.06)
    return fig


def importance_bars(values, tokens: Sequence[str] | None = None, title: str = "", max_bars: int = 200):
    """Token importance as bars. ``values``: a ``(L,)`` tensor or ``{name: (L,)}``; each series is divided by
    its maximum |value| so that series on different scales share one axis. Beyond ``max_bars`` tokens,
    bars are pooled (mean of each block)."""
    Figure = _mpl()
    series = values if isinstance(values, dict) else {"importance": values}
    if not series:
        raise ValueError("values is empty; pass a (L,) tensor or a dict of them.")
    vecs = {}
    L = None
    for k, v in series.items():
        t = torch.as_tensor(v).detach().cpu().double()
        if t.dim() != 1:
            raise ValueError(f"values[{k!r}] must be 1-D (one value per token); got shape {tuple(t.shape)}.")
        if L is not None and t.numel() != L:
            raise ValueError(f"values[{k!r}] has {t.numel()} tokens but the first series has {L}.")
        L = t.numel()
        vecs[k] = torch.nan_to_num(t)
    block = max(1, math.ceil(L / max_bars))
    if block > 1:
        n = math.ceil(L / block)
        vecs = {k: torch.nn.functional.pad(v, (0, n * block - L)).view(n, block).mean(1) for k, v in vecs.items()}
    n = next(iter(vecs.values())).numel()
    width = min(18.0, 2.0 + 0.32 * n)
    fig = Figure(figsize=(width, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    k = len(vecs)
    bw = 0.8 / k
    for s, (name, v) in enumerate(vecs.items()):
        mx = float(v.abs().max())
        ax.bar([i + (s - (k - 1) / 2) * bw for i in range(n)], (v / mx if mx > 0 else v).tolist(), width=bw,
               label=name)
    idx, lab = _labels(tokens, n, block, max_labels=100)
    if idx is not None:
        ax.set_xticks(idx, lab, rotation=90, fontsize=_tick_font(n, 100)[1])
    ax.set_ylabel("importance / max")
    if k > 1:
        ax.legend(fontsize=8, ncols=min(k, 4))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def head_matrix(values, title: str = "", label: str = "", fmt: str = "{:.2f}", cmap: str = "magma"):
    """A ``(layers, H)`` score as a matrix with the values written in the cells (for up to 16 x 16)."""
    Figure = _mpl()
    v = torch.as_tensor(values).detach().cpu().double()
    if v.dim() != 2:
        raise ValueError(f"values must be (layers, H); got shape {tuple(v.shape)}.")
    n, H = v.shape
    fig = Figure(figsize=(1.5 + 0.6 * H, 1.0 + 0.45 * n))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(v.numpy(), cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xticks(range(H), [f"h{h}" for h in range(H)], fontsize=8)
    ax.set_yticks(range(n), [f"L{la}" for la in range(n)], fontsize=8)
    if n <= 16 and H <= 16:
        mid = float(v.mean())
        for la in range(n):
            for h in range(H):
                ax.text(h, la, fmt.format(float(v[la, h])), ha="center", va="center", fontsize=7,
                        color="black" if float(v[la, h]) > mid else "white")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig, path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path``; the suffix picks the format (.png, .svg or .pdf). Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"path must end in one of {', '.join(FORMATS)}; got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
