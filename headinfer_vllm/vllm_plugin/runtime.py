"""The worker's side of headinfer: one page store and one streamed-attention engine per engine.

The metadata builders of an engine create the :class:`HeadInferRuntime` and
hold the only strong references to it, so it (its pinned host tier and its
device tier) is freed with them when vLLM tears the engine down, even when
the model object lives on (an in-process ``LLM`` that is deleted).
"""

from __future__ import annotations

import logging
import operator
import os
import re
import time
import weakref
from typing import TYPE_CHECKING, ClassVar

import torch

from headinfer_vllm.config import GIB, HeadInferConfig
from headinfer_vllm.core import HeadPageStore, StepPlan, StreamedAttention, cpu_attention, host_memory
from headinfer_vllm.core.cpu_split import (
    MIN_SPEEDUP,
    DecodeSplit,
    measure_cpu_rate,
    measure_h2d_rate,
    measure_layer_overhead,
    plan_decode_split,
)
from headinfer_vllm.core.device_memory import check_device_budget
from headinfer_vllm.vllm_plugin.capacity import (
    attends_in_place,
    engine_planned_blocks,
    host_ranks,
    numa_node_count,
    parallel_ranks,
    pipeline_stage,
    vllm_buffer_bytes,
    worker_capacity,
)
from headinfer_vllm.vllm_plugin.metrics import HeadInferMetrics
from headinfer_vllm.vllm_plugin.settings import SETTINGS_KEY

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

STARTUP_WARNING_S = 120
"""Pinning slower than this (seconds) is warned about: vLLM gives an engine 600 s to start by default."""


