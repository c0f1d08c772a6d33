"""Which units (layer, head group) stay resident on the device.

A policy only chooses *which* units; how many fit is decided by the budgets
(:func:`headinfer_vllm.core.layout.plan_capacity`).
"""

from __future__ import annotations

from typing import Protocol

Unit = tuple[int, int]
"""(layer index, head group index)."""


class ResidencyPolicy(Protocol):
    def select(self, num_layers: int, num_groups: int, count: int) -> frozenset[Unit]:
        """Return ``count`` distinct units to keep on the device."""
        ...


class SpreadAcrossLayers:
    """Group 0 of every layer first, then group 1 of every layer, and so on.

    Spreading the resident units gives every layer a unit that needs no
    transfer, which leaves the copy stream time to prefetch the next layer.
    """

    def select(self, num_layers: int, num_groups: int, count: int) -> frozenset[Unit]:
        if not 0 <= count <= num_layers * num_groups:
            raise ValueError(
                f"headinfer: cannot keep {count} of {num_layers * num_groups} units resident"
            )
        order = [(layer, group) for group in range(num_groups) for layer in range(num_layers)]
        return frozenset(order[:count])
