"""The head page store: where every page of every (layer, head group) lives.

::

    host tier (pinned)            device tier
    +-------------------------+   +---------------------------------------+
    | streamed units          |   | resident units  | staging ring         |
    | [S, N, 2, B, G, D]      |   | [R, N, 2, B, G, D] | [P+1, N, 2, B, G, D] |
    +-------------------------+   +---------------------------------------+
      home of streamed pages        home of resident     loaded per step,
                                    pages                reused every unit

    N blocks, B tokens per block, G KV heads per unit, D head dim,
    S streamed units, R resident units, P prefetch depth.

All tensors are allocated once, here. The device tier is checked against its
budget at construction and never grows.
"""

from __future__ import annotations

import torch

from headinfer_vllm.core.host_memory import allocate_host
from headinfer_vllm.core.layout import CapacityPlan, KVLayout
from headinfer_vllm.core.residency import ResidencyPolicy, SpreadAcrossLayers, Unit


class HeadPageStore:
    """Host and device tiers of a head-paged KV cache."""

    def __init__(
        self,
        layout: KVLayout,
        *,
        resident_units: frozenset[Unit],
        num_staging_buffers: int,
        device: torch.device | str,
        device_budget_bytes: int | None = None,
    ) -> None:
        self.layout = layout
        self.device = torch.device(device)
        units = [(layer, group) for layer in range(layout.num_layers) for group in range(layout.num_groups)]
        unknown = set(resident_units) - set(units)
        if unknown:
            raise ValueError(f"headinfer: resident units {sorted(unknown)} do not exist")
        streamed = [unit for unit in units if unit not in resident_units]
        resident = [unit for unit in units if unit in resident_units]
        if streamed and num_staging_buffers < 2:
            raise ValueError("headinfer: streamed units need at least 2 staging buffers")
        if not streamed:
            num_staging_buffers = 0
        self.streamed_units: tuple[Unit, ...] = tuple(streamed)
        """Streamed units in execution order (layer-major)."""
        self._host_index = {unit: i for i, unit in enumerate(streamed)}
        self._resident_index = {unit: i for i, unit in enumerate(resident)}

        device_bytes = (len(resident) + num_staging_buffers) * layout.unit_bytes
        if device_budget_bytes is not None and device_bytes > device_budget_bytes:
            raise ValueError(
                f"headinfer: the device tier needs {device_bytes} bytes "
                f"({len(resident)} resident + {num_staging_buffers} staging units of "
                f"{layout.unit_bytes} bytes) but the budget is {device_budget_bytes} bytes"
            )
        self.host = allocate_host(
            (len(streamed), *layout.unit_shape), layout.dtype, pin=self.device.type == "cuda"
        )
        # host: [S, N, 2, B, G, D]
        self.resident = torch.empty(
            (len(resident), *layout.unit_shape), dtype=layout.dtype, device=self.device
        )
        # resident: [R, N, 2, B, G, D]
        self.staging = torch.empty(
            (num_staging_buffers, *layout.unit_shape), dtype=layout.dtype, device=self.device
        )
        # staging: [P + 1, N, 2, B, G, D]

    @classmethod
    def from_plan(
        cls,
        plan: CapacityPlan,
        device: torch.device | str,
        policy: ResidencyPolicy | None = None,
    ) -> HeadPageStore:
        layout = plan.layout
        policy = policy or SpreadAcrossLayers()
        resident = policy.select(layout.num_layers, layout.num_groups, plan.num_resident_units)
        return cls(
            layout,
            resident_units=resident,
            num_staging_buffers=plan.num_staging_buffers,
            device=device,
            device_budget_bytes=plan.device_bytes,
        )

    @property
    def num_staging_buffers(self) -> int:
        return self.staging.shape[0]

    @property
    def host_bytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    @property
    def device_bytes(self) -> int:
        """Bytes of every device-tier tensor (resident units and staging)."""
        return sum(t.numel() * t.element_size() for t in (self.resident, self.staging))

    def is_resident(self, layer: int, group: int) -> bool:
        return (layer, group) in self._resident_index

    def resident_unit(self, layer: int, group: int) -> torch.Tensor:
        """Device tensor ``[N, 2, B, G, D]`` of a resident unit."""
        return self.resident[self._resident_index[(layer, group)]]

    def host_unit(self, layer: int, group: int) -> torch.Tensor:
        """Host tensor ``[N, 2, B, G, D]`` of a streamed unit."""
        return self.host[self._host_index[(layer, group)]]

    def home(self, layer: int, group: int) -> torch.Tensor:
        if self.is_resident(layer, group):
            return self.resident_unit(layer, group)
        return self.host_unit(layer, group)

    def read_tokens(
        self, layer: int, block_ids: list[int], num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence from the pages' homes (synchronous; for checks).

        Returns two CPU tensors ``[num_tokens, num_kv_heads, head_dim]``.
        """
        layout = self.layout
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # write-backs to the host tier run on a side stream
        keys, values = [], []
        for group in range(layout.num_groups):
            pages = self.home(layer, group)[block_ids].to("cpu")
            # pages: [len(block_ids), 2, B, G, D]
            tokens = pages.transpose(0, 1).reshape(2, -1, layout.head_group_size, layout.head_dim)
            keys.append(tokens[0, :num_tokens])
            values.append(tokens[1, :num_tokens])
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)
