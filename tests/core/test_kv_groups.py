"""KV-cache groups over shared slots (vLLM's hybrid KV-cache manager), against the float64 reference.

Layer ``l`` is in group ``l % G`` and uses slot ``l // G``: the layers of a
slot share its pages, each group with its own block ids from one pool, as
vLLM's hybrid manager hands them out. Every step checks the outputs of every
layer and the homes of every page, so a layer that read or wrote another
group's pages fails.
"""

import pytest
import torch

from headinfer_vllm.core import HeadPageStore, KVLayout, StreamedAttention, cpu_attention
from tests.conftest import DEVICES
from tests.core.scenario import Scenario, relative_error
from tests.core.test_variants import fill_sinks, make_layers, variant_reference

HISTORY = [37, 0, 130, 16, 75]
STEPS = [[12, 48, 1, 1, 75], [1, 1, 1, 1, 1], [1, 20, 1, 1, 1]]


def run_steps(scenario: Scenario, tolerance: float) -> None:
    scenario.build([h + sum(step[r] for step in STEPS) for r, h in enumerate(HISTORY)])
    if scenario.layers is not None:
        fill_sinks(scenario.layers, scenario.generator)
    scenario.write_history(HISTORY)
    for query_lens in STEPS:
        output, reference = scenario.step(query_lens)
        assert relative_error(output, reference) <= tolerance, query_lens
        scenario.assert_every_page_home()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_groups", [2, 3])
@pytest.mark.parametrize("head_group_size", [1, 2])
@pytest.mark.parametrize("residency", ["none", "partial", "all"])
def test_groups_sharing_slots_match_the_reference(device, kv_groups, head_group_size, residency):
    num_slots = -(-4 // kv_groups)
    num_units = num_slots * (4 // head_group_size)
    resident = {"none": 0, "partial": num_units // 2, "all": num_units}[residency]
    scenario = Scenario(
        device=device, num_layers=4, kv_groups=kv_groups, query_per_kv=2, head_group_size=head_group_size,
        num_resident_units=resident, seed=kv_groups + 3 * head_group_size,
    )
    run_steps(scenario, 1e-5)
    assert scenario.store.layout.num_layers == num_slots


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", ["gemma2", "gpt_oss"])
@pytest.mark.parametrize("in_place", [False, True])
def test_windowed_and_full_groups(device, pattern, in_place):
    """Gemma-2's and gpt-oss's layouts as the hybrid manager groups them: windowed layers in one group,
    full ones in the other, each windowed layer sharing a slot with a full one."""
    if in_place and (device != "cpu" or not cpu_attention.is_available()):
        pytest.skip("the C++ kernel attends in place on the CPU")
    layers = make_layers(pattern, 4 * 2, torch.float32, device)
    scenario = Scenario(
        device=device, num_layers=4, kv_groups=2, query_per_kv=2, layers=layers, cpu_kernel=in_place,
        num_resident_units=8 if in_place else 2, reference=lambda layer, *args: variant_reference(layers[layer], *args),
    )
    run_steps(scenario, 1e-5)


def test_layer_slots_must_cover_every_slot():
    layout = KVLayout(2, 2, 16, 4, 8, 1, torch.float32)
    with pytest.raises(ValueError, match="must use each of the 2 slots"):
        HeadPageStore(layout, resident_units=frozenset(), num_staging_buffers=2, device="cpu", layer_slots=[0, 0])


def test_one_plan_per_group():
    scenario = Scenario(num_layers=4, kv_groups=2)
    scenario.build([40])
    with pytest.raises(ValueError, match="1 step plans for 2 KV-cache groups"):
        scenario.attention.begin_step(scenario_plan(scenario))
    with pytest.raises(ValueError, match="must give each of the 4 layers a group"):
        StreamedAttention(scenario.store, num_query_heads=4, scale=1.0, layer_groups=[0, 2, 0, 2])


def scenario_plan(scenario: Scenario):
    scenario.write_history([39])
    scenario.step([1])  # a valid step, which leaves its group 0 plan behind
    return scenario.plan
