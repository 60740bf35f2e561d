"""Record attention maps from salience layers and Hugging Face models, without eager attention.

While a :class:`capture` is open it subscribes to :mod:`salience._hooks`: every salience attention call
(``salience.layers`` and models running ``attn_implementation="salience"``) emits an
:class:`~salience._hooks.AttentionEvent` with q, k, mask, score_mod, scale and the logsumexp. The recorder
then recomputes **only** the layers, heads and query rows asked for with
:func:`salience.attention_weights` (``exp(score - lse)``, no second reduction), in row chunks bounded by
``max_chunk_bytes``, and stores them at the precision asked for, optionally fused over heads
(``aggregate``) and pooled over blocks of tokens (``pool``). The model's own forward pass keeps its fast
kernels.

Maps are ``(B, h, r, s)`` per recorded call: batch, selected heads (1 when aggregated), selected rows
(pooled), keys (pooled). :meth:`AttentionMaps.stack` gives ``(layers, h, r, s)`` for one example, the
input of :mod:`salience.interpret.methods`.

Example:
    >>> import torch
    >>> from salience.layers import MultiHeadAttention
    >>> from salience.interpret import capture
    >>> layer = MultiHeadAttention(16, 4)
    >>> with capture(heads=[0, 1], rows=[0]) as rec:
    ...     _ = layer(torch.randn(1, 5, 16))
    >>> maps = rec.result()
    >>> maps.maps[0].shape                  # (B, heads, rows, keys)
    torch.Size([1, 2, 1, 5])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _hooks
from ..functional import attention_weights

__all__ = ["AttentionMaps", "capture", "Recorder", "capture_with_grad", "GradRecorder", "STORE_DTYPES", "AGGREGATES",
           "EXPLICIT_IMPLEMENTATION"]

#: storage dtypes accepted by :class:`capture` (reduced precision halves or quarters the recorded size)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
#: head aggregations accepted by :class:`capture`
AGGREGATES = (None, "mean", "max")

_FORMAT = "salience.AttentionMaps/1"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass
class AttentionMaps:
    """Recorded attention: ``tokens``, ``maps`` (one ``(B, h, r, s)`` tensor per recorded call, in call
    order) and ``metadata`` (per-entry layer name and index, head and row indices, pooling, dtype, sizes).

    ``metadata["entries"][i]`` describes ``maps[i]``: ``name``, ``layer`` (the layer index used for
    selection), ``call`` (how many times that layer had been called before), ``heads`` (recorded head
    indices, or the aggregated ones), ``rows`` (recorded query positions, before pooling), ``keys`` (S),
    ``aggregate``, ``pool``.

    Example:
        >>> import torch
        >>> m = AttentionMaps(tokens=["a", "b"], maps=[torch.full((1, 1, 2, 2), 0.5)],
        ...                   metadata={"entries": [{"name": "l0", "layer": 0, "call": 0, "heads": [0],
        ...                                          "rows": [0, 1], "keys": 2, "aggregate": None, "pool": 1}]})
        >>> m.stack().shape
        torch.Size([1, 1, 2, 2])
    """

    tokens: list | None
    maps: list[torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @property
    def entries(self) -> list[dict]:
        return self.metadata.get("entries", [])

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded maps."""
        return sum(m.numel() * m.element_size() for m in self.maps)

    @property
    def layer_names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def select(self, call: int | None = 0) -> list[int]:
        """Indices into ``maps`` of the entries of forward pass ``call`` (None: all entries)."""
        return [i for i, e in enumerate(self.entries) if call is None or e.get("call", 0) == call]

    def stack(self, batch: int = 0, layers=None, call: int | None = 0, dtype=torch.float32) -> torch.Tensor:
        """One example's maps as ``(layers, h, r, s)`` (the input of :mod:`salience.interpret.methods`).

        Args:
            batch: which example of the batch.
            layers: indices into the recorded layers of that call (None: all).
            call: which forward pass (0: the first) when the capture saw several; None takes every entry.
            dtype: output dtype (the stored one may be float16/bfloat16).
        """
        idx = self.select(call)
        if not idx:
            raise ValueError(f"no recorded entry for call={call}; recorded calls: "
                             f"{sorted({e.get('call', 0) for e in self.entries})}.")
        if layers is not None:
            sel = [layers] if isinstance(layers, int) else list(layers)
            bad = [i for i in sel if not -len(idx) <= i < len(idx)]
            if bad:
                raise ValueError(f"layers {bad} out of range: {len(idx)} layers were recorded.")
            idx = [idx[i] for i in sel]
        parts = [self.maps[i] for i in idx]
        B = parts[0].shape[0]
        if not -B <= batch < B:
            raise ValueError(f"batch {batch} out of range for batch size {B}.")
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                f"the selected layers have different map shapes {sorted(shapes)} (heads, rows, keys); "
                "stack layers of one kind (pass layers=[...]) or record them with the same heads and rows."
            )
        return torch.stack([p[batch] for p in parts]).to(dtype)

    def summary(self) -> str:
        """One line: what was recorded and how many bytes it takes (and what full float32 maps would take)."""
        if not self.maps:
            return "no attention recorded (did the model run salience attention inside the capture?)"
        full = sum(e.get("full_bytes", 0) for e in self.entries)
        m0 = self.maps[0]
        dt = self.metadata.get("dtype", str(m0.dtype).replace("torch.", ""))
        extra = f"; full float32 maps would take {_fmt_bytes(full)}" if full else ""
        return (f"{len(self.maps)} map(s), first {tuple(m0.shape)} (B, heads, rows, keys), {dt}, "
                f"{_fmt_bytes(self.nbytes)} recorded{extra}")

    def report_fields(self) -> dict:
        """What :func:`salience.interpret.render.html.report` reads off recorded maps: the stacked maps
        (:meth:`stack`), the tokens (the first sequence's for a batch), the rows' positions when they were recorded
        unpooled, the layer names of the first call and the summary line."""
        tokens = self.tokens[0] if self.tokens and isinstance(self.tokens[0], list) else self.tokens
        e0 = self.entries[0] if self.entries else {}
        rows = e0["rows"] if e0.get("rows") is not None and e0.get("pool", 1) == 1 else None
        return {"attn": self.stack(), "tokens": tokens, "row_index": rows,
                "layer_names": [e["name"] for e in self.entries if e.get("call", 0) == 0], "summary": self.summary()}

    def _repr_html_(self) -> str:
        """Jupyter shows the recorded maps as the self-contained HTML report (in an ``<iframe srcdoc>``)."""
        if not self.maps:
            return f"<pre>{self.summary()}</pre>"
        from .render import html

        return html.report(self)._repr_html_()

    # ------------------------------------------------------------------------------------------ npz
    def save(self, path) -> Path:
        """Write an ``.npz`` (maps as arrays, tokens and metadata as JSON); bfloat16 is kept as its bits."""
        import numpy as np

        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"path must end in .npz; got {str(path)!r}.")
        arrays = {}
        dtypes = []
        for i, m in enumerate(self.maps):
            t = m.detach().cpu()
            dtypes.append(str(t.dtype).replace("torch.", ""))
            arrays[f"map_{i}"] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        header = {"format": _FORMAT, "tokens": self.tokens, "metadata": self.metadata, "dtypes": dtypes}
        arrays["header"] = np.array(json.dumps(header, default=_json_default))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path) -> AttentionMaps:
        """Read what :meth:`save` wrote."""
        import numpy as np

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {str(path)!r}")
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise ValueError(f"{str(path)!r} is not an AttentionMaps file (no header array).")
            header = json.loads(str(z["header"]))
            if header.get("format") != _FORMAT:
                raise ValueError(f"{str(path)!r} has format {header.get('format')!r}; expected {_FORMAT!r}.")
            maps = []
            for i, dt in enumerate(header["dtypes"]):
                t = torch.from_numpy(np.array(z[f"map_{i}"]))
                maps.append(t.view(torch.bfloat16) if dt == "bfloat16" else t)
        return cls(tokens=header["tokens"], maps=maps, metadata=header["metadata"])


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    return str(o)


