"""salience: attention for neural networks that is correct, fast on the CPU and inspectable.

Layout (B, H, L, D) everywhere; see :mod:`salience._layout`.

Example:
    >>> import torch, salience
    >>> q = k = v = torch.randn(1, 4, 32, 16)
    >>> salience.attention(q, k, v, mask=salience.masks.causal()).shape
    torch.Size([1, 4, 32, 16])
"""

from . import masks, reference, scores
from ._layout import LAYOUT
from ._result import AttentionResult
from .blocks import BlockMask
from .functional import attention, attention_weights, plan
from .kernels.merge import merge

__version__ = "0.1.0"



def __getattr__(name):
    """``salience.compat`` (drop-in functions with torch SDPA's, FlexAttention's and flash-attn's signatures) and
    ``salience.attention_with_kvcache`` (:mod:`salience.kvcache`) are imported on first use, so ``import salience``
    stays light."""
    if name == "compat":
        import importlib

        return importlib.import_module(".compat", __name__)
    if name == "attention_with_kvcache":  # KV-cache attention (salience.kvcache), imported on first use too
        from .kvcache import attention_with_kvcache

        return attention_with_kvcache
    raise AttributeError(f"module 'salience' has no attribute {name!r}")


__all__ = [
    "LAYOUT",
    "AttentionResult",
    "BlockMask",
    "attention",
    "attention_weights",
    "attention_with_kvcache",
    "masks",
    "merge",
    "plan",
    "reference",
    "scores",
]
