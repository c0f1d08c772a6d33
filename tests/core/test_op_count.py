"""A lean step: aten operations per decode step at Llama-3-8B geometry, and one load per unit.

The count is every ``aten::`` event that torch's profiler records, nested ones
included, over one whole decode step (plan, ``begin_step`` and 32 layers of
attention, the kernel included): a count, not a timing. All 256 (layer, KV
head) units are streamed through 2 staging buffers.
"""

import collections

import torch
from torch.profiler import ProfilerActivity, profile

from headinfer_vllm.core import HeadPageStore, KVLayout, StreamedAttention, build_step_plan

LAYERS, KV_HEADS, QUERY_HEADS, HEAD_DIM, BLOCK = 32, 8, 32, 128, 16
CONTEXT = 512
PAGES = CONTEXT // BLOCK


def make_engine(num_requests: int) -> StreamedAttention:
    layout = KVLayout(LAYERS, KV_HEADS, HEAD_DIM, BLOCK, num_requests * PAGES, 1, torch.float32)
    store = HeadPageStore(layout, resident_units=frozenset(), num_staging_buffers=2, device="cpu")
    store.host.zero_()  # uninitialized memory may hold denormals, which are slow on CPU
    return StreamedAttention(store, num_query_heads=QUERY_HEADS, scale=HEAD_DIM**-0.5)


def block_table(num_requests: int, interleaved: bool) -> torch.Tensor:
    """Request r owns blocks r, r + R, r + 2R, ... (interleaved) or r * P .. (r + 1) * P - 1."""
    pages = torch.arange(PAGES)
    if interleaved:
        return torch.arange(num_requests)[:, None] + num_requests * pages
    return torch.arange(num_requests)[:, None] * PAGES + pages


def profile_decode_step(engine: StreamedAttention, table: torch.Tensor) -> list:
    """Events of one decode step in which request r has ``CONTEXT - r`` tokens."""
    num_requests = table.shape[0]
    seq_lens = torch.tensor([CONTEXT - r for r in range(num_requests)])
    last = seq_lens - 1
    slots = table[torch.arange(num_requests), last // BLOCK] * BLOCK + last % BLOCK
    query = torch.randn(num_requests, QUERY_HEADS, HEAD_DIM)
    key = torch.randn(num_requests, KV_HEADS, HEAD_DIM)
    out = torch.empty_like(query)

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        plan = build_step_plan(
            query_start_loc=torch.arange(num_requests + 1), seq_lens=seq_lens, block_table=table,
            slot_mapping=slots, block_size=BLOCK, device="cpu",
        )
        engine.begin_step(plan)
        for layer in range(LAYERS):
            engine.forward(layer, query, key, key, out)
    return list(profiler.events())


def aten_ops(events: list) -> collections.Counter:
    return collections.Counter(event.name for event in events if event.name.startswith("aten::"))


def load_launches(events: list) -> int:
    """Operations issued by transfer loads: aten ops directly inside ``headinfer::load`` ranges."""
    loads = [event for event in events if event.name == "headinfer::load"]
    assert len(loads) == LAYERS * KV_HEADS  # one load per streamed unit
    return sum(1 for load in loads for child in load.cpu_children if child.name.startswith("aten::"))


def test_one_request_decode_step_is_lean():
    events = profile_decode_step(make_engine(1), block_table(1, interleaved=False))
    count = sum(aten_ops(events).values())
    assert count <= 5_000, f"{count} aten ops per decode step: {aten_ops(events).most_common(12)}"


def test_interleaved_requests_cost_what_contiguous_ones_do():
    engine = make_engine(8)
    interleaved = profile_decode_step(engine, block_table(8, interleaved=True))
    contiguous = profile_decode_step(engine, block_table(8, interleaved=False))
    count = sum(aten_ops(interleaved).values())
    assert count <= 8_000, f"{count} aten ops per decode step: {aten_ops(interleaved).most_common(12)}"
    assert load_launches(interleaved) == load_launches(contiguous) == LAYERS * KV_HEADS
    assert aten_ops(interleaved) == aten_ops(contiguous)
