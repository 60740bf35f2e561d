"""Classic attention layers of the RNN era, shaped for a decoder step.

* :class:`AdditiveAttention` (Bahdanau et al. 2015): ``score = v^T tanh(W_q q + W_k k)``.
* :class:`LuongAttention` (Luong et al. 2015, global): ``dot``, ``general`` or ``concat`` scores, plus the
  attentional hidden state ``tanh(W_c [context; query])``.
* :class:`LuongLocalAttention` (Luong et al. 2015, local-p): a predicted window centre ``p_t`` and a Gaussian.
* :class:`AttentionPooling` and :class:`HierarchicalAttention` (Yang et al. 2016): word-level then
  sentence-level attention pooling.

Calling convention of the decoder-step layers: ``query`` (B, Dq) for one step or (B, T, Dq) for T steps,
``keys`` (B, S, Dk), ``values`` (B, S, Dv) (default: the keys), and either ``source_lengths`` (B,) or
``source_mask`` (B, S) (**True = real token**). They return an :class:`AttentionOutput` that unpacks to
``(context, weights)``: context (B, Dv) / (B, T, Dv), weights (B, S) / (B, T, S); padded positions get weight 0.
The weights come from :func:`salience.attention_weights` with the matching compatibility function of
:mod:`salience.scores`, and the context is ``weights @ values``.

Example (one step of a GRU decoder):
    >>> import torch
    >>> from salience.layers import AdditiveAttention
    >>> attn = AdditiveAttention(query_dim=16, key_dim=12, hidden_dim=8)
    >>> enc = torch.randn(2, 7, 12)                 # encoder states
    >>> h = torch.randn(2, 16)                      # decoder state
    >>> context, weights = attn(h, enc, source_lengths=[7, 4])
    >>> context.shape, weights.shape, weights[1, 4:].sum().item()
    (torch.Size([2, 12]), torch.Size([2, 7]), 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import attention_weights
from ..masks import dense
from ..scores import Additive, Compatibility, Dot, General
from ._util import check_int, check_lengths

__all__ = [
    "AttentionOutput",
    "AdditiveAttention",
    "LuongAttention",
    "LuongLocalAttention",
    "AttentionPooling",
    "HierarchicalAttention",
    "HierarchicalOutput",
]


@dataclass
class AttentionOutput:
    """Result of a classic attention layer; unpacks to ``(context, weights)`` (always two values).

    Attributes:
        context: (B, Dv) or (B, T, Dv).
        weights: (B, S) or (B, T, S); zero at padded source positions.
        attentional: Luong's ``tanh(W_c [context; query])`` (B, [T,] Dout), or None for layers without it.
        centres: the window centres ``p_t`` (B, [T]) of :class:`LuongLocalAttention`, else None.
    """

    context: torch.Tensor
    weights: torch.Tensor
    attentional: torch.Tensor | None = None
    centres: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.context, self.weights))


class _Projected(Compatibility):
    """Additive scores from keys already passed through ``Additive.project_keys`` (not registered as a child)."""

    dot_reducible = False

    def __init__(self, additive: Additive):
        super().__init__()
        object.__setattr__(self, "_additive", additive)

    def forward(self, q, k_proj):
        return self._additive.scores_from_projected(q, k_proj)


def _as_steps(query: torch.Tensor, dim: int, who: str):
    """(B, Dq) -> (B, 1, 1, Dq), single=True; (B, T, Dq) -> (B, 1, T, Dq)."""
    if not isinstance(query, torch.Tensor) or not query.is_floating_point():
        raise TypeError(f"query must be a float tensor (B, {dim}) or (B, T, {dim}); got {type(query).__name__}.")
    if query.dim() not in (2, 3) or query.shape[-1] != dim:
        raise ValueError(f"{who}: query must have shape (B, {dim}) or (B, T, {dim}); got {tuple(query.shape)}.")
    single = query.dim() == 2
    q = query.unsqueeze(1) if single else query
    return q.unsqueeze(1), single


def _check_seq(t, argname: str, dim: int | None, B: int, dtype, who: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{argname} must be a float tensor (B, S, D); got {type(t).__name__}.")
    if t.dim() != 3 or t.shape[0] != B or (dim is not None and t.shape[-1] != dim):
        want = f"(B={B}, S, {dim if dim is not None else 'D'})"
        raise ValueError(f"{who}: {argname} must have shape {want}; got {tuple(t.shape)}.")
    if t.dtype != dtype:
        raise TypeError(f"{who}: {argname} has dtype {t.dtype} but query has {dtype}; cast one of them.")
    if t.shape[1] == 0:
        raise ValueError(f"{who}: {argname} is empty along the source axis.")


def _source_valid(source_lengths, source_mask, B: int, S: int, device, who: str) -> torch.Tensor | None:
    """(B, S) bool, True = real source position (None when nothing is padded)."""
    if source_lengths is not None and source_mask is not None:
        raise ValueError(f"{who}: give source_lengths or source_mask, not both.")
    if source_mask is not None:
        if not isinstance(source_mask, torch.Tensor) or source_mask.dtype != torch.bool:
            seen = source_mask.dtype if isinstance(source_mask, torch.Tensor) else type(source_mask).__name__
            raise TypeError(f"{who}: source_mask must be a bool tensor (B, S) with True = real token; got {seen}.")
        if tuple(source_mask.shape) != (B, S):
            raise ValueError(f"{who}: source_mask must have shape (B, S) = ({B}, {S}); got {tuple(source_mask.shape)}.")
        return source_mask.to(device)
    if source_lengths is not None:
        sl = check_lengths(source_lengths, B, S, "source_lengths", device, who)
        return torch.arange(S, device=device).view(1, -1) < sl.view(-1, 1)
    return None


def _mask_of(valid: torch.Tensor | None):
    return None if valid is None else dense(valid.view(valid.shape[0], 1, 1, -1))


def _finish(w4: torch.Tensor, values: torch.Tensor, single: bool):
    """weights (B, 1, T, S) -> context (B, [T,] Dv), weights (B, [T,] S)."""
    w = w4.squeeze(1)
    ctx = w @ values
    if single:
        return ctx.squeeze(1), w.squeeze(1)
    return ctx, w


def _check_inputs(who: str, query, query_dim: int, keys, key_dim: int, values, value_dim: int | None,
                  source_lengths, source_mask):
    """Validate a classic layer's call: ``(q (B, 1, T, Dq), single, values, valid (B, S) or None)``."""
    q, single = _as_steps(query, query_dim, who)
    B = q.shape[0]
    _check_seq(keys, "keys", key_dim, B, q.dtype, who)
    values = keys if values is None else values
    _check_seq(values, "values", value_dim, B, q.dtype, who)
    S = keys.shape[1]
    if values.shape[1] != S:
        raise ValueError(f"{who}: keys have length {S} but values have {values.shape[1]}; they must match.")
    return q, single, values, _source_valid(source_lengths, source_mask, B, S, q.device, who)


