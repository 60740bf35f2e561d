"""Hugging Face transformers integration: ``attn_implementation="salience"``.

Importing this module registers two functions under the name ``"salience"``:

* an attention function with ``transformers.AttentionInterface`` (what every attention layer of a model
  calls: ``fn(module, query, key, value, attention_mask, *, scaling, dropout, ...)``), and
* a mask function with ``transformers.masking_utils.AttentionMaskInterface`` (what the model calls once per
  forward to build its mask). Without the second, transformers hands custom attention functions no mask at
  all and padding is silently ignored.

The mask function does not build an ``L x S`` tensor: it reads the structure of the mask transformers
asks for (causal, sliding window, bidirectional, packed documents, offsets from a KV cache, the 2-D padding
mask) and returns an :class:`HFMask` holding the equivalent :mod:`salience.masks` object, for example
``causal() & padding(kv_lengths=[7, 5])`` or ``sliding_window(left=4095, right=0)``. Only masks it cannot
read (custom ``or_mask_function``/``and_mask_function`` overlays, chunked attention) fall back to the dense
boolean mask transformers would give SDPA, wrapped in :func:`salience.masks.dense`.

Shapes: transformers hands the attention function ``query (B, H, L, D)``, ``key (B, Hkv, S, D)``,
``value (B, Hkv, S, Dv)`` (salience's own layout, GQA by head count) and expects ``(B, L, H, Dv)`` back
together with the weights ``(B, H, L, S)`` or None.

``output_attentions=True`` keeps the salience kernels: the output comes from
``salience.attention(..., return_lse=True)`` and the maps from ``salience.attention_weights(q, k, lse=...)``.
Attention sinks (gpt-oss's ``s_aux``) go to ``salience.attention(..., sinks=...)``; the logsumexp includes them.
While an interpretability recorder listens (:func:`salience._hooks.recording`), every call emits a
:class:`salience._hooks.AttentionEvent`; otherwise nothing extra is computed.

Importing ``salience`` alone never imports transformers; only this module does.

Example:
    >>> import torch, salience.integrations.hf as shf
    >>> from transformers import BertConfig, BertModel
    >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                  intermediate_size=64)
    >>> model = BertModel(cfg, add_pooling_layer=False).eval()
    >>> model = shf.enable(model)
    >>> model.config._attn_implementation
    'salience'
    >>> ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    >>> out = model(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    >>> out.last_hidden_state.shape
    torch.Size([2, 3, 32])
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from .. import _hooks
from .. import masks as M
from .. import scores as _scores
from ..functional import attention, attention_weights

try:
    from transformers import masking_utils as _mu
    from transformers.modeling_utils import AttentionInterface
except ImportError as _e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "salience.integrations.hf needs the Hugging Face transformers package, which is not installed. "
        "Install the hf extra: pip install 'salience[hf]'"
    ) from _e

__all__ = [
    "IMPLEMENTATION",
    "TESTED_TRANSFORMERS",
    "HFMask",
    "attention_forward",
    "mask_function",
    "translate_mask",
    "register",
    "is_registered",
    "enable",
    "name_modules",
]

#: the name to pass as ``attn_implementation``
IMPLEMENTATION = "salience"

#: transformers versions this integration is tested with (the ``hf`` extra pins this range)
TESTED_TRANSFORMERS = ">=5.0,<6"

_NEG_INF = -math.inf
_POS_INF = math.inf


# --------------------------------------------------------------------------------------------- the mask


@dataclass
class HFMask:
    """The mask transformers asked for, translated to salience.

    Attributes:
        mask: the :mod:`salience.masks` object (None = every query sees every key).
        q_length, kv_length: the sizes it was built for (L and S).
        batch_size: B.
        structure: a readable summary, e.g. ``"causal() & padding(kv_lengths=[7, 5])"``.
        dense: True when the structure could not be read and ``mask`` wraps a dense (B, 1, L, S) tensor.

    Returned by the registered mask function in place of the tensor the eager/SDPA paths get; models pass
    it unchanged to the attention function, as they do FlexAttention's BlockMask.
    """

    mask: M.MaskMod | None
    q_length: int
    kv_length: int
    batch_size: int
    structure: str
    dense: bool = False

    #: transformers' mask helpers read ``attention_mask.ndim``/``.shape`` on whatever they are handed; generate()
    #: with a static cache builds the mask ahead of the forward and hands it back, so an HFMask answers as the
    #: 4-D (B, 1, L, S) mask it stands for (no tensor is built).
    ndim = 4

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.batch_size, 1, self.q_length, self.kv_length))

    def __repr__(self) -> str:
        kind = "dense fallback" if self.dense else "structured"
        return (f"HFMask({self.structure}, B={self.batch_size}, L={self.q_length}, S={self.kv_length}, "
                f"{kind})")


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _code_of(factory_name: str, *args):
    """The code object shared by every closure a transformers mask factory returns (None if absent)."""
    factory = getattr(_mu, factory_name, None)
    if factory is None:
        return None
    try:
        return factory(*args).__code__
    except Exception:  # a changed signature: that pattern is then read through the dense fallback
        return None


_DUMMY = torch.zeros(1, 1, dtype=torch.long)
_CAUSAL = getattr(_mu, "causal_mask_function", None)
_BIDIRECTIONAL = getattr(_mu, "bidirectional_mask_function", None)
_AND = _code_of("and_masks", _CAUSAL)
_OR = _code_of("or_masks", _CAUSAL)
_SW_OVERLAY = _code_of("sliding_window_overlay", 1)
_SW_BIDIR = _code_of("sliding_window_bidirectional_overlay", 1)
_PADDING = _code_of("padding_mask_function", _DUMMY)
_PACKED = _code_of("packed_sequence_mask_function", _DUMMY)
_REMAP = _code_of("remap_positions_for_packed_sequence", _CAUSAL, _DUMMY)


def _terms(fn):
    """Decompose a transformers mask_function into AND-ed terms, or None when it cannot be read.

    Terms: ``("band", lo, hi)`` for ``lo <= kv_pos - q_pos <= hi`` in absolute positions;
    ``("doc", ids)`` for packed sequences; ``("keys", keep)`` for a (B, N) padding mask; ``("remap",)`` marks
    positions remapped per packed sequence (valid only next to a ``doc`` term).
    """
    if fn is None:
        return None
    if _CAUSAL is not None and fn is _CAUSAL:
        return [("band", _NEG_INF, 0)]
    if _BIDIRECTIONAL is not None and fn is _BIDIRECTIONAL:
        return []
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    cl = _closure(fn)
    if code is _AND and "mask_functions" in cl:
        out = []
        for f in cl["mask_functions"]:
            t = _terms(f)
            if t is None:
                return None
            out += t
        return out
    if code is _SW_OVERLAY and "sliding_window" in cl:
        return [("band", 1 - int(cl["sliding_window"]), _POS_INF)]  # kv > q - w
    if code is _SW_BIDIR and "sliding_window" in cl:
        w = int(cl["sliding_window"])
        return [("band", -w, w)]  # |q - kv| <= w
    if code is _PADDING and "padding_mask" in cl:
        return [("keys", cl["padding_mask"])]
    if code is _PACKED and "packed_sequence_mask" in cl:
        return [("doc", cl["packed_sequence_mask"])]
    if code is _REMAP and "mask_function" in cl:
        inner = _terms(cl["mask_function"])
        if inner is None or any(t[0] != "band" for t in inner):
            return None
        return inner + [("remap",)]
    return None


def _band_mask(lo: int, hi: int, L: int, S: int) -> M.MaskMod | None:
    """The salience mask for ``lo <= kv_idx - q_idx <= hi`` on an L x S grid (None when it hides nothing).

    Bounds beyond the grid are unbounded; :func:`salience.masks.band` names the band (causal, sliding window)."""
    lo_b = None if lo <= -(L - 1) else int(lo)  # -(L - 1) and S - 1: the extreme values kv_idx - q_idx takes
    hi_b = None if hi >= S - 1 else int(hi)
    if lo_b is None and hi_b is None:
        return None
    if lo_b is None and hi_b == S - L and S > L:
        return M.band(None, 0, align="bottom_right")
    return M.band(lo_b, hi_b)


def _key_mask(keep: torch.Tensor) -> M.MaskMod:
    """Per-batch key visibility ``keep`` (B, S) of any pattern (left padding, holes), with analytic tiles
    from prefix sums: O(B x S) work, no L x S tensor."""
    keep = keep.to(torch.bool)
    B, S = keep.shape
    csum = torch.nn.functional.pad(keep.long().cumsum(-1), (1, 0))  # (B, S + 1)

    def fn(b, h, q, kv):
        return keep[b, kv]

    def tiles(ctx):
        ks, ke = ctx.k_start.reshape(-1), ctx.k_end.reshape(-1)
        cnt = (csum[:, ke] - csum[:, ks]).view(B, 1, 1, -1)
        return cnt > 0, cnt == (ke - ks).view(1, 1, 1, -1)

    m = M.MaskMod(fn, f"key_mask(<{B} x {S}>, {int(keep.sum())} visible)", tiles=tiles)
    m.keep = keep
    return m


def _left_padding(keep: torch.Tensor, L: int) -> M.MaskMod:
    """Left padding (batch b sees keys ``j >= start[b]``) as a two-document mask: every query belongs to
    document 1 and keys are 0 (padding) or 1 (real), sorted, so kernels see one key interval per row."""
    B, S = keep.shape
    starts = (S - keep.sum(-1)).cpu()
    m = M.document(torch.ones(B, L, dtype=torch.long), keep.long().cpu())
    shown = starts.tolist() if B <= 8 else f"<{B} starts>"
    m.name = m.__name__ = f"left_padding(kv_starts={shown})"
    return m


def _keys_to_mask(keep: torch.Tensor, L: int) -> M.MaskMod | None:
    """A (B, S) key-visibility tensor as the simplest salience mask: None, ``padding(kv_lengths=...)`` (right
    padding), left padding, both (one run of real keys per row: left padding in a static cache), or a general
    per-key mask (holes)."""
    if bool(keep.all()):
        return None
    counts = keep.sum(-1, keepdim=True)
    pos = torch.arange(keep.shape[-1], device=keep.device).unsqueeze(0)
    if bool(((pos < counts) == keep).all()):
        return M.padding(kv_lengths=counts.view(-1).cpu())
    if bool(((pos >= keep.shape[-1] - counts) == keep).all()):
        return _left_padding(keep, L)
    start = keep.long().argmax(-1, keepdim=True)
    if bool((((pos >= start) & (pos < start + counts)) == keep).all()):
        # one run of real keys per row, [start, start + count): a left-padded batch in a static cache (its slots past
        # the current length are not real yet); as left padding & right padding it stays one key interval per row
        return _left_padding(pos >= start, L) & M.padding(kv_lengths=(start + counts).view(-1).cpu())
    return _key_mask(keep)


def _as_int(x) -> int:
    return int(x.reshape(-1)[0]) if isinstance(x, torch.Tensor) else int(x)


def _slice_keys(pad: torch.Tensor, start: int, S: int) -> torch.Tensor:
    """``pad[:, start:start+S]`` with False past the end (as transformers' prepare_padding_mask pads)."""
    pad = pad.to(torch.bool)
    need = start + S - pad.shape[-1]
    if need > 0:
        pad = torch.nn.functional.pad(pad, (0, need), value=False)
    return pad[:, start : start + S]


def translate_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
) -> HFMask | None:
    """Translate the mask transformers describes into a salience mask, or return None when unreadable.

    Args:
        batch_size: B. q_length, kv_length: L and S of the attention call.
        q_offset, kv_offset: absolute position of the first query / key (non-zero with a KV cache).
        mask_function: transformers' mask_function ``(b, h, q_idx, kv_idx) -> bool`` on absolute positions.
        attention_mask: the 2-D padding mask (B, N) (1 = real token), indexed at ``kv_offset + kv_idx``.

    Example:
        >>> from transformers.masking_utils import causal_mask_function
        >>> translate_mask(2, 4, 4, mask_function=causal_mask_function,
        ...                attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])).structure
        'causal() & padding(kv_lengths=[4, 2])'
    """
    terms = _terms(mask_function if mask_function is not None else _BIDIRECTIONAL)
    if terms is None:
        return None
    L, S = int(q_length), int(kv_length)
    qo, ko = _as_int(q_offset), _as_int(kv_offset)
    kinds = {t[0] for t in terms}
    if "remap" in kinds and "doc" not in kinds:
        return None
    lo, hi = _NEG_INF, _POS_INF
    parts = []
    for t in terms:
        if t[0] == "band":
            lo, hi = max(lo, t[1]), min(hi, t[2])
    if lo > _NEG_INF or hi < _POS_INF:
        d = qo - ko  # kv_pos - q_pos = (kv_idx + ko) - (q_idx + qo)
        band = _band_mask(lo + d, hi + d, L, S)
        if band is not None:
            parts.append(band)
    for t in terms:
        if t[0] == "doc":
            ids = t[1]
            if ids.dim() != 2:
                return None
            if ids.shape[-1] < max(qo + L, ko + S):
                return None
            parts.append(M.document(ids[:, qo : qo + L].cpu(), ids[:, ko : ko + S].cpu()))
        elif t[0] == "keys":
            km = _keys_to_mask(_slice_keys(t[1], ko, S), L)
            if km is not None:
                parts.append(km)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return None
        km = _keys_to_mask(_slice_keys(attention_mask, ko, S), L)
        if km is not None:
            parts.append(km)
    mask = None
    for p in parts:
        mask = p if mask is None else (mask & p)
    structure = "full (no mask)" if mask is None else mask.name
    return HFMask(mask, L, S, int(batch_size), structure)


def mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
    device=None,
    **kwargs,
) -> HFMask:
    """The function registered with ``AttentionMaskInterface``: same keywords as transformers' ``sdpa_mask``.

    Returns an :class:`HFMask`; the mask is structured when :func:`translate_mask` can read it, otherwise the
    boolean (B, 1, L, S) tensor transformers' own ``sdpa_mask`` builds, wrapped in ``masks.dense``.
    """
    _check_config_model(kwargs.get("config"))
    if q_length is None and cache_position is not None:  # transformers 4.x called it with cache_position
        q_length = int(cache_position.shape[0])
        q_offset = _as_int(cache_position[:1]) if cache_position.numel() else 0
    if q_length is None or kv_length is None:
        raise ValueError(
            f"salience mask function needs q_length and kv_length; got q_length={q_length}, "
            f"kv_length={kv_length}. This transformers version passes other arguments; supported: "
            f"transformers {TESTED_TRANSFORMERS}."
        )
    if isinstance(attention_mask, HFMask):
        return _handed_back(attention_mask, batch_size, q_length, kv_length)
    hm = translate_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    if hm is not None:
        return hm
    args = dict(kwargs)
    args.update(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                attention_mask=attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if "q_length" in inspect.signature(_mu.sdpa_mask).parameters:
        args.update(q_length=q_length, q_offset=q_offset, device=device if device is not None else "cpu")
    else:  # transformers releases whose sdpa_mask reads the query positions from cache_position
        if cache_position is None:
            cache_position = torch.arange(q_length, device=device) + _as_int(q_offset)
        args.update(cache_position=cache_position)
    dense = _mu.sdpa_mask(**args)
    mm = M.dense(dense)
    return HFMask(mm, int(q_length), int(kv_length), int(batch_size), mm.name, dense=True)


def _handed_back(hm: HFMask, batch_size, q_length, kv_length) -> HFMask:
    """An HFMask given back as ``attention_mask`` (generate() prepared it for this step): used as it is, as
    transformers uses a prepared 4-D mask tensor or BlockMask."""
    want = (int(batch_size), int(q_length), int(kv_length))
    if (hm.batch_size, hm.q_length, hm.kv_length) != want:
        raise ValueError(
            f"attention_mask is a salience HFMask built for B={hm.batch_size}, L={hm.q_length}, S={hm.kv_length}, "
            f"but this call needs B={want[0]}, L={want[1]}, S={want[2]}. Pass the 2-D padding mask (B, S) instead "
            "and let the model build its mask."
        )
    return hm


# ---------------------------------------------------------------------------------------- attention call


def _bias_mod(bias: torch.Tensor, name: str) -> _scores.ScoreMod:
    """An additive bias broadcastable to (B, H, L, S) as a score_mod."""
    b4 = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    Bb, Hb, Lb, Sb = b4.shape

    def fn(s, b, h, q, kv):
        return s + b4[b if Bb > 1 else 0 * b, h if Hb > 1 else 0 * h, q if Lb > 1 else 0 * q,
                      kv if Sb > 1 else 0 * kv].to(s.dtype)

    return _scores.ScoreMod(fn, f"{name}(<{tuple(bias.shape)}>)")


def _tensor_mask(t: torch.Tensor, L: int, S: int):
    """A 4-D tensor mask a model or user handed in: (mask, score_mod)."""
    if t.dim() != 4 or t.shape[-2] not in (1, L) or t.shape[-1] not in (1, S):
        raise ValueError(
            f"attention_mask tensor must broadcast to (B, 1, L={L}, S={S}); got shape {tuple(t.shape)}. "
            "Pass the 2-D padding mask (B, S) to the model and let it build the 4-D mask."
        )
    if t.dtype == torch.bool:
        return M.dense(t), None
    if not t.is_floating_point():
        raise TypeError(
            f"attention_mask tensor must be bool (True = attend) or float (additive); got {t.dtype}. "
            "Convert with mask.bool()."
        )
    hidden = t <= torch.finfo(t.dtype).min / 2
    visible = ~hidden
    rest = torch.where(visible, t, torch.zeros((), dtype=t.dtype, device=t.device))
    mask = None if bool(visible.all()) else M.dense(visible)
    mod = None if bool((rest == 0).all()) else _bias_mod(rest, "additive_mask")
    return mask, mod


try:  # transformers >= 5.x with hook-based output capture: output_attentions set in the config shows here
    from transformers.utils.output_capturing import _active_collector as _COLLECTOR
except ImportError:  # older 5.x releases wrap forwards instead; the config flag is read directly
    _COLLECTOR = None


def _wants_attentions(module, kwargs) -> bool:
    """Whether the caller asked for the attention maps: the call's flag, else transformers' collector or config."""
    if "output_attentions" in kwargs and kwargs["output_attentions"] is not None:
        return bool(kwargs["output_attentions"])
    if _COLLECTOR is not None:
        try:
            c = _COLLECTOR.get()
        except Exception:  # pragma: no cover - a changed private API: fall back to the config flag
            c = None
        else:
            return bool(c) and ("attentions" in c or "cross_attentions" in c)
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _module_name(module) -> str:
    name = getattr(module, "_salience_name", None)
    if name:
        return name
    idx = getattr(module, "layer_idx", None)
    return f"layer{idx}.{type(module).__name__}" if idx is not None else type(module).__name__


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
):
    """The function registered with ``AttentionInterface`` under ``"salience"``.

    Args:
        module: the calling attention layer (its ``is_causal`` and ``layer_idx`` are read).
        query: (B, H, L, D). key: (B, Hkv, S, D). value: (B, Hkv, S, Dv); H % Hkv == 0 (GQA/MQA).
        attention_mask: an :class:`HFMask` from the registered mask function, None (then ``is_causal`` or
            ``module.is_causal`` decides, as in transformers' SDPA path), or a 4-D bool/additive tensor.
        dropout: dropout on the weights (transformers passes 0 in eval mode).
        scaling: softmax scale (default 1/sqrt(D)).
        softcap: Gemma-2 style score capping, applied as :func:`salience.scores.softcap`.
        position_bias: additive bias broadcastable to (B, H, L, S) (T5-style).
        sliding_window: a hint some models pass; the window itself comes from the mask, as in eager.
        s_aux: attention sinks (gpt-oss), one logit per query head (H,) in the scaled score domain, passed to
            :func:`salience.attention` as ``sinks`` (a virtual key of value 0 in every row's softmax; gets its
            gradient). The returned weights of a row then sum to less than 1, as eager's.

    Returns:
        ``(out (B, L, H, Dv), weights (B, H, L, S) or None)``; weights only when attentions are requested
        (``output_attentions=True``), computed from the logsumexp, before dropout.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 4, 5, 8); kv = torch.randn(1, 2, 5, 8)
        >>> mod = torch.nn.Module(); mod.is_causal = True
        >>> out, w = attention_forward(mod, q, kv, kv, None, output_attentions=True)
        >>> out.shape, w.shape
        (torch.Size([1, 5, 4, 8]), torch.Size([1, 4, 5, 5]))
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            seen = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, length, head_dim); got {seen}.")
    L, S = query.shape[2], key.shape[2]
    score_mod = None
    if isinstance(attention_mask, HFMask):
        if attention_mask.q_length != L or attention_mask.kv_length != S:
            raise ValueError(
                f"the salience mask was built for L={attention_mask.q_length}, S={attention_mask.kv_length} but "
                f"the attention call has query length {L} and key length {S} (module {_module_name(module)}). "
                "The model changed the sequence lengths after building its mask; use attn_implementation='sdpa' "
                "for this model and report it."
            )
        mask = attention_mask.mask
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        mask = M.causal() if (causal and L > 1) else None
    elif isinstance(attention_mask, torch.Tensor):
        mask, score_mod = _tensor_mask(attention_mask, L, S)
    else:
        raise TypeError(
            f"attention_mask must be a salience HFMask, a 4-D tensor or None; got {type(attention_mask).__name__}. "
            "Was the model's mask built for another attn_implementation? Call "
            "salience.integrations.hf.enable(model) to switch both the attention and the mask function."
        )
    if position_bias is not None:
        pb = _bias_mod(position_bias, "position_bias")
        score_mod = pb if score_mod is None else _scores.compose(score_mod, pb)
    if softcap is not None:
        cap = _scores.softcap(float(softcap))
        score_mod = cap if score_mod is None else _scores.compose(cap, score_mod)
    sink_kw = {} if s_aux is None else {"sinks": s_aux}  # gpt-oss: one sink logit per head, (H,)
    want_weights = _wants_attentions(module, kwargs)
    record = _hooks.recording()
    lse = weights = None
    if want_weights or record:
        out, lse = attention(query, key, value, mask=mask, score_mod=score_mod, scale=scaling,
                             dropout_p=float(dropout), return_lse=True, **sink_kw)
    else:
        out = attention(query, key, value, mask=mask, score_mod=score_mod, scale=scaling,
                        dropout_p=float(dropout), **sink_kw)
    if want_weights:
        weights = attention_weights(query, key, mask=mask, score_mod=score_mod, scale=scaling, lse=lse)
    if record:
        _hooks.emit(_hooks.AttentionEvent(
            name=_module_name(module), q=query, k=key, mask=mask, score_mod=score_mod, scale=scaling, lse=lse,
            layer_index=getattr(module, "layer_idx", None), module=module,
            extra={"source": "transformers", "hf_mask": attention_mask if isinstance(attention_mask, HFMask) else None,
                   "sinks": s_aux},
        ))
    return out.transpose(1, 2).contiguous(), weights


# ------------------------------------------------------------------------------------------ registration


def _refusal(model_name: str, detail: str = "") -> ValueError:
    return ValueError(
        f"{model_name} does not dispatch its attention through transformers' AttentionInterface{detail}, so "
        f"attn_implementation={IMPLEMENTATION!r} cannot reach its attention layers. Load it with "
        "attn_implementation='sdpa' or 'eager'. salience serves models whose attention layers call "
        "ALL_ATTENTION_FUNCTIONS (Llama, Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, T5, BART, Whisper, ...)."
    )


def _dispatches(model_cls) -> bool | None:
    """Whether a transformers model class's attention layers call AttentionInterface (None: cannot tell).

    transformers' own test (``_can_set_attn_implementation``: the modeling module defines an ``*Attention*``
    layer and calls ``ALL_ATTENTION_FUNCTIONS.get_interface``) or the class's ``_supports_attention_backend``.
    """
    if getattr(model_cls, "_supports_attention_backend", False):
        return True
    can_set = getattr(model_cls, "_can_set_attn_implementation", None)
    if can_set is None:
        return None
    try:
        return bool(can_set())
    except Exception:  # pragma: no cover - a changed private API: do not refuse what we cannot judge
        return None


_CONFIG_DISPATCHES: dict = {}


def _check_config_model(config) -> None:
    """Refuse, at the first mask built, a model whose config maps to a class that bypasses AttentionInterface
    (Bloom, MPT: they build the mask through transformers, then use it as a tensor)."""
    if config is None or getattr(config, "_attn_implementation", IMPLEMENTATION) != IMPLEMENTATION:
        return
    key = type(config)
    if key not in _CONFIG_DISPATCHES:
        name, ok = None, None
        try:
            from transformers.models.auto.modeling_auto import MODEL_MAPPING

            cls = MODEL_MAPPING[key]
            name, ok = cls.__name__, _dispatches(cls)
        except Exception:  # a config of a model transformers does not map (remote code): cannot tell
            pass
        _CONFIG_DISPATCHES[key] = (name, ok)
    name, ok = _CONFIG_DISPATCHES[key]
    if ok is False:
        raise _refusal(name)


class _RefusedAttention:
    """Stands in a model's own attention-class table (Falcon's ``FALCON_ATTENTION_CLASSES``, GPT-Neo's) under
    "salience", so loading such a model with attn_implementation="salience" fails at load time with the clear error
    instead of ``KeyError: 'salience'``."""

    def __init__(self, model_name: str):
        self.model_name = model_name

    def __call__(self, *args, **kwargs):
        raise _refusal(self.model_name)


#: models that look their attention class up by ``config._attn_implementation`` in a table of their own
_CLASS_TABLES = (
    ("transformers.models.falcon.modeling_falcon", "FALCON_ATTENTION_CLASSES", "FalconModel"),
    ("transformers.models.gpt_neo.modeling_gpt_neo", "GPT_NEO_ATTENTION_CLASSES", "GPTNeoModel"),
)


def _refuse_in_class_tables() -> None:
    import importlib

    for module_name, table, model_name in _CLASS_TABLES:
        try:
            t = getattr(importlib.import_module(module_name), table, None)
        except Exception:  # pragma: no cover - that model is absent from this transformers release
            continue
        if isinstance(t, dict):
            t.setdefault(IMPLEMENTATION, _RefusedAttention(model_name))


def register() -> None:
    """Register ``"salience"`` with transformers' attention and mask interfaces (done on import; idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    _mu.AttentionMaskInterface.register(IMPLEMENTATION, mask_function)
    _refuse_in_class_tables()


