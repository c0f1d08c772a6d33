"""Streamed vs all-resident, bit for bit, over many steps (exposes stream races).

Both engines run the same kernel on the same data, so any difference comes
from a page that was stale, half-copied or overwritten too early.
"""

import pytest
import torch

from headinfer_vllm.core import HeadPageStore, KVLayout, StreamedAttention, build_step_plan, kernels

SIZES = {
    "cpu": dict(layers=3, kv_heads=4, head_dim=64, context=700, chunk=128, steps=4),
    "cuda": dict(layers=8, kv_heads=8, head_dim=128, context=32768, chunk=4096, steps=12),
}


def make_engine(layout, streamed, device, cache_pages=0):
    """``cache_pages``: page-cache rows of each streamed unit (0: staging only)."""
    units = layout.num_layers * layout.num_groups
    resident = frozenset() if streamed else frozenset(
        (layer, group) for layer in range(layout.num_layers) for group in range(layout.num_groups)
    )
    cache_bytes = cache_pages * layout.unit_page_bytes * units
    store = HeadPageStore(layout, resident_units=resident, num_staging_buffers=2 if streamed else 0,
                          device=device, cache_bytes=cache_bytes,
                          device_budget_bytes=(2 if streamed else units) * layout.unit_bytes + cache_bytes)
    return StreamedAttention(store, num_query_heads=4 * layout.num_kv_heads,
                             scale=layout.head_dim**-0.5)


@pytest.mark.parametrize("page_cache", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_streamed_equals_resident_bitwise(device, page_cache):
    """With a page cache of a third of the blocks, pages are admitted, evicted and staged across steps."""
    check_streamed_equals_resident(device, page_cache)


def test_split_chunks_stay_bitwise(monkeypatch):
    """The CPU's chunks after earlier tokens through two flash calls (kernels.split_causal_prefill, here
    from 2 query tokens on): a streamed unit of one KV head equals the same head in a resident run."""
    monkeypatch.setattr(kernels, "SPLIT_MIN_QUERY_LEN", 2)
    check_streamed_equals_resident("cpu", page_cache=False)


def check_streamed_equals_resident(device, page_cache):
    size = SIZES[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = 16
    num_blocks = 2 * ((size["context"] + size["chunk"]) // block + 4)
    layout = KVLayout(size["layers"], size["kv_heads"], size["head_dim"], block, num_blocks, 1, dtype)
    streamed = make_engine(layout, True, device, cache_pages=num_blocks // 3 if page_cache else 0)
    resident = make_engine(layout, False, device)
    generator = torch.Generator(device=device).manual_seed(0)
    # Two requests over reversed (non-consecutive) block ids; prefill in chunks, then decode.
    blocks = torch.arange(num_blocks - 1, -1, -1)
    table = torch.stack([blocks[: num_blocks // 2], blocks[num_blocks // 2 :]])
    lengths = [0, 0]
    for step in range(size["steps"]):
        query_lens = [size["chunk"] if lengths[0] < size["context"] else 1, 1 + step % 3]
        starts = [0, query_lens[0], sum(query_lens)]
        slots = []
        for request, count in enumerate(query_lens):
            for position in range(lengths[request], lengths[request] + count):
                slots.append(int(table[request, position // block]) * block + position % block)
            lengths[request] += count
        plan = build_step_plan(
            query_start_loc=torch.tensor(starts), seq_lens=torch.tensor(lengths),
            block_table=table, slot_mapping=torch.tensor(slots), block_size=block, device=device,
        )
        streamed.begin_step(plan)
        resident.begin_step(plan)
        heads = 4 * size["kv_heads"]
        for layer in range(size["layers"]):
            options = dict(generator=generator, device=device, dtype=dtype)
            q = torch.randn(starts[-1], heads, size["head_dim"], **options)
            k = torch.randn(starts[-1], size["kv_heads"], size["head_dim"], **options)
            v = torch.randn_like(k)
            out_streamed = streamed.forward(layer, q, k, v, torch.empty_like(q))
            out_resident = resident.forward(layer, q, k, v, torch.empty_like(q))
            assert torch.equal(out_streamed, out_resident), f"step {step} layer {layer}"
    if device == "cuda":
        torch.cuda.synchronize()
    for layer in range(size["layers"]):
        for group in range(layout.num_groups):
            host = streamed.store.host_unit(layer, group)
            device_copy = resident.store.resident_unit(layer, group).cpu()
            for request in range(2):
                pages = table[request, : -(-lengths[request] // block)]
                tokens = slice(0, lengths[request])
                got = host[pages].transpose(0, 1).reshape(2, -1, 1, size["head_dim"])[:, tokens]
                want = device_copy[pages].transpose(0, 1).reshape(2, -1, 1, size["head_dim"])[:, tokens]
                assert torch.equal(got, want)


@pytest.mark.cuda
def test_step_with_device_tables_never_synchronizes_the_host():
    """Plan, staging map, loads, writes and attention, from vLLM-style device tables, without a host sync."""
    layout = KVLayout(4, 8, 128, 16, 512, 2, torch.bfloat16)
    streamed, resident = make_engine(layout, True, "cuda"), make_engine(layout, False, "cuda")
    assert streamed.store.host.is_pinned()
    streamed.store.host.zero_()  # the histories are zeros in both engines
    lengths = [3000, 1000]
    table = torch.arange(512).view(256, 2).t().contiguous()  # interleaved: blocks 0, 2, 4, ... and 1, 3, 5, ...
    positions = [range(1000, 3000), range(999, 1000)]
    slots = torch.tensor([int(table[r, p // 16]) * 16 + p % 16 for r in range(2) for p in positions[r]])
    device_table, device_slots = table.cuda(), slots.cuda()
    q = torch.randn(2001, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2001, 8, 128, device="cuda", dtype=torch.bfloat16)
    cached = make_engine(layout, True, "cuda", cache_pages=100)  # the page cache's directory, tables and loads
    cached.store.host.zero_()
    outputs = {}
    for name, engine in (("streamed", streamed), ("cached", cached), ("resident", resident)):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            plan = build_step_plan(
                query_start_loc=torch.tensor([0, 2000, 2001]), seq_lens=torch.tensor(lengths),
                block_table=device_table, slot_mapping=device_slots, block_size=16, device="cuda",
            )
            engine.begin_step(plan)
            outputs[name] = [engine.forward(layer, q, k, k, torch.empty_like(q)) for layer in range(layout.num_layers)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for name in ("streamed", "cached"):
        for got, want in zip(outputs[name], outputs["resident"], strict=True):
            assert torch.equal(got, want), name
