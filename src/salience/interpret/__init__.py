"""See what a model attends to: capture, methods, faithfulness and pictures.

* :class:`capture` records attention maps from salience layers and from Hugging Face models running
  ``attn_implementation="salience"`` (no eager fallback), for chosen layers, heads and query rows, in
  chunks, at reduced precision or aggregated; the result is an :class:`AttentionMaps` (tokens, maps,
  metadata) that saves to and loads from ``.npz``. :class:`capture_with_grad` gives weights inside the
  autograd graph (``dF/dA``) for gradient x attention.
* :mod:`~salience.interpret.methods`: raw maps, rollout, flow, gradient x attention, entropy, confidence,
  head roles, head importance through gates.
* :mod:`~salience.interpret.faithfulness`: how well attention-derived token importance agrees with
  gradient x input and leave-one-out erasure (Spearman and Kendall), with a uniform-attention baseline.
* :mod:`~salience.interpret.render`: PNG/SVG/PDF figures (matplotlib, the ``viz`` extra) and one
  self-contained HTML report.
* :func:`~salience.interpret.generation.generation_attention`: each generated token's attention over the
  prompt and earlier output during ``generate()`` of a causal LM, with a step-by-step HTML view.
* :func:`~salience.interpret.pair.pair_attention`: a sentence pair encoded together, A and B side by side
  with the attention that crosses between them.
* :func:`~salience.interpret.seq2seq.cross_attention`: encoder-decoder cross-attention (BART, T5, ...), decoder
  tokens against encoder tokens.

Layout of maps for one input: ``(layers, H, L, S)``.

Example:
    >>> import torch
    >>> from salience.layers import MultiHeadAttention
    >>> from salience.interpret import capture, methods
    >>> layers = [MultiHeadAttention(16, 4, name=f"l{i}", layer_index=i) for i in range(2)]
    >>> with capture() as rec:
    ...     x = torch.randn(1, 6, 16)
    ...     for layer in layers:
    ...         x = layer(x).output
    >>> attn = rec.result().stack()          # (layers, H, L, S)
    >>> methods.rollout(attn).shape
    torch.Size([6, 6])
"""

from . import methods
from .capture import AttentionMaps, Recorder, capture, capture_with_grad

__all__ = ["AttentionMaps", "Recorder", "capture", "capture_with_grad", "generation_attention", "pair_attention", "cross_attention", "methods", "faithfulness", "render"]


def __getattr__(name):  # faithfulness and render import lazily (render needs matplotlib only for PNGs)
    if name == "generation_attention":  # imports transformers-facing code only when asked for
        from .generation import generation_attention

        return generation_attention
    if name == "pair_attention":
        from .pair import pair_attention

        return pair_attention
    if name == "cross_attention":
        from .seq2seq import cross_attention

        return cross_attention
    if name in ("faithfulness", "render"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
