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
import os
import weakref

import torch

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


def check_host_budget(requested_bytes: int) -> None:
    """Refuse a host budget larger than the free host memory, before allocating."""
    free = free_host_bytes()
    if free is not None and requested_bytes > free:
        raise ValueError(
            f"headinfer: cpu_kv_cache_gib asks for {requested_bytes / 2**30:.2f} GiB of host "
            f"memory but only {free / 2**30:.2f} GiB is available; lower cpu_kv_cache_gib"
        )


def allocate_host(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host tensor of ``shape``; page-locked and device-mapped with ``cudaHostRegister`` if ``pin``.

    torch's pinned allocator rounds each allocation up to a power of two
    (a 100 GiB budget would pin 128 GiB), so the memory is allocated plainly
    and registered in place instead. It is unregistered when the tensor dies.
    """
    tensor = torch.empty(shape, dtype=dtype)
    if not pin or tensor.numel() == 0:
        return tensor
    cudart = torch.cuda.cudart()
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    error = cudart.cudaHostRegister(pointer, size, PORTABLE_AND_MAPPED)
    if int(error) != 0:
        raise RuntimeError(
            f"headinfer: cudaHostRegister of {size / 2**30:.2f} GiB failed with CUDA error "
            f"{int(error)}; lower cpu_kv_cache_gib or raise the locked-memory limit (ulimit -l)"
        )
    weakref.finalize(tensor, _unregister, pointer)
    return tensor


def _unregister(pointer: int) -> None:
    # Kernels may still be reading or writing this memory through its device view.
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(pointer)


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
        pointer = _mapped_device_pointer(host.data_ptr())
        words = torch.as_tensor(_CudaArray(pointer, nbytes, host.element_size(), owner=host))
    if words.device != device:
        raise RuntimeError(f"headinfer: the host tier was mapped for {words.device}, not {device}")
    return words.view(host.dtype).view(host.shape)


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
