"""Loads move each distinct page once (shared prefixes, ``n > 1``), and a null-block batch moves nothing.

Bytes are read from the scheduler's traffic, counted on the device from the
same count the page loads stop at; outputs are checked against a float64
reference gathered from the host tier.
"""

import torch

from headinfer_vllm.core import HeadPageStore, KVLayout, StreamedAttention, build_step_plan

BLOCK, HEADS, QUERY_PER_KV, DIM, LAYERS = 16, 2, 2, 32, 2


def engine(num_blocks: int, null_block: int | None = None) -> StreamedAttention:
    layout = KVLayout(LAYERS, HEADS, DIM, BLOCK, num_blocks, 1, torch.float32)
    store = HeadPageStore(layout, resident_units=frozenset(), num_staging_buffers=2, device=torch.device("cpu"),
                          device_budget_bytes=2 * layout.unit_bytes)
    store.host.normal_(generator=torch.Generator().manual_seed(0))
    return StreamedAttention(store, num_query_heads=HEADS * QUERY_PER_KV, scale=DIM**-0.5, null_block=null_block)


def decode_step(attention: StreamedAttention, block_table: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """One decode token per request; returns the outputs ``[layers, R, Hq, D]``."""
    requests = len(seq_lens)
    last_pages = block_table[torch.arange(requests), torch.tensor([(n - 1) // BLOCK for n in seq_lens])]
    plan = build_step_plan(
        query_start_loc=torch.arange(requests + 1), seq_lens=torch.tensor(seq_lens), block_table=block_table,
        slot_mapping=last_pages * BLOCK + torch.tensor([(n - 1) % BLOCK for n in seq_lens]), block_size=BLOCK,
        device="cpu",
    )
    attention.begin_step(plan)
    generator = torch.Generator().manual_seed(1)
    outputs = []
    for layer in range(LAYERS):
        query = torch.randn(requests, HEADS * QUERY_PER_KV, DIM, generator=generator)
        key, value = torch.randn(2, requests, HEADS, DIM, generator=generator)
        out = torch.empty_like(query)
        attention.forward(layer, query, key, value, out)
        outputs.append((query, out))
    return outputs


def reference(attention: StreamedAttention, layer: int, query: torch.Tensor, block_table, seq_lens) -> torch.Tensor:
    """Dense float64 attention of each request's single query over its pages, read from the host tier."""
    store, out = attention.store, []
    for request, seq_len in enumerate(seq_lens):
        pages = block_table[request, : -(-seq_len // BLOCK)]
        heads = []
        for head in range(HEADS):
            unit = store.host_unit(layer, head).double()  # [N, 2, B, 1, D]
            keys, values = (unit[pages, side, :, 0].reshape(-1, DIM)[:seq_len] for side in (0, 1))
            q = query[request, head * QUERY_PER_KV : (head + 1) * QUERY_PER_KV].double()
            weights = torch.softmax(q @ keys.T * DIM**-0.5, dim=-1)
            heads.append(weights @ values)
        out.append(torch.cat(heads))
    return torch.stack(out)


def test_requests_sharing_a_prefix_load_each_distinct_page_once():
    prefix, own, requests = 12, 4, 8  # 8 requests: a 12-page prompt in common, 4 pages each of their own
    num_blocks = 1 + prefix + requests * own + 100  # page references (128) fit: loads by references would move 128
    shared = torch.arange(1, 1 + prefix)
    block_table = torch.stack([
        torch.cat((shared, 1 + prefix + own * r + torch.randperm(own, generator=torch.Generator().manual_seed(r))))
        for r in range(requests)
    ])
    seq_lens = [(prefix + own - 1) * BLOCK + 1 + r for r in range(requests)]
    attention = engine(num_blocks)
    outputs = decode_step(attention, block_table, seq_lens)

    for layer, (query, out) in enumerate(outputs):
        torch.testing.assert_close(out.double(), reference(attention, layer, query, block_table, seq_lens),
                                   rtol=1e-5, atol=1e-5)
    distinct = prefix + requests * own  # 44 pages, against 128 page references
    units = LAYERS * HEADS
    assert attention.transfers.pages_loaded == distinct * units
    page_bytes = 2 * BLOCK * DIM * 4
    assert attention.transfers.traffic.loaded_bytes == distinct * units * page_bytes


def test_parallel_samples_of_one_prompt_load_its_pages_once():
    """``n = 4`` sampling: four requests over the same pages."""
    block_table = torch.tensor([[3, 5, 2]] * 4)
    attention = engine(num_blocks=8)
    decode_step(attention, block_table, [40] * 4)
    assert attention.transfers.pages_loaded == 3 * LAYERS * HEADS


def test_a_batch_of_null_blocks_loads_nothing():
    """vLLM's capture and warm-up batches: every page is the null block (0), which is never loaded."""
    attention = engine(num_blocks=8, null_block=0)
    decode_step(attention, torch.zeros(5, 2, dtype=torch.int64), [1, 3, 17, 20, 2])
    assert attention.transfers.pages_loaded == 0
    assert attention.transfers.traffic.loaded_bytes == 0
    # Without a null block, the same batch loads block 0 once per unit.
    attention = engine(num_blocks=8)
    decode_step(attention, torch.zeros(5, 2, dtype=torch.int64), [1, 3, 17, 20, 2])
    assert attention.transfers.pages_loaded == LAYERS * HEADS
