"""The worker's side of headinfer: one page store and one streamed-attention engine per engine.

The metadata builders of an engine create the :class:`HeadInferRuntime` and
hold the only strong references to it, so it (its pinned host tier and its
device tier) is freed with them when vLLM tears the engine down, even when
the model object lives on (an in-process ``LLM`` that is deleted).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, ClassVar

import torch

from headinfer_vllm.config import GIB, HeadInferConfig
from headinfer_vllm.core import HeadPageStore, StepPlan, StreamedAttention
from headinfer_vllm.core.device_memory import check_device_budget
from headinfer_vllm.vllm_plugin.settings import SETTINGS_KEY, capacity_for, vllm_buffer_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

STARTUP_WARNING_S = 120
"""Pinning slower than this (seconds) is warned about: vLLM gives an engine 600 s to start by default."""


class HeadInferRuntime:
    """The worker's page store and streamed attention, shared by all layers of one engine."""

    live: ClassVar[weakref.WeakSet[HeadInferRuntime]] = weakref.WeakSet()
    """Every runtime alive in this process (for inspection and the lifetime tests)."""
    _by_model: ClassVar[weakref.WeakValueDictionary[int, HeadInferRuntime]] = weakref.WeakValueDictionary()
    """Runtime of each engine, keyed by ``id`` of its first attention module; weak, so a runtime
    lives exactly as long as a builder holds it."""

    @classmethod
    def get(cls, vllm_config: VllmConfig, layer_names: list[str], device: torch.device) -> HeadInferRuntime:
        """The runtime of these layers, made on first use.

        Builders of one engine share it; two engines in one process (same layer
        names, different models) never do.
        """
        from headinfer_vllm.vllm_plugin.compat import attention_layers

        anchor = attention_layers(vllm_config, layer_names[:1])[layer_names[0]]
        runtime = cls._by_model.get(id(anchor))
        if runtime is None or runtime.anchor() is not anchor or runtime.layer_names != frozenset(layer_names):
            runtime = cls(vllm_config, layer_names, device)
            runtime.anchor = weakref.ref(anchor)
            cls._by_model[id(anchor)] = runtime
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
                f"{capacity.layout.num_layers} layers; hybrid models, KV sharing across layers and "
                "draft layers are not supported"
            )
        layers = attention_layers(vllm_config, layer_names)
        scales = {layer.impl.scale for layer in layers.values()}
        heads = {layer.impl.num_heads for layer in layers.values()}
        if len(scales) != 1 or len(heads) != 1:
            raise ValueError("headinfer: all attention layers must share one scale and head count")
        self.layer_names = frozenset(layer_names)
        self.layer_index = {name: i for i, name in enumerate(sorted(layer_names, key=layer_index))}
        _, vllm_device_bytes = vllm_buffer_bytes(vllm_config)
        check_device_budget(capacity.device_bytes + vllm_device_bytes, torch.device(device),
                            vllm_config.cache_config.gpu_memory_utilization)
        store = self._allocate_store(capacity, device)
        self.attention = StreamedAttention(
            store, num_query_heads=heads.pop(), scale=scales.pop(), prefetch_depth=config.prefetch_depth,
        )
        self._plan: StepPlan | None = None
        HeadInferRuntime.live.add(self)
        logger.info(
            "headinfer: worker store ready on %s: host tier %.3f GiB%s, device tier %.3f GiB, kernel %s",
            device, store.host_bytes / GIB, " (pinned)" if store.host.is_pinned() else "",
            store.device_bytes / GIB, self.attention.kernel_name,
        )

    @staticmethod
    def _allocate_store(capacity, device: torch.device) -> HeadPageStore:
        """The page store; pinning a large host tier takes a while, so it is logged and timed."""
        pinned = torch.device(device).type == "cuda"
        if pinned:
            logger.info("headinfer: pinning %.1f GiB of host memory for the host tier (about 1 s per 5-10 GiB)",
                        capacity.host_bytes / GIB)
        started = time.monotonic()
        store = HeadPageStore.from_plan(capacity, device)
        elapsed = time.monotonic() - started
        if pinned:
            logger.info("headinfer: host tier pinned in %.1f s", elapsed)
            if elapsed > STARTUP_WARNING_S:
                logger.warning(
                    "headinfer: pinning took %.0f s; vLLM waits %s s for an engine to start "
                    "(VLLM_ENGINE_READY_TIMEOUT_S): raise it if start-up times out", elapsed,
                    os.environ.get("VLLM_ENGINE_READY_TIMEOUT_S", "600"),
                )
        return store

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
