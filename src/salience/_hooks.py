"""A tiny event bus so that interpretability tools can observe attention calls without eager fallbacks.

Layers (``salience.layers``) and the Hugging Face integration call :func:`emit` with an
:class:`AttentionEvent` after each attention call, but only while someone is recording (``recording()``
is a cheap check), so normal forward passes pay nothing. ``salience.interpret.capture`` subscribes and
recomputes the weights it needs from q, k and the logsumexp with :func:`salience.attention_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["AttentionEvent", "emit", "recording", "subscribe", "unsubscribe"]

_SUBSCRIBERS: list[Callable] = []


@dataclass
class AttentionEvent:
    """One attention call: q (B, H, L, D), k (B, Hkv, S, D), what was masked and added, and the lse (B, H, L).

    ``name`` identifies the layer (module path for HF models, or the layer's own name); ``layer_index`` is its
    position in the model when known. ``lse`` may be None when the path did not produce it.
    """

    name: str
    q: torch.Tensor
    k: torch.Tensor
    mask: object = None
    score_mod: object = None
    scale: float | None = None
    lse: torch.Tensor | None = None
    layer_index: int | None = None
    module: object = None
    extra: dict = field(default_factory=dict)


def recording() -> bool:
    """True while at least one subscriber listens."""
    return bool(_SUBSCRIBERS)


def subscribe(fn: Callable[[AttentionEvent], None]) -> None:
    _SUBSCRIBERS.append(fn)


def unsubscribe(fn: Callable[[AttentionEvent], None]) -> None:
    if fn in _SUBSCRIBERS:
        _SUBSCRIBERS.remove(fn)


def emit(event: AttentionEvent) -> None:
    """Hand an event to every subscriber (detached tensors are the subscriber's business)."""
    for fn in list(_SUBSCRIBERS):
        fn(event)