def _check_index_list(sel, argname: str):
    if sel is None or isinstance(sel, slice):
        return sel
    if isinstance(sel, int) and not isinstance(sel, bool):
        return [sel]
    if isinstance(sel, torch.Tensor):
        sel = sel.tolist()
    try:
        out = list(sel)
    except TypeError:
        raise TypeError(f"{argname} must be None, an int, a slice or a list of ints; got {sel!r}.") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in out):
        raise TypeError(f"{argname} must be None, an int, a slice or a list of ints; got {sel!r}.")
    return out


class Recorder:
    """What :class:`capture` yields: collects entries while open; :meth:`result` returns the
    :class:`AttentionMaps`."""

    def __init__(self, cap: capture):
        self._cap = cap
        self.maps: list[torch.Tensor] = []
        self.entries: list[dict] = []
        self._order: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self.events_seen = 0

    def result(self, tokens=None) -> AttentionMaps:
        """The recorded maps, with ``tokens`` (a list of strings, or one list per example) attached."""
        c = self._cap
        meta = {
            "entries": list(self.entries),
            "dtype": str(c.dtype).replace("torch.", ""),
            "aggregate": c.aggregate,
            "pool": c.pool,
            "events_seen": self.events_seen,
        }
        return AttentionMaps(tokens=tokens, maps=list(self.maps), metadata=meta)

    # --------------------------------------------------------------------------------- event handler
    def __call__(self, ev: _hooks.AttentionEvent) -> None:
        self.events_seen += 1
        name = ev.name or "attention"
        if name not in self._order:
            self._order[name] = len(self._order)
        layer = ev.layer_index if ev.layer_index is not None else self._order[name]
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        if not self._cap._wants_layer(layer, name):
            return
        self._record(ev, name, layer, call)

    def _record(self, ev, name: str, layer: int, call: int) -> None:
        c = self._cap
        q, k = ev.q.detach(), ev.k.detach()
        lse = ev.lse.detach() if ev.lse is not None else None
        B, H, L, _ = q.shape
        S = k.shape[2]
        heads = list(range(H)) if c.heads is None else [h % H for h in c.heads]
        if c.heads is not None and any(not -H <= h < H for h in c.heads):
            raise ValueError(f"heads {c.heads} out of range for layer {name!r} with {H} heads.")
        if c.rows is None:
            rows = list(range(L))
        elif isinstance(c.rows, slice):
            rows = list(range(L))[c.rows]
        else:
            if any(not -L <= r < L for r in c.rows):
                raise ValueError(f"rows {c.rows} out of range for layer {name!r} with query length {L}.")
            rows = [r % L for r in c.rows]
        if not rows:
            raise ValueError(f"rows={c.rows!r} selects no query row of layer {name!r} (length {L}).")
        p = c.pool
        hs = 1 if c.aggregate else len(heads)
        R = math.ceil(len(rows) / p)
        Sp = math.ceil(S / p)
        out = torch.empty(B, hs, R, Sp, dtype=c.dtype, device="cpu")
        # rows per chunk so that one float32 chunk of weights (B, heads, rows, S) stays under the budget
        per_row = max(1, B * len(heads) * S * 4)
        chunk = max(1, c.max_chunk_bytes // per_row)
        chunk = max(p, (chunk // p) * p)
        h_idx = torch.tensor(heads, dtype=torch.long)
        with torch.no_grad():
            for start in range(0, len(rows), chunk):
                r_sel = rows[start : start + chunk]
                w = attention_weights(q, k, mask=ev.mask, score_mod=ev.score_mod, scale=ev.scale,
                                      heads=h_idx.to(q.device), rows=torch.tensor(r_sel, device=q.device),
                                      lse=lse)
                w = w.float()
                if c.aggregate == "mean":
                    w = w.mean(1, keepdim=True)
                elif c.aggregate == "max":
                    w = w.amax(1, keepdim=True)
                if p > 1:
                    w = _pool(w, p)
                out[:, :, start // p : start // p + w.shape[2]] = w.to("cpu", c.dtype)
        self.maps.append(out)
        self.entries.append({
            "name": name, "layer": int(layer), "call": int(call),
            "heads": heads, "rows": rows, "keys": int(S), "query_length": int(L),
            "aggregate": c.aggregate, "pool": p,
            "full_bytes": int(B * H * L * S * 4),
        })


def _pool(w: torch.Tensor, p: int) -> torch.Tensor:
    """(B, h, r, s) -> (B, h, ceil(r/p), ceil(s/p)): mean over each block of rows, sum over each block of
    keys, so pooled rows still sum to 1."""
    B, h, r, s = w.shape
    rp, sp = math.ceil(r / p), math.ceil(s / p)
    w = torch.nn.functional.pad(w, (0, sp * p - s, 0, rp * p - r))
    w = w.view(B, h, rp, p, sp, p).sum((3, 5))
    counts = torch.full((rp,), float(p))
    counts[-1] = r - (rp - 1) * p
    return w / counts.view(1, 1, rp, 1)


class capture:
    """Context manager recording attention maps from salience attention calls.

    Args:
        model: optional. A Hugging Face model is checked to run ``attn_implementation="salience"`` (use
            ``salience.integrations.hf.enable(model)``); None records every salience layer that runs.
        layers: which layers to keep: ints (the layer index a model reports, else the order of first call)
            or strings (a module name, or a part of it); None keeps all.
        heads: query-head indices to keep (None: all).
        rows: query positions to keep: a list, a slice or None (all). One row (e.g. ``[0]`` for [CLS]) of a
            long input costs O(S) per head instead of O(L x S).
        dtype: storage dtype, ``torch.float32`` (default), ``float16``, ``bfloat16`` or ``float64``
            (or its name).
        aggregate: None (keep heads), ``"mean"`` or ``"max"`` over the selected heads.
        pool: block size p >= 1: each stored row is the mean of p query rows and each column the sum of p
            keys (rows still sum to 1); for long inputs, p x p fewer numbers.
        max_chunk_bytes: bound on the float32 weights computed at once (rows are processed in chunks).

    Yields:
        a :class:`Recorder`; after the block, ``recorder.result(tokens)`` is the :class:`AttentionMaps`.

    Example:
        >>> import torch
        >>> from salience.layers import MultiHeadAttention
        >>> layer = MultiHeadAttention(16, 4, name="attn")
        >>> with capture(aggregate="mean", dtype="float16") as rec:
        ...     _ = layer(torch.randn(2, 6, 16))
        >>> rec.result().maps[0].shape, rec.result().maps[0].dtype
        (torch.Size([2, 1, 6, 6]), torch.float16)
    """

    def __init__(self, model=None, *, layers=None, heads=None, rows=None, dtype=torch.float32, aggregate=None,
                 pool: int = 1, max_chunk_bytes: int = 32 * 2**20):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}.")
        if model is not None and hasattr(model, "config") and hasattr(model.config, "_attn_implementation"):
            impl = model.config._attn_implementation
            if impl not in ("salience",) and not str(impl).startswith("salience"):
                raise ValueError(
                    f"this transformers model runs attn_implementation={impl!r}, which emits no attention events; "
                    "switch it with salience.integrations.hf.enable(model) (or load it with "
                    "attn_implementation='salience') and capture again."
                )
        self.model = model
        if isinstance(dtype, str):
            if dtype not in STORE_DTYPES:
                raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}; got {dtype!r}.")
            dtype = STORE_DTYPES[dtype]
        if dtype not in STORE_DTYPES.values():
            raise TypeError(f"dtype must be one of torch.float32, float16, bfloat16, float64; got {dtype!r}.")
        self.dtype = dtype
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be None, 'mean' or 'max'; got {aggregate!r}.")
        self.aggregate = aggregate
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be an int >= 1 (block size in tokens); got {pool!r}.")
        self.pool = pool
        if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be a positive int; got {max_chunk_bytes!r}.")
        self.max_chunk_bytes = max_chunk_bytes
        self.heads = _check_index_list(heads, "heads")
        if isinstance(self.heads, slice):
            raise TypeError("heads must be None, an int or a list of ints (not a slice).")
        self.rows = _check_index_list(rows, "rows")
        if layers is None:
            self.layers = None
        else:
            sel = [layers] if isinstance(layers, (int, str)) and not isinstance(layers, bool) else list(layers)
            if not all((isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, str) for x in sel):
                raise TypeError(f"layers must be None, or ints and/or strings (module names); got {layers!r}.")
            self.layers = sel
        self.recorder: Recorder | None = None

    def _wants_layer(self, layer: int, name: str) -> bool:
        if self.layers is None:
            return True
        for s in self.layers:
            if isinstance(s, str):
                if s == name or s in name:
                    return True
            elif s == layer:
                return True
        return False

    def __enter__(self) -> Recorder:
        if self.recorder is not None:
            raise RuntimeError("this capture is already open; make a new capture(...) for another block.")
        self.recorder = Recorder(self)
        _hooks.subscribe(self.recorder)
        return self.recorder

    def __exit__(self, *exc) -> None:
        _hooks.unsubscribe(self.recorder)
        return None


#: the transformers attention implementation :class:`capture_with_grad` switches a model to while it is open
EXPLICIT_IMPLEMENTATION = "salience_explicit"


class GradRecorder:
    """What :class:`capture_with_grad` yields: ``weights`` (one ``(B, H, L, S)`` tensor per attention call,
    part of the autograd graph) and, after ``backward()``, :meth:`grads`."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []
        self.names: list[str] = []

    def grads(self) -> list[torch.Tensor]:
        """``dF/dA`` per call (zeros where the explained scalar did not depend on a layer)."""
        if not self.weights:
            raise RuntimeError("no attention call was recorded; run the model inside the capture_with_grad block.")
        out = []
        for w in self.weights:
            if w.grad is None and not w.requires_grad:
                raise RuntimeError(
                    "the recorded weights are not part of an autograd graph: run the forward pass with gradients "
                    "enabled (not under torch.no_grad()) and call backward() on the explained scalar."
                )
            out.append(torch.zeros_like(w) if w.grad is None else w.grad.detach())
        return out

    def maps(self) -> torch.Tensor:
        """The weights of example 0 as ``(layers, H, L, S)``, detached."""
        return torch.stack([w.detach()[0] for w in self.weights])


def _explicit_forward_factory(rec_stack: list):
    from .._layout import expand_kv
    from ..integrations import hf as _hf

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        box: list = []
        _hooks.subscribe(box.append)  # read the mask, score_mod and scale salience derives for this call
        try:
            _hf.attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                  **{k: v for k, v in kwargs.items() if k != "output_attentions"})
        finally:
            _hooks.unsubscribe(box.append)
        ev = [e for e in box if e.q is query][-1]
        sinks = ev.extra.get("sinks")
        w = attention_weights(query, key, mask=ev.mask, score_mod=ev.score_mod, scale=ev.scale,
                              sinks=sinks)  # gpt-oss: the sink takes its share of each row
        if w.requires_grad:
            w.retain_grad()
        if rec_stack:
            rec_stack[-1].weights.append(w)
            rec_stack[-1].names.append(ev.name)
        out = w.to(value.dtype) @ expand_kv(value, query.shape[1])
        return out.transpose(1, 2).contiguous(), (w if kwargs.get("output_attentions") else None)

    return forward


_GRAD_STACK: list[GradRecorder] = []


class capture_with_grad:
    """Context manager giving attention weights that are part of the autograd graph, for gradient x attention.

    The fused kernels never form the weights, so ``dF/dA`` does not exist in a normal forward pass. While
    open, a Hugging Face model running salience attention is switched to ``"salience_explicit"``: the
    same masks and score_mods (read from the salience attention call), but the output is computed as
    ``attention_weights(q, k) @ v`` so that ``A.grad`` fills in on ``backward()``. This materialises
    ``(B, H, L, S)`` per layer: meant for inputs of a few hundred tokens. No dropout is applied (use eval
    mode). The previous implementation is restored on exit.

    Only Hugging Face models are supported: salience's own layers emit no values in their attention events,
    so for them compute the gradients yourself and call :func:`salience.interpret.methods.gradient_x_attention`.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import salience.integrations.hf as shf
        >>> from salience.interpret.capture import capture_with_grad
        >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                  intermediate_size=64)
        >>> model = shf.enable(BertModel(cfg, add_pooling_layer=False).eval())
        >>> with capture_with_grad(model) as rec:
        ...     model(torch.tensor([[5, 6, 7, 8]])).last_hidden_state[:, 0].sum().backward()
        >>> len(rec.grads()), rec.grads()[0].shape
        (2, torch.Size([1, 4, 4, 4]))
    """

    def __init__(self, model):
        if not (isinstance(model, torch.nn.Module) and hasattr(model, "set_attn_implementation")):
            raise NotImplementedError(
                f"capture_with_grad supports transformers models (got {type(model).__name__}): salience layers' "
                "attention events carry no values, so dF/dA cannot be formed from them. Compute the gradient of "
                "your scalar with respect to explicit weights and call methods.gradient_x_attention."
            )
        impl = model.config._attn_implementation
        if impl != "salience":
            raise ValueError(
                f"this model runs attn_implementation={impl!r}; enable salience attention first with "
                "salience.integrations.hf.enable(model)."
            )
        self.model = model
        self.recorder: GradRecorder | None = None

    def __enter__(self) -> GradRecorder:
        from transformers import AttentionInterface
        from transformers import masking_utils as mu

        from ..integrations import hf as _hf

        AttentionInterface.register(EXPLICIT_IMPLEMENTATION, _explicit_forward_factory(_GRAD_STACK))
        mu.AttentionMaskInterface.register(EXPLICIT_IMPLEMENTATION, _hf.mask_function)
        self.recorder = GradRecorder()
        _GRAD_STACK.append(self.recorder)
        self.model.set_attn_implementation(EXPLICIT_IMPLEMENTATION)
        return self.recorder

    def __exit__(self, *exc) -> None:
        self.model.set_attn_implementation("salience")
        if self.recorder in _GRAD_STACK:
            _GRAD_STACK.remove(self.recorder)
        return None
