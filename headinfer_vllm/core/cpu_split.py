"""Decode steps split between PCIe streaming and CPU attention in place.

A decode step reads every streamed unit's pages once. Streamed over PCIe, a
unit costs ``bytes / h2d_rate``; attended by the CPU where it lies in the host
tier (:mod:`headinfer_vllm.core.cpu_attention`), ``bytes / cpu_rate``. Both
run at once, so giving the CPU a share ``cpu_rate / (cpu_rate + h2d_rate)`` of
the units makes them finish together, and a step takes the time of the larger
part instead of all of it::

    PCIe-only:  |== S units over PCIe ==============|
    split:      |== S - C units over PCIe ==|            GPU: streamed + resident units
                |== C units on the CPU =====|            CPU: in the host tier, no copy

Per layer of a decode-only step (:class:`CpuDecodeOffload`)::

    compute stream:  q, k, v --> D2H (CPU heads' queries, new K/V) --> streamed attention --> H2D outputs
                                   \\ queries_ready                                         /
    host:                           wait --> new K/V into the host tier --> C++ kernel ----

The host waits once per layer, for its queries; the GPU work of the layer is
queued before that wait, so both sides run together. Steps with a prefill
chunk stream every unit (prefill stays on the GPU).

The rates are measured when the engine starts (:func:`measure_h2d_rate`,
:func:`measure_cpu_rate`) and the share planned once (:func:`plan_decode_split`).

Whether a step splits is decided per step (:meth:`DecodeSplit.pays`): the
per-layer lockstep (the host's wait for the layer's queries, the copies both
ways and the kernel's start, :func:`measure_layer_overhead`) is a fixed cost
per layer, so a step that streams little KV (short contexts) runs faster over
PCIe alone. A step splits only where the prediction, lockstep included, beats
PCIe-only by :data:`MIN_SPEEDUP`: where it streams at least
:attr:`DecodeSplit.min_split_bytes`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from headinfer_vllm.core.page_loader import PageLoader
from headinfer_vllm.core.page_store import HeadPageStore, consecutive_runs
from headinfer_vllm.core.plan import StepPlan
from headinfer_vllm.core.transfer import as_words
from headinfer_vllm.core.variants import LayerAttention

if TYPE_CHECKING:
    from headinfer_vllm.core.cpu_attention import KernelUnits

MIN_SPEEDUP = 1.1
"""``auto`` splits only when the plan predicts decode steps at least this much faster."""
MEASURE_BYTES = 256 << 20
"""Bytes read per timed run of a start-up measurement (at most the store's pages)."""


@dataclasses.dataclass(frozen=True)
class DecodeSplit:
    """Which streamed units the CPU attends in decode-only steps, and the rates that chose them."""

    cpu_groups: Mapping[int, tuple[int, ...]]
    """Per layer, the streamed head groups that the CPU attends (consecutive, the layer's last
    streamed ones); layers without any are absent."""
    num_threads: int
    """OpenMP threads of the CPU kernel."""
    num_streamed: int = 0
    """Streamed units of the store (the CPU's and PCIe's together)."""
    h2d_bytes_per_s: float | None = None
    """Measured host-to-device rate of a load (None: not measured)."""
    cpu_bytes_per_s: float | None = None
    """Measured KV read rate of the CPU kernel (None: not measured)."""
    layer_overhead_s: float = 0.0
    """Measured fixed cost of one layer's split, seconds (:func:`measure_layer_overhead`)."""
    every_step: bool = True
    """Split every decode-only step, paying or not (``cpu_attention=all``, and splits given by hand);
    ``auto`` splits only where it pays."""

    @property
    def num_cpu_units(self) -> int:
        return sum(len(groups) for groups in self.cpu_groups.values())

    @property
    def cpu_units(self) -> frozenset[tuple[int, int]]:
        """The CPU's units as ``(layer, group)`` pairs."""
        return frozenset((layer, group) for layer, groups in self.cpu_groups.items() for group in groups)

    def predicted_speedup(self, num_streamed: int) -> float | None:
        """Decode attention time PCIe-only over split, from the rates (None without them)."""
        if not self.h2d_bytes_per_s or not self.cpu_bytes_per_s or not num_streamed:
            return None
        return predicted_speedup(num_streamed, self.num_cpu_units, self.h2d_bytes_per_s, self.cpu_bytes_per_s)

    @property
    def min_split_bytes(self) -> float:
        """Streamed KV bytes of a step from which splitting it is predicted :data:`MIN_SPEEDUP` times faster
        than PCIe alone, lockstep included (0: every step; ``inf``: none)::

            B / h2d >= MIN_SPEEDUP * (B * f + layers * overhead),  f = max(pcie share / h2d, cpu share / cpu)
        """
        if self.every_step:
            return 0.0
        if not self.h2d_bytes_per_s or not self.cpu_bytes_per_s or not self.num_streamed:
            return math.inf
        cpu_share = self.num_cpu_units / self.num_streamed
        per_byte = max((1 - cpu_share) / self.h2d_bytes_per_s, cpu_share / self.cpu_bytes_per_s)
        gain_per_byte = 1 / self.h2d_bytes_per_s - MIN_SPEEDUP * per_byte
        if gain_per_byte <= 0:
            return math.inf
        return MIN_SPEEDUP * len(self.cpu_groups) * self.layer_overhead_s / gain_per_byte

    def pays(self, step_streamed_bytes: int) -> bool:
        """Whether a decode step that streams ``step_streamed_bytes`` of KV (all streamed units) splits."""
        return step_streamed_bytes >= self.min_split_bytes

    def describe(self, num_streamed: int) -> str:
        """``12 of 32 streamed units on the CPU in decode steps (H2D 48.1 GB/s, CPU 31.0 GB/s with 16
        threads: 1.6x faster than PCIe only)``."""
        rates = ""
        if self.h2d_bytes_per_s and self.cpu_bytes_per_s:
            rates = (f" (H2D {self.h2d_bytes_per_s / 1e9:.1f} GB/s, CPU {self.cpu_bytes_per_s / 1e9:.1f} GB/s "
                     f"with {self.num_threads} threads: {self.predicted_speedup(num_streamed):.2f}x "
                     "the PCIe-only decode, predicted)")
        if self.every_step:
            when = "every decode step"
        elif math.isinf(self.min_split_bytes):
            when = "no decode step (the lockstep costs more than the split saves)"
        else:
            when = (f"decode steps that stream at least {self.min_split_bytes / 2**20:.0f} MiB of KV (per-layer "
                    f"lockstep {1e6 * self.layer_overhead_s:.0f} us)")
        return f"{self.num_cpu_units} of {num_streamed} streamed units on the CPU in {when}{rates}"


def predicted_speedup(num_streamed: int, num_cpu: int, h2d_bytes_per_s: float, cpu_bytes_per_s: float) -> float:
    """PCIe-only time over split time for ``num_cpu`` of ``num_streamed`` equal units."""
    split = max((num_streamed - num_cpu) / h2d_bytes_per_s, num_cpu / cpu_bytes_per_s)
    return (num_streamed / h2d_bytes_per_s) / split


def balanced_cpu_units(num_streamed: int, h2d_bytes_per_s: float, cpu_bytes_per_s: float) -> int:
    """The count of units for the CPU that minimizes the split time (both sides finish together)."""
    share = cpu_bytes_per_s / (cpu_bytes_per_s + h2d_bytes_per_s)
    below = int(num_streamed * share)
    return min(
        (below, min(below + 1, num_streamed)),
        key=lambda count: max((num_streamed - count) / h2d_bytes_per_s, count / cpu_bytes_per_s),
    )


def spread_over_layers(streamed_groups: Mapping[int, Sequence[int]], count: int) -> dict[int, tuple[int, ...]]:
    """``count`` units for the CPU, spread evenly over the layers: each layer's last streamed groups.

    Round-robin over the layers, one more group of each per round, so every
    layer keeps GPU work to overlap with its CPU work for as long as possible.
    """
    available = {layer: list(groups) for layer, groups in streamed_groups.items() if groups}
    if not 0 <= count <= sum(len(groups) for groups in available.values()):
        raise ValueError(f"headinfer: cannot give {count} of {sum(map(len, available.values()))} streamed units "
                         "to the CPU")
    chosen: dict[int, list[int]] = {layer: [] for layer in available}
    while count:
        for layer, groups in available.items():
            if count and len(chosen[layer]) < len(groups):
                chosen[layer].insert(0, groups[len(groups) - 1 - len(chosen[layer])])
                count -= 1
    return {layer: tuple(groups) for layer, groups in chosen.items() if groups}


def split_units(
    store: HeadPageStore,
    count: int,
    *,
    num_threads: int,
    h2d_bytes_per_s: float | None = None,
    cpu_bytes_per_s: float | None = None,
    layer_overhead_s: float = 0.0,
    every_step: bool = True,
) -> DecodeSplit:
    """``count`` of ``store``'s streamed units for the CPU, spread over the layers (:func:`spread_over_layers`).

    ``every_step``: split every decode-only step; else only those where it pays (:meth:`DecodeSplit.pays`)."""
    streamed = {layer: store.streamed_groups(layer) for layer in range(store.num_layers)}
    return DecodeSplit(
        spread_over_layers(streamed, count), num_threads, len(store.streamed_units), h2d_bytes_per_s,
        cpu_bytes_per_s, layer_overhead_s, every_step,
    )


def plan_decode_split(
    store: HeadPageStore,
    mode: str,
    *,
    num_threads: int,
    h2d_bytes_per_s: float | None,
    cpu_bytes_per_s: float | None,
    layer_overhead_s: float = 0.0,
) -> DecodeSplit | None:
    """The split for ``mode`` (``all``: every streamed unit on the CPU, every decode step; ``auto``: balanced
    from the rates, in the steps where it pays, None when it predicts less than :data:`MIN_SPEEDUP` even
    without the lockstep; ``off``: None)."""
    num_streamed = len(store.streamed_units)
    if mode == "off" or not num_streamed:
        return None
    if mode == "all":
        count = num_streamed
    elif mode == "auto":
        if not h2d_bytes_per_s or not cpu_bytes_per_s:
            raise ValueError("headinfer: cpu_attention 'auto' needs both rates measured")
        count = balanced_cpu_units(num_streamed, h2d_bytes_per_s, cpu_bytes_per_s)
        if not count or predicted_speedup(num_streamed, count, h2d_bytes_per_s, cpu_bytes_per_s) < MIN_SPEEDUP:
            return None
    else:
        raise ValueError(f"headinfer: cpu_attention must be 'auto', 'all' or 'off', got {mode!r}")
    return split_units(store, count, num_threads=num_threads, h2d_bytes_per_s=h2d_bytes_per_s,
                       cpu_bytes_per_s=cpu_bytes_per_s, layer_overhead_s=layer_overhead_s, every_step=mode == "all")


# Start-up measurements ---------------------------------------------------------------------


def measure_h2d_rate(store: HeadPageStore, repeats: int = 5) -> float:
    """Bytes per second of a load as the transfer scheduler issues it (:class:`PageLoader`: whole pages
    from the mapped host tier into a staging buffer); the median of ``repeats`` timed runs."""
    if not store.streamed_units or store.device.type != "cuda":
        raise ValueError("headinfer: measuring H2D needs streamed units on a CUDA device")
    num_blocks = store.layout.num_blocks
    page_bytes = store.layout.unit_bytes // num_blocks
    num_pages = max(1, min(num_blocks, MEASURE_BYTES // page_bytes))
    source = as_words(store.host_on_device[0].view(num_blocks, -1))
    target = as_words(store.staging[0].view(num_blocks, -1))
    pages = torch.arange(num_pages, device=store.device)
    count = torch.tensor([num_pages], device=store.device)
    loader = PageLoader(store.device)
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loader.load(source, target, pages, count)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    store.staging[0].zero_()  # as the store made it
    return num_pages * page_bytes / statistics.median(times[1:])


def measure_cpu_rate(store: HeadPageStore, *, query_per_kv: int, num_threads: int, repeats: int = 5) -> float:
    """KV bytes per second that the CPU kernel reads from the host tier, attending one layer's
    streamed units for one request over (at most :data:`MEASURE_BYTES` of) their pages."""
    from headinfer_vllm.core import cpu_attention

    layout, units = store.layout, _first_layer_units(store)
    page_bytes = layout.unit_bytes // layout.num_blocks
    num_pages = max(1, min(layout.num_blocks, MEASURE_BYTES // (page_bytes * units.count)))
    query = torch.zeros(1, layout.num_kv_heads * query_per_kv, layout.head_dim, dtype=layout.dtype)
    out = torch.empty_like(query)
    block_table = torch.arange(num_pages, dtype=torch.int32)[None]
    seq_lens = torch.tensor([num_pages * layout.block_size], dtype=torch.int32)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        cpu_attention.decode_attention_units(query, units, block_table, seq_lens, 1.0, query_per_kv=query_per_kv,
                                             out=out, num_threads=num_threads)
        times.append(time.perf_counter() - started)
    return num_pages * page_bytes * units.count / statistics.median(times[1:])


def _first_layer_units(store: HeadPageStore) -> KernelUnits:
    """``(first KV head, host pages [N, 2, B, G, D])`` of each streamed unit of the first layer that has any,
    made once for the kernel as :class:`CpuDecodeOffload` makes them."""
    from headinfer_vllm.core import cpu_attention

    if not store.streamed_units:
        raise ValueError("headinfer: measuring the CPU kernel needs streamed units")
    layer, group_size = store.streamed_units[0][0], store.layout.head_group_size
    return cpu_attention.KernelUnits(
        [(group * group_size, store.host_unit(layer, group)) for group in store.streamed_groups(layer)])


def measure_layer_overhead(store: HeadPageStore, *, query_per_kv: int, num_threads: int, repeats: int = 20) -> float:
    """Seconds of one layer's split lockstep, whatever the context: the queries' copy to the host and the
    host's wait for it, the kernel over one page, the outputs' copy back; the median of ``repeats`` runs.

    It leaves out what waiting costs the GPU's queue (the host no longer runs ahead), so it is a lower bound.
    """
    from headinfer_vllm.core import cpu_attention

    layout, units = store.layout, _first_layer_units(store)
    cuda = store.device.type == "cuda"
    heads = layout.num_kv_heads * query_per_kv
    on_device = torch.zeros(1, heads, layout.head_dim, dtype=layout.dtype, device=store.device)
    query = torch.zeros(1, heads, layout.head_dim, dtype=layout.dtype, pin_memory=cuda)
    out = torch.empty_like(query)
    block_table = torch.zeros(1, 1, dtype=torch.int32)
    seq_lens = torch.tensor([layout.block_size], dtype=torch.int32)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        query.copy_(on_device, non_blocking=True)
        if cuda:
            torch.cuda.current_stream(store.device).synchronize()
        cpu_attention.decode_attention_units(query, units, block_table, seq_lens, 1.0, query_per_kv=query_per_kv,
                                             out=out, num_threads=num_threads)
        on_device.copy_(out, non_blocking=True)
        times.append(time.perf_counter() - started)
    if cuda:
        torch.cuda.current_stream(store.device).synchronize()
    return statistics.median(times[1:])


# The per-layer work ------------------------------------------------------------------------


class CpuDecodeOffload:
    """Attends the CPU's units of each layer in a decode-only step, from the host tier in place."""

    def __init__(
        self,
        store: HeadPageStore,
        split: DecodeSplit,
        *,
        query_per_kv: int,
        scale: float,
        layers: Sequence[LayerAttention],
        layer_groups: Sequence[int] | None = None,
    ) -> None:
        """``layer_groups``: each layer's KV-cache group, the index of its step plan (None: one group)."""
        from headinfer_vllm.core import cpu_attention

        cpu_attention.library()  # builds it now (cached): a missing compiler stops start-up, not a step
        self._decode_attention = cpu_attention.decode_attention_units
        self.store, self.split, self.query_per_kv, self.scale = store, split, query_per_kv, scale
        self.layers = tuple(layers)
        self.layer_groups = tuple(layer_groups) if layer_groups is not None else (0,) * len(self.layers)
        group_size = store.layout.head_group_size
        self._kv_heads: dict[int, slice] = {}
        """Per layer with CPU groups, its KV heads attended by the CPU (consecutive)."""
        self._units: dict[int, cpu_attention.KernelUnits] = {}
        """Per layer, ``(first KV head within the CPU heads, host pages [N, 2, B, G, D])`` per CPU group,
        checked once for the kernel."""
        for layer, groups in split.cpu_groups.items():
            if len(consecutive_runs(list(groups))) != 1:
                raise ValueError(f"headinfer: the CPU groups of layer {layer} must be consecutive, got {groups}")
            first = groups[0] * group_size
            self._kv_heads[layer] = slice(first, (groups[-1] + 1) * group_size)
            self._units[layer] = cpu_attention.KernelUnits(
                [(group * group_size - first, store.host_unit(layer, group)) for group in groups])
        self._cuda = store.device.type == "cuda"
        self._queries_ready = torch.cuda.Event() if self._cuda else None
        self._sinks: dict[int, torch.Tensor] = {}
        """Per layer with sinks, its CPU heads' sinks ``[heads * q_per_kv]`` as float32 on the host, copied
        each step (as the other kernels read them each layer)."""
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """Per (requests, KV heads): host buffers of the queries, new K/V and outputs (pinned on CUDA)."""
        self._groups_used = sorted({self.layer_groups[layer] for layer in split.cpu_groups})
        """The KV-cache groups of the layers with CPU units."""
        self._block_tables: dict[int, torch.Tensor] = {}
        """Per KV-cache group used, this step's block table on the host."""
        self._new_rows: dict[int, torch.Tensor] = {}
        """Per KV-cache group used, this step's new-token rows on the host."""
        self._seq_lens = torch.empty(0)
        self._num_requests = 0

    def begin_step(self, plans: Sequence[StepPlan]) -> None:
        """Queue the copies of this decode-only step's block tables and new-token rows (those of the KV-cache
        groups with CPU units; ``plans``: one per group) and sinks to the host (on the current stream).

        They are ready when layer 0's queries are (same stream, queued before).
        """
        plan = plans[0]
        self._num_requests = len(plan.requests)
        self._block_tables = {group: self._to_host(plans[group].home.block_table) for group in self._groups_used}
        self._new_rows = {group: self._to_host(plans[group].home.new_rows) for group in self._groups_used}
        self._seq_lens = torch.tensor([request.seq_len for request in plan.requests], dtype=torch.int32)
        per_kv = self.query_per_kv
        self._sinks = {
            layer: self._to_host(sinks[heads.start * per_kv : heads.stop * per_kv].float())
            for layer, heads in self._kv_heads.items()
            if (sinks := self.layers[layer].sinks) is not None
        }

    def send(self, layer: int, query: torch.Tensor, new_kv: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Queue the copies of ``layer``'s CPU heads' queries ``query [>= R, Hq, D]`` and new K/V
        ``new_kv [2R, Hkv, D]`` to the host, on the compute stream."""
        heads = self._kv_heads.get(layer)
        if heads is None:
            return
        queries, new_tokens, _ = self._buffers_for(heads)
        requests, per_kv = self._num_requests, self.query_per_kv
        queries.copy_(query[:requests, heads.start * per_kv : heads.stop * per_kv], non_blocking=True)
        new_tokens.copy_(new_kv[:, heads], non_blocking=True)
        if self._queries_ready is not None:
            self._queries_ready.record(stream)

    def attend(self, layer: int, out: torch.Tensor) -> None:
        """Wait for ``layer``'s queries, write its new K/V into the CPU units' host pages, attend them,
        and queue the outputs' copy into ``out [>= R, Hq, D]`` (on the current stream)."""
        heads = self._kv_heads.get(layer)
        if heads is None:
            return
        queries, new_tokens, outputs = self._buffers_for(heads)
        if self._queries_ready is not None:
            # The one host wait of the layer. The previous layer's output copy ran before it (same stream).
            self._queries_ready.synchronize()
        group_size, kv_group = self.store.layout.head_group_size, self.layer_groups[layer]
        for first_head, pages in self._units[layer].units:
            rows = pages.view(-1, group_size, pages.shape[-1])  # [N * 2 * B, G, D] token rows
            rows.index_copy_(0, self._new_rows[kv_group], new_tokens[:, first_head : first_head + group_size])
        variant = self.layers[layer]
        self._decode_attention(
            queries, self._units[layer], self._block_tables[kv_group], self._seq_lens, self.scale,
            query_per_kv=self.query_per_kv, out=outputs, sliding_window=variant.sliding_window or 0,
            logits_soft_cap=variant.logits_soft_cap or 0.0, sinks=self._sinks.get(layer),
            num_threads=self.split.num_threads,
        )
        per_kv = self.query_per_kv
        out[: self._num_requests, heads.start * per_kv : heads.stop * per_kv].copy_(outputs, non_blocking=True)

    def _buffers_for(self, heads: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (self._num_requests, heads.stop - heads.start)
        buffers = self._buffers.get(key)
        if buffers is None:
            layout, requests, kv_heads = self.store.layout, *key
            shape = (requests, kv_heads * self.query_per_kv, layout.head_dim)
            # Pinned, so that the copies are asynchronous (``*_like`` would not pin).
            queries = torch.empty(shape, dtype=layout.dtype, pin_memory=self._cuda)
            new_tokens = torch.empty((2 * requests, kv_heads, layout.head_dim), dtype=layout.dtype,
                                     pin_memory=self._cuda)
            outputs = torch.zeros(shape, dtype=layout.dtype, pin_memory=self._cuda)
            buffers = self._buffers[key] = (queries, new_tokens, outputs)
        return buffers

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the host, contiguous: on CUDA a copy queued on the current stream into pinned memory."""
        if not self._cuda:
            return tensor.contiguous()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
