"""The transfer scheduler: streams units through the staging ring and writes new tokens home.

Streamed units run in a fixed order each step (layer-major). Unit ``i`` of
that order uses staging buffer ``i % num_buffers``. On CUDA every transfer is
a kernel on one copy stream that addresses the mapped host tier directly::

    copy stream: load i+1 ---> write layer's new tokens home ---> load i+2 ---> ...
                        \\ loaded[b]                                 (waits released[b])
    compute:     attend i ------------> attend i+1 ------------> ...  (waits loaded[b])
                        \\ released[b]

- A load is one launch of :mod:`headinfer_vllm.core.page_loader` over whole
  pages (as 8-byte words where they tile), whatever the fragmentation of the
  step's pages: the distinct pages that the unit's layer reads
  (:mod:`headinfer_vllm.core.staging`; a layer with a sliding window reads
  fewer) go from the host tier to the front of the staging buffer. The load
  stops at the count of distinct pages, read on the device, so a page shared
  by several requests moves once; on CUDA the Triton kernel does it with a few
  CTAs, leaving the other SMs to attention (``index_select`` is the fallback).
- Pages loaded are counted on the device from that same count, and read by the
  host lazily (:attr:`TransferScheduler.traffic`): a pinned copy made each step
  without waiting, so metrics cost no sync. Off CUDA the count is read once per
  step and map (free on the host) and each load is one ``index_select``.
- With a page cache (:mod:`headinfer_vllm.core.page_cache`), a cached unit's
  load first copies the step's admitted pages into its cache rows, then stages
  only the pages the cache does not hold; the engine writes each step's new
  tokens into the cache rows too (write-through: the host tier keeps every page).
- A layer's new K/V go to the host pages of all its streamed units in one
  launch. Loads issued after it read them; a unit loaded before it (the first
  units of a layer, prefetched during the previous layer) is *stale*, and the
  engine writes the new tokens into its staging buffer as well.
- While unit ``i`` is computed, units up to ``i + prefetch_depth`` are being
  loaded, the next layer's first units included. A buffer is reloaded only
  after the attention reading it (``released``), and read only after its load
  (``loaded``). The host never waits.

Without CUDA the same schedule runs synchronously on the host tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping

import torch

from headinfer_vllm.core.page_cache import COUNTERS, Admissions, PageDirectory
from headinfer_vllm.core.page_loader import PageLoader, accumulate_pages
from headinfer_vllm.core.page_store import HeadPageStore
from headinfer_vllm.core.plan import to_device
from headinfer_vllm.core.residency import Unit
from headinfer_vllm.core.staging import StagingMap


def as_words(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor [..., n]`` (last dimension contiguous) reinterpreted as the widest integers that tile a row.

    Copy kernels then move 8 bytes per element where the row allows it.
    """
    row_bytes = tensor.shape[-1] * tensor.element_size()
    word = next(word for word in (torch.int64, torch.int32, torch.int16, torch.uint8) if row_bytes % word.itemsize == 0)
    return tensor.view(word)


