"""Engine-side decisions: what headinfer refuses, which defaults it changes, how big the KV is.

:func:`apply_settings` runs in the process that builds the ``VllmConfig``
(inside the platform's ``check_and_update_config``), before any worker
starts. It refuses what HeadInfer cannot run, sets long-context defaults the
user did not choose, plans the capacity from the host budget, checks the
host has the memory, and tells vLLM's scheduler the block count through
``num_gpu_blocks_override``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from headinfer_vllm.config import GIB, HeadInferConfig
from headinfer_vllm.core import CapacityPlan, plan_capacity
from headinfer_vllm.core.host_memory import check_host_budget

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

SETTINGS_KEY = "headinfer"
"""Key of the plugin's settings in ``--additional-config``."""
APPLIED_KEY = "headinfer_num_blocks"
"""Set in ``additional_config`` once the settings are applied (idempotency)."""
ALTERNATIVE = "use vLLM's default attention backend (omit --attention-backend) for this model"

LONG_CONTEXT_BLOCK_SIZE = 256
"""Tokens per page on CUDA when the user sets no --block-size.

vLLM's CUDA default of 16 makes each page of one KV head 8 KiB (Llama-3-8B,
bf16): copies that small run far below PCIe bandwidth, and the block table of
a 1M-token request has 65,536 columns."""
LONG_CONTEXT_PREFILL_TOKENS = 16384
"""Smallest chunked-prefill step on CUDA when the user sets no --max-num-batched-tokens.

Each chunk re-streams the whole past KV over PCIe, so a prompt of n tokens
moves about n²/(2·chunk) tokens of KV: small chunks make prefill PCIe-bound."""
DRAFT_FREE_SPECULATIVE_METHODS = ("ngram", "ngram_gpu", "suffix")
"""Speculative methods without draft attention layers (the only ones headinfer runs)."""


def settings_of(vllm_config: VllmConfig) -> HeadInferConfig:
    additional = vllm_config.additional_config
    if additional is None:
        additional = {}
    if not isinstance(additional, dict):
        raise ValueError(f"headinfer: --additional-config must be a JSON object, got {additional!r}")
    settings = additional.get(SETTINGS_KEY) or {}
    if not isinstance(settings, dict):
        raise ValueError(
            f'headinfer: --additional-config "{SETTINGS_KEY}" must be an object such as '
            f'{{"{SETTINGS_KEY}": {{"cpu_kv_cache_gib": 8}}}}, got {settings!r}'
        )
    return HeadInferConfig.from_sources(settings)


def capacity_for(vllm_config: VllmConfig, config: HeadInferConfig) -> CapacityPlan:
    """The capacity plan of this model under ``config``'s budgets."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return plan_capacity(
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        block_size=vllm_config.cache_config.block_size,
        dtype=model.dtype,
        host_bytes=config.cpu_kv_cache_bytes,
        device_bytes=config.gpu_kv_cache_bytes,
        head_group_size=config.head_group_size,
        prefetch_depth=config.prefetch_depth,
    )


def refusals(vllm_config: VllmConfig) -> list[str]:
    """Every reason headinfer cannot run this configuration, each saying what to change."""
    parallel, cache, model = vllm_config.parallel_config, vllm_config.cache_config, vllm_config.model_config
    reasons = []
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        reasons.append(
            "tensor and pipeline parallelism are not supported; run with "
            "--tensor-parallel-size 1 --pipeline-parallel-size 1"
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
        "sliding-window attention": model.get_sliding_window(),
        "a V head size that differs from the K head size": _v_head_size(model) not in (None, model.get_head_size()),
    }
    refused = [name for name, present in model_features.items() if present]
    if refused:
        reasons.append(f"it does not support {', '.join(refused)} (model {model.model}); {ALTERNATIVE}")
    return reasons


def _v_head_size(model_config) -> int | None:
    """The V head size where the model declares one apart from K's (MLA-like layouts), else None."""
    text_config = getattr(model_config, "hf_text_config", None)
    return getattr(text_config, "v_head_dim", None)