class HeadInferRuntime:
    """The worker's page store and streamed attention, shared by all layers of one engine.

    Each KV-cache group's metadata builder joins it (:meth:`add_group`). The
    store is built at the first step plan, when every group has joined: vLLM
    makes all builders before it builds any metadata.
    """

    live: ClassVar[weakref.WeakSet[HeadInferRuntime]] = weakref.WeakSet()
    """Every runtime alive in this process (for inspection and the lifetime tests)."""
    _by_model: ClassVar[weakref.WeakValueDictionary[int, HeadInferRuntime]] = weakref.WeakValueDictionary()
    """Runtime of each engine, keyed by ``id`` of its first headinfer attention module; weak, so a
    runtime lives exactly as long as a builder holds it."""

    @classmethod
    def get(cls, vllm_config: VllmConfig, device: torch.device) -> HeadInferRuntime:
        """The runtime of this worker's engine, made on first use.

        Builders of one engine share it; two engines in one process (same layer
        names, different models) never do.
        """
        from headinfer_vllm.vllm_plugin.compat import attention_layers, headinfer_layer_names

        first = headinfer_layer_names(vllm_config)[0]
        anchor = attention_layers(vllm_config, [first])[first]
        runtime = cls._by_model.get(id(anchor))
        if runtime is None or runtime.anchor() is not anchor:
            runtime = cls(vllm_config, device)
            runtime.anchor = weakref.ref(anchor)
            cls._by_model[id(anchor)] = runtime
        return runtime

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        self.vllm_config = vllm_config
        self.device = torch.device(device)
        self.config = HeadInferConfig.from_sources((vllm_config.additional_config or {})[SETTINGS_KEY], environ={})
        self.groups: list[tuple[str, ...]] = []
        """Each KV-cache group's layer names, as vLLM lists them: the ``i``-th layer of each group uses
        slot ``i`` of the store (as it would the ``i``-th KV tensor)."""
        self.windows_free_pages = False
        """Whether some group's windowed layers free their pages as they leave the window."""
        self.attention: StreamedAttention | None = None
        """The streamed attention over the store; None until the first step plan."""
        self.metrics = HeadInferMetrics.get()
        self._latest: list[StepPlan | None] = []
        """Each group's last plan, as its builder made it."""
        self._step_plans: tuple[StepPlan, ...] = ()
        """The plans of the step running."""
        self._planned: set[int] = set()
        """The groups whose builder made a plan since the last step began."""
        self._begun_at_plan_time = False
        """Whether ``_step_plans`` began when the last group's plan came, and no layer has run it yet."""
        HeadInferRuntime.live.add(self)

    def add_group(self, layer_names: list[str], windows_free_pages: bool) -> int:
        """Join a KV-cache group (its builder's layers); returns its index. Joining again returns the same.

        ``windows_free_pages``: the group's layers are windowed and vLLM frees their pages as they leave
        the window (a sliding-window KV-cache spec)."""
        names = tuple(layer_names)
        self.windows_free_pages |= windows_free_pages
        if names in self.groups:
            return self.groups.index(names)
        if self.attention is not None:
            raise RuntimeError(f"headinfer: layers {list(names)} joined after the store was built "
                               "(report this as a bug)")
        self.groups.append(names)
        self._latest.append(None)
        return len(self.groups) - 1

    def set_plan(self, group: int, plan: StepPlan) -> None:
        """``group``'s plan for the coming step; the first plan builds the store.

        Once every group has its plan, the step begins: its first loads start now, while vLLM runs the
        model's first layers, not when the first attention layer runs.
        """
        if self.attention is None:
            # Builders run under inference mode; the store outlives the step, as vLLM's own KV tensors do.
            with torch.inference_mode(False):
                self._build()
        self._latest[group] = plan
        self._planned.add(group)
        if len(self._planned) == len(self.groups):
            self._begin_step(tuple(self._latest))
            self._begun_at_plan_time = True

    def _begin_step(self, plans: tuple[StepPlan, ...]) -> None:
        self.attention.begin_step(plans)
        self._step_plans = plans
        self._planned.clear()

    def _build(self) -> None:
        from headinfer_vllm.vllm_plugin.compat import (
            attention_layers,
            flash_attn_version,
            gpu_memory_utilization,
            layer_index,
        )

        vllm_config, config, device = self.vllm_config, self.config, self.device
        layer_names = sorted((name for names in self.groups for name in names), key=layer_index)
        group_of = {name: group for group, names in enumerate(self.groups) for name in names}
        slot_of = {name: slot for names in self.groups for slot, name in enumerate(names)}
        num_slots = max(len(names) for names in self.groups)
        capacity = worker_capacity(vllm_config, config, num_slots)  # this rank's: its layers, its KV heads
        if engine_planned_blocks(vllm_config):
            if capacity.layout.num_blocks != vllm_config.cache_config.num_gpu_blocks_override:
                raise RuntimeError(
                    f"headinfer: the worker plans {capacity.layout.num_blocks} blocks of "
                    f"{capacity.layout.block_size} tokens but the engine planned "
                    f"{vllm_config.cache_config.num_gpu_blocks_override}; the block size or the settings "
                    "changed between the engine and its workers (report this as a bug)"
                )
            if len(self.groups) != 1 or len(layer_names) != capacity.layout.num_layers:
                raise ValueError(
                    f"headinfer: {len(layer_names)} attention layers in {len(self.groups)} KV-cache groups but "
                    f"this pipeline stage has {capacity.layout.num_layers} layers in one; KV sharing across "
                    "layers and draft layers are not supported"
                )
        layers = attention_layers(vllm_config, layer_names)
        scales = {layer.impl.scale for layer in layers.values()}
        heads = {layer.impl.num_heads for layer in layers.values()}
        if len(scales) != 1 or len(heads) != 1:
            raise ValueError("headinfer: all attention layers must share one scale and head count")
        kv_heads = {layer.impl.num_kv_heads for layer in layers.values()}
        if kv_heads != {capacity.layout.num_kv_heads}:
            raise RuntimeError(
                f"headinfer: this rank's attention layers have {sorted(kv_heads)} KV heads but its plan has "
                f"{capacity.layout.num_kv_heads}"
            )
        host_memory.check_host_budget(capacity.host_bytes, config.host_memory_check)  # this rank's tier, on its host
        self.layer_index = {name: index for index, name in enumerate(layer_names)}
        self.layer_groups = tuple(group_of[name] for name in layer_names)
        _, vllm_device_bytes = vllm_buffer_bytes(vllm_config)
        check_device_budget(capacity.device_bytes + vllm_device_bytes, device,
                            gpu_memory_utilization(vllm_config.cache_config))  # the field is None on vLLM 0.34
        store = self._allocate_store(capacity, device, [slot_of[name] for name in layer_names])
        query_per_kv = next(iter(heads)) // capacity.layout.num_kv_heads
        decode_split = None
        if device.type == "cuda" and config.cpu_attention != "off" and store.streamed_units:
            threads = config.cpu_threads or default_cpu_threads(len(host_ranks(vllm_config)))
            decode_split = plan_split_at_startup(store, config.cpu_attention, query_per_kv, threads)
        self.attention = StreamedAttention(
            store, num_query_heads=heads.pop(), scale=scales.pop(), prefetch_depth=config.prefetch_depth,
            flash_version=flash_attn_version(vllm_config, capacity.layout.head_dim),
            layers=[layers[name].impl.variant for name in layer_names],
            cpu_kernel=attends_in_place(config), cpu_threads=config.cpu_threads or None, decode_split=decode_split,
            layer_groups=self.layer_groups, null_block=NULL_BLOCK,
        )
        self._last_layer = len(layer_names) - 1
        layout = capacity.layout
        self.metrics.describe_store(
            resident_units=capacity.num_resident_units, streamed_units=capacity.num_streamed_units,
            host_bytes=store.host_bytes,
            cpu_decode_units=decode_split.num_cpu_units if decode_split is not None else 0,
        )
        logger.info(
            "headinfer: worker store ready on %s%s: host tier %.3f GiB%s, device tier %.3f GiB, kernel %s%s%s",
            device, rank_description(vllm_config, capacity, len(layer_names)), store.host_bytes / GIB,
            " (pinned)" if store.host.is_pinned() else "", store.device_bytes / GIB, self.attention.kernel_name,
            describe_groups(self.groups, layout), describe_variants(self.attention.layers, self.windows_free_pages),
        )
        if store.cache_rows:
            cached = len(self.attention.transfers.cached_units)
            logger.info(
                "headinfer: device page cache (device_tier=pages): %d pages (of %d blocks) in each of %d "
                "streamed units, %.3f GiB; shortest requests first, least recently used evicted%s",
                store.cache_rows, layout.num_blocks, cached, cached * store.cache_rows * layout.unit_page_bytes / GIB,
                f"; {len(store.streamed_units) - cached} CPU-split units stay out" if cached < len(
                    store.streamed_units) else "",
            )
        if device.type == "cuda":
            report_numa_placement(store.host, device)

    @staticmethod
    def _allocate_store(capacity, device: torch.device, layer_slots: list[int]) -> HeadPageStore:
        """The page store; pinning a large host tier takes a while, so it is logged and timed."""
        pinned = torch.device(device).type == "cuda"
        if pinned:
            logger.info("headinfer: pinning %.1f GiB of host memory for the host tier (about 1 s per 5-10 GiB)",
                        capacity.host_bytes / GIB)
        started = time.monotonic()
        store = HeadPageStore.from_plan(capacity, device, layer_slots=layer_slots)
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
        """One layer of one step; layer 0 (or a new plan) starts a step, with every group's latest plan."""
        index = self.layer_index[layer_name]
        group = self.layer_groups[index]
        if index == 0 or not self._step_plans or plan is not self._step_plans[group]:
            plans = tuple(self._latest)
            if plans[group] is not plan:
                raise RuntimeError(f"headinfer: {layer_name} runs with a plan that is not its KV-cache group's "
                                   "latest (report this as a bug)")
            begun = self._begun_at_plan_time and all(map(operator.is_, plans, self._step_plans))
            if not begun:  # a step run again with the same metadata, or groups planned out of order
                self._begin_step(plans)
            self._begun_at_plan_time = False
        self.attention.forward(index, query, key, value, output)
        if index == self._last_layer:
            self.metrics.record(self.attention.transfers.traffic)


