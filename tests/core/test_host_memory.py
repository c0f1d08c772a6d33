"""The host tier as the device addresses it: the host tensor on CPU, mapped pinned memory on CUDA."""

import logging

import pytest
import torch

from headinfer_vllm.core import host_memory
from headinfer_vllm.core.host_memory import (
    REGISTER_CHUNK_BYTES,
    allocate_host,
    check_host_budget,
    contiguous_mapping,
    device_view,
    register_in_chunks,
)
from headinfer_vllm.core.transfer import as_words


def test_cpu_view_is_the_host_tensor():
    host = allocate_host((4, 2, 16, 1, 8), torch.float32, pin=False)
    assert device_view(host, torch.device("cpu")) is host


def test_words_tile_each_row():
    assert as_words(torch.zeros(3, 8, dtype=torch.bfloat16)).dtype == torch.int64
    assert as_words(torch.zeros(3, 6, dtype=torch.bfloat16)).dtype == torch.int32
    assert as_words(torch.zeros(3, 3, dtype=torch.bfloat16)).shape == (3, 3)


@pytest.mark.cuda
def test_mapped_host_tier_gathers_fragmented_pages_in_one_launch():
    host = allocate_host((64, 2, 16, 1, 128), torch.bfloat16, pin=True)
    host.copy_(torch.randn(host.shape, generator=torch.Generator().manual_seed(0)))
    view = device_view(host, torch.device("cuda"))
    assert view.is_cuda and view.dtype == host.dtype and view.shape == host.shape
    rows = as_words(view.view(64, -1))  # [pages, page words]
    # Out of order, non-consecutive, with a duplicate: what interleaved requests produce.
    pages = torch.tensor([63, 0, 5, 6, 7, 31, 2, 2, 40], device="cuda")
    staged = torch.empty((len(pages), rows.shape[1]), dtype=rows.dtype, device="cuda")
    torch.index_select(rows, 0, pages, out=staged)
    want = host[pages.cpu()].cuda()  # a plain copy
    assert torch.equal(staged.view(torch.bfloat16).view(want.shape), want)
    # Writes through the view land in host memory.
    view[3].fill_(1.5)
    torch.cuda.synchronize()
    assert bool((host[3] == 1.5).all())


class FakeDriver:
    """``cudaHostRegister`` / ``cudaHostUnregister`` / ``cudaGetLastError`` that record their calls."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []
        self.pending_error = 0
        self.fail_at = fail_at

    def register(self, start: int, length: int) -> int:
        if start == self.fail_at:
            self.pending_error = 2  # cudaErrorMemoryAllocation, left pending as the runtime does
            return 2
        self.registered.append((start, length))
        return 0

    def unregister(self, start: int) -> int:
        self.unregistered.append(start)
        return 0

    def clear_error(self) -> int:
        error, self.pending_error = self.pending_error, 0
        return error


def test_registration_goes_in_chunks_that_cover_the_tier_once():
    driver = FakeDriver()
    starts = register_in_chunks(1000, 10 * 64 + 5, driver.register, driver.unregister, driver.clear_error,
                                chunk_bytes=64)
    assert driver.registered == [(1000 + 64 * i, 64) for i in range(10)] + [(1000 + 640, 5)]
    assert starts == [start for start, _ in driver.registered]
    assert REGISTER_CHUNK_BYTES <= 64 << 30  # vllm#51080: one call over ~512 GiB fails


def test_a_failed_chunk_unregisters_the_others_and_clears_the_pending_error():
    driver = FakeDriver(fail_at=1000 + 2 * 64)
    with pytest.raises(RuntimeError, match=r"failed with CUDA error 2 at .*ulimit -l"):
        register_in_chunks(1000, 5 * 64, driver.register, driver.unregister, driver.clear_error, chunk_bytes=64)
    assert driver.unregistered == [1000, 1064]
    assert driver.pending_error == 0


def test_one_view_needs_the_chunks_mapped_back_to_back():
    assert contiguous_mapping(1000, 3 * 64, lambda host: host + 7, chunk_bytes=64) == 1007
    with pytest.raises(RuntimeError, match="one device view of the tier is impossible"):
        contiguous_mapping(1000, 3 * 64, lambda host: host + (7 if host < 1128 else 99), chunk_bytes=64)


def test_the_host_check_refuses_or_warns_as_configured(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "free_host_bytes", lambda: 2 << 30)
    caplog.set_level(logging.INFO, logger="headinfer_vllm")
    check_host_budget(1 << 30)
    assert "host memory check (strict)" in caplog.text
    with pytest.raises(ValueError, match=r"asks for 3.00 GiB .* only 2.00 GiB .*HEADINFER_HOST_MEMORY_CHECK=warn"):
        check_host_budget(3 << 30)
    caplog.clear()
    check_host_budget(3 << 30, mode="warn")
    assert "host memory check (warn)" in caplog.text and "going on" in caplog.text