class AdditiveAttention(nn.Module):
    """Bahdanau (additive) attention: ``e_j = v^T tanh(W_q q + W_k k_j + b)``, ``a = softmax(e)``,
    ``context = sum_j a_j values_j``. Costs O(T S hidden) per call.

    In a decoder loop the key projection ``W_k k + b`` is the same at every step: compute it once with
    :meth:`prepare` and pass ``projected_keys=`` to skip it.

    Args:
        query_dim: Dq (decoder state size); key_dim: Dk (default Dq); hidden_dim: the tanh layer size (default Dq).

    Call: ``attn(query, keys, values=None, *, source_lengths=None, source_mask=None, projected_keys=None)``
    -> :class:`AttentionOutput`.

    Example:
        >>> attn = AdditiveAttention(8)
        >>> keys = torch.randn(3, 5, 8)
        >>> pk = attn.prepare(keys)
        >>> a = attn(torch.randn(3, 8), keys, projected_keys=pk)
        >>> a.context.shape, bool(torch.allclose(a.weights.sum(-1), torch.ones(3)))
        (torch.Size([3, 8]), True)
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, hidden_dim: int | None = None):
        super().__init__()
        self.query_dim = check_int(query_dim, "query_dim")
        self.key_dim = query_dim if key_dim is None else check_int(key_dim, "key_dim")
        self.hidden_dim = query_dim if hidden_dim is None else check_int(hidden_dim, "hidden_dim")
        self.score = Additive(self.query_dim, self.key_dim, self.hidden_dim)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"

    def prepare(self, keys: torch.Tensor) -> torch.Tensor:
        """``W_k keys + b`` (B, S, hidden), to pass as ``projected_keys=`` at every decoder step."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[-1] != self.key_dim:
            seen = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"{type(self).__name__}: keys must have shape (B, S, {self.key_dim}); got {seen}.")
        return self.score.project_keys(keys)

    def forward(self, query, keys, values=None, *, source_lengths=None, source_mask=None,
                projected_keys=None) -> AttentionOutput:
        who = type(self).__name__
        q, single, values, valid = _check_inputs(who, query, self.query_dim, keys, self.key_dim, values, None,
                                                 source_lengths, source_mask)
        B, S = q.shape[0], keys.shape[1]
        m = _mask_of(valid)
        if projected_keys is not None:
            _check_seq(projected_keys, "projected_keys", self.hidden_dim, B, q.dtype, who)
            if projected_keys.shape[1] != S:
                raise ValueError(f"{who}: projected_keys cover {projected_keys.shape[1]} positions but keys have {S}.")
            w = attention_weights(q, projected_keys.unsqueeze(1), mask=m, compatibility=_Projected(self.score))
        else:
            w = attention_weights(q, keys.unsqueeze(1), mask=m, compatibility=self.score)
        ctx, w = _finish(w, values, single)
        return AttentionOutput(ctx, w)


