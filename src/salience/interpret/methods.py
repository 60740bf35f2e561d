"""Ways to read attention maps: raw maps, rollout, flow, gradient x attention, entropy, head roles and
head importance.

Every function here works on plain tensors of attention weights for **one input**, laid out
``(layers, H, L, S)``: layer, head, query position, key position (rows sum to 1, or to 0 for fully
masked rows). :class:`salience.interpret.AttentionMaps` gives that tensor with ``maps.stack()``.
Rollout and flow propagate attention through the layers, so they need self-attention (``L == S``).

Example:
    >>> import torch
    >>> from salience.interpret import methods
    >>> attn = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)   # 2 layers, 4 heads, 5 tokens
    >>> methods.rollout(attn).shape
    torch.Size([5, 5])
    >>> methods.entropy(attn).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "FUSIONS",
    "check_maps",
    "raw",
    "fuse_heads",
    "rollout",
    "flow",
    "flow_cost",
    "FLOW_MAX_SECONDS",
    "gradient_x_attention",
    "token_importance",
    "entropy",
    "confidence",
    "HeadRoles",
    "head_roles",
    "HeadSite",
    "HeadImportance",
    "find_head_sites",
    "head_importance",
]

#: the head fusions accepted by :func:`fuse_heads`, :func:`rollout` and :func:`flow`
FUSIONS = ("mean", "max", "min")

#: the longest estimated run :func:`flow` accepts by default (seconds, see :func:`flow_cost`)
FLOW_MAX_SECONDS = 10.0


def check_maps(attn, argname: str = "attn", square: bool = False) -> torch.Tensor:
    """Validate attention maps and return them as one floating tensor ``(layers, H, L, S)``.

    Accepts a tensor or a list of per-layer ``(H, L, S)`` tensors of equal shape (numpy arrays too).
    ``square=True`` also requires ``L == S`` (self-attention), which rollout and flow need.
    """
    if isinstance(attn, (list, tuple)):
        if not attn:
            raise ValueError(f"{argname} is an empty list; pass one (H, L, S) map per layer.")
        parts = [torch.as_tensor(a) for a in attn]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                f"{argname}: the per-layer maps have different shapes {sorted(shapes)}; they must all be "
                "(H, L, S). Select layers with equal head counts and lengths, or fuse heads first."
            )
        attn = torch.stack(parts)
    elif not isinstance(attn, torch.Tensor):
        try:
            attn = torch.as_tensor(attn)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"{argname} must be a tensor (layers, H, L, S) or a list of (H, L, S) tensors; got "
                f"{type(attn).__name__}."
            ) from e
    if attn.dim() != 4:
        raise ValueError(
            f"{argname} must have 4 dimensions (layers, H, L, S); got shape {tuple(attn.shape)}. For one layer "
            f"use {argname}.unsqueeze(0); for a batch pick one example, e.g. {argname}[:, 0] of (layers, B, H, L, S)."
        )
    if not attn.is_floating_point():
        raise TypeError(f"{argname} must hold floating-point weights; got {attn.dtype}. Cast with .float().")
    if attn.numel() == 0:
        raise ValueError(f"{argname} is empty (shape {tuple(attn.shape)}); every axis must be >= 1.")
    if not bool(torch.isfinite(attn).all()):
        raise ValueError(
            f"{argname} contains NaN or inf; attention weights must be finite (fully masked rows are 0)."
        )
    if square and attn.shape[-1] != attn.shape[-2]:
        raise ValueError(
            f"{argname} has L={attn.shape[-2]} query rows and S={attn.shape[-1]} keys; this method propagates "
            "attention through layers and needs self-attention maps with all rows (L == S). Capture with "
            "rows=None, or use raw maps / entropy for row subsets and cross-attention."
        )
    return attn


def _check_choice(value, argname: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{argname} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def _check_residual(residual) -> float:
    if isinstance(residual, bool) or not isinstance(residual, (int, float)):
        raise TypeError(f"residual must be a float in [0, 1]; got {type(residual).__name__}.")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(
            f"residual must be in [0, 1] (the weight of the identity, 0.5 in Abnar & Zuidema 2020); got {residual}."
        )
    return float(residual)


def _layer_slice(n: int, start_layer, end_layer) -> slice:
    for name, v in (("start_layer", start_layer), ("end_layer", end_layer)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} must be an int or None; got {type(v).__name__}.")
    s = 0 if start_layer is None else (start_layer + n if start_layer < 0 else start_layer)
    e = n if end_layer is None else (end_layer + n if end_layer < 0 else end_layer)
    if not 0 <= s < e <= n:
        raise ValueError(
            f"start_layer={start_layer}, end_layer={end_layer} select no layer of the {n} given; "
            f"use 0 <= start_layer < end_layer <= {n} (end exclusive; negatives count from the end)."
        )
    return slice(s, e)


def raw(attn, layers=None, heads=None) -> torch.Tensor:
    """The captured maps themselves, restricted to ``layers`` and ``heads`` (lists of indices or None).

    Returns:
        ``(len(layers), len(heads), L, S)``.

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> methods.raw(torch.full((3, 2, 4, 4), 0.25), layers=[2], heads=[0]).shape
        torch.Size([1, 1, 4, 4])
    """
    a = check_maps(attn)
    for name, sel, n, dim in (("layers", layers, a.shape[0], 0), ("heads", heads, a.shape[1], 1)):
        if sel is None:
            continue
        idx = [sel] if isinstance(sel, int) and not isinstance(sel, bool) else list(sel)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise TypeError(f"{name} must be None, an int or a list of ints; got {sel!r}.")
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise ValueError(f"{name} {bad} out of range: the maps have {n} {name}.")
        a = a.index_select(dim, torch.tensor([i % n for i in idx], dtype=torch.long, device=a.device))
    return a


def fuse_heads(attn, how: str = "mean") -> torch.Tensor:
    """Fuse the heads of ``(layers, H, L, S)`` maps by ``mean``, ``max`` or ``min``: returns ``(layers, L, S)``.

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> a = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])   # 1 layer, 2 heads, 1 row, 2 keys
        >>> methods.fuse_heads(a, "max").tolist()
        [[[1.0, 1.0]]]
    """
    a = check_maps(attn)
    _check_choice(how, "head_fusion", FUSIONS)
    if how == "mean":
        return a.mean(1)
    return a.amax(1) if how == "max" else a.amin(1)


def _augmented(attn, residual: float, head_fusion: str, start_layer, end_layer) -> torch.Tensor:
    """``(n, L, L)``: residual * I + (1 - residual) * fused A per layer, rows renormalised to sum to 1."""
    a = check_maps(attn, square=True)
    r = _check_residual(residual)
    _check_choice(head_fusion, "head_fusion", FUSIONS)
    a = a[_layer_slice(a.shape[0], start_layer, end_layer)]
    fused = fuse_heads(a, head_fusion).double()
    eye = torch.eye(a.shape[-1], dtype=fused.dtype, device=fused.device)
    aug = r * eye + (1.0 - r) * fused
    tot = aug.sum(-1, keepdim=True)
    return torch.where(tot > 0, aug / torch.where(tot > 0, tot, torch.ones_like(tot)), aug)


def rollout(attn, residual: float = 0.5, head_fusion: str = "mean", start_layer: int = 0,
            end_layer: int | None = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each input token flows into each position.

    Per layer ``A~ = residual * I + (1 - residual) * fuse(A)`` (rows renormalised), then
    ``R = A~[end-1] @ ... @ A~[start]``. ``R[i, j]`` is the share of input token ``j`` in position ``i``
    at the top; each row sums to 1. ``residual=0.5`` with mean fusion is the paper's setting.

    Args:
        attn: ``(layers, H, L, L)`` self-attention maps of one input.
        residual: weight of the identity standing for the residual connection, in [0, 1].
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        start_layer, end_layer: the layers rolled out, ``attn[start_layer:end_layer]``.

    Returns:
        ``(L, L)`` float64 (rows: output positions, columns: input tokens).

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> a = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])     # one layer: both tokens read token 0
        >>> methods.rollout(a).tolist()
        [[1.0, 0.0], [0.5, 0.5]]
    """
    aug = _augmented(attn, residual, head_fusion, start_layer, end_layer)
    out = aug[0]
    for layer in aug[1:]:
        out = layer @ out
    return out


