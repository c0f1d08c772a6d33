"""``generate`` with the prompt prefilled in bounded chunks."""

from __future__ import annotations

import torch

from headinfer_vllm.hf.cache import HeadInferCache
from headinfer_vllm.hf.support import refuse_padding


def generate(model, input_ids: torch.Tensor, past_key_values: HeadInferCache | None = None, **kwargs):
    """``model.generate`` over a HeadInferCache, prefilling the prompt chunk by chunk first.

    All prompt tokens but the last go through :meth:`HeadInferCache.prefill`
    (``prefill_chunk_size`` tokens per forward pass); ``model.generate`` then
    sees the cache holding them and runs only the last prompt token before
    decoding, so the result equals an unchunked ``model.generate``.

    Args:
        model: a model of a supported family (``headinfer_vllm.hf.SUPPORTED_MODEL_TYPES``) loaded
            with ``attn_implementation="headinfer"``.
        input_ids: ``[B, L]`` prompt (equal-length rows, no padding), or the
            full sequence when continuing a cache that holds a prefix of it.
        past_key_values: the cache; a ``HeadInferCache(model.config)`` by default.
        **kwargs: passed to ``model.generate``.

    Returns what ``model.generate`` returns.
    """
    cache = past_key_values if past_key_values is not None else HeadInferCache(model.config)
    refuse_padding(kwargs.get("attention_mask"))  # before prefill, which passes no mask
    pending = input_ids[:, cache.get_seq_length() : -1]
    if pending.shape[1]:
        cache.prefill(model, pending)
    return model.generate(input_ids, past_key_values=cache, **kwargs)
