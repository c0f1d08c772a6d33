"""What headinfer refuses, each reason saying what to change (checked before anything is planned)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from headinfer_vllm.vllm_plugin import compat

if TYPE_CHECKING:
    from vllm.config import VllmConfig

ALTERNATIVE = "use vLLM's default attention backend (omit --attention-backend) for this model"
DRAFT_FREE_SPECULATIVE_METHODS = ("ngram", "ngram_gpu", "suffix")
"""Speculative methods without draft attention layers (the only ones headinfer runs)."""


def refusals(vllm_config: VllmConfig) -> list[str]:
    """Every reason headinfer cannot run this configuration, each saying what to change."""
    parallel, cache, model = vllm_config.parallel_config, vllm_config.cache_config, vllm_config.model_config
    reasons = []
    context_parallel = {
        "decode": getattr(parallel, "decode_context_parallel_size", 1),
        "prefill": getattr(parallel, "prefill_context_parallel_size", 1),
    }
    if any(size > 1 for size in context_parallel.values()):
        reasons.append(
            "context parallelism (--decode-context-parallel-size, --prefill-context-parallel-size) is not "
            "supported: it splits each request's tokens across ranks, while every headinfer rank keeps all "
            "tokens of its own KV heads; use tensor or pipeline parallelism instead"
        )
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 1) > 1:
        reasons.append(
            "micro-batching (--enable-dbo, ubatch_size) is not supported: both micro-batches would "
            "stream the same staging buffers; drop it"
        )
    connector = vllm_config.kv_transfer_config
    if connector is not None and getattr(connector, "kv_connector", None):
        reasons.append(
            f"KV connectors are not supported (--kv-transfer-config uses {connector.kv_connector}): a connector "
            "would move vLLM's placeholder KV tensor, not the KV in headinfer's page store; drop "
            "--kv-transfer-config (headinfer already keeps the whole KV cache in host memory)"
        )
    if compat.extensible_kv_cache_requested(cache):
        reasons.append(
            "vLLM's extensible KV cache (--enable-extensible-kv-cache) is not supported: headinfer keeps the KV "
            "in its own page store, sized by cpu_kv_cache_gib, and gives vLLM a fixed placeholder; drop "
            "--enable-extensible-kv-cache"
        )
    if getattr(cache, "kv_offloading_size", None) is not None:
        reasons.append(
            "vLLM's KV offloading (--kv-offloading-size) is not supported: headinfer already keeps the whole "
            "KV cache in host memory (set its size with cpu_kv_cache_gib); drop --kv-offloading-size"
        )
    speculative = vllm_config.speculative_config
    if speculative is not None and speculative.method not in DRAFT_FREE_SPECULATIVE_METHODS:
        reasons.append(
            f"speculative decoding with method {speculative.method!r} is not supported: its draft layers would "
            "need a KV cache of their own; use a draft-free method "
            f"({', '.join(DRAFT_FREE_SPECULATIVE_METHODS)}) or no --speculative-config"
        )
    if cache.cache_dtype not in ("auto", None):
        reasons.append(
            f"kv_cache_dtype={cache.cache_dtype} is not supported (the KV cache is kept in the model dtype); "
            "drop --kv-cache-dtype"
        )
    model_features = {
        "encoder-decoder models": model.is_encoder_decoder,
        "MLA attention": model.use_mla,
        "chunked-local attention": getattr(model, "attention_chunk_size", None),
        "attention-free models": getattr(model, "is_attention_free", False),
        "Mamba, linear-attention and other stateful layers": getattr(model, "is_hybrid", False)
        or getattr(model, "has_inner_state", False),
        "a V head size that differs from the K head size": _v_head_size_differs(model),
    }
    refused = [name for name, present in model_features.items() if present]
    if refused:
        reasons.append(f"it does not support {', '.join(refused)} (model {model.model}); {ALTERNATIVE}")
    return reasons


def _v_head_size_differs(model_config) -> bool:
    """Whether the model declares a V head size apart from K's: MLA-like layouts (``v_head_dim``), or windowed
    layers of their own sizes (MiMo-V2's ``swa_v_head_dim``, for which vLLM 0.34 would pick another backend)."""
    text_config = getattr(model_config, "hf_text_config", None)
    k_sizes = {"v_head_dim": model_config.get_head_size(), "swa_v_head_dim": getattr(text_config, "swa_head_dim", None)}
    return any(getattr(text_config, name, None) not in (None, k_size) for name, k_size in k_sizes.items())
