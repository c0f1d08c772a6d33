"""Geometry of the head-paged KV cache, and how budgets turn into capacity.

The cache is cut into *units*: one unit is one head group (``head_group_size``
consecutive KV heads) of one layer. A unit is the granularity of residency
and of streaming. Every unit stores all ``num_blocks`` pages::

    unit tensor: [num_blocks, 2, block_size, head_group_size, head_dim]
                             K|V

so a run of consecutive block ids is one contiguous byte range (K and V
together), and ``unit[:, 0]`` / ``unit[:, 1]`` are K / V in vLLM's paged
layout ``[num_blocks, block_size, num_heads, head_dim]``. Block id ``b``
addresses the same token range in every unit, so a vLLM block table is used
as is.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shape of one model's head-paged KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    """Tokens per page."""
    num_blocks: int
    """Pages per unit; block ids are ``0 .. num_blocks - 1``."""
    head_group_size: int
    """KV heads per unit; divides ``num_kv_heads``."""
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "head_group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"headinfer: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise ValueError(f"headinfer: num_blocks must be >= 0, got {self.num_blocks}")
        if self.num_kv_heads % self.head_group_size:
            raise ValueError(
                f"headinfer: head_group_size {self.head_group_size} must divide "
                f"num_kv_heads {self.num_kv_heads}; valid: {divisors(self.num_kv_heads)}"
            )

    @property
    def num_groups(self) -> int:
        """Head groups per layer."""
        return self.num_kv_heads // self.head_group_size

    @property
    def num_units(self) -> int:
        return self.num_layers * self.num_groups

    @property
    def unit_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_blocks, 2, self.block_size, self.head_group_size, self.head_dim)

    @property
    def unit_page_bytes(self) -> int:
        """Bytes of one page (K and V) of one unit."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.head_group_size * self.head_dim * itemsize

    @property
    def unit_bytes(self) -> int:
        return self.num_blocks * self.unit_page_bytes

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    """How host and device budgets were turned into a cache geometry."""

    layout: KVLayout
    num_resident_units: int
    num_staging_buffers: int
    """0 when every unit is resident, else ``prefetch_depth + 1``."""
    cache_bytes: int = 0
    """Device bytes of the page cache (:mod:`headinfer_vllm.core.page_cache`): the budget left beside
    the staging buffers when not every unit fits; 0 without a device budget or with whole-unit residency."""

    @property
    def num_streamed_units(self) -> int:
        return self.layout.num_units - self.num_resident_units

    @property
    def host_bytes(self) -> int:
        return self.num_streamed_units * self.layout.unit_bytes

    @property
    def device_bytes(self) -> int:
        return (self.num_resident_units + self.num_staging_buffers) * self.layout.unit_bytes + self.cache_bytes

    def describe(self) -> str:
        layout = self.layout
        heads = layout.head_group_size
        return (
            f"{self.num_resident_units * heads} of {layout.num_units * heads} (layer, KV head) "
            f"pairs resident, {self.num_streamed_units * heads} streamed in groups of {heads}; "
            f"host tier {self.host_bytes / 2**30:.3f} GiB, device tier "
            f"{self.device_bytes / 2**30:.3f} GiB ({self.num_staging_buffers} staging buffers, "
            f"page cache {self.cache_bytes / 2**30:.3f} GiB: "
            f"{self.cache_bytes // max(self.num_streamed_units * layout.unit_page_bytes, 1)} pages per streamed unit); "
            f"{layout.num_blocks} blocks of {layout.block_size} tokens = "
            f"{layout.max_tokens} tokens"
        )


