"""HeadInfer for Hugging Face transformers (Llama, Mistral, Qwen2).

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

register()

__all__ = ["CapacityError", "HeadInferCache", "generate", "register"]
