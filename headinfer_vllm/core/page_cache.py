"""The device page cache's directory: which block ids have a cached copy on the device, and where.

The device tier caches *pages*, not whole units: every cached unit (a streamed
(layer, head group)) has ``C`` cache rows, and one directory, shared by all of
them, says which block id each row ``s`` holds. A block id names the same
tokens in every unit, so a page cached at row ``s`` is cached at row ``s`` of
every cached unit::

    slot_of   [N]  block id -> its cache row, -1 when not cached
    block_in  [C]  cache row -> the block id it holds, -1 when empty
    last_used [C]  cache row -> the last step that read it

Each step (:meth:`PageDirectory.update`, device operations only, sizes known
on the host, no sync):

1. *wanted*: of the pages the step reads, the ``C`` with the smallest
   ``(priority, not cached, block id)``; the priority of a page is the page
   count of the shortest request that reads it, so requests that fit entirely
   come first and a request longer than the cache keeps a fixed part of itself
   cached (its lowest block ids) and streams the rest, never thrashing;
2. *admitted*: wanted pages not cached; each takes a row that holds no wanted
   page: an empty row first, then the least recently used. A page that holds
   only this step's new tokens (a new page: decode crossing a page boundary, a
   prefill chunk) is admitted without a load (write-allocate): the new tokens
   are written into its row, and nothing else in it is read;
3. the directory is rewritten: evicted block ids are forgotten, admitted ones
   recorded. Pages read and cached (hits, and pages admitted now) are read
   where they are; other pages are staged (loaded into the staging ring).

The caller loads the admitted pages that hold older tokens into every cached
unit's rows (``Admissions.pages -> Admissions.slots`` for ``i < count``). Eviction is free: the
host tier holds every page (write-through), so a forgotten row is just
overwritten later. The directory is updated in stream order on the device, so
rows read by the previous step's kernels are overwritten only by loads
ordered after them (the copy stream waits for the compute stream at each
step's start).

Counters (on the device, read lazily): distinct pages read, of which hits
(cached before the step), pages admitted, and the pages cached now.
"""

from __future__ import annotations

import dataclasses

import torch

from headinfer_vllm.core.plan import StepPlan

NOT_CACHED = -1
COUNTERS = ("pages_read", "pages_hit", "pages_admitted", "pages_cached")
"""The device-side counters of :attr:`PageDirectory.counters`, in order."""


@dataclasses.dataclass(frozen=True, slots=True)
class Admissions:
    """The pages a step loads into the cache, and the directory after the step's update."""

    pages: torch.Tensor
    """shape: [capacity], int64, device. Block id of each admitted page to load (new pages are not
    loaded); entries past ``count`` are padding (block 0), never loaded."""
    slots: torch.Tensor
    """shape: [capacity], int64, device. The cache row each of ``pages`` goes to."""
    count: torch.Tensor
    """shape: [1], int64, device. Admitted pages to load."""
    slot_of: torch.Tensor
    """shape: [num_blocks], int64, device. Each block id's cache row after the update, -1 when not
    cached (a new tensor: later updates do not change it)."""


