"""The device tier's budget against what the GPU has free, checked before allocating."""

from __future__ import annotations

import torch


def device_budget_error(requested_bytes: int, free_bytes: int, total_bytes: int, utilization: float) -> str | None:
    """Why ``requested_bytes`` of device tier does not fit, or None if it does.

    The tier may use what is free now, within the share ``utilization`` of
    the whole device that the engine was given (vLLM's
    ``gpu_memory_utilization``); what is already in use (weights) counts
    against that share.
    """
    allowed = min(free_bytes, int(total_bytes * utilization) - (total_bytes - free_bytes))
    if requested_bytes <= allowed:
        return None
    return (
        f"headinfer: the device tier needs {requested_bytes / 2**30:.3f} GiB but only "
        f"{max(allowed, 0) / 2**30:.3f} GiB of GPU memory fits ({free_bytes / 2**30:.3f} GiB free of "
        f"{total_bytes / 2**30:.3f} GiB, utilization {utilization}); lower gpu_kv_cache_gib to at most "
        f"{max(allowed, 0) / 2**30:.3f} (or unset it for staging only), use a smaller head_group_size or "
        "prefetch_depth, or raise --gpu-memory-utilization"
    )


def check_device_budget(requested_bytes: int, device: torch.device, utilization: float = 1.0) -> None:
    """Raise ``ValueError`` if the device tier cannot fit on ``device``; nothing to check off CUDA."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    error = device_budget_error(requested_bytes, free, total, utilization)
    if error:
        raise ValueError(error)