def _flow_solver(solver: str) -> str:
    _check_choice(solver, "solver", ("auto", "scipy", "networkx"))
    if solver == "auto":
        try:
            import scipy.sparse.csgraph  # noqa: F401

            return "scipy"
        except ImportError:
            return "networkx"
    return solver


def flow_cost(n_layers: int, L: int, n_sources: int, solver: str = "auto") -> float:
    """Estimated seconds of :func:`flow`: ``n_sources * L`` max-flow problems on ``n_layers * L**2`` edges, at
    the rate measured on MiniLM maps on a 2-core machine (scipy's Dinic ~0.2 us, networkx's preflow-push
    ~5 us per unit of ``n_sources * L * n_layers * L**2``)."""
    rate = FLOW_SECONDS_PER_UNIT[_flow_solver(solver)]
    return float(n_sources) * L * n_layers * L * L * rate


#: seconds per unit of work (sources x tokens x edges), measured on all-MiniLM-L6-v2 maps
FLOW_SECONDS_PER_UNIT = {"scipy": 2.0e-7, "networkx": 5.0e-6}

#: scipy's max-flow takes integer capacities: weights are scaled by this (error <= cut edges x 2**-30)
FLOW_SCALE = 2**29


def flow(attn, residual: float = 0.5, head_fusion: str = "mean", start_layer: int = 0,
         end_layer: int | None = None, sources: Sequence[int] | None = None,
         max_seconds: float | None = FLOW_MAX_SECONDS, solver: str = "auto") -> torch.Tensor:
    """Attention flow (Abnar & Zuidema 2020): max-flow through the layered attention graph.

    Nodes are (layer boundary, token); an edge from token ``i`` above layer ``l`` to token ``j`` below it has
    capacity ``A~_l[i, j]`` (as in :func:`rollout`). ``F[i, j]`` is the maximum flow from position ``i`` at
    the top to input token ``j``: unlike rollout it is limited by the narrowest layer on the way. Each
    entry is one max-flow problem on ``layers * L**2`` edges, so the work grows like
    ``len(sources) * layers * L**3``. Inputs whose estimated time (:func:`flow_cost`) exceeds
    ``max_seconds`` are refused with a ValueError that says why, rather than left running for minutes.

    Solvers: ``"scipy"`` (Dinic in C, capacities scaled to integers by 2**29: each value is within
    ``(cut edges) * 2**-30`` of the real-valued max flow) or ``"networkx"`` (preflow-push in floating point,
    ~25x slower); ``"auto"`` takes scipy when installed.

    Args:
        attn: ``(layers, H, L, L)`` self-attention maps of one input.
        residual, head_fusion, start_layer, end_layer: as in :func:`rollout`.
        sources: top-layer positions to compute (rows of the result); None means all ``L``.
            Pass ``[0]`` for a [CLS]-pooled classifier: it costs ``L`` times less.
        max_seconds: the longest estimated run accepted (None: no limit).
        solver: ``"auto"``, ``"scipy"`` or ``"networkx"``.

    Returns:
        ``(len(sources), L)`` float64 flow values in [0, 1].

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> a = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
        >>> methods.flow(a).tolist()
        [[1.0, 0.0], [0.5, 0.5]]
    """
    solver = _flow_solver(solver)
    aug = _augmented(attn, residual, head_fusion, start_layer, end_layer)
    n, L, _ = aug.shape
    if sources is None:
        src = list(range(L))
    else:
        src = [sources] if isinstance(sources, int) and not isinstance(sources, bool) else list(sources)
        if not src or not all(isinstance(i, int) and not isinstance(i, bool) and -L <= i < L for i in src):
            raise ValueError(f"sources must be a non-empty list of token positions in [-{L}, {L}); got {sources!r}.")
        src = [i % L for i in src]
    est = flow_cost(n, L, len(src), solver)
    if max_seconds is not None and est > max_seconds:
        raise ValueError(
            f"attention flow refused: {len(src)} source(s) x {L} tokens x {n} layers means {len(src) * L} max-flow "
            f"problems on {n * L * L} edges each, estimated {est:.0f} s with {solver} (max_seconds={max_seconds}). "
            "Use rollout (the same idea in linear algebra), fewer sources (sources=[0] for a [CLS] classifier), "
            "fewer layers (start_layer), or raise max_seconds if you can wait."
        )
    a = aug.cpu().numpy()
    out = torch.zeros(len(src), L, dtype=torch.float64)
    if solver == "scipy":
        import numpy as np
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow

        lay, i, j = np.nonzero(a)
        caps = np.rint(a[lay, i, j] * FLOW_SCALE).astype(np.int32)
        keep = caps > 0
        lay, i, j, caps = lay[keep], i[keep], j[keep], caps[keep]
        N = (n + 1) * L
        g = csr_matrix((caps, ((lay + 1) * L + i, lay * L + j)), shape=(N, N))
        for r, s in enumerate(src):
            for t in range(L):
                out[r, t] = maximum_flow(g, n * L + s, t, method="dinic").flow_value / FLOW_SCALE
        return out
    import networkx as nx
    from networkx.algorithms.flow import build_residual_network, preflow_push

    g = nx.DiGraph()
    for layer in range(n):
        rows, cols = a[layer].nonzero()
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            g.add_edge((layer + 1, i), (layer, j), capacity=float(a[layer, i, j]))
    residual_net = build_residual_network(g, "capacity")  # built once, reset by each preflow_push call
    for r, i in enumerate(src):
        s = (n, i)
        for j in range(L):
            t = (0, j)
            if s in g and t in g:
                res = preflow_push(g, s, t, capacity="capacity", residual=residual_net, value_only=True)
                out[r, j] = res.graph["flow_value"]
    return out