@dataclasses.dataclass(frozen=True, slots=True)
class HostLayer:
    """The host pages of some streamed units of one layer, as words.

    The host tier holds a layer's streamed units consecutively; ``rows`` spans those from the first
    unit written to the last, and ``unit_offsets`` says where those written start (all of them, unless
    the CPU decode split leaves out some in between).
    """

    rows: torch.Tensor
    """shape: [span * N * 2 * B, row words]: the token rows (see ``plan``) of each unit of the span in turn."""
    unit_offsets: torch.Tensor
    """shape: [units], int64, device: the first row in ``rows`` of each unit written, in group order."""
    groups: slice | torch.Tensor | None
    """The units' head groups, indexing dimension 1 of ``[T * 2, groups, row words]``; None: all."""
    head_group_size: int

    @property
    def num_units(self) -> int:
        return self.unit_offsets.shape[0]

    def unit_rows(self, new_rows: torch.Tensor) -> torch.Tensor:
        """``[T * 2 * units]``: each of ``new_rows [T * 2]`` in each unit written in turn."""
        return (new_rows[:, None] + self.unit_offsets).flatten()

    def write(self, new_kv: torch.Tensor, unit_rows: torch.Tensor) -> None:
        """Store ``new_kv [T * 2, num_kv_heads, D]`` (K, V rows of each new token) at ``unit_rows``."""
        num_rows, num_kv_heads, head_dim = new_kv.shape
        if self.groups is None:  # every group of the layer: [T * 2 * groups, row words] is a view
            tokens = as_words(new_kv.view(-1, self.head_group_size * head_dim))
        else:
            tokens = as_words(new_kv.view(num_rows, num_kv_heads // self.head_group_size, -1))[:, self.groups]
            tokens = tokens.reshape(-1, tokens.shape[-1])  # [T * 2 * units, row words]
        self.rows.index_copy_(0, unit_rows, tokens)


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """The streamed units that a kind of step loads, in order, and where it writes new tokens home."""

    order: tuple[Unit, ...]
    """Units loaded, in execution order (layer-major); unit ``i`` uses staging buffer ``i % num_buffers``."""
    position: Mapping[Unit, int]
    """Index of each unit in ``order``."""
    host_layers: Mapping[int, HostLayer | None]
    """Per layer, the host pages of its units in ``order`` (None: none)."""


@dataclasses.dataclass
class Traffic:
    """Running totals of one store's transfers since it was made (for operators' metrics)."""

    loaded_bytes: int = 0
    """Bytes copied from the host tier to staging buffers: the distinct pages of each load, counted on
    the device from the count the load stops at (on CUDA read lazily: up to a step behind). The
    ``index_select`` fallback on CUDA cannot stop at a count it does not read; there the padding it
    moves is counted too."""
    written_bytes: int = 0
    """Bytes of new tokens' K/V written to the host tier."""
    transfer_seconds: float = 0.0
    """On CUDA, the span of each step's copies on the copy stream (first load to last transfer, waits
    for free buffers included), added once the step's events completed, never waited for; a span
    still running at the next step is skipped. Off CUDA, the wall time of the (synchronous) copies."""
    steps: int = 0
    """Steps begun."""
    split_steps: int = 0
    """Decode steps split between PCIe and CPU attention (:mod:`headinfer_vllm.core.cpu_split`)."""
    step_host_bytes: int = 0
    """Host-tier bytes of the pages the last step's requests hold (a page shared by two requests
    counts twice; at most the tier)."""
    pages_read: int = 0
    """Distinct pages that steps read, summed over steps (page cache only; read lazily as ``loaded_bytes``)."""
    pages_hit: int = 0
    """Of ``pages_read``, those the page cache held before the step."""
    pages_admitted: int = 0
    """Pages brought into the page cache (each loaded once per cached unit)."""
    cached_bytes: int = 0
    """Device bytes of the pages the page cache holds now, over all cached units."""

    @property
    def hit_rate(self) -> float:
        """Share of the pages read that the page cache held (0 without reads)."""
        return self.pages_hit / self.pages_read if self.pages_read else 0.0

    def snapshot(self) -> Traffic:
        return dataclasses.replace(self)


class TransferScheduler:
    """Loads streamed units into staging buffers ahead of use; writes new tokens to the host tier."""

    def __init__(
        self, store: HeadPageStore, prefetch_depth: int, uncached_units: frozenset[Unit] = frozenset()
    ) -> None:
        """``uncached_units``: streamed units kept out of the page cache (those whose new tokens the host
        writes: the CPU decode split's), which stage every page they read."""
        self.store = store
        num_buffers = store.num_staging_buffers
        if store.streamed_units and not 1 <= prefetch_depth < num_buffers:
            raise ValueError(
                f"headinfer: prefetch_depth {prefetch_depth} needs at least "
                f"{prefetch_depth + 1} staging buffers, the store has {num_buffers}"
            )
        self.prefetch_depth = prefetch_depth
        host, staging, num_pages = store.host_on_device, store.staging, store.layout.num_blocks
        self._host_pages = {
            unit: as_words(host[store.host_index(*unit)].view(num_pages, -1)) for unit in store.streamed_units
        }
        self._staging_pages = [as_words(staging[buffer].view(num_pages, -1)) for buffer in range(num_buffers)]
        # _host_pages: per streamed unit [N, page words]; _staging_pages: per buffer [N, page words]
        self._schedules: dict[frozenset[Unit], Schedule] = {}
        """Per set of streamed units that a step leaves out (to the CPU), the step's order and host layers."""
        self._schedule = self._schedule_without(frozenset())
        self._cuda = store.device.type == "cuda"
        if self._cuda:
            self._copy = torch.cuda.Stream(store.device)
            self._new_tokens_ready = torch.cuda.Event()
            self._loaded = [torch.cuda.Event() for _ in range(num_buffers)]
            self._released = [torch.cuda.Event() for _ in range(num_buffers)]
            self._step_span = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._step_span_pending = False
        layout = store.layout
        self._page_bytes = layout.unit_bytes // layout.num_blocks
        self._row_bytes = layout.head_group_size * layout.head_dim * layout.dtype.itemsize
        self._traffic = Traffic()
        self.directory = PageDirectory(layout.num_blocks, store.cache_rows, store.device) if store.cache_rows else None
        """The page cache's directory; None without a page cache."""
        self.cached_units = frozenset(
            unit for unit in store.streamed_units if self.directory is not None and unit not in uncached_units
        )
        """Streamed units that read cached pages in their cache rows."""
        self._cache_pages = {
            unit: as_words(store.cache_pages(*unit).view(store.cache_rows, -1)) for unit in self.cached_units
        }
        # _cache_pages: per cached unit [C, page words]
        self._admissions: Admissions | None = None
        """This step's admissions to the page cache (off CUDA: cut at their count)."""
        self._cache_seen = torch.zeros(len(COUNTERS), dtype=torch.int64, pin_memory=self._cuda)
        """The host's copy of the directory's counters, refreshed at each step's start without waiting."""
        self.loader = PageLoader(store.device)
        """Copies pages up to a count known on the device (the Triton kernel, or ``index_select``)."""
        self._counts_padding = self._cuda and self.loader.path == "index_select"
        """Whether loads move every position up to the host's bound (``index_select`` on CUDA)."""
        self._pages_loaded = torch.zeros(2, dtype=torch.int64, device=store.device)
        """[pages loaded since the store was made, pages loaded this step], counted on the device."""
        self._pages_loaded_seen = torch.zeros(2, dtype=torch.int64, pin_memory=self._cuda)
        """The host's copy of ``_pages_loaded``, refreshed at each step's start without waiting."""
        self._loads: dict[Unit, tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]] = {}
        """Per streamed unit, this step's pages to stage (``[num_loads]``, int64) and, on CUDA, their
        distinct count (``[1]``, int64, on the device); off CUDA the pages cut at that count and each
        buffer's rows for them (:meth:`_host_loads`)."""
        self._unit_rows: dict[tuple[int, int], torch.Tensor] = {}
        """Per (new-token rows, count of streamed units in a layer), where this step's new tokens go
        (``HostLayer.unit_rows``)."""
        self._fresh = [False] * num_buffers
        """Per buffer, whether its load came after its layer's new tokens were written home."""
        self._issued = 0
        """Units of this step whose load has been issued."""
        self._next = 0
        """Position of the next unit to acquire."""
        self._written_layer = -1
        """Last layer of this step whose new tokens went home."""

    def _schedule_without(self, left_out: frozenset[Unit]) -> Schedule:
        schedule = self._schedules.get(left_out)
        if schedule is None:
            order = tuple(unit for unit in self.store.streamed_units if unit not in left_out)
            schedule = self._schedules[left_out] = Schedule(
                order=order,
                position={unit: position for position, unit in enumerate(order)},
                host_layers={
                    layer: self._host_layer(layer, tuple(group for (unit_layer, group) in order if unit_layer == layer))
                    for layer in range(self.store.num_layers)
                },
            )
        return schedule

    def _host_layer(self, layer: int, groups: tuple[int, ...]) -> HostLayer | None:
        """The host pages of ``groups`` (streamed, in order) of ``layer``."""
        store, layout = self.store, self.store.layout
        if not groups:
            return None
        first = store.host_index(layer, groups[0])
        positions = [store.host_index(layer, group) - first for group in groups]
        units = store.host_on_device[first : first + positions[-1] + 1]
        rows = as_words(units.view(-1, layout.head_group_size * layout.head_dim))
        # Made once per kind of step; an asynchronous copy (a list made into a device tensor would sync).
        offsets = to_device(torch.tensor(positions) * (rows.shape[0] // (positions[-1] + 1)), torch.int64,
                            store.device)
        if len(groups) == layout.num_groups:
            index = None
        elif groups == tuple(range(groups[0], groups[0] + len(groups))):
            index = slice(groups[0], groups[0] + len(groups))
        else:
            index = to_device(torch.tensor(groups), torch.int64, store.device)
        return HostLayer(rows, offsets, index, layout.head_group_size)

    def begin_step(
        self,
        staging: Mapping[Unit, StagingMap],
        stream: torch.cuda.Stream | None,
        left_out: frozenset[Unit] = frozenset(),
        admissions: Admissions | None = None,
    ) -> None:
        """Start a step (``staging``: the map of each streamed unit; ``stream``: the compute stream);
        issues the first loads at once. ``admissions``: the pages that the page cache takes this step
        (:meth:`PageDirectory.update`), loaded into every cached unit's rows; None: no page cache.

        ``left_out``: streamed units this step neither loads nor writes home (the CPU attends them
        in the host tier). The compute stream then waits for the copy stream's earlier work, so that
        what the host reads after its stream's events (those units' pages) was written.
        """
        self._schedule = self._schedule_without(left_out)
        self._issued = 0
        self._next = 0
        self._written_layer = -1
        self._unit_rows = {}
        if not self._cuda:
            self._loads = self._host_loads(staging)
            self._admissions = admissions
            if admissions is not None:
                count = int(admissions.count)
                self._admissions = dataclasses.replace(
                    admissions, pages=admissions.pages[:count], slots=admissions.slots[:count]
                )
            cached = sum(unit in self.cached_units for unit in self._schedule.order)
            step_pages = sum(self._loads[unit][0].shape[0] for unit in self._schedule.order) + cached * (
                0 if self._admissions is None else self._admissions.pages.shape[0]
            )
            self._pages_loaded[0] += step_pages
            self._pages_loaded[1] = step_pages
        else:
            self._admissions = admissions
            self._loads = {unit: (maps.load_pages, maps.num_pages) for unit, maps in staging.items()}
            if left_out:
                stream.wait_stream(self._copy)
            self._add_step_span()
            # Loads read the step's indices, made on the compute stream. (This also orders them after
            # work that a step cut short by an exception left behind without ``released`` events.)
            self._copy.wait_stream(stream)
            self._step_span[0].record(self._copy)
            loads = {id(pages): (pages, count) for pages, count in self._loads.values()}
            if admissions is not None:
                loads[id(admissions)] = (admissions.pages, admissions.slots, admissions.count)
            for load in loads.values():
                for tensor in load:
                    tensor.record_stream(self._copy)
            with _running_on(self._copy, then=stream):
                self._pages_loaded_seen.copy_(self._pages_loaded, non_blocking=True)  # the last step's totals
                if self.directory is not None:
                    self._cache_seen.copy_(self.directory.counters, non_blocking=True)
                self._pages_loaded[1].zero_()
        self._issue_loads_through(self.prefetch_depth - 1, stream)

    def _host_loads(self, staging: Mapping[Unit, StagingMap]) -> dict[Unit, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Off CUDA, per unit: the pages to load, cut at their count (read on the host once per map: free
        there), and the staging buffers' first rows as targets. Each load is then one ``index_select``."""
        loads, cut, targets = {}, {}, {}
        for unit, maps in staging.items():
            if id(maps) not in cut:
                count = int(maps.num_pages)
                cut[id(maps)] = maps.load_pages[:count]
                if count not in targets:
                    targets[count] = [pages[:count] for pages in self._staging_pages]
            loads[unit] = (cut[id(maps)], targets[cut[id(maps)].shape[0]])
        return loads

    def write_home(
        self, layer: int, new_kv: torch.Tensor, new_rows: torch.Tensor, stream: torch.cuda.Stream | None
    ) -> None:
        """Write ``new_kv [T * 2, num_kv_heads, D]`` to the host pages of ``layer``'s streamed units at ``new_rows``."""
        host_layer = self._schedule.host_layers[layer]
        if host_layer is None:
            return
        self._written_layer = layer
        key = (id(new_rows), host_layer.num_units)  # new_rows: one tensor per KV-cache group's plan, held all step
        unit_rows = self._unit_rows.get(key)
        if unit_rows is None:
            unit_rows = self._unit_rows[key] = host_layer.unit_rows(new_rows)
        self._traffic.written_bytes += unit_rows.numel() * self._row_bytes
        if not self._cuda:
            started = time.perf_counter()
            with torch.profiler.record_function("headinfer::write_home"):
                host_layer.write(new_kv, unit_rows)
            self._traffic.transfer_seconds += time.perf_counter() - started
            return
        self._new_tokens_ready.record(stream)
        self._copy.wait_event(self._new_tokens_ready)
        with _running_on(self._copy, then=stream), torch.profiler.record_function("headinfer::write_home"):
            host_layer.write(new_kv, unit_rows)
        for tensor in (new_kv, unit_rows):
            tensor.record_stream(self._copy)

    def buffer_of(self, unit: Unit) -> int:
        """The staging buffer that ``unit`` uses this step (after :meth:`begin_step`)."""
        return self._schedule.position[unit] % self.store.num_staging_buffers

    def acquire(self, unit: Unit, stream: torch.cuda.Stream | None) -> tuple[int, bool]:
        """The staging buffer (an index of ``store.staging``) holding ``unit``, ready for ``stream``.

        Also says whether it is fresh: a stale buffer lacks this step's new
        tokens (see the module docstring).
        """
        order = self._schedule.order
        position = self._schedule.position[unit]
        if position != self._next:
            expected = order[self._next] if self._next < len(order) else None
            raise RuntimeError(
                f"headinfer: unit {unit} (layer, group) was requested out of order; expected "
                f"{expected}. Every layer must run once per step, in order"
            )
        self._issue_loads_through(position + self.prefetch_depth, stream)
        buffer = position % self.store.num_staging_buffers
        if self._cuda:
            stream.wait_event(self._loaded[buffer])
        return buffer, self._fresh[buffer]

    def release(self, unit: Unit, stream: torch.cuda.Stream | None) -> None:
        """After ``unit``'s attention is queued on ``stream``: its buffer may be reloaded."""
        position = self._schedule.position[unit]
        self._next = position + 1
        if self._cuda:
            self._released[position % self.store.num_staging_buffers].record(stream)
            if self._next == len(self._schedule.order):  # every transfer of the step is queued
                self._step_span[1].record(self._copy)
                self._step_span_pending = True

    @property
    def traffic(self) -> Traffic:
        """The running totals; pages loaded as of the last step's start on CUDA (read without waiting),
        as of now off CUDA."""
        if not self._cuda:
            self._pages_loaded_seen.copy_(self._pages_loaded)
            if self.directory is not None:
                self._cache_seen.copy_(self.directory.counters)
        traffic = self._traffic
        traffic.loaded_bytes = int(self._pages_loaded_seen[0]) * self._page_bytes
        traffic.pages_read, traffic.pages_hit, traffic.pages_admitted, cached_pages = self._cache_seen.tolist()
        traffic.cached_bytes = cached_pages * len(self.cached_units) * self._page_bytes
        return traffic

    @property
    def pages_loaded(self) -> int:
        """Pages copied to staging buffers this step, summed over the units (waits for the device: tests
        and benchmarks only)."""
        return int(self._pages_loaded[1])

    def _add_step_span(self) -> None:
        """Add the last step's copy-stream span to ``traffic`` if it completed (never waits)."""
        if self._step_span_pending and self._step_span[1].query():
            self._traffic.transfer_seconds += self._step_span[0].elapsed_time(self._step_span[1]) / 1000
        self._step_span_pending = False

    def _issue_loads_through(self, last_position: int, stream: torch.cuda.Stream | None) -> None:
        units = self._schedule.order
        last_position = min(last_position, len(units) - 1)
        if self._issued > last_position:
            return
        with _running_on(self._copy, then=stream) if self._cuda else contextlib.nullcontext():
            while self._issued <= last_position:
                position = self._issued
                buffer = position % self.store.num_staging_buffers
                if self._cuda:
                    self._copy.wait_event(self._released[buffer])
                unit = units[position]
                self._fresh[buffer] = unit[0] <= self._written_layer
                self._issued += 1
                admissions = self._admissions if unit in self.cached_units else None
                if not self._cuda:
                    pages, targets = self._loads[unit]
                    started = time.perf_counter()
                    with torch.profiler.record_function("headinfer::load"):
                        if admissions is not None:
                            self._cache_pages[unit].index_copy_(
                                0, admissions.slots, self._host_pages[unit].index_select(0, admissions.pages)
                            )
                        torch.index_select(self._host_pages[unit], 0, pages, out=targets[buffer])
                    self._traffic.transfer_seconds += time.perf_counter() - started
                    continue
                load_pages, num_pages = self._loads[unit]
                with torch.profiler.record_function("headinfer::load"):
                    if admissions is not None:
                        self.loader.load(self._host_pages[unit], self._cache_pages[unit], admissions.pages,
                                         admissions.count, admissions.slots)
                    self.loader.load(self._host_pages[unit], self._staging_pages[buffer], load_pages, num_pages)
                self._loaded[buffer].record(self._copy)
                for pages, count in ((load_pages, num_pages),) + (
                    () if admissions is None else ((admissions.pages, admissions.count),)
                ):
                    if self._counts_padding:
                        self._pages_loaded.add_(pages.shape[0])
                    else:  # the count the load stopped at
                        accumulate_pages(self._pages_loaded, count)


@contextlib.contextmanager
def _running_on(stream: torch.cuda.Stream, then: torch.cuda.Stream):
    """Make ``stream`` current, and ``then`` afterwards (no query of the current stream)."""
    torch.cuda.set_stream(stream)
    try:
        yield
    finally:
        torch.cuda.set_stream(then)
