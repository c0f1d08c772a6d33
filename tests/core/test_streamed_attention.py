"""Streamed attention against a float64 dense reference, and page round trips."""

import pytest
import torch

from tests.conftest import DEVICES
from tests.core.scenario import Scenario, relative_error

FP32_TOLERANCE = 1e-5
# bf16 has an 8-bit mantissa: inputs round at 2**-9 relative; allow a few ulps.
BF16_TOLERANCE = 2e-2

# (history, first step, second step) per request: prefill chunks and decode
# tokens mixed in one batch; a request with no history prefills from scratch.
HISTORY = [37, 0, 130, 16, 75]
FIRST = [12, 48, 1, 1, 75]
SECOND = [1, 1, 20, 1, 1]


def run_and_check(scenario: Scenario, tolerance: float) -> None:
    scenario.build([h + a + b for h, a, b in zip(HISTORY, FIRST, SECOND, strict=True)])
    scenario.write_history(HISTORY)
    for query_lens in (FIRST, SECOND):
        output, reference = scenario.step(query_lens)
        assert relative_error(output, reference) <= tolerance
        scenario.assert_every_page_home()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("query_per_kv", [1, 4, 8])
@pytest.mark.parametrize("head_group_size", [1, 2, 4])
@pytest.mark.parametrize("residency", ["none", "partial", "all"])
def test_matches_dense_reference_fp32(device, head_dim, query_per_kv, head_group_size, residency):
    num_units = 2 * (4 // head_group_size)
    resident = {"none": 0, "partial": num_units // 2, "all": num_units}[residency]
    scenario = Scenario(
        device=device, head_dim=head_dim, query_per_kv=query_per_kv,
        head_group_size=head_group_size, num_resident_units=resident,
        seed=head_dim + 7 * query_per_kv + 31 * head_group_size,
    )
    run_and_check(scenario, FP32_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_group_size", [1, 4])
def test_matches_dense_reference_bf16(device, head_group_size):
    scenario = Scenario(device=device, dtype=torch.bfloat16, query_per_kv=4, head_group_size=head_group_size)
    run_and_check(scenario, BF16_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch_depth", [2, 3])
def test_deeper_prefetch(device, prefetch_depth):
    scenario = Scenario(device=device, num_layers=3, prefetch_depth=prefetch_depth, num_resident_units=1)
    run_and_check(scenario, FP32_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_block_size_and_long_prefill(device):
    """A few thousand tokens in large pages, chunked over two steps."""
    scenario = Scenario(device=device, block_size=64, query_per_kv=4, head_group_size=2, num_layers=2)
    scenario.build([2600, 900])
    scenario.write_history([1000, 0])
    for query_lens in ([1500, 899], [100, 1]):
        output, reference = scenario.step(query_lens)
        assert relative_error(output, reference) <= FP32_TOLERANCE


def test_expanded_grouped_heads_match_the_reference(monkeypatch):
    """The K/V head expansion that CUDA uses where torch has no fused GQA kernel, run on CPU."""
    from headinfer_vllm.core import kernels

    expanded = []
    monkeypatch.setattr(kernels, "sdpa_needs_expanded_heads", lambda *args: expanded.append(args) or True)
    scenario = Scenario(query_per_kv=4, head_group_size=2)
    run_and_check(scenario, FP32_TOLERANCE)
    assert expanded  # the engine chose the expanded kernel


def test_wrong_head_is_caught():
    """The check is sharp enough to see one head's K swapped for another's."""
    scenario = Scenario(query_per_kv=2)
    scenario.build([40, 20])
    scenario.write_history([30, 10])
    unit = scenario.store.home(0, 0)
    swapped = unit[..., 0, :].clone()
    unit[..., 0, :] = scenario.store.home(0, 1)[..., 0, :]
    scenario.store.home(0, 1)[..., 0, :] = swapped
    output, reference = scenario.step([1, 5])
    assert relative_error(output, reference) > 100 * FP32_TOLERANCE


def test_out_of_order_layers_are_refused():
    scenario = Scenario()
    scenario.build([20])
    scenario.write_history([10])
    scenario.step([1])
    query = torch.zeros(1, 4, 64)
    with pytest.raises(RuntimeError, match="out of order"):
        scenario.attention.forward(1, query, query, query, query.clone())


def test_decode_batches_bound_the_padding():
    from headinfer_vllm.core.kernels import decode_batches
    from headinfer_vllm.core.plan import RequestSpan

    spans = [RequestSpan(0, 1, 512), RequestSpan(1, 1, 500), RequestSpan(2, 30, 600),
             RequestSpan(32, 1, 11), RequestSpan(33, 1, 13), RequestSpan(34, 1, 5000)]
    # The prefill (index 2) is no decode; each request is padded to at most twice its length.
    assert decode_batches(tuple(spans)) == [[5], [0, 1], [3, 4]]
