"""The step plan: every index structure a step needs, built once per step.

A batch holds ``num_reqs`` requests, each with its query tokens at the end of
its sequence (a prefill chunk or one decode token)::

    request r:  [ ------------- seq_lens[r] tokens ------------- ]
                                       [ -- query_len(r) tokens -- ]
    queries:    query_start_loc[r] .. query_start_loc[r + 1]  (in the batch)

Every layer then reads the plan: where each request's pages are, where the
new tokens' K and V go, and the attention metadata. Lengths come from the
host; the block table and the slot mapping may stay on the device. Nothing
here waits for the device.

A unit tensor ``[num_pages, 2, block_size, heads, head_dim]`` seen as token
rows ``[num_pages * 2 * block_size, heads, head_dim]`` (a view) holds::

    row (page * 2 + 0) * block_size + offset: K of the token at (page, offset)
    row (page * 2 + 1) * block_size + offset: its V
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSpan:
    """One request's slice of the batch, as host integers."""

    query_start: int
    query_len: int
    seq_len: int

    def causal_mask(self) -> CausalBias | None:
        """None for one query token; else causal with the query block at the end."""
        if self.query_len == 1:
            return None
        return causal_lower_right(self.query_len, self.seq_len)

    def window_start(self, window: int | None) -> int:
        """First key position that a ``window`` (None: no window) lets any of the queries see."""
        return 0 if window is None else max(0, self.seq_len - self.query_len - window + 1)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class PageTable:
    """Where a step's pages lie in one kind of unit tensor: their homes, or a staging buffer."""

    block_table: torch.Tensor
    """shape: [num_reqs, max_pages], dtype: int32, device. Page index, in the unit
    tensor, of each request's pages in sequence order; entries past a sequence are
    never read."""
    new_rows: torch.Tensor
    """shape: [num_tokens * 2], dtype: int64, device. Token rows (see the module
    docstring) receiving each new token's K, then its V."""


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan:
    """Per-step metadata shared by every layer.

    Spans and sizes are host data, so that no layer needs a device-to-host
    synchronization; tensors live on the attention device.
    """

    block_size: int
    requests: tuple[RequestSpan, ...]
    num_tokens: int
    """Query tokens with an output (padding excluded)."""
    max_query_len: int
    max_seq_len: int
    num_page_refs: int
    """Pages summed over the requests (a page that two requests share counts twice)."""
    query_start_loc: torch.Tensor
    """shape: [num_reqs + 1], dtype: int32, device."""
    seq_lens: torch.Tensor
    """shape: [num_reqs], dtype: int32, device."""
    page_in_use: torch.Tensor
    """shape: [num_reqs, max_pages], dtype: bool, device. Whether a column of the
    block table holds one of the request's pages."""
    new_slots: torch.Tensor
    """shape: [num_tokens], dtype: int64, device. ``block * block_size + offset``
    of each query token's K/V."""
    home: PageTable
    """Pages as block ids: the page table of resident units and of the host tier."""


def new_token_rows(pages: torch.Tensor, offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token rows ``[2 * n]`` (K, V, K, V, ...) of ``n`` tokens at ``(pages, offsets)``, both ``[n]`` int64."""
    key_rows = pages * (2 * block_size) + offsets
    return torch.stack((key_rows, key_rows + block_size), dim=1).flatten()


def build_step_plan(
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> StepPlan:
    """Build a plan without waiting for the device.

    Args:
        query_start_loc: ``[num_reqs + 1]`` int, host. Batch offset of each
            request's first query token.
        seq_lens: ``[num_reqs]`` int, host. Tokens in each sequence, the
            query tokens included (vLLM: ``seq_lens_cpu_upper_bound``, exact
            outside asynchronous speculative decoding).
        block_table: ``[num_reqs, >= max_pages]`` int, host or device. Block
            ids of each sequence's pages, in order; entries past a sequence
            are ignored, and only the first ``ceil(max_seq_len / block_size)``
            columns are used. A device tensor is used in place.
        slot_mapping: ``[>= num_tokens]`` int, host or device. ``block *
            block_size + offset`` where each query token's K/V goes. A ``-1``
            (vLLM's padding slot, seen in its dummy runs only) writes slot 0
            of block 0, which vLLM reserves as its null block.
        block_size: tokens per page.
        device: the attention device.
    """
    device = torch.device(device)
    starts, lengths = query_start_loc.tolist(), seq_lens.tolist()
    query_lens = [end - start for start, end in itertools.pairwise(starts)]
    if not all(1 <= query_len <= seq_len for query_len, seq_len in zip(query_lens, lengths, strict=True)):
        raise ValueError("headinfer: every request needs 1 <= query_len <= seq_len")
    num_pages = [-(-seq_len // block_size) for seq_len in lengths]
    max_pages = max(num_pages, default=0)
    if max_pages > block_table.shape[1]:
        raise ValueError("headinfer: block_table has fewer pages than seq_lens needs")
    num_tokens = starts[-1] if lengths else 0
    device_seq_lens = to_device(seq_lens, torch.int32, device)
    slots = to_device(slot_mapping[:num_tokens], torch.int64, device).clamp(min=0)
    page_starts = torch.arange(max_pages, device=device) * block_size
    return StepPlan(
        block_size=block_size,
        requests=tuple(map(RequestSpan, starts, query_lens, lengths)),
        num_tokens=num_tokens,
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(lengths, default=0),
        num_page_refs=sum(num_pages),
        query_start_loc=to_device(query_start_loc, torch.int32, device),
        seq_lens=device_seq_lens,
        page_in_use=page_starts < device_seq_lens[:, None],
        new_slots=slots,
        home=PageTable(
            block_table=to_device(block_table[:, :max_pages], torch.int32, device),
            new_rows=new_token_rows(slots // block_size, slots % block_size, block_size),
        ),
    )


def to_device(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` as ``dtype`` on ``device``: in place if it is there already, else an asynchronous copy."""
    if tensor.device.type == device.type:
        return tensor.to(device, dtype)
    if device.type != "cuda":
        return tensor.to(device, dtype)
    # Through a pinned buffer of our own, so the copy is asynchronous and safe: vLLM's host
    # tensors may be pinned buffers that it rewrites next step while this copy is in flight,
    # whereas torch's pinned allocator keeps ours until the copy has run.
    staged = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
    staged.copy_(tensor)
    return staged.to(device, non_blocking=True)