def plan_capacity(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    host_bytes: int,
    device_bytes: int | None,
    head_group_size: int | None,
    prefetch_depth: int,
    in_place: bool = False,
    page_cache: bool = True,
) -> CapacityPlan:
    """Choose head group size, residency count and block count from budgets.

    ``in_place``: the KV is attended where it lies (on the CPU): every unit in
    one tier of ``host_bytes``, no staging buffers, the device budget unused.

    Capacity is set by the host budget: ``num_blocks = host_bytes //
    (streamed_units * unit_page_bytes)``. The device must hold
    ``prefetch_depth + 1`` staging units plus the resident units, each
    ``num_blocks`` pages. When every unit fits the device, all are resident.
    Otherwise extra device memory goes to the page cache (``page_cache``,
    the default: the pages that running requests read stay on the device), or
    with ``page_cache=False`` makes whole units resident (which also frees host
    memory, so capacity grows with it). With ``device_bytes=None`` nothing is
    resident and nothing cached.

    Raises ``ValueError`` when the device budget cannot hold the staging
    buffers, stating the minimum.
    """

    def layout_for(group: int, num_blocks: int) -> KVLayout:
        return KVLayout(
            num_layers, num_kv_heads, head_dim, block_size, num_blocks, group, dtype
        )

    if in_place:
        layout = layout_for(head_group_size or num_kv_heads, 0)
        num_blocks = host_bytes // (layout.num_units * layout.unit_page_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"headinfer: the host budget of {host_bytes / 2**30:.4f} GiB holds no block; one block of "
                f"every head needs {layout.num_units * layout.unit_page_bytes / 2**30:.4f} GiB"
            )
        return CapacityPlan(dataclasses.replace(layout, num_blocks=num_blocks), layout.num_units, 0)
    num_buffers = prefetch_depth + 1
    groups = [head_group_size] if head_group_size else sorted(divisors(num_kv_heads), reverse=True)
    if device_bytes is None:
        groups = [head_group_size or 1]
    best: CapacityPlan | None = None
    for group in groups:
        page = layout_for(group, 0).unit_page_bytes
        units = layout_for(group, 0).num_units
        num_blocks = host_bytes // (units * page)
        if num_blocks < 1:
            raise ValueError(
                f"headinfer: the host budget of {host_bytes / 2**30:.4f} GiB holds no block; "
                f"one block of every head needs {units * page / 2**30:.4f} GiB"
            )
        plan = CapacityPlan(layout_for(group, num_blocks), 0, num_buffers)
        if device_bytes is None:
            return plan
        if plan.device_bytes > device_bytes:
            continue
        best = _add_resident_units(plan, host_bytes, device_bytes)
        if page_cache and best.num_resident_units < best.layout.num_units:
            best = dataclasses.replace(plan, cache_bytes=device_bytes - plan.device_bytes)
        break
    if best is None:
        group = min(groups)
        page = layout_for(group, 0).unit_page_bytes
        minimum = num_buffers * (host_bytes // (layout_for(group, 0).num_units * page)) * page
        raise ValueError(
            f"headinfer: gpu_kv_cache_gib={device_bytes / 2**30:.4f} GiB cannot hold the "
            f"staging buffers ({num_buffers} head groups of {group} KV heads for "
            f"cpu_kv_cache_gib={host_bytes / 2**30:.4f} GiB); the minimum is "
            f"{minimum / 2**30:.4f} GiB. Raise gpu_kv_cache_gib, lower cpu_kv_cache_gib, "
            f"or unset gpu_kv_cache_gib to use the minimum"
        )
    return best


def _add_resident_units(plan: CapacityPlan, host_bytes: int, device_bytes: int) -> CapacityPlan:
    """Largest resident count whose device tier fits; capacity follows the host."""
    layout = plan.layout
    page, units = layout.unit_page_bytes, layout.num_units
    all_resident_blocks = device_bytes // (units * page)
    best = plan
    for resident in range(1, units):
        num_blocks = host_bytes // ((units - resident) * page)
        if (resident + plan.num_staging_buffers) * num_blocks * page > device_bytes:
            break
        best = CapacityPlan(dataclasses.replace(layout, num_blocks=num_blocks), resident, best.num_staging_buffers)
    if all_resident_blocks >= best.layout.num_blocks:
        best = CapacityPlan(dataclasses.replace(layout, num_blocks=all_resident_blocks), units, 0)
    return best


def plan_residency(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_blocks: int,
    device_bytes: int | None,
    head_group_size: int | None,
    prefetch_depth: int,
    in_place: bool = False,
    page_cache: bool = True,
) -> CapacityPlan:
    """The plan for a block count decided elsewhere (vLLM's, when its hybrid KV-cache manager sizes the
    block pool): head group size and resident units, as :func:`plan_capacity` chooses them.

    ``num_layers`` counts the store's slots. ``in_place``: every unit in one tier, no staging. Without a
    device budget nothing is resident; with one, the largest head group whose staging buffers fit, and beside
    them every unit resident when all fit, else the page cache (``page_cache``) or as many resident units as
    fit (``page_cache=False``).

    Raises ``ValueError`` when the device budget cannot hold the staging buffers, stating the minimum.
    """

    def layout_for(group: int) -> KVLayout:
        return KVLayout(num_layers, num_kv_heads, head_dim, block_size, num_blocks, group, dtype)

    if in_place:
        layout = layout_for(head_group_size or num_kv_heads)
        return CapacityPlan(layout, layout.num_units, 0)
    num_buffers = prefetch_depth + 1
    if device_bytes is None:
        return CapacityPlan(layout_for(head_group_size or 1), 0, num_buffers)
    groups = [head_group_size] if head_group_size else sorted(divisors(num_kv_heads), reverse=True)
    for group in groups:
        layout = layout_for(group)
        if layout.num_units * layout.unit_bytes <= device_bytes:
            return CapacityPlan(layout, layout.num_units, 0)
        if num_buffers * layout.unit_bytes <= device_bytes:
            if page_cache:
                return CapacityPlan(layout, 0, num_buffers, cache_bytes=device_bytes - num_buffers * layout.unit_bytes)
            resident = min(layout.num_units - 1, device_bytes // layout.unit_bytes - num_buffers)
            return CapacityPlan(layout, resident, num_buffers)
    minimum = num_buffers * layout_for(min(groups)).unit_bytes
    raise ValueError(
        f"headinfer: gpu_kv_cache_gib={device_bytes / 2**30:.4f} GiB cannot hold the staging buffers "
        f"({num_buffers} head groups of {min(groups)} KV heads over {num_blocks} blocks); the minimum is "
        f"{minimum / 2**30:.4f} GiB. Raise gpu_kv_cache_gib, lower cpu_kv_cache_gib, or unset gpu_kv_cache_gib"
    )
