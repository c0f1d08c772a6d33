"""Compact staging: a step loads the distinct pages it reads to the front of each staging buffer.

::

    block ids in use this step:   3  7  8  12        (every request's pages, deduplicated, in id order)
    staging buffer positions:    [0][1][2][3] . . .  (position i holds load_pages[i])

Streamed units attend through the block table remapped to these positions;
resident units keep the block ids. However vLLM interleaves the block ids of
concurrent requests, a unit loads with one ``index_select``. The map is computed once
per step by device operations that never wait for the device: a bitmap of
the pages in use over all block ids, its running count for the positions,
and ``torch.nonzero_static`` with a size known on the host for the list of
pages to load.

A page shared by several requests (a common prefix, ``n > 1`` sampling) is
loaded once: the loads stop at the count of distinct pages, which only the
device knows (``num_pages``); the host knows a bound (``load_pages``' length).

A layer with a sliding window reads only the pages that hold a key in some
query's window; pages wholly before every window of a request are neither
loaded nor mapped. Each such window has a map of its own per step, which the
layers with that window share.

A *null block* (vLLM's block 0: never a request's page; vLLM maps it where a
window freed a page and everywhere in the dummy batches of CUDA-graph capture
and warm-up) is never loaded: its table entries point at some loaded page,
whose keys the window masks or whose output is discarded. So a capture batch,
whose every page is the null block, loads nothing.

With a device page cache (:mod:`headinfer_vllm.core.page_cache`), pages that
the cache holds after the step's update are not staged: a unit reads them in
its cache rows. :meth:`StagingMap.pool_tables` then gives each cached unit its
table of pool rows (cached row or staging row per page) and its new tokens' rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from headinfer_vllm.core.plan import PageTable, StepPlan, new_token_rows


@dataclasses.dataclass(frozen=True, slots=True)
class CachedPages:
    """Where a step's pages lie in the page cache (see :meth:`StagingMap.pool_tables`)."""

    table: torch.Tensor
    """shape: [num_reqs, max_pages], int64, device: each page's cache row, -1 where staged."""
    new_pages: torch.Tensor
    """shape: [num_tokens], int64, device: each new token's page as a cache row, -1 where staged."""


@dataclasses.dataclass(frozen=True, slots=True)
class StagingMap:
    """Which pages a step loads into a staging buffer, and where its pages are there."""

    load_pages: torch.Tensor
    """shape: [num_loads], dtype: int64, device. Block id loaded into each staging
    position. ``num_loads = min(num_pages_read(plan, window), num_blocks)`` is a
    bound known on the host; entries past ``num_pages`` are padding (block 0), never
    loaded by a load that stops at the count, never read."""
    num_pages: torch.Tensor
    """shape: [1], dtype: int64, device. The distinct pages to load: the count a load stops at."""
    table: PageTable
    """The step's pages as staging positions."""
    new_pages: torch.Tensor
    """shape: [num_tokens], int64, device: each new token's page as a staging position."""
    new_offsets: torch.Tensor
    """shape: [num_tokens], int64, device: each new token's offset in its page."""
    block_size: int
    cached: CachedPages | None = None
    """Pages that the page cache holds, read there rather than staged; None: no page cache."""

    def pool_tables(self, cache_first_rows: torch.Tensor, staging_first_rows: torch.Tensor) -> list[PageTable]:
        """The step's pages as rows of the store's pool for ``n`` units at once, unit ``i`` with its cache rows
        from ``cache_first_rows[i]`` and its staging buffer from ``staging_first_rows[i]`` (both ``[n]`` int64,
        device): a cached page's row, else the staging row that holds it. A few launches for all ``n``."""
        if self.cached is None:
            raise ValueError("headinfer: pool tables need a map made with a page cache")
        cache_first, staging_first = cache_first_rows[:, None, None], staging_first_rows[:, None, None]
        cached, staged = self.cached.table, self.table.block_table.long()  # [R, P] each
        tables = torch.where(cached >= 0, cached + cache_first, staged + staging_first).int()  # [n, R, P]
        cached, staged = self.cached.new_pages, self.new_pages  # [T] each
        new_pages = torch.where(cached >= 0, cached + cache_first[:, 0], staged + staging_first[:, 0])  # [n, T]
        key_rows = new_pages * (2 * self.block_size) + self.new_offsets
        new_rows = torch.stack((key_rows, key_rows + self.block_size), dim=-1).flatten(1)  # [n, 2T]
        return [PageTable(table, rows) for table, rows in zip(tables.unbind(), new_rows.unbind(), strict=True)]


