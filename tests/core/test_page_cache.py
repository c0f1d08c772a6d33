"""The device page cache: its directory's rules, exactness across steps, and the bytes it saves.

The directory is checked against the rules of :mod:`headinfer_vllm.core.page_cache`
recomputed here in Python; the engine with a page cache against the float64
dense reference over consecutive steps (admissions, evictions, a request
restarted over the same block ids, windows, the CPU decode split); bytes from
the scheduler's device-side page counts.
"""

import random

import pytest
import torch

from headinfer_vllm.core.page_cache import PageDirectory
from tests.core.scenario import Scenario, relative_error
from tests.core.test_variants import fill_sinks, variant_scenario

FP32_TOLERANCE = 1e-5


def directory_state(directory: PageDirectory) -> dict[int, int]:
    """{block id: cache row} of the pages cached, checked to be a one-to-one map both ways."""
    slot_of = directory.slot_of[: directory.num_blocks].tolist()
    block_in = directory.block_in[: directory.num_slots].tolist()
    cached = {block: slot for block, slot in enumerate(slot_of) if slot >= 0}
    assert {slot: block for block, slot in cached.items()} == {s: b for s, b in enumerate(block_in) if b >= 0}
    return cached


@pytest.mark.parametrize("seed", range(6))
def test_directory_follows_its_rules_over_random_steps(seed):
    rng = random.Random(seed)
    num_blocks, num_slots = 40, rng.choice([1, 5, 12, 40])
    directory = PageDirectory(num_blocks, num_slots, torch.device("cpu"))
    last_read: dict[int, int] = {}
    totals = [0, 0, 0]
    for step in range(1, 12):
        before = directory_state(directory)
        in_use = set(rng.sample(range(num_blocks), rng.randint(0, 25)))
        priority = {block: rng.randint(1, 9) for block in in_use}
        new = {block for block in in_use if rng.random() < 0.2}
        admissions = directory.update(
            torch.tensor([block in in_use for block in range(num_blocks)]),
            torch.tensor([priority.get(block, num_blocks) for block in range(num_blocks)]),
            torch.tensor([block in new for block in range(num_blocks)]),
            bound=len(in_use),
        )
        after = directory_state(directory)
        ranked = sorted(in_use, key=lambda block: (priority[block], block not in before, block))
        wanted = set(ranked[:num_slots])
        admitted = wanted - set(before)
        assert wanted <= set(after)
        assert set(after) - wanted <= set(before)  # nothing unwanted comes in
        assert all(after[block] == before[block] for block in set(before) & set(after))  # cached pages stay put
        evicted = set(before) - set(after)
        assert not evicted & wanted
        empty_rows = num_slots - len(before)
        assert len(evicted) == max(0, len(admitted) - empty_rows)
        survivors = (set(before) & set(after)) - wanted
        if evicted and survivors:  # the least recently used go first
            assert max(last_read.get(block, 0) for block in evicted) <= min(last_read.get(b, 0) for b in survivors)
        count = int(admissions.count)
        loads = dict(zip(admissions.pages[:count].tolist(), admissions.slots[:count].tolist(), strict=True))
        assert loads == {block: after[block] for block in admitted - new}
        assert admissions.slot_of.tolist() == [after.get(block, -1) for block in range(num_blocks)]
        for block in in_use & set(after):
            last_read[block] = step
        totals = [totals[0] + len(in_use), totals[1] + len(in_use & set(before)), totals[2] + len(admitted)]
        assert directory.counters.tolist() == [*totals, len(after)]


def test_a_request_longer_than_the_cache_keeps_a_fixed_part_cached():
    directory = PageDirectory(64, 10, torch.device("cpu"))
    in_use = torch.zeros(64, dtype=torch.bool)
    in_use[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:30]] = True
    priority, new = torch.full((64,), 30), torch.zeros(64, dtype=torch.bool)
    first = directory.update(in_use, priority, new, bound=30)
    assert int(first.count) == 10
    for _ in range(3):
        assert int(directory.update(in_use, priority, new, bound=30).count) == 0


