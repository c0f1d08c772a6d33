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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from headinfer_vllm.core.plan import PageTable, StepPlan, new_token_rows


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


def stage_pages(
    plan: StepPlan, num_blocks: int, window: int | None = None, null_block: int | None = None
) -> StagingMap:
    """Compact staging positions of ``plan``'s pages, for units of ``num_blocks`` pages.

    ``window``: the layers' sliding window; pages before every query's window
    are left out, their table entries point at some loaded page (never read).
    ``null_block``: a block id never loaded (see the module docstring), or None.
    """
    block_size = plan.block_size
    device = plan.home.block_table.device
    pages_read = plan.page_in_use if window is None else plan.page_in_use & pages_in_window(plan, window)
    # Entries of pages not read become the spare id num_blocks, which no unit has.
    block_ids = plan.home.block_table.long().masked_fill(~pages_read, num_blocks)
    in_use = torch.zeros(num_blocks + 1, dtype=torch.bool, device=device)
    in_use = in_use.index_fill_(0, block_ids.flatten(), True)[:num_blocks]
    if null_block is not None:
        in_use[null_block] = False
    # Position of each page in use; pages not in use get some valid position and are never read.
    position = (in_use.cumsum(0) - 1).clamp(min=0)
    num_loads = min(num_pages_read(plan, window), num_blocks)
    new_pages = position[plan.new_slots // block_size]
    return StagingMap(
        load_pages=torch.nonzero_static(in_use, size=num_loads, fill_value=0).flatten(),
        num_pages=in_use.sum(dtype=torch.int64).reshape(1),
        table=PageTable(
            block_table=position[block_ids.clamp(max=num_blocks - 1)].int(),
            new_rows=new_token_rows(new_pages, plan.new_slots % block_size, block_size),
        ),
    )


def stage_layers(
    plan: StepPlan, num_blocks: int, windows: Mapping[int, int | None], null_block: int | None = None
) -> dict[int, StagingMap]:
    """A map per layer of ``windows`` (layer -> its sliding window), one per window that leaves a page out.

    Layers whose window leaves out no page this step share the map of all pages.
    ``null_block``: as in :func:`stage_pages`.
    """
    maps: dict[int | None, StagingMap] = {}
    staged = {}
    for layer, window in windows.items():
        if window is not None and not any(span.window_start(window) >= plan.block_size for span in plan.requests):
            window = None
        if window not in maps:
            maps[window] = stage_pages(plan, num_blocks, window, null_block)
        staged[layer] = maps[window]
    return staged


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