def gradient_x_attention(attn, grads, start_layer: int = 0, end_layer: int | None = None, *,
                         include_identity: bool = True) -> torch.Tensor:
    """Gradient x attention relevance: Chefer et al. 2021 ("Generic attention-model explainability"), the rule
    for self-attention.

    Per layer ``A_bar = mean_h( max(A * dF/dA, 0) )`` (elementwise product of the weights and the gradient of
    the explained scalar ``F`` with respect to them, positive part, mean over heads) and, starting from
    ``R = I``, ``R <- R + A_bar @ R`` through the layers. ``R[i, j]`` is the relevance of input token ``j``
    for position ``i``.

    The starting ``I`` stands for each position's own input carried by the residual stream; it is not
    attention. It gives every token the same ``1`` on its own row, which swamps what attention adds when the
    gradients are small (on MiniLM ``A * dF/dA`` is ~1e-4: with the identity kept, the mean over rows is
    ``1/L + ~1e-4`` for every token, a flat series). ``include_identity=False`` returns ``R - I``, the
    relevance attention adds; that is what a token importance should be read from (``salience explain``
    and :func:`salience.interpret.faithfulness.evaluate` do so), e.g.
    ``token_importance(gradient_x_attention(a, g, include_identity=False), "mean")`` for a mean-pooled
    output (``query=0`` for a [CLS] classifier: there the identity only touches [CLS] itself). Subtracting
    ``I`` shifts every token of the mean row by the same ``1/L``, so rankings are unchanged.

    Args:
        attn: ``(layers, H, L, L)`` maps of one input.
        grads: gradients of the explained scalar with respect to those weights, same shape.
        start_layer, end_layer: the layers propagated, ``attn[start_layer:end_layer]``.
        include_identity: keep the starting ``I`` (Chefer et al.'s ``R``, the default) or return ``R - I``.

    Returns:
        ``(L, L)`` float64.

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]]); g = torch.ones_like(a)
        >>> methods.gradient_x_attention(a, g).tolist()
        [[1.5, 0.5], [0.0, 2.0]]
        >>> methods.gradient_x_attention(a, g, include_identity=False).tolist()
        [[0.5, 0.5], [0.0, 1.0]]
    """
    if not isinstance(include_identity, bool):
        raise TypeError(f"include_identity must be True or False; got {include_identity!r}.")
    a = check_maps(attn, square=True)
    g = check_maps(grads, argname="grads")
    if g.shape != a.shape:
        raise ValueError(f"grads must have the shape of attn {tuple(a.shape)}; got {tuple(g.shape)}.")
    sl = _layer_slice(a.shape[0], start_layer, end_layer)
    a, g = a[sl].double(), g[sl].double().to(a.device)
    L = a.shape[-1]
    eye = torch.eye(L, dtype=torch.float64, device=a.device)
    # d = R - I, updated as R <- R + A_bar @ R  <=>  d <- d + A_bar @ (I + d): no cancellation of a large I
    d = torch.zeros(L, L, dtype=torch.float64, device=a.device)
    for layer in range(a.shape[0]):
        abar = (g[layer] * a[layer]).clamp(min=0).mean(0)
        d = d + abar + abar @ d
    return d + eye if include_identity else d