# (history, then the query lengths of each step) per request; after step 2 request 1 restarts: its
# blocks are prefilled again through forward, whatever the cache held for them.
HISTORY = [37, 0, 130, 16]
STEPS = [[12, 48, 1, 1], [1, 1, 20, 1], [1, 30, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
RESTART_AFTER, RESTARTED = 2, 1


def run_steps(scenario: Scenario, after_build=lambda scenario: None) -> list[int]:
    """Run ``STEPS`` after ``HISTORY``; check each against the reference; return the pages loaded per step."""
    totals = [h + sum(step[r] for step in STEPS) for r, h in enumerate(HISTORY)]
    scenario.build(totals)
    after_build(scenario)
    scenario.write_history(HISTORY)
    loaded = []
    for index, query_lens in enumerate(STEPS):
        if index == RESTART_AFTER:
            scenario.restart(RESTARTED)
            query_lens = list(query_lens)
            query_lens[RESTARTED] = HISTORY[RESTARTED] + sum(step[RESTARTED] for step in STEPS[: index + 1])
        output, reference = scenario.step(query_lens)
        assert relative_error(output, reference) <= FP32_TOLERANCE, f"step {index}"
        scenario.assert_every_page_home()
        loaded.append(scenario.attention.transfers.pages_loaded)
    return loaded


@pytest.mark.parametrize("cache_pages", [1, 4, 9, 64])
@pytest.mark.parametrize(("query_per_kv", "head_group_size", "head_dim"), [(1, 1, 64), (4, 2, 32), (2, 4, 128)])
def test_matches_dense_reference_across_admissions_and_evictions(cache_pages, query_per_kv, head_group_size, head_dim):
    scenario = Scenario(cache_pages=cache_pages, query_per_kv=query_per_kv, head_group_size=head_group_size,
                        head_dim=head_dim, num_layers=3, seed=cache_pages + head_dim)
    run_steps(scenario)
    assert scenario.attention.transfers.traffic.pages_admitted > 0


@pytest.mark.parametrize("pattern", ["gemma2", "gpt_oss", "windows"])
@pytest.mark.parametrize("cache_pages", [3, 64])
def test_windows_soft_caps_and_sinks_with_a_page_cache(pattern, cache_pages):
    """Windowed layers read fewer pages than the directory admits for every layer: admitted pages are
    loaded into every cached unit, so a window that later covers them (another request) reads them right."""
    scenario = variant_scenario(pattern, cache_pages=cache_pages, block_size=4, query_per_kv=2)
    run_steps(scenario, after_build=lambda built: fill_sinks(built.layers, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("cache_pages", [0, 5])
def test_resident_units_kv_groups_and_the_cpu_split_beside_a_page_cache(cache_pages):
    """Resident units stay resident; the CPU split's units stay out of the cache (the host writes their
    new tokens in split steps); two KV-cache groups share the directory over one pool of block ids. The
    CPU takes groups between the GPU's (layer 1: 0, 1 | 2 | 3), whose new tokens still go to their own
    host pages (without a cache too)."""
    scenario = Scenario(cache_pages=cache_pages, num_layers=4, kv_groups=2, num_resident_units=1,
                        cpu_groups={1: (2,), 2: (1, 2)})
    run_steps(scenario)
    transfers = scenario.attention.transfers
    assert not transfers.cached_units & {(1, 2), (2, 1), (2, 2)}
    assert (len(transfers.cached_units) > 0) == (cache_pages > 0)
    assert scenario.attention.transfers.traffic.split_steps > 0


def test_requests_that_fit_load_no_page_in_steady_decode():
    scenario = Scenario(cache_pages=64, num_layers=2, head_group_size=2)
    loaded = run_steps(scenario)
    assert loaded[0] > 0  # the history's pages come in once
    assert loaded[-2:] == [0, 0]  # then decode reads them where they are; new pages are write-allocated
    traffic = scenario.attention.transfers.traffic
    assert traffic.hit_rate > 0.5
    layout = scenario.store.layout
    pages_cached = len(directory_state(scenario.attention.transfers.directory))
    assert traffic.cached_bytes == pages_cached * len(scenario.store.streamed_units) * layout.unit_page_bytes


def test_a_request_longer_than_the_cache_moves_no_more_than_whole_unit_residency():
    """The same device budget beside the staging buffers: as 2 resident units, or as a page cache."""
    def decode_pages(**kwargs) -> int:
        scenario = Scenario(num_layers=2, num_kv_heads=4, block_size=4, **kwargs)
        scenario.build([400])
        scenario.write_history([300])
        for _ in range(3):
            output, reference = scenario.step([1])
            assert relative_error(output, reference) <= FP32_TOLERANCE
        return scenario.attention.transfers.pages_loaded

    num_blocks, pages_read = 100 + 7, -(-303 // 4)  # the request's pages + the scenario's 7 spare; 303 tokens
    whole_units = decode_pages(num_resident_units=2)
    rows = 2 * num_blocks // 8  # 2 units' pages spread over the 8 units' cache rows
    page_cache = decode_pages(cache_pages=rows)
    assert whole_units == 6 * pages_read  # 6 streamed units read every page
    assert page_cache == 8 * (pages_read - rows)  # 8 units each stream what their rows do not hold
    assert page_cache <= whole_units