_LUONG_METHODS = ("dot", "general", "concat")


def _luong_score(method: str, query_dim: int, key_dim: int, hidden_dim: int) -> Compatibility:
    if method not in _LUONG_METHODS:
        raise ValueError(f"method must be one of {_LUONG_METHODS}; got {method!r}.")
    if method == "dot":
        if query_dim != key_dim:
            raise ValueError(
                f"method='dot' needs query_dim == key_dim; got {query_dim} and {key_dim}. Use method='general'."
            )
        return Dot()
    if method == "general":
        return General(query_dim, key_dim, scale=1.0)
    return Additive(query_dim, key_dim, hidden_dim)


class LuongAttention(nn.Module):
    """Luong global attention: ``score(h_t, h_s)`` is ``h_t . h_s`` (dot), ``h_t W h_s`` (general) or
    ``v^T tanh(W [h_t; h_s])`` (concat); ``a = softmax(score)``, ``c_t = sum_s a_s h_s``, and the attentional
    hidden state ``h~_t = tanh(W_c [c_t; h_t])`` (``output.attentional``), fed to the next step.

    Args:
        query_dim: Dq; key_dim: Dk (default Dq); method: ``"dot" | "general" | "concat"``;
        hidden_dim: concat's tanh size (default Dq); value_dim: Dv (default Dk); output_dim: size of h~ (default Dq).

    Example:
        >>> attn = LuongAttention(8, method="general")
        >>> out = attn(torch.randn(2, 3, 8), torch.randn(2, 5, 8), source_mask=torch.ones(2, 5, dtype=torch.bool))
        >>> out.context.shape, out.weights.shape, out.attentional.shape
        (torch.Size([2, 3, 8]), torch.Size([2, 3, 5]), torch.Size([2, 3, 8]))
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, method: str = "general", *,
                 hidden_dim: int | None = None, value_dim: int | None = None, output_dim: int | None = None):
        super().__init__()
        self.query_dim = check_int(query_dim, "query_dim")
        self.key_dim = query_dim if key_dim is None else check_int(key_dim, "key_dim")
        self.value_dim = self.key_dim if value_dim is None else check_int(value_dim, "value_dim")
        self.output_dim = query_dim if output_dim is None else check_int(output_dim, "output_dim")
        hidden_dim = query_dim if hidden_dim is None else check_int(hidden_dim, "hidden_dim")
        self.method = method
        self.score = _luong_score(method, self.query_dim, self.key_dim, hidden_dim)
        self.combine = nn.Linear(self.value_dim + self.query_dim, self.output_dim, bias=False)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, method={self.method!r}"

    def _weights(self, q, keys, m):
        return attention_weights(q, keys.unsqueeze(1), mask=m, compatibility=self.score)

    def forward(self, query, keys, values=None, *, source_lengths=None, source_mask=None) -> AttentionOutput:
        q, single, values, valid = _check_inputs(type(self).__name__, query, self.query_dim, keys, self.key_dim,
                                                 values, self.value_dim, source_lengths, source_mask)
        ctx, w = _finish(self._weights(q, keys, _mask_of(valid)), values, single)
        h = torch.tanh(self.combine(torch.cat((ctx, query), dim=-1)))
        return AttentionOutput(ctx, w, attentional=h)


class LuongLocalAttention(LuongAttention):
    """Luong local-p attention: a predicted centre ``p_t = (S_b - 1) sigmoid(v_p^T tanh(W_p h_t))`` in each
    source (S_b its length), alignment weights (softmax of the score) over the window ``|s - p_t| <= D``
    multiplied by the Gaussian ``exp(-(s - p_t)^2 / (2 sigma^2))``, ``sigma = D / 2`` (as in the paper, the
    product is not renormalised). The Gaussian makes ``p_t`` trainable. Pass ``centres=`` (B,) or (B, T) to
    fix the centres instead (local-m: the target step t).

    Args: as :class:`LuongAttention`, plus ``window`` (D, the half-width) and ``predictor_dim`` (size of W_p).

    Example:
        >>> attn = LuongLocalAttention(8, window=2)
        >>> out = attn(torch.randn(2, 8), torch.randn(2, 10, 8), source_lengths=[10, 6])
        >>> out.weights.shape, bool((out.weights[1, 6:] == 0).all()), out.centres.shape
        (torch.Size([2, 10]), True, torch.Size([2]))
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, method: str = "general", *, window: int = 4,
                 predictor_dim: int | None = None, hidden_dim: int | None = None, value_dim: int | None = None,
                 output_dim: int | None = None):
        super().__init__(query_dim, key_dim, method, hidden_dim=hidden_dim, value_dim=value_dim,
                         output_dim=output_dim)
        self.window = check_int(window, "window")
        predictor_dim = query_dim if predictor_dim is None else check_int(predictor_dim, "predictor_dim")
        self.w_p = nn.Linear(query_dim, predictor_dim, bias=False)
        self.v_p = nn.Linear(predictor_dim, 1, bias=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"

    def forward(self, query, keys, values=None, *, source_lengths=None, source_mask=None,
                centres=None) -> AttentionOutput:
        who = type(self).__name__
        q, single, values, valid = _check_inputs(who, query, self.query_dim, keys, self.key_dim, values,
                                                 self.value_dim, source_lengths, source_mask)
        B, T, S = q.shape[0], q.shape[2], keys.shape[1]
        n = valid.sum(-1) if valid is not None else torch.full((B,), S, device=q.device)
        if centres is None:
            p = (n.to(q.dtype) - 1).clamp(min=0).view(B, 1) * torch.sigmoid(self.v_p(torch.tanh(self.w_p(q[:, 0])))).squeeze(-1)
        else:
            p = torch.as_tensor(centres, device=q.device).to(q.dtype)
            if p.dim() == 1:
                p = p.view(B, 1).expand(B, T) if p.shape[0] == B else p
            if p.shape != (B, T):
                raise ValueError(f"{who}: centres must have shape (B,) or (B, T) = ({B}, {T}); got {tuple(p.shape)}.")
        pos = torch.arange(S, device=q.device, dtype=q.dtype).view(1, 1, S)
        dist = pos - p.unsqueeze(-1)  # (B, T, S)
        inside = dist.abs() <= self.window
        vis = inside if valid is None else inside & valid.view(B, 1, S)
        align = attention_weights(q, keys.unsqueeze(1), mask=dense(vis.unsqueeze(1)), compatibility=self.score)
        sigma = self.window / 2.0
        w4 = align * torch.exp(-(dist * dist) / (2 * sigma * sigma)).unsqueeze(1)
        ctx, w = _finish(w4, values, single)
        h = torch.tanh(self.combine(torch.cat((ctx, query), dim=-1)))
        return AttentionOutput(ctx, w, attentional=h, centres=p.squeeze(1) if single else p)


class AttentionPooling(nn.Module):
    """Attention pooling with a learned context vector (Yang et al. 2016):
    ``u_t = tanh(W h_t + b)``, ``a = softmax(u . c)``, ``s = sum_t a_t h_t``.

    Call ``pool(h, lengths=None)`` with h (B, T, D) and lengths (B,) -> :class:`AttentionOutput`
    (context (B, D), weights (B, T)); rows of length 0 give context 0.

    Example:
        >>> pool = AttentionPooling(6, attn_dim=4)
        >>> out = pool(torch.randn(2, 5, 6), lengths=[5, 2])
        >>> out.context.shape, out.weights[1, 2:].sum().item()
        (torch.Size([2, 6]), 0.0)
    """

    def __init__(self, input_dim: int, attn_dim: int | None = None):
        super().__init__()
        self.input_dim = check_int(input_dim, "input_dim")
        self.attn_dim = input_dim if attn_dim is None else check_int(attn_dim, "attn_dim")
        self.proj = nn.Linear(self.input_dim, self.attn_dim)
        self.context = nn.Parameter(torch.randn(self.attn_dim) / math.sqrt(self.attn_dim))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, attn_dim={self.attn_dim}"

    def forward(self, h: torch.Tensor, lengths=None) -> AttentionOutput:
        who = type(self).__name__
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != self.input_dim or not h.is_floating_point():
            seen = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"{who}: h must be a float tensor (B, T, {self.input_dim}); got {seen}.")
        B, T, _ = h.shape
        valid = _source_valid(lengths, None, B, T, h.device, who)
        u = torch.tanh(self.proj(h)).unsqueeze(1)  # (B, 1, T, A)
        c = self.context.to(h.dtype).view(1, 1, 1, -1).expand(B, 1, 1, self.attn_dim)
        w = attention_weights(c, u, mask=_mask_of(valid), scale=1.0)
        ctx, w = _finish(w, h, True)
        return AttentionOutput(ctx, w)


