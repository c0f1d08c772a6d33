"""The one configuration object of headinfer_vllm.

Every field has a default, a unit and a docstring, and is validated when the
object is built. The vLLM plugin reads it from
``--additional-config '{"headinfer": {...}}'`` and from ``HEADINFER_<NAME>``
environment variables (see :meth:`HeadInferConfig.from_sources`); the
transformers cache takes the same fields as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

GIB = 1 << 30

ENV_PREFIX = "HEADINFER_"


@dataclasses.dataclass(frozen=True)
class HeadInferConfig:
    """Budgets and knobs of the head-wise offloaded KV cache."""

    cpu_kv_cache_gib: float = 4.0
    """Host memory for the KV cache, in GiB (pinned when CUDA is used).

    This sets the capacity: the number of tokens the cache can hold is about
    ``cpu_kv_cache_gib`` divided by the KV bytes per token of the streamed
    heads. Allocated once, up front. With KV-cache groups (a model with
    sliding windows under vLLM's hybrid KV-cache manager) the layers of all
    groups share pages, so the same memory pools more blocks; vLLM sizes that
    pool from this budget."""

    gpu_kv_cache_gib: float | None = None
    """Device memory for resident head pages and staging buffers, in GiB.

    ``None`` means the minimum: only the staging buffers, every head streamed
    (the paper's setting). A value below the staging size is refused with an
    error that states the minimum. When the whole cache fits, every head is
    resident; otherwise memory beyond the staging buffers goes where
    ``device_tier`` says: a page cache (the default) or whole resident head groups."""

    device_tier: str = "pages"
    """What device memory beyond the staging buffers holds: ``pages`` or ``units``.

    ``pages``: a page cache. Every streamed head group gets the same number
    of cache rows, and the pages that running requests read stay there,
    shortest requests first, least recently used evicted; a step loads only
    what the cache misses, and new pages are allocated in it without a load.
    Requests whose KV fits run decode with no KV transfer; one longer than
    the cache keeps a fixed part cached and streams the rest. The host tier
    still holds every page (write-through), so capacity is set by
    ``cpu_kv_cache_gib`` alone. ``units``: whole (layer, head group) units
    resident on the device (every page of the capacity, used or not), the
    rest streamed; the host tier then holds only the streamed units, so
    capacity grows with the device budget. Ignored without
    ``gpu_kv_cache_gib`` and on vLLM's CPU platform in place. Environment
    variable: ``HEADINFER_DEVICE_TIER``."""

    head_group_size: int | None = None
    """KV heads streamed together as one unit (1..num_kv_heads, a divisor).

    ``None`` chooses: the largest group whose staging fits the device budget,
    or 1 when no device budget is given. Larger groups mean fewer, larger
    copies and kernels; smaller groups mean less device memory."""

    prefetch_depth: int = 1
    """Head groups loaded ahead of the one being computed (count, >= 1).

    The staging ring holds ``prefetch_depth + 1`` head groups."""

    cpu_attention: str = "auto"
    """Whether the CPU attends the KV where it lies in host memory: ``auto``, ``all`` or ``off``.

    The CPU side runs headinfer's C++ kernel (built once, on first use, with
    the system's C++ compiler and OpenMP; cached under ``~/.cache/headinfer_vllm``).
    On vLLM's CPU platform, ``auto`` and ``all`` keep the whole KV in one tier
    that the decode tokens attend in place: no staging copies; ``off`` streams
    head groups through staging buffers, as on CUDA. On CUDA, decode-only
    steps can split the streamed head groups between PCIe and the CPU, which
    attends its share in the host tier while the GPU streams the rest:
    ``auto`` measures the H2D and CPU-kernel rates at start-up and splits so
    that both finish together, where that predicts decode at least 1.1x
    faster (logged either way); ``all`` gives the CPU every streamed group;
    ``off`` streams them all. Steps with a prefill chunk always stream. The
    transformers cache ignores it."""

    cpu_threads: int = 0
    """Threads of the CPU attention kernel (count, >= 0).

    ``0`` chooses: on CUDA, the cores this process may run on, divided among
    the engine's ranks on this host (vLLM's GPU workers set torch to one
    thread, so torch's count is no guide there); on vLLM's CPU platform,
    torch's thread count, which vLLM's CPU worker binds to its cores."""

    host_memory_check: str = "strict"
    """What a host budget larger than the host's available memory (``MemAvailable``) does: ``strict`` or ``warn``.

    ``strict`` refuses it before allocating, with an error that names both
    sizes. ``warn`` logs a warning and allocates anyway: for hosts whose
    memory grows on demand (VMs with memory ballooning, some containers),
    where ``MemAvailable`` at start-up is far below what the host can give.
    Checked by the transformers cache, the vLLM engine (at config time) and
    each vLLM worker; each logs which mode applied. Environment variable:
    ``HEADINFER_HOST_MEMORY_CHECK``."""

    def __post_init__(self) -> None:
        if not self.cpu_kv_cache_gib > 0:
            raise ValueError(
                f"headinfer: cpu_kv_cache_gib must be > 0 GiB, got {self.cpu_kv_cache_gib!r}"
            )
        if self.gpu_kv_cache_gib is not None and not self.gpu_kv_cache_gib >= 0:
            raise ValueError(
                "headinfer: gpu_kv_cache_gib must be >= 0 GiB or unset (staging only), "
                f"got {self.gpu_kv_cache_gib!r}"
            )
        if self.head_group_size is not None and self.head_group_size < 1:
            raise ValueError(
                f"headinfer: head_group_size must be >= 1 or unset (auto), got {self.head_group_size!r}"
            )
        if self.prefetch_depth < 1:
            raise ValueError(
                f"headinfer: prefetch_depth must be >= 1, got {self.prefetch_depth!r}"
            )
        if self.cpu_threads < 0:
            raise ValueError(f"headinfer: cpu_threads must be >= 0 (0: auto), got {self.cpu_threads!r}")
        if self.host_memory_check not in HOST_MEMORY_CHECK_CHOICES:
            raise ValueError(
                f"headinfer: host_memory_check must be one of {', '.join(HOST_MEMORY_CHECK_CHOICES)}, "
                f"got {self.host_memory_check!r}"
            )
        if self.device_tier not in DEVICE_TIER_CHOICES:
            raise ValueError(
                f"headinfer: device_tier must be one of {', '.join(DEVICE_TIER_CHOICES)}, "
                f"got {self.device_tier!r}"
            )
        if self.cpu_attention not in CPU_ATTENTION_CHOICES:
            raise ValueError(
                f"headinfer: cpu_attention must be one of {', '.join(CPU_ATTENTION_CHOICES)}, "
                f"got {self.cpu_attention!r}"
            )

    @property
    def cpu_kv_cache_bytes(self) -> int:
        return int(self.cpu_kv_cache_gib * GIB)

    @property
    def gpu_kv_cache_bytes(self) -> int | None:
        if self.gpu_kv_cache_gib is None:
            return None
        return int(self.gpu_kv_cache_gib * GIB)

    @classmethod
    def from_sources(
        cls,
        settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> HeadInferConfig:
        """Build from ``HEADINFER_<NAME>`` variables, then ``settings`` on top.

        Unknown keys and unparsable values raise ``ValueError`` naming them.
        """
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name in fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = _parse(name, raw, f"{ENV_PREFIX}{name.upper()}")
        for name, value in (settings or {}).items():
            if name not in fields:
                raise ValueError(
                    f"headinfer: unknown setting {name!r}; known settings: {', '.join(fields)}"
                )
            values[name] = _parse(name, value, f"setting {name!r}")
        return cls(**values)


_FLOAT_FIELDS = {"cpu_kv_cache_gib", "gpu_kv_cache_gib"}
CPU_ATTENTION_CHOICES = ("auto", "all", "off")
HOST_MEMORY_CHECK_CHOICES = ("strict", "warn")
DEVICE_TIER_CHOICES = ("pages", "units")
_CHOICE_FIELDS = {
    "cpu_attention": CPU_ATTENTION_CHOICES,
    "host_memory_check": HOST_MEMORY_CHECK_CHOICES,
    "device_tier": DEVICE_TIER_CHOICES,
}


def _parse(name: str, value: Any, origin: str) -> Any:
    if name in _CHOICE_FIELDS:
        if not isinstance(value, str):
            raise ValueError(f"headinfer: {origin} must be one of {', '.join(_CHOICE_FIELDS[name])}, got {value!r}")
        return value.strip().lower()
    if value is None or (isinstance(value, str) and value.lower() in ("none", "auto")):
        if name in ("gpu_kv_cache_gib", "head_group_size"):
            return None
        raise ValueError(f"headinfer: {origin} cannot be unset")
    try:
        if name in _FLOAT_FIELDS:
            return float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        kind = "a number" if name in _FLOAT_FIELDS else "an integer"
        raise ValueError(f"headinfer: {origin} must be {kind}, got {value!r}") from None