def token_importance(matrix: torch.Tensor, query="mean", exclude_self: bool = False) -> torch.Tensor:
    """One importance per input token from a ``(L, S)`` relevance matrix (rollout, flow, a fused raw map).

    ``query``: an int (that position's row, e.g. 0 for [CLS]) or ``"mean"`` (mean over rows: what a
    mean-pooled embedding reads). ``exclude_self`` zeroes the whole diagonal first (each position's relevance
    to itself, attention's included); to drop only the identity of :func:`gradient_x_attention` pass it
    ``include_identity=False`` instead.

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> methods.token_importance(torch.tensor([[0.5, 0.5], [0.0, 1.0]]), "mean").tolist()
        [0.25, 0.75]
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        seen = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a 2-D tensor (L, S); got {seen}.")
    m = matrix
    if exclude_self:
        n = min(m.shape)
        m = m.clone()
        m[range(n), range(n)] = 0
    if query == "mean":
        return m.mean(0)
    if isinstance(query, int) and not isinstance(query, bool):
        if not -m.shape[0] <= query < m.shape[0]:
            raise ValueError(f"query {query} out of range for {m.shape[0]} rows.")
        return m[query]
    raise ValueError(f"query must be 'mean' or a row index (int); got {query!r}.")


def _row_entropy(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return -(torch.where(a > 0, a * torch.log(torch.where(a > 0, a, torch.ones_like(a))), torch.zeros_like(a))).sum(-1)


def entropy(attn, normalize: bool = False) -> torch.Tensor:
    """Mean entropy (nats) of each head's attention rows: ``(layers, H)``.

    Low entropy = focused head, high = diffuse. Fully masked rows (all zero) are left out.
    ``normalize=True`` divides each row's entropy by ``log(number of keys with nonzero weight)``, so 1 means
    uniform over what the row could see (rows seeing one key count as 0).

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> a = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])
        >>> [round(x, 4) for x in methods.entropy(a)[0].tolist()]
        [0.6931, 0.0]
    """
    a = check_maps(attn)
    h = _row_entropy(a)
    live = a.sum(-1) > 0
    if normalize:
        nvis = (a > 0).sum(-1).double()
        denom = torch.log(nvis.clamp(min=1))
        h = torch.where(denom > 0, h / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(h))
    cnt = live.sum(-1).clamp(min=1)
    return torch.where(live, h, torch.zeros_like(h)).sum(-1) / cnt


def confidence(attn) -> torch.Tensor:
    """Mean over rows of the largest weight, per head (Voita et al. 2019): ``(layers, H)``, in [0, 1].

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> methods.confidence(torch.tensor([[[[0.9, 0.1], [0.3, 0.7]]]], dtype=torch.float64)).tolist()
        [[0.8]]
    """
    a = check_maps(attn).double()
    live = a.sum(-1) > 0
    mx = a.amax(-1)
    return torch.where(live, mx, torch.zeros_like(mx)).sum(-1) / live.sum(-1).clamp(min=1)


@dataclass
class HeadRoles:
    """Scores of head-role detectors, each ``(layers, H)`` in [0, 1]: the mean weight a head puts on the key
    the role predicts (``previous_token``: i-1, ``first_token``: 0, a sink, ``self``: i, ``offset+k``: i+k).
    """

    scores: dict[str, torch.Tensor]

    def best(self, threshold: float = 0.5) -> list[tuple[int, int, str, float]]:
        """``(layer, head, role, score)`` for each head whose best role scores at least ``threshold``,
        strongest first."""
        names = list(self.scores)
        stack = torch.stack([self.scores[n] for n in names])  # (roles, layers, H)
        val, idx = stack.max(0)
        out = []
        for layer in range(val.shape[0]):
            for h in range(val.shape[1]):
                if float(val[layer, h]) >= threshold:
                    out.append((layer, h, names[int(idx[layer, h])], float(val[layer, h])))
        return sorted(out, key=lambda t: -t[3])

    def table(self, threshold: float = 0.5) -> str:
        """Plain-text table of :meth:`best`."""
        rows = self.best(threshold)
        if not rows:
            return f"no head scores >= {threshold} on any role"
        lines = [f"{'layer':>5} {'head':>4}  {'role':<15} score"]
        lines += [f"{la:>5} {h:>4}  {r:<15} {s:.2f}" for la, h, r, s in rows]
        return "\n".join(lines)


def head_roles(attn, offsets: Iterable[int] = (1, -2, 2), row_index: Sequence[int] | None = None,
               ignore_rows: Iterable[int] = ()) -> HeadRoles:
    """Score every head on the roles previous token, first token (sink), self and fixed offsets.

    A role's score is the mean, over the query rows where the predicted key exists, of the weight on that
    key. ``row_index`` gives the position of each map row when only some rows were captured; ``ignore_rows``
    (positions) are left out, e.g. ``[0]`` to skip [CLS].

    Returns:
        :class:`HeadRoles` with ``previous_token``, ``first_token``, ``self`` and ``offset+k`` per k.

    Example:
        >>> import torch
        >>> from salience.interpret import methods
        >>> a = torch.tensor([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]])
        >>> methods.head_roles(a, offsets=()).scores["previous_token"].tolist()
        [[1.0]]
    """
    a = check_maps(attn).double()
    _, _, R, S = a.shape
    if row_index is None:
        pos = torch.arange(R)
    else:
        pos = torch.as_tensor(list(row_index), dtype=torch.long)
        if pos.shape != (R,):
            raise ValueError(f"row_index must list one position per map row ({R}); got {len(pos)}.")
    offs = list(offsets)
    if not all(isinstance(o, int) and not isinstance(o, bool) and o != 0 for o in offs):
        raise ValueError(f"offsets must be non-zero ints (0 is the 'self' role); got {offs!r}.")
    ignore = {int(i) for i in ignore_rows}
    keep_row = torch.tensor([int(p) not in ignore for p in pos], dtype=torch.bool)

    def score(target: torch.Tensor) -> torch.Tensor:
        ok = (target >= 0) & (target < S) & keep_row
        t = target.clamp(0, S - 1)
        w = a.gather(-1, t.view(1, 1, R, 1).expand(a.shape[0], a.shape[1], R, 1)).squeeze(-1)
        if not bool(ok.any()):
            return torch.zeros(a.shape[:2], dtype=torch.float64)
        return w[..., ok].mean(-1)

    scores = {
        "previous_token": score(pos - 1),
        "first_token": score(torch.zeros_like(pos)),
        "self": score(pos),
    }
    for o in offs:
        name = f"offset{o:+d}"
        if o == -1:
            continue
        scores[name] = score(pos + o)
    return HeadRoles(scores)


@dataclass
class HeadSite:
    """Where a layer's head outputs meet: ``module`` receives the concatenated heads ``(B, L, H * Dv)`` as its
    first input (the output projection), ``layer`` its index in the model."""

    name: str
    module: torch.nn.Module
    num_heads: int
    layer: int


@dataclass
class HeadImportance:
    """Head importance ``scores`` ``(layers, H)`` (Michel et al. 2019): the expected ``|dL / d gate|`` of a gate
    multiplying each head's output, over ``examples`` inputs. ``sites`` names the layers."""

    scores: torch.Tensor
    sites: list[str] = field(default_factory=list)
    examples: int = 0

    def ranking(self) -> list[tuple[int, int, float]]:
        """``(layer, head, score)`` from most to least important."""
        flat = [(la, h, float(self.scores[la, h])) for la in range(self.scores.shape[0])
                for h in range(self.scores.shape[1])]
        return sorted(flat, key=lambda t: -t[2])


