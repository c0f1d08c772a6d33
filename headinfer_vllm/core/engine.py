"""Streamed attention: one model's head-wise offloaded attention, layer by layer.

Per step the caller builds a :class:`StepPlan` and calls :meth:`begin_step`;
per layer it calls :meth:`forward`, which for each head group:

1. takes the group's pages (a resident unit, or a staging buffer that the
   transfer scheduler loaded ahead of time),
2. stores the new tokens' K/V into those pages,
3. computes exact causal attention of the group's query heads,
4. hands the buffer back, which writes the new pages to the host tier.

GQA: KV head ``h`` serves query heads ``h * q_per_kv .. (h + 1) * q_per_kv``.
"""

from __future__ import annotations

import torch

from headinfer_vllm.core.kernels import select_kernel
from headinfer_vllm.core.page_store import HeadPageStore
from headinfer_vllm.core.plan import StepPlan
from headinfer_vllm.core.transfer import TransferScheduler


class StreamedAttention:
    """Exact attention over a :class:`HeadPageStore`, streamed by head group."""

    def __init__(
        self,
        store: HeadPageStore,
        *,
        num_query_heads: int,
        scale: float,
        prefetch_depth: int = 1,
        allow_flash: bool = True,
    ) -> None:
        layout = store.layout
        if num_query_heads % layout.num_kv_heads:
            raise ValueError(
                f"headinfer: {num_query_heads} query heads are not a multiple of "
                f"{layout.num_kv_heads} KV heads"
            )
        self.store = store
        self.scale = scale
        self.query_heads_per_group = num_query_heads // layout.num_kv_heads * layout.head_group_size
        self.transfers = TransferScheduler(store, prefetch_depth)
        self.kernel_name, self._attend = select_kernel(
            store.device, layout.dtype, layout.block_size, layout.head_dim, allow_flash=allow_flash
        )
        self._plan: StepPlan | None = None

    def begin_step(self, plan: StepPlan) -> None:
        """Adopt this step's plan; the first units start loading now."""
        if plan.block_size != self.store.layout.block_size:
            raise ValueError("headinfer: the plan's block_size differs from the store's")
        self._plan = plan
        if self.store.streamed_units:
            self.transfers.begin_step(plan)

    def forward(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of one layer for this step's batch.

        Args:
            query: ``[num_tokens, num_query_heads, head_dim]``.
            key, value: ``[num_tokens, num_kv_heads, head_dim]``, the new
                tokens' K/V (rows past ``plan.num_tokens`` are padding).
            out: ``[num_tokens, num_query_heads, head_dim]``, written in place.

        Returns ``out``.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("headinfer: forward() before begin_step()")
        store = self.store
        heads, query_heads = store.layout.head_group_size, self.query_heads_per_group
        new_keys = key.index_select(0, plan.new_token_index)
        new_values = value.index_select(0, plan.new_token_index)
        # new_keys, new_values: [num_new, num_kv_heads, head_dim]
        for group in range(store.layout.num_groups):
            resident = store.is_resident(layer, group)
            unit = store.resident_unit(layer, group) if resident else self.transfers.acquire((layer, group))
            # unit: [num_blocks, 2, block_size, heads, head_dim]
            kv_heads = slice(group * heads, (group + 1) * heads)
            unit[plan.new_block, 0, plan.new_offset] = new_keys[:, kv_heads]
            unit[plan.new_block, 1, plan.new_offset] = new_values[:, kv_heads]
            q_heads = slice(group * query_heads, (group + 1) * query_heads)
            self._attend(query[:, q_heads], unit, plan, self.scale, out[:, q_heads])
            if not resident:
                self.transfers.release((layer, group))
        return out
