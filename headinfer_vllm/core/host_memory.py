"""The host tier's memory: pinned and mapped into the device's address space on CUDA.

On CUDA the host tier is registered with ``cudaHostRegisterPortable |
cudaHostRegisterMapped``, so a kernel can read and write it directly over the
link (zero-copy, through unified virtual addressing). :func:`device_view`
wraps that memory as a CUDA tensor, which lets one ``index_select`` load any
list of pages, however fragmented, in one launch. On CPU the host tensor is
its own device view.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections.abc import Callable

import torch

logger = logging.getLogger("headinfer_vllm")

PORTABLE_AND_MAPPED = 3
"""``cudaHostRegisterPortable | cudaHostRegisterMapped``: usable from every context, device-addressable."""


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


def check_host_budget(requested_bytes: int, mode: str = "strict", what: str = "cpu_kv_cache_gib") -> None:
    """Compare a host budget with the host's available memory (``MemAvailable``), before allocating.

    ``mode`` (``HeadInferConfig.host_memory_check``): ``strict`` refuses a budget
    larger than the available memory; ``warn`` logs it and goes on (hosts whose
    memory grows on demand). Either way the log says which mode applied.
    ``what`` names the budget in the messages.
    """
    free = free_host_bytes()
    if free is None or requested_bytes <= free:
        logger.info(
            "headinfer: host memory check (%s): %s asks for %.2f GiB, %s GiB available",
            mode, what, requested_bytes / 2**30, "unknown" if free is None else f"{free / 2**30:.2f}",
        )
        return
    if mode == "warn":
        logger.warning(
            "headinfer: host memory check (warn): %s asks for %.2f GiB of host memory but only %.2f GiB is "
            "available now; going on (host_memory_check=warn trusts hosts whose memory grows on demand)",
            what, requested_bytes / 2**30, free / 2**30,
        )
        return
    raise ValueError(
        f"headinfer: {what} asks for {requested_bytes / 2**30:.2f} GiB of host memory but only "
        f"{free / 2**30:.2f} GiB is available; lower {what}, or set host_memory_check=warn "
        f"(HEADINFER_HOST_MEMORY_CHECK=warn) on a host whose memory grows on demand"
    )


REGISTER_CHUNK_BYTES = 64 << 30
"""Largest piece of the host tier registered with one ``cudaHostRegister`` call (bytes).

