"""The tiny random Llama the decoding benchmarks generate with (decode_bench.py, decode_overhead.py): two copies
with the same weights, one per attention implementation, and a generate() call whose steps are time-stamped by a
logits processor (so the decoding steps are timed inside generate() itself)."""

from __future__ import annotations

import time

import torch


def tiny_llamas(prompt: int, impls=("salience", "sdpa"), room: int = 256):
    """``{impl: model}`` (2 layers, hidden 256, 8 heads, 2 kv heads, vocabulary 512, random weights shared by all)
    and a ``(1, prompt)`` batch of token ids."""
    import transformers

    import salience.integrations.hf  # noqa: F401  (registers "salience")

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=prompt + room)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    models = {}
    for impl in impls:
        models[impl] = transformers.LlamaForCausalLM(cfg).eval()
        models[impl].load_state_dict(base.state_dict())
        models[impl].set_attn_implementation(impl)
    return models, torch.randint(0, 512, (1, prompt))


def timed_generate(model, ids, new_tokens: int):
    """Greedy generate() of exactly ``new_tokens``: ``(new token ids, time to the first step in s, the times between
    consecutive steps in s)``."""
    import transformers

    stamps = []

    class Stamps(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([Stamps()]))
    return res[0, ids.shape[1]:].tolist(), stamps[0] - t0, [b - a for a, b in zip(stamps[:-1], stamps[1:])]