class PageDirectory:
    """Which block ids the device page cache holds (see the module docstring)."""

    def __init__(self, num_blocks: int, num_slots: int, device: torch.device) -> None:
        if num_slots < 1 or num_blocks < 1:
            raise ValueError(f"headinfer: a page cache needs rows and blocks, got {num_slots} and {num_blocks}")
        self.num_blocks = num_blocks
        self.num_slots = num_slots
        # One spare entry at the end of each table takes the writes of padded entries.
        self.slot_of = torch.full((num_blocks + 1,), NOT_CACHED, dtype=torch.int64, device=device)
        self.block_in = torch.full((num_slots + 1,), NOT_CACHED, dtype=torch.int64, device=device)
        self.last_used = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        """[pages read, pages hit, pages admitted] summed over steps, then the pages cached now
        (:data:`COUNTERS`)."""
        self._step = 0

    def update(self, in_use: torch.Tensor, priority: torch.Tensor, new: torch.Tensor, bound: int) -> Admissions:
        """Cache the step's wanted pages.

        Args:
            in_use: ``[num_blocks]`` bool, device: the pages the step reads (the null block excluded).
            new: ``[num_blocks]`` bool, device: pages that hold only this step's new tokens (loaded never).
            priority: ``[num_blocks]`` int64, device: the page count of the shortest request reading each
                page (any value where ``in_use`` is False), at most ``num_blocks``.
            bound: a host bound on the pages read (their sum over requests): admissions are at most
                ``min(bound, num_slots)``.
        """
        num_blocks, num_slots, device = self.num_blocks, self.num_slots, in_use.device
        self._step += 1
        slot_of = self.slot_of[:num_blocks]
        cached = slot_of >= 0
        blocks = torch.arange(num_blocks, device=device)
        # (priority, not cached, block id) as one integer; pages not read last.
        key = (priority.clamp(0, num_blocks) * 2 + (~cached).long()) * num_blocks + blocks
        key = key.masked_fill(~in_use, torch.iinfo(torch.int64).max)
        candidates = torch.topk(key, min(num_slots, num_blocks), largest=False, sorted=False).indices
        wanted = torch.zeros(num_blocks + 1, dtype=torch.bool, device=device)
        wanted[candidates.masked_fill(~in_use[candidates], num_blocks)] = True
        wanted[num_blocks] = False
        admit = wanted[:num_blocks] & ~cached
        count = admit.sum(dtype=torch.int64).reshape(1)
        capacity = min(bound, num_slots, num_blocks)
        pages = torch.nonzero_static(admit, size=capacity, fill_value=0).flatten()
        # Rows to take: those holding no wanted page, empty ones first, then the least recently used.
        held = self.block_in[:num_slots]
        keeps = wanted[held.masked_fill(held < 0, num_blocks)]
        order = self.last_used[:num_slots].masked_fill(held < 0, -1).masked_fill(keeps, torch.iinfo(torch.int64).max)
        slots = torch.topk(order, capacity, largest=False, sorted=True).indices
        valid = torch.arange(capacity, device=device) < count
        slots = slots.masked_fill(~valid, num_slots)  # padded entries write the spare row and block
        evicted = self.block_in[slots]
        self.slot_of[evicted.masked_fill(evicted < 0, num_blocks)] = NOT_CACHED
        self.slot_of[pages.masked_fill(~valid, num_blocks)] = slots
        self.block_in[slots] = pages.masked_fill(~valid, NOT_CACHED)
        self.slot_of[num_blocks] = NOT_CACHED
        self.block_in[num_slots] = NOT_CACHED
        slot_of = self.slot_of[:num_blocks].clone()
        load = admit & ~new
        load_count = load.sum(dtype=torch.int64).reshape(1)
        load_pages = torch.nonzero_static(load, size=capacity, fill_value=0).flatten()
        read_rows = slot_of.masked_fill(~in_use | (slot_of < 0), num_slots)
        self.last_used.index_fill_(0, read_rows, self._step)
        self.counters[:3] += torch.stack((in_use.sum(), (in_use & cached).sum(), count[0]))
        self.counters[3] = (self.block_in[:num_slots] >= 0).sum()
        return Admissions(pages=load_pages, slots=slot_of[load_pages].clamp(min=0), count=load_count, slot_of=slot_of)

    def clear(self) -> None:
        """Forget every cached page (the host tier still holds them)."""
        self.slot_of.fill_(NOT_CACHED)
        self.block_in.fill_(NOT_CACHED)
        self.last_used.zero_()


def page_priority(block_table: torch.Tensor, page_in_use: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[num_blocks]`` int64: the page count of the shortest request reading each block (``num_blocks`` where
    none does), from a step's ``block_table [R, P]`` and ``page_in_use [R, P]``."""
    request_pages = page_in_use.sum(dim=1, keepdim=True).expand_as(page_in_use)
    ids = block_table.long().masked_fill(~page_in_use, num_blocks)
    priority = torch.full((num_blocks + 1,), num_blocks, dtype=torch.int64, device=block_table.device)
    priority.scatter_reduce_(0, ids.flatten(), request_pages.flatten(), "amin")
    return priority[:num_blocks]


def new_pages(plan: StepPlan, num_blocks: int) -> torch.Tensor:
    """``[num_blocks]`` bool: pages that hold only ``plan``'s new tokens in every request that reads them
    (their first position is a query token), and no page of ``num_blocks`` that a request reads as older."""
    query_lens = plan.query_start_loc.diff()
    first_new = (plan.seq_lens - query_lens)[:, None]
    columns = torch.arange(plan.page_in_use.shape[1], device=first_new.device) * plan.block_size
    older = plan.page_in_use & (columns < first_new)
    ids = plan.home.block_table.long()
    new = torch.zeros(num_blocks + 1, dtype=torch.bool, device=ids.device)
    new[ids.masked_fill(~(plan.page_in_use & ~older), num_blocks).flatten()] = True
    held_older = torch.zeros(num_blocks + 1, dtype=torch.bool, device=ids.device)
    held_older[ids.masked_fill(~older, num_blocks).flatten()] = True
    return (new & ~held_older)[:num_blocks]