One call above about 512 GiB fails and leaves a pending CUDA error that later
surfaces as a bogus out-of-memory (vllm#51080); vLLM 0.34 registers in chunks
of at most 64 GiB for the same reason."""


def allocate_host(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host tensor of ``shape``; page-locked and device-mapped with ``cudaHostRegister`` if ``pin``.

    torch's pinned allocator rounds each allocation up to a power of two
    (a 100 GiB budget would pin 128 GiB), so the memory is allocated plainly
    and registered in place instead, in chunks of at most
    :data:`REGISTER_CHUNK_BYTES`. Every chunk is unregistered when the tensor dies.
    """
    tensor = torch.empty(shape, dtype=dtype)
    if not pin or tensor.numel() == 0:
        return tensor
    cudart = torch.cuda.cudart()
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    chunks = register_in_chunks(
        pointer, size,
        register=lambda start, length: int(cudart.cudaHostRegister(start, length, PORTABLE_AND_MAPPED)),
        unregister=lambda start: int(cudart.cudaHostUnregister(start)),
        clear_error=lambda: int(cudart.cudaGetLastError()),
    )
    weakref.finalize(tensor, _unregister, chunks)
    return tensor


def register_in_chunks(
    pointer: int,
    size: int,
    register: Callable[[int, int], int],
    unregister: Callable[[int], int],
    clear_error: Callable[[], int],
    chunk_bytes: int = REGISTER_CHUNK_BYTES,
) -> list[int]:
    """Register ``size`` bytes at ``pointer`` in chunks of at most ``chunk_bytes``; the chunks' starts.

    ``register(start, length)`` and ``unregister(start)`` return CUDA error
    codes (0: success). On a failure the chunks already registered are
    unregistered and the pending error is cleared (``clear_error``), so that it
    cannot surface later in an unrelated call, and a ``RuntimeError`` says what to do.
    """
    starts: list[int] = []
    for offset in range(0, size, chunk_bytes):
        length = min(chunk_bytes, size - offset)
        error = register(pointer + offset, length)
        if error != 0:
            clear_error()
            for start in starts:
                unregister(start)
            clear_error()
            raise RuntimeError(
                f"headinfer: cudaHostRegister of the host tier failed with CUDA error {error} at "
                f"{offset / 2**30:.1f} of {size / 2**30:.2f} GiB (chunks of {chunk_bytes / 2**30:.0f} GiB); "
                "lower cpu_kv_cache_gib or raise the locked-memory limit (ulimit -l)"
            )
        starts.append(pointer + offset)
    return starts


def _unregister(chunks: list[int]) -> None:
    # Kernels may still be reading or writing this memory through its device view.
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    for start in chunks:
        cudart.cudaHostUnregister(start)


def indexed(device: torch.device | str) -> torch.device:
    """``device`` with its index: a bare ``cuda`` is the current CUDA device (tensors report ``cuda:N``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` as a tensor on ``device`` without a copy: the host tensor itself on CPU.

    On CUDA, ``host`` must come from :func:`allocate_host` with ``pin=True``.
    The view keeps ``host`` alive. Raises ``RuntimeError`` when the memory
    cannot be mapped (no unified addressing, or the driver refuses).
    """
    if device.type != "cuda" or host.numel() == 0:
        return host
    device = indexed(device)
    nbytes = host.numel() * host.element_size()
    with torch.cuda.device(device):
        pointer = contiguous_mapping(host.data_ptr(), nbytes, _mapped_device_pointer)
        words = torch.as_tensor(_CudaArray(pointer, nbytes, host.element_size(), owner=host))
    if words.device != device:
        raise RuntimeError(f"headinfer: the host tier was mapped for {words.device}, not {device}")
    return words.view(host.dtype).view(host.shape)


def contiguous_mapping(
    host_pointer: int, nbytes: int, device_pointer_of: Callable[[int], int], chunk_bytes: int = REGISTER_CHUNK_BYTES
) -> int:
    """The device address of registered host memory, checked to be one run over every registered chunk.

    Each chunk (see :func:`register_in_chunks`) is mapped by the driver on its
    own; a single view over the tier needs chunk ``i`` at ``base + i * chunk_bytes``.
    """
    base = device_pointer_of(host_pointer)
    for offset in range(chunk_bytes, nbytes, chunk_bytes):
        where = device_pointer_of(host_pointer + offset)
        if where != base + offset:
            raise RuntimeError(
                f"headinfer: the driver mapped the host tier's chunk at {offset / 2**30:.0f} GiB to device "
                f"address {where:#x}, not {base + offset:#x}: one device view of the tier is impossible; "
                "lower cpu_kv_cache_gib below one chunk or run on a system with unified addressing"
            )
    return base


class _CudaArray:
    """Exposes ``nbytes`` of device-addressable memory as a 1-D integer array (``__cuda_array_interface__``).

    The integer type has the element's width; the caller reinterprets it
    (bfloat16 has no type string in the interface).
    """

    def __init__(self, pointer: int, nbytes: int, itemsize: int, owner: torch.Tensor) -> None:
        self.owner = owner  # the memory's owner lives as long as any tensor over it
        self.__cuda_array_interface__ = {
            "shape": (nbytes // itemsize,),
            "typestr": f"<i{itemsize}",
            "data": (pointer, False),
            "version": 3,
        }


def _mapped_device_pointer(host_pointer: int) -> int:
    """The device address of registered, mapped host memory (``cuMemHostGetDevicePointer``).

    With unified addressing it equals the host address on most systems, but
    the driver decides; ask it.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise RuntimeError(f"headinfer: cannot load the CUDA driver to map the host tier: {error}") from error
    device_pointer = ctypes.c_uint64()
    status = driver.cuMemHostGetDevicePointer_v2(ctypes.byref(device_pointer), ctypes.c_void_p(host_pointer), 0)
    if status != 0:
        raise RuntimeError(f"headinfer: cuMemHostGetDevicePointer failed with CUDA driver error {status}")
    return device_pointer.value