_SITE_SUFFIXES = (
    "attention.output.dense",  # BERT, RoBERTa, MiniLM, ELECTRA
    "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma
    "self_attn.out_proj",  # BART, OPT, Whisper, CLIP
    "attn.c_proj",  # GPT-2
    "attention.dense",  # GPT-NeoX
    "attn.out_proj",  # GPT-J
)


def find_head_sites(model: torch.nn.Module, num_heads: int | None = None) -> list[HeadSite]:
    """Find the output projections where each layer's heads are concatenated.

    Knows salience's :class:`~salience.layers.MultiHeadAttention` (its ``out_proj``) and the usual Hugging Face
    module names (``attention.output.dense`` in BERT-like models, ``self_attn.o_proj``, ``attn.c_proj``...).
    ``num_heads`` defaults to ``model.config.num_attention_heads`` or the layer's own head count.
    For other models build the :class:`HeadSite` list yourself.
    """
    cfg_heads = num_heads
    if cfg_heads is None:
        cfg = getattr(model, "config", None)
        cfg_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    sites = []
    for name, mod in model.named_modules():
        heads = None
        target = None
        if type(mod).__name__ == "MultiHeadAttention" and isinstance(getattr(mod, "out_proj", None), torch.nn.Module) \
                and not isinstance(mod, torch.nn.MultiheadAttention):
            heads = getattr(mod, "num_heads", None) or getattr(mod, "heads", None)
            target, tname = mod.out_proj, f"{name}.out_proj" if name else "out_proj"
        elif any(name == s or name.endswith("." + s) for s in _SITE_SUFFIXES) and isinstance(mod, torch.nn.Linear) \
                or (type(mod).__name__ == "Conv1D" and name.endswith("attn.c_proj")):
            heads = cfg_heads
            target, tname = mod, name
        if target is not None:
            if not heads:
                raise ValueError(
                    f"found the head output projection {tname!r} but not the head count; pass num_heads=."
                )
            sites.append(HeadSite(tname, target, int(heads), len(sites)))
    return sites


