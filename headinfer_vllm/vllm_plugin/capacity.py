"""How big the KV is, how it is split over parallel ranks, and whether the host has the memory.

Parallelism: ``cpu_kv_cache_gib`` is one engine's total across its
tensor-parallel × pipeline-parallel ranks (as vLLM's ``kv_offloading_size``
is), split evenly: each rank plans with ``cpu_kv_cache_gib / (TP × PP)``, its
own KV heads (vLLM's per-rank count, replicated when there are fewer KV heads
than ranks) and its own stage's layers. vLLM's scheduler hands one set of
block ids to every rank, so all ranks hold the same number of blocks: the
stage with the most layers sets it (:func:`engine_capacity`), and each worker
builds its store for its own layers with that count (:func:`capacity_for`).
``gpu_kv_cache_gib`` is per rank (per GPU), as vLLM's ``kv_cache_memory_bytes``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import TYPE_CHECKING

from headinfer_vllm.config import GIB, HeadInferConfig
from headinfer_vllm.core import CapacityPlan, host_memory, plan_capacity, plan_residency
from headinfer_vllm.vllm_plugin import defaults

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

APPLIED_KEY = "headinfer_num_blocks"
"""Set in ``additional_config`` once the settings are applied (idempotency): the planned block count,
or None where vLLM sizes the block pool (:func:`uses_kv_cache_groups`)."""


def parallel_ranks(parallel) -> int:
    """Ranks of one engine that hold KV pages: tensor-parallel × pipeline-parallel."""
    return parallel.tensor_parallel_size * parallel.pipeline_parallel_size


def pipeline_stage(parallel, rank: int | None = None) -> int:
    """The pipeline stage of ``rank`` (default: this process's), as vLLM orders ranks (PP × TP)."""
    rank = parallel.rank if rank is None else rank
    return (rank // parallel.tensor_parallel_size) % parallel.pipeline_parallel_size


def stage_layer_counts(vllm_config: VllmConfig) -> list[int]:
    """Layers of each pipeline stage, as vLLM splits them (``VLLM_PP_LAYER_PARTITION`` honoured).

    Stages can differ: vLLM gives the remainder to the stages before the last.
    """
    from vllm.distributed.utils import get_pp_indices

    total = vllm_config.model_config.get_total_num_hidden_layers()
    stages = vllm_config.parallel_config.pipeline_parallel_size
    return [end - start for start, end in (get_pp_indices(total, stage, stages) for stage in range(stages))]


def rank_host_budget(vllm_config: VllmConfig, config: HeadInferConfig) -> int:
    """One rank's share of ``cpu_kv_cache_gib`` (the engine's total across its TP × PP ranks), bytes."""
    return config.cpu_kv_cache_bytes // parallel_ranks(vllm_config.parallel_config)


def engine_capacity(vllm_config: VllmConfig, config: HeadInferConfig) -> CapacityPlan:
    """The plan of a rank of the stage with the most layers: it sets every rank's block count.

    vLLM's scheduler hands out one set of block ids (``num_gpu_blocks_override``)
    to all ranks, so every rank holds that many blocks of its own layers and
    KV heads; with an even share of the host budget, the largest stage binds.
    """
    ranks = parallel_ranks(vllm_config.parallel_config)
    try:
        return _plan_largest_stage(vllm_config, config)
    except ValueError as error:
        if ranks == 1:
            raise
        share = rank_host_budget(vllm_config, config) / GIB
        raise ValueError(
            f"{error} (the budgets above are one rank's: cpu_kv_cache_gib={config.cpu_kv_cache_gib} is the "
            f"total of {ranks} ranks, {share:.4f} GiB each; gpu_kv_cache_gib is per rank)"
        ) from None


def _plan_largest_stage(vllm_config: VllmConfig, config: HeadInferConfig) -> CapacityPlan:
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return plan_capacity(
        num_layers=max(stage_layer_counts(vllm_config)),
        num_kv_heads=model.get_num_kv_heads(parallel),  # per rank: total // TP, at least 1 (replicated)
        head_dim=model.get_head_size(),
        block_size=vllm_config.cache_config.block_size,
        dtype=model.dtype,
        host_bytes=rank_host_budget(vllm_config, config),
        device_bytes=config.gpu_kv_cache_bytes,
        head_group_size=config.head_group_size,
        prefetch_depth=config.prefetch_depth,
        in_place=attends_in_place(config),
        page_cache=config.device_tier == "pages",
    )


def uses_kv_cache_groups(vllm_config: VllmConfig) -> bool:
    """Whether vLLM's hybrid KV-cache manager may give windowed layers KV-cache groups of their own.

    It does for a model that declares a sliding window, unless the user disabled
    the manager (``--disable-hybrid-kv-cache-manager``); then vLLM plans every
    layer as full attention over one block table. With groups, the layers of
    all groups draw blocks from one pool, and vLLM sizes it from
    ``kv_cache_memory_bytes`` once it knows the groups (:func:`apply_settings`).
    """
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        return False
    model = vllm_config.model_config
    layer_types = getattr(getattr(model, "hf_text_config", None), "layer_types", None) or ()
    return model.get_sliding_window() is not None or any("sliding" in str(kind) for kind in layer_types)


def engine_planned_blocks(vllm_config: VllmConfig) -> bool:
    """Whether :func:`apply_settings` fixed the block count (``num_gpu_blocks_override``); False where vLLM
    sizes the block pool for its KV-cache groups."""
    return (vllm_config.additional_config or {}).get(APPLIED_KEY) is not None


def worker_capacity(vllm_config: VllmConfig, config: HeadInferConfig, num_slots: int) -> CapacityPlan:
    """This rank's plan for a store of ``num_slots`` slots (its layers, when they share one KV-cache group).

    Where vLLM sizes the block pool (:func:`uses_kv_cache_groups`), its block
    count (``cache_config.num_gpu_blocks``, set in each worker before the KV
    cache) is taken and the residency planned around it; otherwise the plan
    is the engine's (:func:`capacity_for`).
    """
    if engine_planned_blocks(vllm_config):
        return capacity_for(vllm_config, config)
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    if vllm_config.cache_config.num_gpu_blocks is None:
        raise RuntimeError(
            "headinfer: vLLM gave the worker no block count (cache_config.num_gpu_blocks) for its KV-cache "
            "groups; pass --disable-hybrid-kv-cache-manager to plan one block table (and report this as a bug)"
        )
    return plan_residency(
        num_layers=num_slots,
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        block_size=vllm_config.cache_config.block_size,
        dtype=model.dtype,
        num_blocks=vllm_config.cache_config.num_gpu_blocks,
        device_bytes=config.gpu_kv_cache_bytes,
        head_group_size=config.head_group_size,
        prefetch_depth=config.prefetch_depth,
        in_place=attends_in_place(config),
        page_cache=config.device_tier == "pages",
    )


def current_platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def attends_in_place(config: HeadInferConfig) -> bool:
    """Whether the CPU attends the whole KV where it lies (``cpu_attention``: on vLLM's CPU platform)."""
    return config.cpu_attention != "off" and current_platform_is_cpu()


def stage_capacity(engine: CapacityPlan, num_layers: int, device_budget: bool) -> CapacityPlan:
    """A rank's plan for a stage of ``num_layers`` layers, with the engine plan's block count and groups.

    Its tiers are no larger than the engine plan's: it keeps the same staging
    ring and at most as many resident units; with a device budget, a stage
    whose every unit fits in the engine plan's device tier keeps them all
    resident instead.
    """
    if num_layers == engine.layout.num_layers:
        return engine
    layout = dataclasses.replace(engine.layout, num_layers=num_layers)
    if device_budget and layout.num_units <= engine.num_resident_units + engine.num_staging_buffers:
        return CapacityPlan(layout, layout.num_units, 0)
    return CapacityPlan(layout, min(engine.num_resident_units, layout.num_units), engine.num_staging_buffers)


def capacity_for(vllm_config: VllmConfig, config: HeadInferConfig, stage: int | None = None) -> CapacityPlan:
    """The capacity plan of a rank of pipeline stage ``stage`` (default: this process's stage)."""
    if stage is None:
        stage = pipeline_stage(vllm_config.parallel_config)
    return stage_capacity(
        engine_capacity(vllm_config, config), stage_layer_counts(vllm_config)[stage],
        device_budget=config.gpu_kv_cache_bytes is not None or attends_in_place(config),
    )


def host_ranks(vllm_config: VllmConfig) -> list[int]:
    """Ranks of one engine whose workers run on this host (the API process's).

    With multiprocessing, vLLM puts ``local_world_size`` consecutive ranks on
    each node. Ray places workers itself, which this process cannot see: one
    rank of the largest stage is counted, and each worker checks its own tier
    against its host's free memory when it starts.
    """
    parallel = vllm_config.parallel_config
    ranks = parallel_ranks(parallel)
    if parallel.distributed_executor_backend == "ray" or getattr(parallel, "data_parallel_backend", "mp") == "ray":
        layers = stage_layer_counts(vllm_config)
        return [layers.index(max(layers)) * parallel.tensor_parallel_size]
    local = max(1, min(ranks, getattr(parallel, "local_world_size", ranks)))
    node = getattr(parallel, "node_rank_within_dp", 0) if local < ranks else 0
    return list(range(node * local, min(ranks, (node + 1) * local)))


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


def host_tier_bytes(vllm_config: VllmConfig, config: HeadInferConfig) -> tuple[int, int]:
    """Host bytes of one engine's ranks on this host: (host tiers, vLLM's own buffers).

    Each rank's tier is its stage's plan (ranks of smaller stages hold less);
    vLLM's per-request buffers are counted once per rank (each worker keeps
    its own token ids and block tables).
    """
    parallel = vllm_config.parallel_config
    ranks = host_ranks(vllm_config)
    engine, layers = engine_capacity(vllm_config, config), stage_layer_counts(vllm_config)
    budget = config.gpu_kv_cache_bytes is not None
    tiers = sum(stage_capacity(engine, layers[pipeline_stage(parallel, rank)], budget).host_bytes for rank in ranks)
    host_buffers, _ = vllm_buffer_bytes(vllm_config)
    return tiers, len(ranks) * host_buffers


def check_budgets(vllm_config: VllmConfig, config: HeadInferConfig) -> None:
    """The host must hold the tiers of every rank of every engine on it, plus vLLM's own buffers.

    All ranks on one host share its RAM: an engine's ranks on this host
    (:func:`host_ranks`), times the data-parallel engines on it
    (``data_parallel_size_local``), each engine with its own ``cpu_kv_cache_gib``.
    """
    parallel = vllm_config.parallel_config
    engines = max(1, getattr(parallel, "data_parallel_size_local", 1))
    host_buffers, _ = vllm_buffer_bytes(vllm_config)
    if host_buffers > GIB:
        logger.warning(
            "headinfer: vLLM's own buffers for %d requests of up to %d tokens take %.2f GiB of host memory "
            "per rank; lower --max-num-seqs for long contexts",
            vllm_config.scheduler_config.max_num_seqs, vllm_config.model_config.max_model_len,
            host_buffers / GIB,
        )
    tiers, buffers = host_tier_bytes(vllm_config, config)
    ranks = len(host_ranks(vllm_config))
    what = "cpu_kv_cache_gib" if engines == 1 else f"cpu_kv_cache_gib × {engines} data-parallel engines"
    if ranks > 1:
        what += f" ({engines * ranks} ranks on this host)"
    requested = engines * (tiers + buffers)
    host_memory.check_host_budget(requested, config.host_memory_check, what)
    free = host_memory.free_host_bytes()
    if free is not None and not defaults.long_context_defaults_apply():
        # Off CUDA the device tier is host memory too: it must fit beside the host tiers.
        device = engines * ranks * engine_capacity(vllm_config, config).device_bytes
        if requested + device > free:
            left = max(free - requested, 0) // (engines * ranks)
            message = (
                f"headinfer: gpu_kv_cache_gib={config.gpu_kv_cache_gib} asks for {device / GIB:.2f} GiB, which "
                f"without CUDA is host memory too, and only {left / GIB:.3f} GiB per rank is left beside the host "
                f"tier; lower gpu_kv_cache_gib to at most {left / GIB:.3f}, or unset it"
            )
            if config.host_memory_check == "strict":
                raise ValueError(message)
            logger.warning("%s (host_memory_check=warn: going on)", message)


def recommend_numa_binding(vllm_config: VllmConfig) -> None:
    """On CUDA hosts with several NUMA nodes, say how to keep each rank's host tier near its GPU.

    Pages cross the link from the host tier to the GPU every step; a tier on
    another socket's memory adds the inter-socket hop. vLLM's ``--numa-bind``
    starts each worker under ``numactl --membind=<its GPU's node>``, and the
    tier, allocated and pinned in the worker, lands there. headinfer does not
    turn it on itself: it needs ``numactl`` and the right to set memory policy.
    """
    nodes = numa_node_count()
    on_cuda = defaults.long_context_defaults_apply()
    if nodes < 2 or not on_cuda or getattr(vllm_config.parallel_config, "numa_bind", False):
        return
    logger.warning(
        "headinfer: this host has %d NUMA nodes and --numa-bind is off, so each rank's host tier goes "
        "wherever the kernel puts its worker's memory, possibly a socket away from its GPU; pass --numa-bind "
        "(multiprocessing executor) to allocate each rank's tier on its GPU's NUMA node", nodes,
    )


def numa_node_count(root: str = "/sys/devices/system/node") -> int:
    """NUMA nodes of this host (1 when unknown)."""
    try:
        return max(1, sum(1 for name in os.listdir(root) if re.fullmatch(r"node\d+", name)))
    except OSError:
        return 1


def describe_parallel(vllm_config: VllmConfig, config: HeadInferConfig, capacity: CapacityPlan) -> str:
    """The start-up line: the plan of one rank (of the largest stage) and, with several ranks, the whole host."""
    parallel, model = vllm_config.parallel_config, vllm_config.model_config
    ranks = parallel_ranks(parallel)
    if ranks == 1:
        return capacity.describe()
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    total_heads = model.get_total_num_kv_heads()
    heads = f"{capacity.layout.num_kv_heads} of {total_heads} KV heads"
    if total_heads < tp:
        heads += f" (replicated: each KV head on {tp // total_heads} ranks)"
    stages = stage_layer_counts(vllm_config)
    layers = f"{capacity.layout.num_layers} of {sum(stages)} layers"
    if len(set(stages)) > 1:
        layers += f" (layers per stage: {', '.join(map(str, stages))})"
    tiers, _ = host_tier_bytes(vllm_config, config)
    on_host = len(host_ranks(vllm_config))
    return (
        f"per rank (tensor-parallel {tp} × pipeline-parallel {pp} = {ranks} ranks; {heads}, {layers}; "
        f"host budget {rank_host_budget(vllm_config, config) / GIB:.3f} GiB = cpu_kv_cache_gib / {ranks}): "
        f"{capacity.describe()}; host tiers of the {on_host} ranks on this host: {tiers / GIB:.3f} GiB"
    )