def is_registered() -> bool:
    """True when both the attention function and the mask function are registered under ``"salience"``."""
    return (AttentionInterface._global_mapping.get(IMPLEMENTATION) is attention_forward
            and _mu.AttentionMaskInterface._global_mapping.get(IMPLEMENTATION) is mask_function)


def name_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Stamp each submodule with its module path, used as the ``name`` of emitted AttentionEvents."""
    for name, mod in model.named_modules():
        try:
            mod._salience_name = name or type(mod).__name__
        except AttributeError:  # pragma: no cover - modules with read-only attributes
            pass
    return model


def enable(model, implementation: str = IMPLEMENTATION):
    """Switch a loaded transformers model to salience attention (and name its modules); returns the model.

    Equivalent to ``AutoModel.from_pretrained(path, attn_implementation="salience")`` for a model that is
    already loaded. ``implementation`` may be another registered name ("sdpa", "eager") to switch back.

    Raises:
        ValueError: the model's attention layers do not dispatch through transformers' AttentionInterface
            (Falcon, Bloom, MPT, ...); the model is left as it was.
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel; got {type(model).__name__}. For a "
            "SentenceTransformer, pass its first module's auto_model (model[0].auto_model)."
        )
    register()
    if implementation == IMPLEMENTATION and _dispatches(type(model)) is False:
        raise _refusal(type(model).__name__)
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        raise _refusal(type(model).__name__, f" (it kept attn_implementation={model.config._attn_implementation!r})")
    name_modules(model)
    return model


register()
