"""The device tier's start-up check against free GPU memory."""

import pytest
import torch

from headinfer_vllm.core.device_memory import check_device_budget, device_budget_error

GIB = 1 << 30


def test_fits_within_free_memory_and_utilization():
    assert device_budget_error(10 * GIB, free_bytes=60 * GIB, total_bytes=80 * GIB, utilization=0.9) is None


@pytest.mark.parametrize(
    "free, utilization, allowed",
    [
        (60, 0.9, 52.0),  # the engine's share (72 GiB) less what is in use (20 GiB)
        (30, 1.0, 30.0),  # what is free, when that is less
        (5, 0.5, 0.0),  # weights already exceed the share
    ],
)
def test_refusal_states_what_fits(free, utilization, allowed):
    error = device_budget_error(int(allowed * GIB) + GIB, free * GIB, 80 * GIB, utilization)
    assert error is not None
    assert f"only {allowed:.3f} GiB of GPU memory fits" in error
    assert f"lower gpu_kv_cache_gib to at most {allowed:.3f}" in error


def test_no_check_off_cuda():
    check_device_budget(1 << 60, torch.device("cpu"))


@pytest.mark.cuda
def test_cuda_device_refuses_more_than_it_has():
    device = torch.device("cuda")
    _, total = torch.cuda.mem_get_info(device)
    check_device_budget(GIB, device, utilization=0.9)
    with pytest.raises(ValueError, match=r"the device tier needs .* GiB but only"):
        check_device_budget(total + GIB, device, utilization=0.9)