def long_context_defaults_apply() -> bool:
    """Whether headinfer changes vLLM's defaults for long contexts: on CUDA, where pages cross PCIe."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def set_long_context_defaults(vllm_config: VllmConfig) -> None:
    """A page size of at least :data:`LONG_CONTEXT_BLOCK_SIZE` where the user chose none.

    (The chunked-prefill step is raised earlier, where vLLM still knows whether
    the user chose it: ``compat._patch_prefill_chunk_default``.)
    """
    cache = vllm_config.cache_config
    if not long_context_defaults_apply() or getattr(cache, "user_specified_block_size", True):
        return
    if cache.block_size < LONG_CONTEXT_BLOCK_SIZE:
        logger.info(
            "headinfer: block_size %d -> %d tokens (long-context default: fewer, larger page copies; "
            "set --block-size to choose)", cache.block_size, LONG_CONTEXT_BLOCK_SIZE,
        )
        cache.block_size = LONG_CONTEXT_BLOCK_SIZE
    # Why: the worker re-derives the block size from the backend's preference
    # unless the user chose one (Platform.update_block_size_for_backend), which
    # would no longer match num_gpu_blocks_override. Marking it chosen keeps it.
    cache.user_specified_block_size = True


def choose_piecewise_graphs(vllm_config: VllmConfig) -> None:
    """``-cc.cudagraph_mode=FULL`` would raise at KV-cache start-up; fall back with a warning.

    headinfer's attention streams pages and waits on events, so it cannot be
    captured in a CUDA graph; vLLM runs it eagerly between graph pieces.
    """
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode != CUDAGraphMode.FULL:
        return  # every other mode is downgraded by vLLM itself, or has no full graphs
    piecewise = compilation.mode == CompilationMode.VLLM_COMPILE and compilation.splitting_ops_contain_attention()
    compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE if piecewise else CUDAGraphMode.NONE
    logger.warning(
        "headinfer: cudagraph_mode=FULL cannot capture attention that streams KV pages; using %s instead",
        compilation.cudagraph_mode.name,
    )


def vllm_buffer_bytes(vllm_config: VllmConfig) -> tuple[int, int]:
    """Host and device bytes of vLLM's own per-request buffers that grow with ``max_model_len``.

    Host: the token ids of ``max_num_seqs`` requests (int32 plus a flag byte
    per token, pinned) and the block tables (int32, a host and a pinned copy).
    Device: the block tables (int32, two copies). An estimate that errs high.
    """
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    max_len = vllm_config.model_config.max_model_len
    pages = -(-max_len // vllm_config.cache_config.block_size)
    block_tables = max_seqs * pages * 4
    return max_seqs * max_len * 5 + 2 * block_tables, 2 * block_tables


def check_budgets(vllm_config: VllmConfig, config: HeadInferConfig) -> None:
    """The host must hold every engine's tier on this host plus vLLM's own buffers."""
    engines = max(1, getattr(vllm_config.parallel_config, "data_parallel_size_local", 1))
    host_buffers, _ = vllm_buffer_bytes(vllm_config)
    if host_buffers > GIB:
        logger.warning(
            "headinfer: vLLM's own buffers for %d requests of up to %d tokens take %.2f GiB of host memory; "
            "lower --max-num-seqs for long contexts",
            vllm_config.scheduler_config.max_num_seqs, vllm_config.model_config.max_model_len,
            host_buffers / GIB,
        )
    what = "cpu_kv_cache_gib" if engines == 1 else f"cpu_kv_cache_gib × {engines} data-parallel engines"
    check_host_budget(engines * (config.cpu_kv_cache_bytes + host_buffers), what=what)


def apply_settings(vllm_config: VllmConfig) -> None:
    """Refuse what HeadInfer cannot run, then size vLLM's KV from the host budget."""
    additional = vllm_config.additional_config
    if isinstance(additional, dict) and APPLIED_KEY in additional:
        return
    reasons = refusals(vllm_config)
    if reasons:
        raise ValueError(f"headinfer: {'; '.join(reasons)}")
    config = settings_of(vllm_config)
    set_long_context_defaults(vllm_config)
    choose_piecewise_graphs(vllm_config)
    check_budgets(vllm_config, config)
    model, cache = vllm_config.model_config, vllm_config.cache_config
    capacity = capacity_for(vllm_config, config)
    layout = capacity.layout
    usable_tokens = (layout.num_blocks - 1) * layout.block_size  # vLLM keeps one null block
    if usable_tokens < model.max_model_len:
        needed = config.cpu_kv_cache_gib * (model.max_model_len + layout.block_size) / usable_tokens
        raise ValueError(
            f"headinfer: cpu_kv_cache_gib={config.cpu_kv_cache_gib} holds {usable_tokens} tokens but "
            f"max_model_len is {model.max_model_len}; raise cpu_kv_cache_gib to at least {needed:.3f} "
            "or lower --max-model-len"
        )
    for name in ("num_gpu_blocks_override", "kv_cache_memory_bytes"):
        if getattr(cache, name) is not None:
            logger.warning("headinfer: ignoring %s=%s; the KV capacity comes from cpu_kv_cache_gib",
                           name, getattr(cache, name))
    # vLLM's own KV tensor shrinks to one element per token and layer
    # (HeadInferBackend.customize_spec); the block count comes from the plan.
    cache.num_gpu_blocks_override = layout.num_blocks
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    cache.kv_cache_memory_bytes = max(1 << 20, layout.num_blocks * layout.block_size * layout.num_layers * itemsize)
    if additional is None:
        vllm_config.additional_config = additional = {}
    # Workers rebuild the same plan from the resolved settings, not from their environment.
    additional[SETTINGS_KEY] = dataclasses.asdict(config)
    additional[APPLIED_KEY] = layout.num_blocks
    logger.info("headinfer: %s", capacity.describe())
