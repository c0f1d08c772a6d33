"""The step plan: every index structure a step needs, built once per step.

A batch holds ``num_reqs`` requests, each with its query tokens at the end of
its sequence (a prefill chunk or one decode token)::

    request r:  [ ------------- seq_lens[r] tokens ------------- ]
                                       [ -- query_len(r) tokens -- ]
    queries:    query_start_loc[r] .. query_start_loc[r + 1]  (in the batch)

Every layer then reads the plan: which pages to load (coalesced runs of
consecutive block ids), where to write the new tokens, and which pages to
write back to the host.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

PageRuns = tuple[tuple[int, int], ...]
"""Runs of consecutive block ids: ``((first_block, num_blocks), ...)``."""


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


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan:
    """Per-step metadata shared by every layer.

    Device tensors live on the attention device; spans and runs are host data
    so that no layer needs a device-to-host synchronization.
    """

    block_size: int
    requests: tuple[RequestSpan, ...]
    num_tokens: int
    """Query tokens with an output (padding excluded)."""
    max_query_len: int
    max_seq_len: int
    load_runs: PageRuns
    """Pages any request attends to."""
    store_runs: PageRuns
    """Pages that receive new tokens this step."""
    query_start_loc: torch.Tensor
    """shape: [num_reqs + 1], dtype: int32, device."""
    seq_lens: torch.Tensor
    """shape: [num_reqs], dtype: int32, device."""
    block_table: torch.Tensor
    """shape: [num_reqs, max_pages], dtype: int32, device."""
    new_token_index: torch.Tensor
    """shape: [num_new], dtype: int64, device. Batch rows whose K/V are stored."""
    new_block: torch.Tensor
    """shape: [num_new], dtype: int64, device. Block id of each stored row."""
    new_offset: torch.Tensor
    """shape: [num_new], dtype: int64, device. Slot within its block."""

    def pages(self, request: int) -> torch.Tensor:
        """Block ids ``[num_pages]`` (device, int32) of a request's sequence."""
        num_pages = -(-self.requests[request].seq_len // self.block_size)
        return self.block_table[request, :num_pages]


def coalesce(block_ids: torch.Tensor) -> PageRuns:
    """Sorted, duplicate-free runs of consecutive ids from any 1-D int tensor."""
    ids = torch.unique(block_ids.to(torch.int64))  # sorted
    if ids.numel() == 0:
        return ()
    breaks = torch.nonzero(ids[1:] - ids[:-1] != 1).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
    ends = torch.cat([breaks, torch.tensor([ids.numel()])])
    return tuple(zip(ids[starts].tolist(), (ends - starts).tolist(), strict=True))


def build_step_plan(
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> StepPlan:
    """Build a plan from host tensors.

    Args:
        query_start_loc: ``[num_reqs + 1]`` int, host. Batch offset of each
            request's first query token.
        seq_lens: ``[num_reqs]`` int, host. Tokens in each sequence, the
            query tokens included.
        block_table: ``[num_reqs, max_pages]`` int, host. Block ids of each
            sequence's pages, in order; entries past a sequence are ignored.
        slot_mapping: ``[num_tokens]`` int, host. ``block * block_size +
            offset`` where each query token's K/V goes; ``-1`` marks padding.
        block_size: tokens per page.
        device: the attention device.
    """
    query_start_loc = query_start_loc.to("cpu", torch.int64)
    seq_lens = seq_lens.to("cpu", torch.int64)
    block_table = block_table.to("cpu")
    slot_mapping = slot_mapping.to("cpu", torch.int64)
    num_reqs = seq_lens.numel()
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    if num_reqs and (query_lens.min() < 1 or (query_lens > seq_lens).any()):
        raise ValueError("headinfer: every request needs 1 <= query_len <= seq_len")
    num_pages = (seq_lens + block_size - 1) // block_size
    if num_reqs and num_pages.max() > block_table.shape[1]:
        raise ValueError("headinfer: block_table has fewer pages than seq_lens needs")
    needed = torch.arange(block_table.shape[1]) < num_pages[:, None]
    num_tokens = int(query_start_loc[-1]) if num_reqs else 0

    stored = torch.nonzero(slot_mapping[:num_tokens] >= 0).flatten()
    slots = slot_mapping[stored]
    requests = tuple(
        RequestSpan(start, length, seq)
        for start, length, seq in zip(
            query_start_loc[:-1].tolist(), query_lens.tolist(), seq_lens.tolist(), strict=True
        )
    )

    pin = torch.device(device).type == "cuda"

    def to_device(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tensor = tensor.to(dtype)
        # From pinned memory the copy is truly asynchronous; from pageable memory it may wait.
        return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=True)

    return StepPlan(
        block_size=block_size,
        requests=requests,
        num_tokens=num_tokens,
        max_query_len=int(query_lens.max()) if num_reqs else 0,
        max_seq_len=int(seq_lens.max()) if num_reqs else 0,
        load_runs=coalesce(block_table[needed]),
        store_runs=coalesce(slots // block_size),
        query_start_loc=to_device(query_start_loc, torch.int32),
        seq_lens=to_device(seq_lens, torch.int32),
        block_table=to_device(block_table, torch.int32),
        new_token_index=to_device(stored, torch.int64),
        new_block=to_device(slots // block_size, torch.int64),
        new_offset=to_device(slots % block_size, torch.int64),
    )