def head_importance(model: torch.nn.Module, batches: Iterable, loss_fn: Callable, sites: list[HeadSite] | None = None,
                    normalize_layers: bool = True) -> HeadImportance:
    """Head importance through gates (Michel et al. 2019), without transformers' removed ``head_mask``.

    A gate ``xi[b, h] = 1`` multiplies each head's output on the way into the output projection (a forward
    pre-hook on each :class:`HeadSite`); one backward pass of ``loss_fn`` per batch gives ``dL_b / dxi[b, h]``
    for every example ``b`` at once, and the importance is ``mean_b |dL_b / dxi[b, h]|``.

    Args:
        model: the network (salience layers or a Hugging Face model).
        batches: an iterable of batches (anything ``loss_fn`` understands; a single batch is fine in a list).
        loss_fn: ``loss_fn(model, batch) -> loss``: per-example losses ``(B,)`` or their sum (a mean scales all
            scores by 1/B, which keeps the ranking).
        sites: where heads meet (default :func:`find_head_sites`).
        normalize_layers: divide each layer's scores by their L2 norm, as Michel et al. do.

    Returns:
        :class:`HeadImportance` with ``scores`` ``(layers, H)``.

    Example:
        >>> import torch
        >>> from salience.interpret.methods import HeadSite, head_importance
        >>> proj = torch.nn.Linear(4, 1, bias=False)
        >>> site = HeadSite("proj", proj, num_heads=2, layer=0)
        >>> x = torch.tensor([[[1.0, 1.0, 2.0, 2.0]]])                 # (B, L, H * Dv), two heads of size 2
        >>> _ = torch.nn.init.ones_(proj.weight)
        >>> head_importance(proj, [x], lambda m, b: m(b).sum(), [site], normalize_layers=False).scores.tolist()
        [[2.0, 4.0]]
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> loss; got {type(loss_fn).__name__}.")
    if sites is None:
        sites = find_head_sites(model)
    if not sites:
        raise ValueError(
            "no head output projection found in this model; pass sites=[HeadSite(name, out_proj_module, "
            "num_heads, layer)] for the module that receives the concatenated heads."
        )
    heads = {s.num_heads for s in sites}
    H = max(heads)
    totals = torch.zeros(len(sites), H, dtype=torch.float64)
    gates: list[list[torch.Tensor]] = [[] for _ in sites]

    def make_hook(k: int, site: HeadSite):
        def hook(_mod, args):
            x = args[0]
            if x.shape[-1] % site.num_heads:
                raise ValueError(
                    f"site {site.name!r}: input width {x.shape[-1]} is not divisible by num_heads={site.num_heads}."
                )
            g = torch.ones(x.shape[0], site.num_heads, dtype=x.dtype, device=x.device, requires_grad=True)
            gates[k].append(g)
            shape = x.shape
            xg = x.reshape(shape[0], -1, site.num_heads, shape[-1] // site.num_heads)
            xg = xg * g.view(shape[0], 1, site.num_heads, 1)
            return (xg.reshape(shape), *args[1:])
        return hook

    handles = [s.module.register_forward_pre_hook(make_hook(k, s)) for k, s in enumerate(sites)]
    n_ex = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                for gl in gates:
                    gl.clear()
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() > 1:
                    raise ValueError("loss_fn must return a scalar loss or per-example losses of shape (B,).")
                loss = loss.sum()
                used = [g for gl in gates for g in gl]
                if not used:
                    raise ValueError("no gate was used: the sites were not called by loss_fn's forward pass.")
                grads = torch.autograd.grad(loss, used, allow_unused=True)
                it = iter(grads)
                b = 0
                for k, gl in enumerate(gates):
                    for g in gl:
                        gr = next(it)
                        b = max(b, g.shape[0])
                        if gr is not None:
                            totals[k, : g.shape[1]] += gr.detach().abs().double().sum(0).cpu()
                n_ex += b
    finally:
        for h in handles:
            h.remove()
    if n_ex == 0:
        raise ValueError("batches was empty; pass at least one batch.")
    scores = totals / n_ex
    if normalize_layers:
        norm = scores.norm(dim=1, keepdim=True)
        scores = torch.where(norm > 0, scores / torch.where(norm > 0, norm, torch.ones_like(norm)), scores)
    return HeadImportance(scores=scores, sites=[s.name for s in sites], examples=n_ex)

