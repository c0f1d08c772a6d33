"""Streamed attention: one model's head-wise offloaded attention, layer by layer.

Per step the caller builds a :class:`StepPlan` and calls :meth:`begin_step`
(which maps the step's pages to staging positions and starts the first
loads); per layer it calls :meth:`forward`, which:

1. stacks the new tokens' K/V once, and writes them to their pages' homes:
   each resident run of head groups, and the host pages of every streamed
   unit of the layer (one launch each),
2. attends each resident run (one kernel call for all its head groups),
3. for each streamed head group, takes the staging buffer that the transfer
   scheduler loaded ahead of time, adds the new tokens if it was loaded
   before step 1, attends, and hands the buffer back. With a page cache
   (:mod:`headinfer_vllm.core.page_cache`) the group reads its cached pages
   in its cache rows and the others in the staging buffer, in one kernel call
   through a table of pool rows, and its new tokens go to both (write-through).

With a :class:`DecodeSplit`, decode-only steps leave some streamed groups of
each layer to the CPU, which attends them in the host tier while the GPU
streams the rest (:mod:`headinfer_vllm.core.cpu_split`).

GQA: KV head ``h`` serves query heads ``h * q_per_kv .. (h + 1) * q_per_kv``.

Each layer may have its own sliding window, soft-cap and sinks
(:class:`LayerAttention`). The streamed units of a layer with a window load
only the pages that hold keys in some query's window.

KV-cache groups (vLLM's hybrid KV-cache manager): layers may belong to
groups with block tables of their own over one pool of block ids. Each step
then has one plan per group, and each layer attends, loads and writes its
pages through its group's plan; layers of different groups may share a
slot of pages (``HeadPageStore.layer_slots``), as their block ids never meet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headinfer_vllm.core.cpu_split import CpuDecodeOffload, DecodeSplit
from headinfer_vllm.core.kernels import select_kernel
from headinfer_vllm.core.page_cache import Admissions, new_pages, page_priority
from headinfer_vllm.core.page_store import HeadPageStore
from headinfer_vllm.core.plan import PageTable, StepPlan, to_device
from headinfer_vllm.core.residency import Unit
from headinfer_vllm.core.staging import StagingMap, effective_windows, pages_read, stage_layers
from headinfer_vllm.core.transfer import TransferScheduler
from headinfer_vllm.core.variants import LayerAttention


class StreamedAttention:
    """Exact attention over a :class:`HeadPageStore`, streamed by head group."""

    def __init__(
        self,
        store: HeadPageStore,
        *,
        num_query_heads: int,
        scale: float,
        prefetch_depth: int = 1,
        allow_flash: bool = True,
        flash_version: int | None = None,
        layers: Sequence[LayerAttention] | None = None,
        cpu_kernel: bool = False,
        cpu_threads: int | None = None,
        decode_split: DecodeSplit | None = None,
        layer_groups: Sequence[int] | None = None,
        null_block: int | None = None,
    ) -> None:
        """``flash_version``: the FlashAttention version to call on CUDA (vLLM's own choice); None probes.
        ``layers``: each layer's attention variant, in layer order; None: plain causal attention everywhere.
        ``cpu_kernel``: on the CPU, attend with headinfer's C++ kernels (:class:`CpuKernel`: decode tokens, and
        prefill chunks where its prefill path is the kernel's), with ``cpu_threads`` threads (None: torch's count).
        ``decode_split``: the streamed groups that the CPU attends in decode-only steps (None: none).
        ``layer_groups``: the KV-cache group of each layer, in layer order: the index of the step plan
        it attends with (:meth:`begin_step`); None: one group.
        ``null_block``: a block id that is never a request's page (vLLM's block 0), never loaded
        (:mod:`headinfer_vllm.core.staging`); None: every block id may be one."""
        layout = store.layout
        if num_query_heads % layout.num_kv_heads:
            raise ValueError(
                f"headinfer: {num_query_heads} query heads are not a multiple of "
                f"{layout.num_kv_heads} KV heads"
            )
        self.layers = tuple(layers) if layers is not None else (LayerAttention(),) * store.num_layers
        if len(self.layers) != store.num_layers:
            raise ValueError(f"headinfer: {len(self.layers)} layer variants for {store.num_layers} layers")
        self.layer_groups = tuple(layer_groups) if layer_groups is not None else (0,) * store.num_layers
        self.num_groups = max(self.layer_groups, default=0) + 1
        if len(self.layer_groups) != store.num_layers or sorted(set(self.layer_groups)) != list(range(self.num_groups)):
            raise ValueError(f"headinfer: layer_groups {self.layer_groups} must give each of the "
                             f"{store.num_layers} layers a group, numbered from 0")
        for variant in self.layers:
            variant.check(num_query_heads)
        self.store = store
        self.scale = scale
        self._cpu_units = decode_split.cpu_units if decode_split is not None else frozenset()
        """Streamed units that the CPU attends in decode-only steps (kept out of the page cache: the host
        writes their new tokens in split steps)."""
        self.transfers = TransferScheduler(store, prefetch_depth, uncached_units=self._cpu_units)
        self._kernels = tuple(
            select_kernel(
                store.device, layout.dtype, layout.block_size, layout.head_dim, scale=scale,
                query_per_kv=num_query_heads // layout.num_kv_heads, allow_flash=allow_flash,
                flash_version=flash_version,
                sinks_dtypes={variant.sinks.dtype for variant in self.layers if variant.sinks is not None},
                cpu_kernel=cpu_kernel,
                cpu_threads=cpu_threads,
            )
            for _ in range(self.num_groups)
        )
        """One kernel per KV-cache group: each keeps its group's per-step state."""
        self._streamed_windows = [
            {
                layer: variant.sliding_window
                for layer, variant in enumerate(self.layers)
                if store.streamed_groups(layer) and self.layer_groups[layer] == group
            }
            for group in range(self.num_groups)
        ]
        """Per KV-cache group, the sliding window of each of its layers with streamed units."""
        self._streamed_units_per_group = [0] * self.num_groups
        for layer, group in enumerate(self.layer_groups):
            self._streamed_units_per_group[group] += len(store.streamed_groups(layer))
        """Per KV-cache group, the streamed units of its layers (for the step's host-tier bytes)."""
        if self._cpu_units - set(store.streamed_units):
            raise ValueError(f"headinfer: units {sorted(self._cpu_units - set(store.streamed_units))} are not "
                             "streamed and cannot go to the CPU")
        self._offload: CpuDecodeOffload | None = None
        if self._cpu_units:
            self._offload = CpuDecodeOffload(
                store, decode_split, query_per_kv=num_query_heads // layout.num_kv_heads, scale=scale,
                layers=self.layers, layer_groups=self.layer_groups,
            )
        self._gpu_groups = {
            split: {
                layer: tuple(group for group in store.streamed_groups(layer)
                             if not split or (layer, group) not in self._cpu_units)
                for layer in range(store.num_layers)
            }
            for split in (False, True)
        }
        """Per kind of step (split or not), each layer's groups streamed to the GPU."""
        self._split = False
        """Whether this step is split (decode only, with CPU groups)."""
        self._plans: tuple[StepPlan, ...] = ()
        """This step's plan of each KV-cache group."""
        self.null_block = null_block
        self._decode_split = decode_split
        self._staging: dict[Unit, StagingMap] = {}
        """This step's staging map of each streamed unit."""
        self._pool_tables: dict[Unit, PageTable] = {}
        """This step's page table of each cached unit, in rows of the store's pool."""

    @property
    def kernel_name(self) -> str:
        return self._kernels[0].name

    def begin_step(self, plan: StepPlan | Sequence[StepPlan]) -> None:
        """Adopt this step's plan, or with several KV-cache groups the plan of each group (the same
        requests and tokens, each over its group's block table); the first units start loading now."""
        plans = (plan,) if isinstance(plan, StepPlan) else tuple(plan)
        if len(plans) != self.num_groups:
            raise ValueError(f"headinfer: {len(plans)} step plans for {self.num_groups} KV-cache groups")
        if any(group_plan.block_size != self.store.layout.block_size for group_plan in plans):
            raise ValueError("headinfer: the plan's block_size differs from the store's")
        if len({(group_plan.num_tokens, group_plan.requests) for group_plan in plans}) != 1:
            raise ValueError("headinfer: the KV-cache groups' plans differ in their requests")
        self._plans = plans
        for kernel, group_plan in zip(self._kernels, plans, strict=True):
            kernel.begin_step(group_plan)
        traffic, layout, store = self.transfers.traffic, self.store.layout, self.store
        traffic.steps += 1
        traffic.step_host_bytes = (layout.unit_bytes // layout.num_blocks) * sum(
            min(group_plan.num_page_refs, layout.num_blocks) * units
            for group_plan, units in zip(plans, self._streamed_units_per_group, strict=True)
        )
        stream = self._current_stream()
        plan = plans[0]
        self._split = (
            self._offload is not None and plan.num_tokens > 0 and plan.max_query_len == 1
            and self._decode_split.pays(traffic.step_host_bytes)
        )
        traffic.split_steps += self._split
        if store.streamed_units:
            admissions = self._admit(plans) if self.transfers.directory is not None else None
            self._staging = self._stage(plans, admissions)
            self.transfers.begin_step(
                self._staging, stream, self._cpu_units if self._split else frozenset(), admissions
            )
            self._pool_tables = self._tables_in_pool() if admissions is not None else {}
        if self._split:
            self._offload.begin_step(plans)

    def _admit(self, plans: tuple[StepPlan, ...]) -> Admissions:
        """Update the page cache's directory with the pages that the step's streamed layers read."""
        num_blocks = self.store.layout.num_blocks
        in_use = torch.zeros(num_blocks, dtype=torch.bool, device=self.store.device)
        priority = torch.full((num_blocks,), num_blocks, dtype=torch.int64, device=self.store.device)
        new = torch.ones(num_blocks, dtype=torch.bool, device=self.store.device)
        bound = 0
        for plan, windows in zip(plans, self._streamed_windows, strict=True):
            if not windows:
                continue
            for window in set(effective_windows(plan, windows).values()):
                in_use |= pages_read(plan, num_blocks, window, self.null_block)[1]
            priority = torch.minimum(priority, page_priority(plan.home.block_table, plan.page_in_use, num_blocks))
            if len(plans) > 1:  # a page of another group's block ids is new for this one
                new &= new_pages(plan, num_blocks) | ~pages_read(plan, num_blocks)[1]
            else:
                new = new_pages(plan, num_blocks)
            bound += plan.num_page_refs
        return self.transfers.directory.update(in_use, priority, new, bound)

    def _stage(self, plans: tuple[StepPlan, ...], admissions: Admissions | None) -> dict[Unit, StagingMap]:
        """The staging map of each streamed unit: cached units stage what the cache does not hold."""
        num_blocks, cached_units = self.store.layout.num_blocks, self.transfers.cached_units
        some_uncached = len(cached_units) < len(self.store.streamed_units)
        staging = {}
        for plan, windows in zip(plans, self._streamed_windows, strict=True):
            maps = stage_layers(plan, num_blocks, windows, self.null_block) if some_uncached else {}
            cached_maps = maps if admissions is None else stage_layers(
                plan, num_blocks, windows, self.null_block, admissions.slot_of
            )
            for layer in windows:
                for group in self.store.streamed_groups(layer):
                    staging[layer, group] = cached_maps[layer] if (layer, group) in cached_units else maps[layer]
        return staging

    def _tables_in_pool(self) -> dict[Unit, PageTable]:
        """The page table of each cached unit of this step, as rows of the pool: a few launches per map."""
        store, device = self.store, self.store.device
        units_of_map: dict[int, list[Unit]] = {}
        for unit in self.transfers.cached_units:
            units_of_map.setdefault(id(self._staging[unit]), []).append(unit)
        tables = {}
        for units in units_of_map.values():
            first_rows = torch.tensor(
                [[store.cache_index(*unit) * store.cache_rows for unit in units],
                 [store.staging_row(self.transfers.buffer_of(unit)) for unit in units]],
            )
            first_rows = to_device(first_rows, torch.int64, device)
            tables.update(zip(units, self._staging[units[0]].pool_tables(*first_rows), strict=True))
        return tables

    def forward(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of one layer for this step's batch.

        Args:
            query: ``[num_tokens, num_query_heads, head_dim]``.
            key, value: ``[num_tokens, num_kv_heads, head_dim]``, the new
                tokens' K/V (rows past ``plan.num_tokens`` are padding).
            out: ``[num_tokens, num_query_heads, head_dim]``, written in place.

        Returns ``out``.
        """
        if not self._plans:
            raise RuntimeError("headinfer: forward() before begin_step()")
        plan, kernel = self._plans[self.layer_groups[layer]], self._kernels[self.layer_groups[layer]]
        store, stream = self.store, self._current_stream()
        group_size = store.layout.head_group_size
        if key.shape[0] != plan.num_tokens:
            key, value = key[: plan.num_tokens], value[: plan.num_tokens]
        # [T, Hkv, D] twice -> [T, 2 * Hkv, D], the memory of [T, 2, Hkv, D]: rows K, V of each token.
        new_kv = torch.cat((key, value), dim=1).view(-1, *key.shape[1:])
        # new_kv: [num_tokens * 2, num_kv_heads, head_dim]
        runs = store.resident_runs(layer)
        for run in runs:
            heads = slice(run.first_group * group_size, run.first_group * group_size + run.views.token_rows.shape[1])
            run.views.token_rows.index_copy_(0, plan.home.new_rows, new_kv[:, heads])
        self.transfers.write_home(layer, new_kv, plan.home.new_rows, stream)
        if self._split:
            self._offload.send(layer, query, new_kv, stream)
        kernel.begin_layer(query, out, self.layers[layer])
        for run in runs:
            kernel.attend(run.first_group * group_size, run.views, plan.home)
        for group in self._gpu_groups[self._split][layer]:
            unit = (layer, group)
            staging = self._staging[unit]
            buffer, fresh = self.transfers.acquire(unit, stream)
            heads = slice(group * group_size, (group + 1) * group_size)
            if unit in self._pool_tables:
                # Cached rows take the new tokens every step (write-through), staged rows too (fresh or not).
                views, table = store.pool_views, self._pool_tables[unit]
                views.token_rows.index_copy_(0, table.new_rows, new_kv[:, heads])
            else:
                views, table = store.staging_views[buffer], staging.table
                if not fresh:
                    views.token_rows.index_copy_(0, table.new_rows, new_kv[:, heads])
            kernel.attend(group * group_size, views, table)
            self.transfers.release(unit, stream)
        kernel.end_layer()
        if self._split:  # after end_layer, which writes every head's decode rows of ``out``
            self._offload.attend(layer, out)
        return out

    def _current_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.store.device) if self.store.device.type == "cuda" else None
