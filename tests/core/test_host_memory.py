"""The host tier as the device addresses it: the host tensor on CPU, mapped pinned memory on CUDA."""

import pytest
import torch

from headinfer_vllm.core.host_memory import allocate_host, device_view
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
