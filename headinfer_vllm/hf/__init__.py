"""HeadInfer for Hugging Face transformers.

Families (``SUPPORTED_MODEL_TYPES``): Llama, Mistral (with or without a
sliding window), Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3 text and gpt-oss;
sliding windows, soft-capping and attention sinks are computed exactly.

Importing this package registers the attention implementation ``"headinfer"``::

    import headinfer_vllm.hf
    from headinfer_vllm.hf import HeadInferCache

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="headinfer")
    out = model.generate(ids, past_key_values=HeadInferCache(model.config), max_new_tokens=64)

    # long prompts: prefill in chunks of prefill_chunk_size tokens, then decode
    out = headinfer_vllm.hf.generate(model, ids, HeadInferCache(model.config), max_new_tokens=64)
"""

from headinfer_vllm.hf.attention import register
from headinfer_vllm.hf.cache import CapacityError, HeadInferCache
from headinfer_vllm.hf.generation import generate
from headinfer_vllm.hf.support import SUPPORTED_MODEL_TYPES

register()

__all__ = ["SUPPORTED_MODEL_TYPES", "CapacityError", "HeadInferCache", "generate", "register"]