NULL_BLOCK = 0
"""vLLM's null block: never a request's page; where a window freed a page and in every dummy batch
(warm-up, CUDA-graph capture) the block tables hold it. headinfer never loads it, so capture runs load
nothing. How a capture batch shows, by version (read from vLLM's sources): 0.32-0.34, ``BlockPool``
reserves block 0 as the null block; the V2 runner (0.33, 0.34) builds PIECEWISE capture batches' metadata
through the ordinary ``build()`` (``cudagraph_utils.prepare_inputs_to_capture``, ``for_capture`` False) over
``get_dummy_block_tables``, which zeroes the rows; the V1 runner (0.32, 0.33) builds them in ``_dummy_run``
from the input batch's block table, whose rows are zero before any request (capture runs at start-up)
and are zeroed when a request leaves."""

CORES_LEFT_TO_VLLM = 2
"""Cores that CPU attention leaves, by default, to vLLM's engine core, API server and tokenizer: with every
core busy in the kernel's OpenMP team, those threads would straggle its barriers and delay the steps."""


def default_cpu_threads(ranks_on_host: int) -> int:
    """The cores this process may run on less :data:`CORES_LEFT_TO_VLLM`, shared among the engine's ranks on
    this host (at least 1)."""
    return max(1, (len(os.sched_getaffinity(0)) - CORES_LEFT_TO_VLLM) // max(1, ranks_on_host))


def plan_split_at_startup(store: HeadPageStore, mode: str, query_per_kv: int, num_threads: int) -> DecodeSplit | None:
    """Measure the H2D and CPU-kernel rates on ``store`` and plan the decode split of ``cpu_attention=mode``.

    ``all`` without a working C++ compiler stops start-up with the build's
    error; ``auto`` then streams every unit, and says so.
    """
    try:
        cpu_attention.library()
    except RuntimeError as error:
        if mode == "all":
            raise
        logger.warning("headinfer: CPU attention unavailable, decode streams every unit over PCIe: %s",
                       str(error).splitlines()[0])
        return None
    h2d = measure_h2d_rate(store)
    cpu = measure_cpu_rate(store, query_per_kv=query_per_kv, num_threads=num_threads)
    overhead = measure_layer_overhead(store, query_per_kv=query_per_kv, num_threads=num_threads)
    split = plan_decode_split(store, mode, num_threads=num_threads, h2d_bytes_per_s=h2d, cpu_bytes_per_s=cpu,
                              layer_overhead_s=overhead)
    if split is None:
        logger.info(
            "headinfer: decode streams every unit over PCIe (cpu_attention=auto): H2D loads %.1f GB/s, CPU "
            "attention %.1f GB/s with %d threads would make decode less than %.1fx faster", h2d / 1e9, cpu / 1e9,
            num_threads, MIN_SPEEDUP,
        )
    else:
        logger.info("headinfer: decode split (cpu_attention=%s): %s", mode, split.describe(len(store.streamed_units)))
    return split


def describe_groups(groups: list[tuple[str, ...]], layout) -> str:
    """``; 6 KV-cache groups sharing 1 slot of 960 blocks``, or "" with one group."""
    if len(groups) == 1:
        return ""
    slots = f"{layout.num_layers} slot{'s' if layout.num_layers > 1 else ''}"
    return f"; {len(groups)} KV-cache groups sharing {slots} of {layout.num_blocks} blocks"


def describe_variants(layers, windows_free_pages: bool = False) -> str:
    """``; sliding window 4096 in 24 of 48 layers, sinks in 24 of 48 layers, windowed layers keep every page,
    50% of the host tier (...)``, or "".

    ``windows_free_pages``: vLLM's hybrid KV-cache manager frees the windowed layers' pages that leave
    their window (their KV-cache groups' block tables hold only the window's)."""
    parts = []
    for name, values in (
        ("sliding window", [layer.sliding_window for layer in layers]),
        ("soft-cap", [layer.logits_soft_cap for layer in layers]),
        ("sinks", [True if layer.sinks is not None else None for layer in layers]),
    ):
        present = [value for value in values if value is not None]
        if not present:
            continue
        distinct = sorted(set(present))
        shown = "" if name == "sinks" else " " + "/".join(str(value) for value in distinct)
        parts.append(f"{name}{shown} in {len(present)} of {len(layers)} layers")
    windowed = sum(layer.sliding_window is not None for layer in layers)
    if windowed and windows_free_pages:
        parts.append("windowed layers free their pages as they leave the window")
    elif windowed:  # one block table for all layers: no page leaves the tier
        parts.append(f"windowed layers keep every page, {windowed / len(layers):.0%} of the host tier "
                     "(they read only the pages in their window)")
    return "; " + ", ".join(parts) if parts else ""


def rank_description(vllm_config: VllmConfig, capacity, num_layers: int) -> str:
    """`` (rank R: tensor-parallel rank T of TP, pipeline stage S of PP; L layers, H of N KV heads)``, or ""."""
    parallel = vllm_config.parallel_config
    if parallel_ranks(parallel) == 1:
        return ""
    tp, layout = parallel.tensor_parallel_size, capacity.layout
    total_heads = vllm_config.model_config.get_total_num_kv_heads()
    replicated = f", replicated on {tp // total_heads} ranks" if total_heads < tp else ""
    return (
        f" (rank {parallel.rank}: tensor-parallel rank {parallel.rank % tp} of {tp}, pipeline stage "
        f"{pipeline_stage(parallel)} of {parallel.pipeline_parallel_size}; {num_layers} layers, "
        f"{layout.num_kv_heads} of {total_heads} KV heads{replicated})"
    )


def gpu_numa_node(device: torch.device) -> int | None:
    """The NUMA node of ``device``'s PCI slot, from sysfs (None when unknown or a single node)."""
    try:
        props = torch.cuda.get_device_properties(device)
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        with open(f"/sys/bus/pci/devices/{address}/numa_node") as numa_node:
            node = int(numa_node.read().strip())
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None
    return node if node >= 0 else None


def numa_pages(tensor: torch.Tensor) -> dict[int, int]:
    """Pages per NUMA node of the mappings that hold ``tensor``'s memory (``/proc/self/numa_maps``).

    Only pages already touched (pinning touches them all) are counted; a
    mapping shared with other allocations counts their pages too.
    """
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    pages: dict[int, int] = {}
    try:
        with open("/proc/self/numa_maps") as numa_maps, open("/proc/self/maps") as maps:
            ends = {int(low, 16): int(high, 16) for low, high in (line.split()[0].split("-") for line in maps)}
            for line in numa_maps:
                fields = line.split()
                low = int(fields[0], 16)
                if low >= end or ends.get(low, low) <= start:
                    continue
                for field in fields[1:]:
                    match = re.fullmatch(r"N(\d+)=(\d+)", field)
                    if match:
                        node = int(match[1])
                        pages[node] = pages.get(node, 0) + int(match[2])
    except (OSError, ValueError):
        return {}
    return pages


def report_numa_placement(host: torch.Tensor, device: torch.device) -> None:
    """Log where this rank's host tier lies against its GPU's NUMA node; warn when mostly elsewhere."""
    if numa_node_count() < 2 or host.numel() == 0:
        return
    node, pages = gpu_numa_node(device), numa_pages(host)
    if node is None or not pages:
        return
    local = pages.get(node, 0) / sum(pages.values())
    placement = ", ".join(f"node {n}: {count * 100 / sum(pages.values()):.0f}%" for n, count in sorted(pages.items()))
    if local < 0.5:
        logger.warning(
            "headinfer: the host tier of %s is on NUMA %s, but the GPU is on node %d: every page crosses "
            "sockets; pass --numa-bind", device, placement, node,
        )
    else:
        logger.info("headinfer: host tier of %s on NUMA %s (GPU on node %d)", device, placement, node)
