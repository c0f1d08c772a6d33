"""Allocation of the host tier: pinned when CUDA is used, plain otherwise."""

from __future__ import annotations

import os
import weakref

import torch


def free_host_bytes() -> int | None:
    """Available host memory in bytes (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_budget(requested_bytes: int, what: str = "cpu_kv_cache_gib") -> None:
    """Refuse a host budget larger than the free host memory, before allocating."""
    free = free_host_bytes()
    if free is not None and requested_bytes > free:
        raise ValueError(
            f"headinfer: {what} asks for {requested_bytes / 2**30:.2f} GiB of host "
            f"memory but only {free / 2**30:.2f} GiB is available; lower cpu_kv_cache_gib"
        )


def allocate_host(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host tensor of ``shape``; page-locked with ``cudaHostRegister`` if ``pin``.

    torch's pinned allocator rounds each allocation up to a power of two
    (a 100 GiB budget would pin 128 GiB), so the memory is allocated plainly
    and registered in place instead. It is unregistered when the tensor dies.
    """
    tensor = torch.empty(shape, dtype=dtype)
    if not pin or tensor.numel() == 0:
        return tensor
    cudart = torch.cuda.cudart()
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    error = cudart.cudaHostRegister(pointer, size, 1)  # cudaHostRegisterPortable: every context
    if int(error) != 0:
        raise RuntimeError(
            f"headinfer: cudaHostRegister of {size / 2**30:.2f} GiB failed with CUDA error "
            f"{int(error)}; lower cpu_kv_cache_gib or raise the locked-memory limit (ulimit -l)"
        )
    weakref.finalize(tensor, _unregister, pointer)
    return tensor


def _unregister(pointer: int) -> None:
    # Write-backs into this memory may still be in flight on a side stream.
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(pointer)
