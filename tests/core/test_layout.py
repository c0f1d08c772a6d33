"""Budgets to capacity: host sets the tokens, device holds staging + residents."""

import pytest
import torch

from headinfer_vllm.core import HeadPageStore, KVLayout, plan_capacity, plan_residency

SHAPE = dict(num_layers=4, num_kv_heads=4, head_dim=8, block_size=4, dtype=torch.float32)
PAGE = 2 * 4 * 8 * 4  # bytes of one page of one KV head


def plan(host_pages, device_pages=None, group=None, depth=1, page_cache=True):
    return plan_capacity(
        **SHAPE, host_bytes=host_pages * PAGE,
        device_bytes=None if device_pages is None else device_pages * PAGE,
        head_group_size=group, prefetch_depth=depth, page_cache=page_cache,
    )


def test_host_budget_sets_capacity_without_device_budget():
    result = plan(host_pages=16 * 100)
    assert result.layout.head_group_size == 1
    assert result.layout.num_blocks == 100
    assert result.num_resident_units == 0
    assert result.host_bytes == 16 * 100 * PAGE
    assert result.device_bytes == 2 * 100 * PAGE


def test_too_small_device_budget_states_minimum():
    with pytest.raises(ValueError, match=r"minimum is .* GiB"):
        plan(host_pages=16 * 100, device_pages=199)


def test_device_budget_picks_largest_group_that_fits():
    # Staging of 2 groups of 2 heads at 100 blocks = 400 pages.
    result = plan(host_pages=16 * 100, device_pages=400)
    assert result.layout.head_group_size == 2
    assert result.device_bytes <= 400 * PAGE


def test_extra_device_memory_goes_to_the_page_cache():
    result = plan(host_pages=16 * 100, device_pages=600, group=1)
    assert (result.num_resident_units, result.layout.num_blocks) == (0, 100)  # the host holds every page
    assert result.cache_bytes == (600 - 2 * 100) * PAGE and result.device_bytes == 600 * PAGE
    store = HeadPageStore.from_plan(result, "cpu")
    assert store.cache_rows == 400 // 16  # rows of every one of the 16 streamed units
    assert store.device_bytes == (2 * 100 + 16 * store.cache_rows) * PAGE <= result.device_bytes


def test_extra_device_memory_makes_units_resident_and_grows_capacity():
    result = plan(host_pages=16 * 100, device_pages=600, group=1, page_cache=False)
    assert result.num_resident_units > 0 and result.cache_bytes == 0
    assert result.layout.num_blocks == (16 * 100) // (16 - result.num_resident_units)
    assert result.device_bytes <= 600 * PAGE
    assert result.host_bytes <= 16 * 100 * PAGE


def test_device_large_enough_for_everything_keeps_all_resident():
    result = plan(host_pages=16 * 10, device_pages=16 * 1000, group=4)
    assert result.num_resident_units == result.layout.num_units
    assert result.num_staging_buffers == 0
    assert result.host_bytes == 0
    assert result.layout.num_blocks == 1000


def test_group_must_divide_heads():
    with pytest.raises(ValueError, match="must divide"):
        plan(host_pages=1000, group=3)


def test_store_never_exceeds_device_budget():
    result = plan(host_pages=16 * 50, device_pages=500, group=1, page_cache=False)
    store = HeadPageStore.from_plan(result, "cpu")
    assert store.device_bytes == result.device_bytes <= 500 * PAGE
    assert store.host_bytes == result.host_bytes
    layout = KVLayout(4, 4, 8, 4, 50, 1, torch.float32)
    with pytest.raises(ValueError, match="budget"):
        HeadPageStore(layout, resident_units=frozenset({(0, 0)}), num_staging_buffers=2,
                      device="cpu", device_budget_bytes=3 * layout.unit_bytes - 1)


def test_in_place_keeps_every_unit_in_one_tier_without_staging():
    """Attended where it lies (the CPU): one unit per layer of all KV heads, the whole budget is the KV."""
    result = plan_capacity(**SHAPE, host_bytes=16 * 100 * PAGE + PAGE, device_bytes=8 * PAGE,
                           head_group_size=None, prefetch_depth=1, in_place=True)
    assert result.layout.head_group_size == 4
    assert result.layout.num_blocks == 100
    assert result.num_resident_units == result.layout.num_units == 4
    assert result.num_staging_buffers == 0 and result.num_streamed_units == 0
    assert result.device_bytes == 16 * 100 * PAGE
    with pytest.raises(ValueError, match="holds no block"):
        plan_capacity(**SHAPE, host_bytes=PAGE, device_bytes=None, head_group_size=None, prefetch_depth=1,
                      in_place=True)


def residency(device_pages=None, group=None, in_place=False, num_blocks=100, page_cache=True):
    """A plan for vLLM's block count (KV-cache groups): 4 slots of 4 KV heads."""
    return plan_residency(
        **SHAPE, num_blocks=num_blocks, device_bytes=None if device_pages is None else device_pages * PAGE,
        head_group_size=group, prefetch_depth=1, in_place=in_place, page_cache=page_cache,
    )


def test_residency_around_a_given_block_count():
    streamed = residency()
    assert (streamed.layout.num_blocks, streamed.layout.head_group_size, streamed.num_resident_units) == (100, 1, 0)
    assert streamed.host_bytes == 16 * 100 * PAGE and streamed.num_staging_buffers == 2
    # Device room for the staging buffers of the largest group (4 heads: 2 x 400 pages) and one unit more.
    partial = residency(device_pages=3 * 400 + 399, page_cache=False)
    assert (partial.layout.head_group_size, partial.num_resident_units, partial.num_staging_buffers) == (4, 1, 2)
    assert partial.device_bytes <= (3 * 400 + 399) * PAGE
    cached = residency(device_pages=3 * 400 + 399)
    assert (cached.layout.head_group_size, cached.num_resident_units, cached.num_staging_buffers) == (4, 0, 2)
    assert cached.cache_bytes == (400 + 399) * PAGE and cached.device_bytes == (3 * 400 + 399) * PAGE
    every = residency(device_pages=16 * 100)
    assert every.num_resident_units == every.layout.num_units and every.num_staging_buffers == 0
    in_place = residency(in_place=True)
    assert in_place.num_resident_units == in_place.layout.num_units and in_place.device_bytes == 16 * 100 * PAGE


def test_residency_refuses_a_device_budget_below_the_staging_buffers():
    with pytest.raises(ValueError, match=r"2 head groups of 1 KV heads over 100 blocks\); the minimum is"):
        residency(device_pages=2 * 100 - 1)
