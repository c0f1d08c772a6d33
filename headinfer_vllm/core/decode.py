"""A step's decode tokens (query length 1), attended together: one batched product per unit.

For ``R`` decode requests of at most ``L`` tokens and a unit of ``H`` KV heads::

    queries [H * R, q_per_kv, D] @ keys^T [H * R, D, L]  ->  scores [H * R, q_per_kv, L]
    softmax(scores, padding -> -inf) @ values [H * R, L, D]  ->  outputs [H * R, q_per_kv, D]

Batch entry ``h * R + r`` is KV head ``h`` of request ``r``. A layer with a
sliding window ``w`` shorter than ``L`` reads the last ``w`` keys of each
request (:class:`KeySpan`); scores are soft-capped before the mask, and sinks
join the softmax's denominator (:mod:`headinfer_vllm.core.variants`).

Keys and values come from the unit's token rows (see :mod:`headinfer_vllm.core.plan`)
with one gather, whose index is built once per step, page table and key
count, into buffers made once per step, head count and key count. Queries
are gathered and scaled once per layer, outputs scattered once per layer.
The product runs one precision above the cache's (float32 for half
precision, as torch's own math attention does; float64 for float32):
rounding the scores ``q . k`` is what costs the most accuracy.
"""

from __future__ import annotations

import dataclasses

import torch

from headinfer_vllm.core.plan import PageTable, StepPlan, to_device
from headinfer_vllm.core.variants import LayerAttention, soft_cap_, softmax_with_sinks_


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeBuffers:
    """Per step and head count ``H``: where a unit's decode K/V and scores go (shared by page tables)."""

    gathered: torch.Tensor
    """shape: [2, H * R, L, D], the cache dtype."""
    gathered_rows: torch.Tensor
    """shape: [2 * H * R * L, D]: ``gathered`` as the gather's output (a view)."""
    widened: torch.Tensor | None
    """shape: [2, H * R, L, D], the compute dtype: ``gathered`` widened, where it is narrower."""
    keys_t: torch.Tensor
    """shape: [H * R, D, L]."""
    values: torch.Tensor
    """shape: [H * R, L, D]."""
    scores: torch.Tensor
    """shape: [H * R, q_per_kv, L]."""
    padding: torch.Tensor | None
    """shape: [H * R, 1, L], bool: key positions past a request's sequence; None when none are."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeySpan:
    """The last ``L`` key positions of each decode request: all of them, or a window's."""

    positions: torch.Tensor
    """shape: [R, L], int64. Past a sequence, positions repeat its last token: finite keys and
    values, masked out."""
    padding: torch.Tensor | None
    """shape: [R, L], bool: entries past a request's sequence; None when none are."""

    @classmethod
    def last(cls, seq_lens: torch.Tensor, length: int, short: bool) -> KeySpan:
        """The last ``length`` positions of sequences of ``seq_lens [R, 1]`` (``short``: some have fewer)."""
        first = (seq_lens - length).clamp(min=0)
        positions = first + torch.arange(length, device=seq_lens.device)
        padding = positions >= seq_lens if short else None
        return cls(torch.minimum(positions, seq_lens - 1), padding)


