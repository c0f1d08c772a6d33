"""The head page store: where every page of every (layer, head group) lives.

::

    host tier (pinned, mapped)    device tier
    +-------------------------+   +-----------------------------------------------------------+
    | streamed units          |   | resident runs      | pool: page cache  | staging ring         |
    | [S, N, 2, B, G, D]      |   | [N, 2, B, k*G, D]  | [U * C, 2, B, G, D] [(P+1) * N, 2, B, G, D] |
    +-------------------------+   +-----------------------------------------------------------+
      home of streamed pages        home of resident     cached copies of     loaded per step,
      (all of them)                 pages                streamed pages       reused every unit

    N blocks, B tokens per block, G KV heads per unit, D head dim,
    S streamed units, P prefetch depth. A resident run is k consecutive
    resident head groups of one layer, stored with their heads side by side
    so that one kernel call attends them all. Units are per slot: layers
    that share a slot (``layer_slots``) share its pages.

The page cache and the staging ring are one device tensor of uniform page
shape (the *pool*), so that a kernel reads a unit's cached and staged pages
in one call through a block table of pool rows: each of the U streamed
(layer, head group) units owns ``C`` consecutive cache rows (row ``s`` of
every unit holds the same block id: :mod:`headinfer_vllm.core.page_cache`),
and staging buffer ``b`` is rows ``U * C + b * N ..`` of the pool.

All tensors are allocated once, here. The device tier is zero-filled (a
kernel that reads whole pages must never meet NaN past a sequence's end),
checked against its budget at construction, and never grows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from headinfer_vllm.core.host_memory import allocate_host, device_view, indexed
from headinfer_vllm.core.layout import CapacityPlan, KVLayout
from headinfer_vllm.core.residency import ResidencyPolicy, SpreadAcrossLayers, Unit


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class PageViews:
    """The pages of ``H`` consecutive KV heads (a staging buffer, a resident run) in three views.

    Made once, so that per-unit code creates no views.
    """

    pages: torch.Tensor
    """shape: [N, 2, B, H, D], contiguous."""
    token_rows: torch.Tensor
    """shape: [N * 2 * B, H, D]: one row per (page, K|V, offset); see ``plan``."""
    head_rows: torch.Tensor
    """shape: [N * 2 * B * H, D]: one row per token row and head."""

    @classmethod
    def of(cls, pages: torch.Tensor) -> PageViews:
        heads, head_dim = pages.shape[3:]
        return cls(pages, pages.view(-1, heads, head_dim), pages.view(-1, head_dim))


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class ResidentRun:
    """Consecutive resident head groups of one layer, with their heads side by side."""

    first_group: int
    views: PageViews
    """Pages ``[N, 2, B, num_groups * G, D]`` on the device."""


class HeadPageStore:
    """Host and device tiers of a head-paged KV cache."""

    def __init__(
        self,
        layout: KVLayout,
        *,
        resident_units: frozenset[Unit],
        num_staging_buffers: int,
        device: torch.device | str,
        device_budget_bytes: int | None = None,
        layer_slots: Sequence[int] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        """``cache_bytes``: device bytes of the page cache; each streamed unit gets
        ``cache_bytes // (streamed units * page bytes)`` cache rows (at most ``N``), none below one.

        ``layer_slots``: the slot whose pages each layer uses, in layer order (None: layer ``i`` uses
        slot ``i``). The layout's ``num_layers`` counts slots; units and residency are per slot.

        Layers may share a slot when their block ids never meet: vLLM's hybrid KV-cache manager gives
        each KV-cache group its own block table over one shared pool of blocks, and the ``i``-th layer
        of every group uses the ``i``-th KV tensor.
        """
        self.layout = layout
        self.device = indexed(device)
        self.layer_slots = tuple(range(layout.num_layers)) if layer_slots is None else tuple(layer_slots)
        if sorted(set(self.layer_slots)) != list(range(layout.num_layers)):
            raise ValueError(f"headinfer: layer_slots {self.layer_slots} must use each of the "
                             f"{layout.num_layers} slots")
        units = [(slot, group) for slot in range(layout.num_layers) for group in range(layout.num_groups)]
        unknown = set(resident_units) - set(units)
        if unknown:
            raise ValueError(f"headinfer: resident units {sorted(unknown)} do not exist")
        streamed = [unit for unit in units if unit not in resident_units]
        resident = [unit for unit in units if unit in resident_units]
        if streamed and num_staging_buffers < 2:
            raise ValueError("headinfer: streamed units need at least 2 staging buffers")
        if not streamed:
            num_staging_buffers = 0
        slot_index = {unit: i for i, unit in enumerate(streamed)}
        self._host_index = {
            (layer, group): slot_index[slot, group]
            for layer, slot in enumerate(self.layer_slots) for group in range(layout.num_groups)
            if (slot, group) in slot_index
        }
        """Host-tier index of each streamed ``(layer, group)``: its slot's."""
        self.streamed_units: tuple[Unit, ...] = tuple(self._host_index)
        """Streamed ``(layer, group)`` units in execution order (layer-major); layers sharing a slot
        each have their own."""
        self._streamed_groups = {
            layer: tuple(group for group in range(layout.num_groups) if (layer, group) in self._host_index)
            for layer in range(self.num_layers)
        }

        page_bytes = layout.unit_page_bytes
        cache_rows = min(cache_bytes // (len(self.streamed_units) * page_bytes), layout.num_blocks) if streamed else 0
        self.cache_rows: int = cache_rows
        """Cache rows of each streamed unit (0: no page cache)."""
        self._cache_index = {unit: i for i, unit in enumerate(self.streamed_units)} if cache_rows else {}
        device_bytes = (len(resident) + num_staging_buffers) * layout.unit_bytes
        device_bytes += len(self._cache_index) * cache_rows * page_bytes
        if device_budget_bytes is not None and device_bytes > device_budget_bytes:
            raise ValueError(
                f"headinfer: the device tier needs {device_bytes} bytes "
                f"({len(resident)} resident + {num_staging_buffers} staging units of "
                f"{layout.unit_bytes} bytes, {cache_rows} cache rows per streamed unit) but the budget is "
                f"{device_budget_bytes} bytes"
            )
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            # Registered (pinned and mapped) for this device, the current one.
            self.host = allocate_host((len(streamed), *layout.unit_shape), layout.dtype, pin=cuda)
            # host: [S, N, 2, B, G, D]
            self.host_on_device = device_view(self.host, self.device)
        """``host`` as the device addresses it: the same memory, mapped (CUDA) or as is (CPU)."""
        num_cache_rows = len(self._cache_index) * cache_rows
        self.pool = torch.zeros(
            (num_cache_rows + num_staging_buffers * layout.num_blocks, *layout.unit_shape[1:]),
            dtype=layout.dtype, device=self.device,
        )
        # pool: [U * C + (P + 1) * N, 2, B, G, D]
        self.pool_views = PageViews.of(self.pool)
        self.staging = self.pool[num_cache_rows:].view(num_staging_buffers, *layout.unit_shape)
        # staging: [P + 1, N, 2, B, G, D], a view of the pool's last rows
        # Views by indexing, not iteration: iterating makes views that no_grad callers cannot write.
        self.staging_views = tuple(PageViews.of(self.staging[buffer]) for buffer in range(num_staging_buffers))
        runs = {slot: self._allocate_runs(slot, resident_units) for slot in range(layout.num_layers)}
        self._resident_runs = {layer: runs[slot] for layer, slot in enumerate(self.layer_slots)}
        """Per layer, its slot's resident runs in group order."""

    def _allocate_runs(self, slot: int, resident_units: frozenset[Unit]) -> tuple[ResidentRun, ...]:
        """Zeroed pages for each run of consecutive resident head groups of ``slot``."""
        num_blocks, _, block_size, heads, head_dim = self.layout.unit_shape
        groups = [group for group in range(self.layout.num_groups) if (slot, group) in resident_units]
        runs = []
        for first, count in consecutive_runs(groups):
            shape = (num_blocks, 2, block_size, count * heads, head_dim)
            pages = torch.zeros(shape, dtype=self.layout.dtype, device=self.device)
            runs.append(ResidentRun(first, PageViews.of(pages)))
        return tuple(runs)

    @classmethod
    def from_plan(
        cls,
        plan: CapacityPlan,
        device: torch.device | str,
        policy: ResidencyPolicy | None = None,
        layer_slots: Sequence[int] | None = None,
    ) -> HeadPageStore:
        layout = plan.layout
        policy = policy or SpreadAcrossLayers()
        resident = policy.select(layout.num_layers, layout.num_groups, plan.num_resident_units)
        return cls(
            layout,
            resident_units=resident,
            num_staging_buffers=plan.num_staging_buffers,
            device=device,
            device_budget_bytes=plan.device_bytes,
            layer_slots=layer_slots,
            cache_bytes=plan.cache_bytes,
        )

    def cache_index(self, layer: int, group: int) -> int:
        """Index of a streamed unit among the page cache's units: its rows are ``index * cache_rows ..``."""
        return self._cache_index[(layer, group)]

    def cache_pages(self, layer: int, group: int) -> torch.Tensor:
        """Device tensor ``[C, 2, B, G, D]``: a streamed unit's cache rows (a view of the pool)."""
        first = self.cache_index(layer, group) * self.cache_rows
        return self.pool[first : first + self.cache_rows]

    def staging_row(self, buffer: int) -> int:
        """First pool row of staging buffer ``buffer``."""
        return len(self._cache_index) * self.cache_rows + buffer * self.layout.num_blocks

    @property
    def num_layers(self) -> int:
        """Layers that attend over the store (``layout.num_layers`` counts their slots)."""
        return len(self.layer_slots)

    @property
    def num_staging_buffers(self) -> int:
        return self.staging.shape[0]

    @property
    def host_bytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    @property
    def device_bytes(self) -> int:
        """Bytes of every device-tier tensor (resident runs, and the pool: page cache and staging)."""
        tensors = [run.views.pages for runs in self._resident_runs.values() for run in runs] + [self.pool]
        return sum(t.numel() * t.element_size() for t in tensors)

    def resident_runs(self, layer: int) -> tuple[ResidentRun, ...]:
        return self._resident_runs[layer]

    def streamed_groups(self, layer: int) -> tuple[int, ...]:
        """Head groups of ``layer`` that are streamed, in order."""
        return self._streamed_groups[layer]

    def is_resident(self, layer: int, group: int) -> bool:
        if not 0 <= layer < self.num_layers:
            raise KeyError(f"headinfer: no layer {layer}")
        return (layer, group) not in self._host_index

    def resident_unit(self, layer: int, group: int) -> torch.Tensor:
        """Device tensor ``[N, 2, B, G, D]`` of a resident unit (a view into its run)."""
        heads = self.layout.head_group_size
        for run in self._resident_runs[layer]:
            offset = (group - run.first_group) * heads
            if 0 <= offset < run.views.pages.shape[3]:
                return run.views.pages[:, :, :, offset : offset + heads]
        raise KeyError(f"headinfer: unit {(layer, group)} is not resident")

    def host_index(self, layer: int, group: int) -> int:
        """Index of a streamed unit in ``host``."""
        return self._host_index[(layer, group)]

    def host_unit(self, layer: int, group: int) -> torch.Tensor:
        """Host tensor ``[N, 2, B, G, D]`` of a streamed unit."""
        return self.host[self.host_index(layer, group)]

    def home(self, layer: int, group: int) -> torch.Tensor:
        if self.is_resident(layer, group):
            return self.resident_unit(layer, group)
        return self.host_unit(layer, group)

    def read_tokens(
        self, layer: int, block_ids: list[int], num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence from the pages' homes (synchronous; for checks).

        Returns two CPU tensors ``[num_tokens, num_kv_heads, head_dim]``.
        """
        layout = self.layout
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # writes to the host tier run on a side stream
        keys, values = [], []
        for group in range(layout.num_groups):
            pages = self.home(layer, group)[block_ids].to("cpu")
            # pages: [len(block_ids), 2, B, G, D]
            tokens = pages.transpose(0, 1).reshape(2, -1, layout.head_group_size, layout.head_dim)
            keys.append(tokens[0, :num_tokens])
            values.append(tokens[1, :num_tokens])
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def consecutive_runs(values: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive integers in sorted ``values``."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and sum(runs[-1]) == value:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs
