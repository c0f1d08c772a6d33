"""The engine-args hook: headinfer's settings applied to vLLM's config, before any worker starts.

:func:`apply_settings` runs in the process that builds the ``VllmConfig``
(inside the platform's ``check_and_update_config``, ``compat.patch_platform``).
It refuses what HeadInfer cannot run (:mod:`.refusals`), sets long-context
defaults the user did not choose (:mod:`.defaults`), plans the capacity from
the host budget and checks the host has the memory (:mod:`.capacity`), and
tells vLLM's scheduler the block count through ``num_gpu_blocks_override``
(for a model with sliding windows under vLLM's hybrid KV-cache manager, the
memory from which vLLM sizes its pool once it knows the KV-cache groups:
:func:`.capacity.uses_kv_cache_groups`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from headinfer_vllm.config import HeadInferConfig
from headinfer_vllm.vllm_plugin.capacity import (
    APPLIED_KEY,
    check_budgets,
    describe_parallel,
    engine_capacity,
    rank_host_budget,
    recommend_numa_binding,
    uses_kv_cache_groups,
)
from headinfer_vllm.vllm_plugin.defaults import choose_piecewise_graphs, set_long_context_defaults
from headinfer_vllm.vllm_plugin.metrics import collect_from_all_processes
from headinfer_vllm.vllm_plugin.refusals import refusals

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

SETTINGS_KEY = "headinfer"
"""Key of the plugin's settings in ``--additional-config``."""


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
    model, cache = vllm_config.model_config, vllm_config.cache_config
    capacity = engine_capacity(vllm_config, config)  # the largest stage's: it binds every rank's block count
    check_budgets(vllm_config, config)
    recommend_numa_binding(vllm_config)
    layout = capacity.layout
    for name in ("num_gpu_blocks_override", "kv_cache_memory_bytes"):
        if getattr(cache, name) is not None:
            logger.warning("headinfer: ignoring %s=%s; the KV capacity comes from cpu_kv_cache_gib",
                           name, getattr(cache, name))
    if additional is None:
        vllm_config.additional_config = additional = {}
    # Workers rebuild the same plan from the resolved settings, not from their environment.
    additional[SETTINGS_KEY] = dataclasses.asdict(config)
    collect_from_all_processes()  # headinfer's counters on /metrics (vllm_plugin.metrics)
    if uses_kv_cache_groups(vllm_config):
        # The groups (and so how many layers share a block) are known once the workers report their
        # layers: vLLM sizes the pool from this budget then, at one element per token and layer of its
        # placeholder KV for every 2 * KV heads * head dim elements of real KV.
        cache.num_gpu_blocks_override = None
        real_per_placeholder = 2 * layout.num_kv_heads * layout.head_dim
        cache.kv_cache_memory_bytes = rank_host_budget(vllm_config, config) // real_per_placeholder
        additional[APPLIED_KEY] = None
        logger.info(
            "headinfer: the model declares sliding windows: vLLM's hybrid KV-cache manager gives windowed layers "
            "KV-cache groups of their own, whose out-of-window pages leave the host tier; vLLM sizes the "
            "block pool from cpu_kv_cache_gib=%s once it knows the groups (the workers log the plan; if vLLM "
            "reports too little KV cache memory for max_model_len, raise cpu_kv_cache_gib)",
            config.cpu_kv_cache_gib,
        )
        return
    usable_tokens = (layout.num_blocks - 1) * layout.block_size  # vLLM keeps one null block
    if usable_tokens < model.max_model_len:
        needed = config.cpu_kv_cache_gib * (model.max_model_len + layout.block_size) / usable_tokens
        raise ValueError(
            f"headinfer: cpu_kv_cache_gib={config.cpu_kv_cache_gib} holds {usable_tokens} tokens but "
            f"max_model_len is {model.max_model_len}; raise cpu_kv_cache_gib to at least {needed:.3f} "
            "or lower --max-model-len"
        )
    # vLLM's own KV tensor shrinks to one element per token and layer
    # (HeadInferBackend.customize_spec); the block count comes from the plan.
    cache.num_gpu_blocks_override = layout.num_blocks
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    cache.kv_cache_memory_bytes = max(1 << 20, layout.num_blocks * layout.block_size * layout.num_layers * itemsize)
    additional[APPLIED_KEY] = layout.num_blocks
    logger.info("headinfer: %s", describe_parallel(vllm_config, config, capacity))
