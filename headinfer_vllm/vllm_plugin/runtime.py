"""vLLM side of HeadInfer: budgets into vLLM's block count, and the worker's engine.

Two halves:

- :func:`apply_settings` runs in the process that builds the ``VllmConfig``
  (inside the platform's ``check_and_update_config``): it reads the settings,
  plans the capacity from the host budget, and tells vLLM's scheduler the
  block count through ``num_gpu_blocks_override``.
- :class:`HeadInferRuntime` lives in the worker: one page store and one
  streamed-attention engine shared by every attention layer.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, ClassVar

import torch

from headinfer_vllm.config import HeadInferConfig
from headinfer_vllm.core import CapacityPlan, HeadPageStore, StepPlan, StreamedAttention, plan_capacity
from headinfer_vllm.core.host_memory import check_host_budget

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

SETTINGS_KEY = "headinfer"
"""Key of the plugin's settings in ``--additional-config``."""
APPLIED_KEY = "headinfer_num_blocks"
"""Set in ``additional_config`` once the settings are applied (idempotency)."""


def settings_of(vllm_config: VllmConfig) -> HeadInferConfig:
    additional = vllm_config.additional_config or {}
    settings = additional.get(SETTINGS_KEY) or {}
    if not isinstance(settings, dict):
        raise ValueError(f'headinfer: --additional-config "{SETTINGS_KEY}" must be an object, got {settings!r}')
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


def apply_settings(vllm_config: VllmConfig) -> None:
    """Refuse what HeadInfer cannot run, then size vLLM's KV from the host budget."""
    additional = vllm_config.additional_config
    if isinstance(additional, dict) and APPLIED_KEY in additional:
        return
    parallel, cache, model = vllm_config.parallel_config, vllm_config.cache_config, vllm_config.model_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ValueError(
            "headinfer: tensor and pipeline parallelism are not supported; run with "
            "--tensor-parallel-size 1 --pipeline-parallel-size 1, or use the default attention backend"
        )
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 1) > 1:
        raise ValueError(
            "headinfer: micro-batching (--enable-dbo, ubatch_size) is not supported: both micro-batches "
            "would stream the same staging buffers; drop it, or use the default attention backend"
        )
    unsupported = {
        "encoder-decoder models": model.is_encoder_decoder,
        "MLA attention": model.use_mla,
        "chunked-local attention": getattr(model, "attention_chunk_size", None),
        "sliding-window attention": model.get_sliding_window(),
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise ValueError(
            f"headinfer does not support {', '.join(refused)} (model {model.model}); "
            "use vLLM's default attention backend (omit --attention-backend) for this model"
        )
    if cache.cache_dtype not in ("auto", None):
        raise ValueError(
            f"headinfer: kv_cache_dtype={cache.cache_dtype} is not supported (the KV cache is kept in the "
            "model dtype); drop --kv-cache-dtype, or use the default attention backend for fp8 KV"
        )
    config = settings_of(vllm_config)
    check_host_budget(config.cpu_kv_cache_bytes)
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
    cache.kv_cache_memory_bytes = max(1 << 20, 2 * layout.num_blocks * layout.block_size * layout.num_layers * itemsize)
    if not isinstance(additional, dict):
        raise ValueError("headinfer: --additional-config must be a JSON object")
    # Workers rebuild the same plan from the resolved settings, not from their environment.
    additional[SETTINGS_KEY] = dataclasses.asdict(config)
    additional[APPLIED_KEY] = layout.num_blocks
    logger.info("headinfer: %s", capacity.describe())


class HeadInferRuntime:
    """The worker's page store and streamed attention, shared by all layers of one engine."""

    live: ClassVar[weakref.WeakSet[HeadInferRuntime]] = weakref.WeakSet()
    """Every runtime alive in this process (for inspection)."""

    @classmethod
    def get(cls, vllm_config: VllmConfig, layer_names: list[str], device: torch.device) -> HeadInferRuntime:
        """The runtime of these layers, made on first use.

        It hangs off the engine's own first attention module, so two engines in
        one process (same layer names, different models) never share a store.
        """
        from headinfer_vllm.vllm_plugin.compat import attention_layers

        anchor = attention_layers(vllm_config, layer_names[:1])[layer_names[0]]
        runtime = getattr(anchor, "headinfer_runtime", None)
        if runtime is None or runtime.layer_names != frozenset(layer_names):
            runtime = cls(vllm_config, layer_names, device)
            anchor.headinfer_runtime = runtime
        return runtime

    def __init__(self, vllm_config: VllmConfig, layer_names: list[str], device: torch.device) -> None:
        from headinfer_vllm.vllm_plugin.compat import attention_layers, layer_index

        config = HeadInferConfig.from_sources((vllm_config.additional_config or {})[SETTINGS_KEY], environ={})
        capacity = capacity_for(vllm_config, config)
        if capacity.layout.num_blocks != vllm_config.cache_config.num_gpu_blocks_override:
            raise RuntimeError("headinfer: the worker's capacity plan differs from the engine's")
        if len(layer_names) != capacity.layout.num_layers:
            raise ValueError(
                f"headinfer: {len(layer_names)} attention layers share the KV cache but the model has "
                f"{capacity.layout.num_layers} layers; hybrid and KV-sharing models are not supported"
            )
        layers = attention_layers(vllm_config, layer_names)
        scales = {layer.impl.scale for layer in layers.values()}
        heads = {layer.impl.num_heads for layer in layers.values()}
        if len(scales) != 1 or len(heads) != 1:
            raise ValueError("headinfer: all attention layers must share one scale and head count")
        self.layer_names = frozenset(layer_names)
        self.layer_index = {name: i for i, name in enumerate(sorted(layer_names, key=layer_index))}
        store = HeadPageStore.from_plan(capacity, device)
        self.attention = StreamedAttention(
            store, num_query_heads=heads.pop(), scale=scales.pop(), prefetch_depth=config.prefetch_depth
        )
        self._plan: StepPlan | None = None
        HeadInferRuntime.live.add(self)
        logger.info(
            "headinfer: worker store ready on %s: host tier %.3f GiB%s, device tier %.3f GiB, kernel %s",
            device, store.host_bytes / 2**30, " (pinned)" if store.host.is_pinned() else "",
            store.device_bytes / 2**30, self.attention.kernel_name,
        )

    def forward(
        self,
        layer_name: str,
        plan: StepPlan,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """One layer of one step; layer 0 (or a new plan) starts a step."""
        index = self.layer_index[layer_name]
        if index == 0 or plan is not self._plan:
            self.attention.begin_step(plan)
            self._plan = plan
        self.attention.forward(index, query, key, value, output)
