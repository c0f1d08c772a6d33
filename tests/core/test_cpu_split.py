"""Decode steps split between streaming and CPU attention in the host tier, against the float64 reference.

On the CPU the same schedule runs as on CUDA (the left-out units, their new
tokens written by the host, the outputs copied back), synchronously.
"""

import dataclasses

import pytest
import torch

from headinfer_vllm.core import cpu_attention
from headinfer_vllm.core.cpu_split import (
    MIN_SPEEDUP,
    DecodeSplit,
    balanced_cpu_units,
    measure_cpu_rate,
    measure_layer_overhead,
    plan_decode_split,
    predicted_speedup,
    spread_over_layers,
)
from tests.conftest import DEVICES
from tests.core.scenario import Scenario, relative_error
from tests.core.test_variants import make_layers, variant_reference

pytestmark = pytest.mark.skipif(not cpu_attention.is_available(), reason="no C++ compiler with OpenMP")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HISTORY = [37, 0, 130, 16, 75]
# A prefill step (every unit streamed), two decode-only steps (split), then a prefill chunk again,
# which loads the pages that the host wrote during the split steps.
STEPS = [[12, 48, 1, 1, 75], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 20, 1, 1, 1]]


def run_steps(scenario: Scenario, steps=STEPS) -> list[int]:
    """Run ``steps``, checking outputs and the homes of every page; returns the pages loaded per step."""
    scenario.build([h + sum(step[r] for step in steps) for r, h in enumerate(HISTORY)])
    scenario.write_history(HISTORY)
    loaded = []
    for query_lens in steps:
        output, reference = scenario.step(query_lens)
        error = relative_error(output, reference)
        assert error <= TOLERANCE[scenario.dtype], (query_lens, error)
        loaded.append(scenario.attention.transfers.pages_loaded)
        scenario.assert_every_page_home()
    return loaded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_per_kv", [1, 4])