@dataclass
class HierarchicalOutput:
    """Document vector (B, Ds), word weights (B, N, T) and sentence weights (B, N) of :class:`HierarchicalAttention`."""

    document: torch.Tensor
    word_weights: torch.Tensor
    sentence_weights: torch.Tensor


def _encode(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run a (bidirectional) GRU over right-padded rows, respecting lengths; padded outputs are 0."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    T = x.shape[1]
    packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    return out * (lengths > 0).to(out.dtype).view(-1, 1, 1)


class HierarchicalAttention(nn.Module):
    """Hierarchical attention network (Yang et al. 2016): a bidirectional GRU and :class:`AttentionPooling`
    over the words of each sentence give sentence vectors; a second GRU and pooling over sentences give the
    document vector. Padding (word_lengths, sentence_lengths) never leaks: padded words and sentences get
    weight 0, and the GRUs run on packed sequences.

    Args:
        input_dim: word embedding size E; word_hidden, sentence_hidden: GRU sizes per direction;
        attn_dim: size of the pooling's tanh layer (default 2 * hidden).

    Call: ``han(x, word_lengths, sentence_lengths)`` with x (B, N, T, E), word_lengths (B, N) and
    sentence_lengths (B,) -> :class:`HierarchicalOutput` (document (B, 2 * sentence_hidden)).

    Example:
        >>> han = HierarchicalAttention(8, word_hidden=4, sentence_hidden=3)
        >>> x = torch.randn(2, 3, 5, 8)
        >>> out = han(x, torch.tensor([[5, 2, 4], [3, 1, 0]]), torch.tensor([3, 2]))
        >>> out.document.shape, out.word_weights.shape, out.sentence_weights[1, 2].item()
        (torch.Size([2, 6]), torch.Size([2, 3, 5]), 0.0)
    """

    def __init__(self, input_dim: int, word_hidden: int = 50, sentence_hidden: int = 50, attn_dim: int | None = None):
        super().__init__()
        self.input_dim = check_int(input_dim, "input_dim")
        check_int(word_hidden, "word_hidden")
        check_int(sentence_hidden, "sentence_hidden")
        self.word_gru = nn.GRU(input_dim, word_hidden, batch_first=True, bidirectional=True)
        self.word_pool = AttentionPooling(2 * word_hidden, attn_dim or 2 * word_hidden)
        self.sentence_gru = nn.GRU(2 * word_hidden, sentence_hidden, batch_first=True, bidirectional=True)
        self.sentence_pool = AttentionPooling(2 * sentence_hidden, attn_dim or 2 * sentence_hidden)

    def forward(self, x: torch.Tensor, word_lengths, sentence_lengths) -> HierarchicalOutput:
        who = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.input_dim or not x.is_floating_point():
            seen = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{who}: x must be a float tensor (B, N, T, {self.input_dim}) of word embeddings; got {seen}.")
        B, N, T, E = x.shape
        wl = torch.as_tensor(word_lengths, device=x.device)
        sl = torch.as_tensor(sentence_lengths, device=x.device)
        if wl.shape != (B, N) or wl.dtype.is_floating_point or wl.dtype == torch.bool:
            raise ValueError(f"{who}: word_lengths must be integers of shape (B, N) = ({B}, {N}); got {wl.dtype} {tuple(wl.shape)}.")
        if sl.shape != (B,) or sl.dtype.is_floating_point or sl.dtype == torch.bool:
            raise ValueError(f"{who}: sentence_lengths must be integers of shape (B,) = ({B},); got {sl.dtype} {tuple(sl.shape)}.")
        if bool(((wl < 0) | (wl > T)).any()) or bool(((sl < 0) | (sl > N)).any()):
            raise ValueError(f"{who}: word_lengths must lie in [0, T={T}] and sentence_lengths in [0, N={N}].")
        real_sent = torch.arange(N, device=x.device).view(1, -1) < sl.view(-1, 1)
        wl = wl * real_sent  # words of padded sentences do not count
        h = _encode(self.word_gru, x.reshape(B * N, T, E), wl.reshape(-1))
        words = self.word_pool(h, lengths=wl.reshape(-1))
        sent = words.context.view(B, N, -1)
        hs = _encode(self.sentence_gru, sent, sl)
        doc = self.sentence_pool(hs, lengths=sl)
        return HierarchicalOutput(doc.context, words.weights.view(B, N, T), doc.weights)