def pages_read(
    plan: StepPlan, num_blocks: int, window: int | None = None, null_block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages that layers with ``window`` read in ``plan``.

    Returns ``block_ids [num_reqs, max_pages]`` int64 (entries not read: the spare id ``num_blocks``)
    and ``in_use [num_blocks]`` bool (the null block excluded).
    """
    read = plan.page_in_use if window is None else plan.page_in_use & pages_in_window(plan, window)
    block_ids = plan.home.block_table.long().masked_fill(~read, num_blocks)
    in_use = torch.zeros(num_blocks + 1, dtype=torch.bool, device=block_ids.device)
    in_use = in_use.index_fill_(0, block_ids.flatten(), True)[:num_blocks]
    if null_block is not None:
        in_use[null_block] = False
    return block_ids, in_use


def stage_pages(
    plan: StepPlan,
    num_blocks: int,
    window: int | None = None,
    null_block: int | None = None,
    slot_of: torch.Tensor | None = None,
) -> StagingMap:
    """Compact staging positions of ``plan``'s pages, for units of ``num_blocks`` pages.

    ``window``: the layers' sliding window; pages before every query's window
    are left out, their table entries point at some loaded page (never read).
    ``null_block``: a block id never loaded (see the module docstring), or None.
    ``slot_of``: ``[num_blocks]`` int64, each block id's cache row or -1
    (:class:`headinfer_vllm.core.page_cache.Admissions`); cached pages are not
    staged. None: no page cache.
    """
    block_size = plan.block_size
    block_ids, in_use = pages_read(plan, num_blocks, window, null_block)
    if slot_of is not None:
        in_use = in_use & (slot_of < 0)
    # Position of each page in use; pages not in use get some valid position and are never read.
    position = (in_use.cumsum(0) - 1).clamp(min=0)
    num_loads = min(num_pages_read(plan, window), num_blocks)
    new_pages = plan.new_slots // block_size
    new_offsets = plan.new_slots % block_size
    cached = None
    if slot_of is not None:
        cached = CachedPages(slot_of[block_ids.clamp(max=num_blocks - 1)], slot_of[new_pages])
    new_positions = position[new_pages]
    return StagingMap(
        load_pages=torch.nonzero_static(in_use, size=num_loads, fill_value=0).flatten(),
        num_pages=in_use.sum(dtype=torch.int64).reshape(1),
        table=PageTable(
            block_table=position[block_ids.clamp(max=num_blocks - 1)].int(),
            new_rows=new_token_rows(new_positions, new_offsets, block_size),
        ),
        new_pages=new_positions,
        new_offsets=new_offsets,
        block_size=block_size,
        cached=cached,
    )


def stage_layers(
    plan: StepPlan,
    num_blocks: int,
    windows: Mapping[int, int | None],
    null_block: int | None = None,
    slot_of: torch.Tensor | None = None,
) -> dict[int, StagingMap]:
    """A map per layer of ``windows`` (layer -> its sliding window), one per window that leaves a page out.

    Layers whose window leaves out no page this step share the map of all pages.
    ``null_block``, ``slot_of``: as in :func:`stage_pages`.
    """
    maps: dict[int | None, StagingMap] = {}
    staged = {}
    for layer, window in effective_windows(plan, windows).items():
        if window not in maps:
            maps[window] = stage_pages(plan, num_blocks, window, null_block, slot_of)
        staged[layer] = maps[window]
    return staged


def effective_windows(plan: StepPlan, windows: Mapping[int, int | None]) -> dict[int, int | None]:
    """``windows`` with None for each window that leaves out no page of ``plan``."""
    return {
        layer: window
        if window is not None and any(span.window_start(window) >= plan.block_size for span in plan.requests)
        else None
        for layer, window in windows.items()
    }


def pages_in_window(plan: StepPlan, window: int) -> torch.Tensor:
    """shape: [num_reqs, max_pages], bool, device: whether a page holds a key that some query's window sees."""
    query_lens = plan.query_start_loc.diff()
    first_page = (plan.seq_lens - query_lens - window + 1).clamp(min=0) // plan.block_size
    columns = torch.arange(plan.page_in_use.shape[1], device=first_page.device)
    return columns >= first_page[:, None]


def num_pages_read(plan: StepPlan, window: int | None) -> int:
    """Pages summed over the requests (as ``plan.num_page_refs``), counting only those in ``window``."""
    block_size = plan.block_size
    return sum(
        -(-span.seq_len // block_size) - span.window_start(window) // block_size for span in plan.requests
    )