class DecodeBatch:
    """The decode requests of one step."""

    def __init__(self, plan: StepPlan, requests: list[int], *, query_per_kv: int, compute_dtype: torch.dtype) -> None:
        device = plan.seq_lens.device
        spans = [plan.requests[index] for index in requests]
        self.block_size = plan.block_size
        self.query_per_kv = query_per_kv
        self.compute_dtype = compute_dtype
        self.max_len = max(span.seq_len for span in spans)
        self.requests = to_device(torch.tensor(requests), torch.int64, device)
        self.batch_rows = to_device(torch.tensor([span.query_start for span in spans]), torch.int64, device)
        # batch_rows: [R], the batch row of each request's token
        self._seq_lens = plan.seq_lens[self.requests].long()[:, None]  # [R, 1]
        self._host_seq_lens = [span.seq_len for span in spans]
        self._spans: dict[int, KeySpan] = {}
        """Per count of keys read per request (``max_len``, or a shorter window), made once per step."""
        first = spans[0].query_start
        consecutive = all(span.query_start == first + index for index, span in enumerate(spans))
        self._batch_slice = slice(first, first + len(spans)) if consecutive else None
        """``batch_rows`` as a slice when they are consecutive (as when decodes come first)."""
        self._scale: torch.Tensor | None = None
        self._length = self.max_len
        """Keys read per request in this layer."""
        self._soft_cap: float | None = None
        self._sinks: torch.Tensor | None = None
        """shape: [num_kv_heads, 1, q_per_kv, 1], the compute dtype: this layer's sinks."""
        self._queries: torch.Tensor | None = None
        """shape: [num_kv_heads, R, q_per_kv, D]: this layer's scaled decode queries."""
        self._outputs: torch.Tensor | None = None
        """Same shape: this layer's decode outputs."""
        self._queries_by_request: torch.Tensor | None = None
        self._outputs_by_request: torch.Tensor | None = None
        self._heads: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._indices: dict[tuple[PageTable, int, int], torch.Tensor] = {}
        self._buffers: dict[tuple[int, int], DecodeBuffers] = {}

    def load_queries(
        self, query: torch.Tensor, scale: float, variant: LayerAttention, sinks: torch.Tensor | None
    ) -> None:
        """Take this layer's decode queries from ``query [T, num_query_heads, D]``, scaled.

        ``sinks``: ``variant``'s sinks ``[num_query_heads]`` in the compute dtype, or None.
        """
        if self._queries is None:
            self._allocate(query, scale)
        window = variant.sliding_window
        self._length = self.max_len if window is None else min(window, self.max_len)
        self._soft_cap = variant.logits_soft_cap
        self._sinks = None if sinks is None else sinks.view(-1, 1, self.query_per_kv, 1)
        assert self._queries_by_request is not None
        consecutive = self._batch_slice is not None
        selected = self._batch_rows_of(query) if consecutive else query.index_select(0, self.batch_rows)
        self._queries_by_request.copy_(selected.view(self._queries_by_request.shape))
        self._queries_by_request.mul_(self._scale)

    def _allocate(self, query: torch.Tensor, scale: float) -> None:
        num_requests, (_, num_query_heads, head_dim) = self.batch_rows.numel(), query.shape
        shape = (num_query_heads // self.query_per_kv, num_requests, self.query_per_kv, head_dim)
        self._queries = torch.empty(shape, dtype=self.compute_dtype, device=query.device)
        self._outputs = torch.empty_like(self._queries)
        self._queries_by_request = self._queries.transpose(0, 1)
        self._outputs_by_request = self._outputs.transpose(0, 1)
        # *_by_request: [R, num_kv_heads, q_per_kv, D] views
        self._scale = torch.full((), scale, dtype=self.compute_dtype, device=query.device)

    def attend(self, first_head: int, head_rows: torch.Tensor, heads: int, table: PageTable) -> None:
        """Attend KV heads ``first_head .. first_head + heads``, a unit seen as ``head_rows [N * 2 * B * heads, D]``."""
        length = self._length
        index = self._index(table, heads, length, head_rows)
        buffers = self._buffers.get((heads, length)) or self._allocate_buffers(heads, length, head_rows)
        queries, outputs = self._head_views(first_head, heads)
        torch.gather(head_rows, 0, index, out=buffers.gathered_rows)
        if buffers.widened is not None:
            buffers.widened.copy_(buffers.gathered)
        scores = buffers.scores
        torch.bmm(queries, buffers.keys_t, out=scores)
        soft_cap_(scores, self._soft_cap)
        if buffers.padding is not None:
            scores.masked_fill_(buffers.padding, float("-inf"))
        if self._sinks is None:
            # torch._softmax: the kernel that torch.softmax dispatches to, one operation instead of two.
            torch.bmm(torch._softmax(scores, -1, False), buffers.values, out=outputs)
            return
        # scores as [H, R, q_per_kv, L] against the head range's sinks [H, 1, q_per_kv, 1].
        softmax_with_sinks_(scores.view(heads, -1, *scores.shape[1:]), self._sinks[first_head : first_head + heads])
        torch.bmm(scores, buffers.values, out=outputs)

    def store_outputs(self, out: torch.Tensor) -> None:
        """Write this layer's decode outputs into their rows of ``out [T, num_query_heads, D]``."""
        by_request = self._outputs_by_request
        assert by_request is not None
        if self._batch_slice is not None:
            self._batch_rows_of(out).view(by_request.shape).copy_(by_request)
        else:
            out.view(-1, *by_request.shape[1:]).index_copy_(0, self.batch_rows, by_request.to(out.dtype))

    def _batch_rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The decode rows of ``tensor [T, ...]`` when they are consecutive: itself when they are all of it."""
        rows = self._batch_slice
        assert rows is not None
        return tensor if rows == slice(0, tensor.shape[0]) else tensor[rows]

    def _head_views(self, first_head: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and outputs ``[heads * R, q_per_kv, D]`` of a head range (views, made once per step)."""
        views = self._heads.get((first_head, heads))
        if views is None:
            assert self._queries is not None and self._outputs is not None
            shape = (-1, self.query_per_kv, self._queries.shape[-1])
            chosen = slice(first_head, first_head + heads)
            views = self._queries[chosen].view(shape), self._outputs[chosen].view(shape)
            self._heads[(first_head, heads)] = views
        return views

    def _key_span(self, length: int) -> KeySpan:
        span = self._spans.get(length)
        if span is None:
            short = any(seq_len < length for seq_len in self._host_seq_lens)
            span = self._spans[length] = KeySpan.last(self._seq_lens, length, short)
        return span

    def _index(self, table: PageTable, heads: int, length: int, head_rows: torch.Tensor) -> torch.Tensor:
        """``[2 * H * R * L, D]`` (an expanded view): the row of ``head_rows`` of each K, then V, element."""
        index = self._indices.get((table, heads, length))
        if index is None:
            block_size, device = self.block_size, head_rows.device
            positions = self._key_span(length).positions
            pages = table.block_table[self.requests].long().gather(1, positions // block_size)
            key_rows = pages * (2 * block_size) + positions % block_size  # [R, L]
            token_rows = torch.stack((key_rows, key_rows + block_size))  # [2, R, L]
            source_rows = token_rows[:, None] * heads + torch.arange(heads, device=device)[:, None, None]
            # source_rows: [2, H, R, L]
            index = source_rows.flatten()[:, None].expand(-1, head_rows.shape[1])
            self._indices[(table, heads, length)] = index
        return index

    def _allocate_buffers(self, heads: int, length: int, head_rows: torch.Tensor) -> DecodeBuffers:
        device, head_dim = head_rows.device, head_rows.shape[1]
        shape = (2, heads * self.batch_rows.numel(), length, head_dim)
        padding = self._key_span(length).padding
        gathered = torch.empty(shape, dtype=head_rows.dtype, device=device)
        widened = None
        if head_rows.dtype != self.compute_dtype:
            widened = torch.empty_like(gathered, dtype=self.compute_dtype)
        keys_values = gathered if widened is None else widened
        buffers = DecodeBuffers(
            gathered=gathered,
            gathered_rows=gathered.view(-1, head_dim),
            widened=widened,
            keys_t=keys_values[0].transpose(1, 2),
            values=keys_values[1],
            scores=torch.empty((shape[1], self.query_per_kv, length), dtype=self.compute_dtype, device=device),
            padding=None if padding is None else padding.repeat(heads, 1)[:, None],
        )
        self._buffers[(heads, length)] = buffers
        return buffers
