"""The transfer scheduler: streams units through the staging ring.

Streamed units run in a fixed order each step (layer-major). Unit ``i`` of
that order uses staging buffer ``i % num_buffers``. On CUDA::

    h2d stream:  load i+1 ------> load i+2 ------> ...      (waits released[b])
                        \\ loaded[b]        \\
    compute:     attend i -------> attend i+1 ------> ...   (waits loaded[b])
                        \\ computed[b]      \\
    d2h stream:          write back i ----> write back i+1  (waits computed[b])
                                     \\ released[b]

While unit ``i`` is computed, units up to ``i + prefetch_depth`` are being
loaded, the next layer's first units included. A buffer is reloaded only
after the write-back reading it has finished (``released``), and is read by
attention only after its load has finished (``loaded``). The host never
waits: every ordering is an event waited on by a stream. Only the pages in
``plan.load_runs`` are loaded and only those in ``plan.store_runs`` are
written back. Without CUDA the same schedule runs with synchronous copies.
"""

from __future__ import annotations

import torch

from headinfer_vllm.core.page_store import HeadPageStore
from headinfer_vllm.core.plan import PageRuns, StepPlan
from headinfer_vllm.core.residency import Unit


def copy_runs(destination: torch.Tensor, source: torch.Tensor, runs: PageRuns) -> None:
    """Copy pages ``runs`` of ``source`` into the same pages of ``destination``.

    Both are ``[N, ...]`` unit tensors; each run is one contiguous copy.
    """
    for first, count in runs:
        destination[first : first + count].copy_(source[first : first + count], non_blocking=True)


class TransferScheduler:
    """Loads streamed units into staging buffers ahead of use; writes pages back."""

    def __init__(self, store: HeadPageStore, prefetch_depth: int) -> None:
        self.store = store
        num_buffers = store.num_staging_buffers
        if store.streamed_units and not 1 <= prefetch_depth < num_buffers:
            raise ValueError(
                f"headinfer: prefetch_depth {prefetch_depth} needs at least "
                f"{prefetch_depth + 1} staging buffers, the store has {num_buffers}"
            )
        self.prefetch_depth = prefetch_depth
        self._position = {unit: i for i, unit in enumerate(store.streamed_units)}
        self._cuda = store.device.type == "cuda"
        if self._cuda:
            self._h2d = torch.cuda.Stream(store.device)
            self._d2h = torch.cuda.Stream(store.device)
            self._loaded = [torch.cuda.Event() for _ in range(num_buffers)]
            self._computed = [torch.cuda.Event() for _ in range(num_buffers)]
            self._released = [torch.cuda.Event() for _ in range(num_buffers)]
        self._plan: StepPlan | None = None
        self._issued = 0
        """Units of this step whose load has been issued."""
        self._next = 0
        """Position of the next unit to acquire."""

    def begin_step(self, plan: StepPlan) -> None:
        """Start a step; issues the first loads at once so they overlap the model's start."""
        self._plan = plan
        self._issued = 0
        self._next = 0
        if self._cuda:
            # A step cut short by an exception (out of memory, say) leaves queued work that reads
            # or writes staging buffers with no ``released`` event after it: loads wait for it all.
            self._h2d.wait_stream(torch.cuda.current_stream(self.store.device))
        self._issue_loads_through(self.prefetch_depth - 1)

    def acquire(self, unit: Unit) -> torch.Tensor:
        """The staging buffer holding ``unit``, ready for the current stream."""
        position = self._position[unit]
        if position != self._next:
            expected = self.store.streamed_units[self._next] if self._next < len(self._position) else None
            raise RuntimeError(
                f"headinfer: unit {unit} (layer, group) was requested out of order; expected "
                f"{expected}. Every layer must run once per step, in order"
            )
        self._issue_loads_through(position + self.prefetch_depth)
        buffer = position % self.store.num_staging_buffers
        if self._cuda:
            torch.cuda.current_stream(self.store.device).wait_event(self._loaded[buffer])
        return self.store.staging[buffer]

    def release(self, unit: Unit) -> None:
        """After ``unit``'s work is queued: write its new pages back, free its buffer."""
        position = self._position[unit]
        buffer = position % self.store.num_staging_buffers
        staging, home = self.store.staging[buffer], self.store.host_unit(*unit)
        assert self._plan is not None
        self._next = position + 1
        if not self._cuda:
            copy_runs(home, staging, self._plan.store_runs)
            return
        self._computed[buffer].record(torch.cuda.current_stream(self.store.device))
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(self._computed[buffer])
            copy_runs(home, staging, self._plan.store_runs)
            self._released[buffer].record(self._d2h)

    def _issue_loads_through(self, last_position: int) -> None:
        assert self._plan is not None
        units = self.store.streamed_units
        while self._issued <= min(last_position, len(units) - 1):
            position = self._issued
            buffer = position % self.store.num_staging_buffers
            staging, home = self.store.staging[buffer], self.store.host_unit(*units[position])
            if self._cuda:
                with torch.cuda.stream(self._h2d):
                    # The previous user of this buffer must be written back.
                    self._h2d.wait_event(self._released[buffer])
                    copy_runs(staging, home, self._plan.load_runs)
                    self._loaded[buffer].record(self._h2d)
            else:
                copy_runs(staging, home, self._plan.load_runs)
            self._issued += 1