@pytest.mark.parametrize("head_group_size", [1, 2])
@pytest.mark.parametrize("share", ["one", "half", "all"])
def test_split_decode_matches_the_reference(device, query_per_kv, head_group_size, share):
    layers, groups = 3, 4 // head_group_size
    streamed = {layer: tuple(range(1, groups)) if layer == 0 else tuple(range(groups)) for layer in range(layers)}
    count = {"one": 1, "half": sum(map(len, streamed.values())) // 2, "all": sum(map(len, streamed.values()))}[share]
    scenario = Scenario(
        device=device, num_layers=layers, query_per_kv=query_per_kv, head_group_size=head_group_size,
        num_resident_units=1, cpu_groups=spread_over_layers(streamed, count), seed=query_per_kv + 5 * head_group_size,
    )
    loaded = run_steps(scenario)
    # Split steps load the GPU's units only: none when the CPU attends them all.
    num_streamed = len(scenario.store.streamed_units)
    assert (loaded[1] == 0) == (count == num_streamed)
    assert loaded[1] % (num_streamed - count or 1) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_split_decode_bf16(device):
    scenario = Scenario(device=device, dtype=torch.bfloat16, query_per_kv=4, cpu_groups={0: (2, 3), 1: (3,)})
    run_steps(scenario)


@pytest.mark.parametrize("kv_groups", [1, 2])
@pytest.mark.parametrize("pattern", ["gemma2", "gpt_oss", "windows"])
def test_split_decode_with_windows_soft_caps_and_sinks(pattern, kv_groups):
    """With 2 KV-cache groups (windowed layers 0 and 2 in one, full layers 1 and 3 in the other, layers 2i and
    2i + 1 sharing slot i), each layer's CPU units attend through its own group's block table."""
    layers = make_layers(pattern, num_query_heads=8, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(3)
    for variant in layers:
        if variant.sinks is not None:
            variant.sinks.copy_(torch.randn(variant.sinks.shape, generator=generator))
    scenario = Scenario(
        num_layers=4, query_per_kv=2, layers=layers, cpu_groups={0: (3,), 1: (2, 3), 2: (0, 1, 2, 3), 3: (1, 2, 3)},
        reference=lambda layer, *args: variant_reference(layers[layer], *args), kv_groups=kv_groups,
    )
    run_steps(scenario)


def test_prefill_steps_stream_every_unit():
    """A step with a prefill chunk loads exactly what an unsplit engine loads."""
    split = Scenario(cpu_groups={0: (2, 3), 1: (3,)})
    unsplit = Scenario()
    assert run_steps(split)[0::3] == run_steps(unsplit)[0::3]
    assert run_steps(split)[1] == 5 * run_steps(unsplit)[1] // 8  # 3 of 8 units on the CPU, 5 loaded


def test_units_not_streamed_cannot_go_to_the_cpu():
    with pytest.raises(ValueError, match=r"not streamed"):
        Scenario(num_resident_units=2, cpu_groups={0: (0,)}).build([40])


def test_cpu_groups_must_be_consecutive():
    with pytest.raises(ValueError, match=r"consecutive"):
        Scenario(cpu_groups={0: (1, 3)}).build([40])


def test_balanced_share_makes_both_sides_finish_together():
    # CPU half as fast as PCIe: a third of the units.
    assert balanced_cpu_units(30, h2d_bytes_per_s=2.0, cpu_bytes_per_s=1.0) == 10
    assert predicted_speedup(30, 10, 2.0, 1.0) == pytest.approx(1.5)
    # Equal rates: half, twice as fast.
    assert balanced_cpu_units(32, 1.0, 1.0) == 16
    assert predicted_speedup(32, 16, 1.0, 1.0) == pytest.approx(2.0)
    # The rounding that gives the shorter step wins: 7 * 0.75 = 5.25 -> 5.
    assert balanced_cpu_units(7, 1.0, 3.0) == 5
    assert balanced_cpu_units(5, 1.0, 1e-9) == 0


def test_units_spread_over_layers_from_each_layers_last_groups():
    streamed = {0: (1, 2, 3), 1: (0, 1, 2, 3), 2: (), 3: (2, 3)}
    assert spread_over_layers(streamed, 0) == {}
    assert spread_over_layers(streamed, 2) == {0: (3,), 1: (3,)}
    assert spread_over_layers(streamed, 5) == {0: (2, 3), 1: (2, 3), 3: (3,)}
    assert spread_over_layers(streamed, 9) == {0: (1, 2, 3), 1: (0, 1, 2, 3), 3: (2, 3)}
    with pytest.raises(ValueError, match=r"cannot give 10 of 9"):
        spread_over_layers(streamed, 10)


def test_plan_modes():
    scenario = Scenario(num_layers=2, num_kv_heads=4, num_resident_units=2)
    scenario.build([40])
    store = scenario.store  # 6 streamed units
    assert plan_decode_split(store, "off", num_threads=2, h2d_bytes_per_s=1.0, cpu_bytes_per_s=1.0) is None
    every = plan_decode_split(store, "all", num_threads=2, h2d_bytes_per_s=None, cpu_bytes_per_s=None)
    assert every.num_cpu_units == 6 and every.cpu_groups == {0: (1, 2, 3), 1: (1, 2, 3)}
    auto = plan_decode_split(store, "auto", num_threads=2, h2d_bytes_per_s=2.0, cpu_bytes_per_s=1.0)
    assert auto.num_cpu_units == 2 and auto.predicted_speedup(6) == pytest.approx(1.5)
    assert "2 of 6 streamed units on the CPU" in auto.describe(6) and "1.50x" in auto.describe(6)
    # A CPU too slow to gain MIN_SPEEDUP: no split.
    slow = 1.0 / (MIN_SPEEDUP * 6)
    assert plan_decode_split(store, "auto", num_threads=2, h2d_bytes_per_s=1.0, cpu_bytes_per_s=slow) is None
    with pytest.raises(ValueError, match=r"needs both rates"):
        plan_decode_split(store, "auto", num_threads=2, h2d_bytes_per_s=None, cpu_bytes_per_s=1.0)


def test_a_split_pays_from_the_bytes_where_it_beats_pcie_by_min_speedup_lockstep_included():
    """6 streamed units, 2 on the CPU (one in each of 2 layers), H2D 2 B/s, CPU 1 B/s, 2 s per layer of lockstep:
    B bytes take B/2 s over PCIe and max(B*4/6/2, B*2/6/1) + 2*2 = B/3 + 4 s split; B/2 = 1.1 (B/3 + 4) at B = 33."""
    split = DecodeSplit({0: (3,), 1: (3,)}, num_threads=2, num_streamed=6, h2d_bytes_per_s=2.0, cpu_bytes_per_s=1.0,
                        layer_overhead_s=2.0, every_step=False)
    assert split.min_split_bytes == pytest.approx(33.0)
    assert split.pays(34) and not split.pays(32)
    assert "at least 0 MiB of KV (per-layer lockstep 2000000 us)" in split.describe(6)
    assert dataclasses.replace(split, every_step=True).pays(0)
    assert not dataclasses.replace(split, cpu_bytes_per_s=0.1).pays(10**12)  # no gain to pay the lockstep with


@pytest.mark.parametrize("threshold", ["below", "above"])
def test_steps_split_only_where_the_rule_says_and_stay_exact(threshold):
    probe = Scenario(cpu_groups={0: (3,), 1: (3,)})
    run_steps(probe, STEPS[:2])
    decode_bytes = probe.attention.transfers.traffic.step_host_bytes  # what the decode step STEPS[1] streams
    scenario = Scenario(cpu_groups={0: (3,), 1: (3,)},
                        split_from_bytes=decode_bytes + (1 if threshold == "above" else -1))
    loaded = run_steps(scenario, STEPS[:2])
    traffic = scenario.attention.transfers.traffic
    assert traffic.split_steps == (1 if threshold == "below" else 0)
    streamed = len(scenario.store.streamed_units)
    assert loaded[1] % (streamed - (2 if threshold == "below" else 0)) == 0


@pytest.mark.skipif(not cpu_attention.is_available(), reason="no C++ compiler with OpenMP")
def test_start_up_measurements_run_on_a_cpu_store():
    scenario = Scenario(num_layers=2, num_kv_heads=4, num_resident_units=2)
    scenario.build([40])
    overhead = measure_layer_overhead(scenario.store, query_per_kv=2, num_threads=1, repeats=3)
    assert 0 < overhead < 1  # one page, seconds
    assert measure_cpu_rate(scenario.store, query_per_kv=2, num_threads=1, repeats=1) > 0


def test_describe_without_rates():
    assert DecodeSplit({0: (1,)}, num_threads=4).describe(8) == "1 of 8 streamed units on the CPU in every decode step"
