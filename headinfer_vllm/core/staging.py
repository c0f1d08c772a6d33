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
"""

from __future__ import annotations

import dataclasses

import torch

from headinfer_vllm.core.plan import PageTable, StepPlan, new_token_rows


@dataclasses.dataclass(frozen=True, slots=True)
class StagingMap:
    """Which pages a step loads into a staging buffer, and where its pages are there."""

    load_pages: torch.Tensor
    """shape: [num_loads], dtype: int64, device. Block id loaded into each staging
    position. ``num_loads = min(num_page_refs, num_blocks)`` is a bound known on
    the host; positions past the distinct pages reload block 0 and are never read."""
    table: PageTable
    """The step's pages as staging positions."""


def stage_pages(plan: StepPlan, num_blocks: int) -> StagingMap:
    """Compact staging positions of ``plan``'s pages, for units of ``num_blocks`` pages."""
    block_size = plan.block_size
    device = plan.home.block_table.device
    # Entries past a sequence become the spare id num_blocks, which no unit has.
    block_ids = plan.home.block_table.long().masked_fill(~plan.page_in_use, num_blocks)
    in_use = torch.zeros(num_blocks + 1, dtype=torch.bool, device=device)
    in_use = in_use.index_fill_(0, block_ids.flatten(), True)[:num_blocks]
    # Position of each page in use; pages not in use get some valid position and are never read.
    position = (in_use.cumsum(0) - 1).clamp(min=0)
    num_loads = min(plan.num_page_refs, num_blocks)
    new_pages = position[plan.new_slots // block_size]
    return StagingMap(
        load_pages=torch.nonzero_static(in_use, size=num_loads, fill_value=0).flatten(),
        table=PageTable(
            block_table=position[block_ids.clamp(max=num_blocks - 1)].int(),
            new_rows=new_token_rows(new_pages, plan.new_slots % block_size, block_size),
        ),
    )
