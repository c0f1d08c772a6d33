"""Exact causal attention of a range of KV heads over its paged K/V.

Per step the engine calls ``begin_step(plan)``; per layer ``begin_layer(query,
out)``, then ``attend(first_head, unit, table)`` for each unit it holds, then
``end_layer()``:

- ``unit``: the pages ``[num_pages, 2, block_size, heads, head_dim]`` of KV
  heads ``first_head .. first_head + heads`` (a staging buffer, or a run of
  resident head groups), in :class:`PageViews`; ``table`` says where the
  step's pages lie in it.
- ``query``, ``out``: ``[num_tokens, num_query_heads, head_dim]``. KV head
  ``h`` serves query heads ``h * q_per_kv .. (h + 1) * q_per_kv``. ``out`` is
  written in place; rows past ``plan.num_tokens`` (padding) are untouched.

Two kernels, chosen once per device and dtype:

- ``flash`` (:class:`FlashKernel`): the FlashAttention that the CUDA vLLM
  wheel bundles reads the paged unit through the page table, for the whole
  batch in one call.
- ``sdpa`` (:class:`TorchKernel`; CPU, and CUDA without vLLM): the step's
  decode tokens in one batched product per unit (:mod:`headinfer_vllm.core.decode`;
  more batches only where lengths differ so much that padding would more than
  double the tokens); each prefill chunk with torch's
  ``scaled_dot_product_attention`` over its gathered K/V.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from headinfer_vllm.core.decode import DecodeBatch
from headinfer_vllm.core.page_store import PageViews
from headinfer_vllm.core.plan import PageTable, RequestSpan, StepPlan


class AttentionKernel(Protocol):
    name: str

    def begin_step(self, plan: StepPlan) -> None: ...

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor) -> None: ...

    def attend(self, first_head: int, unit: PageViews, table: PageTable) -> None: ...

    def end_layer(self) -> None: ...


class FlashKernel:
    """vLLM's FlashAttention over the paged unit, the whole batch per call."""

    name = "flash"

    def __init__(self, *, version: int, scale: float, query_per_kv: int) -> None:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        self._flash_attn_varlen_func = flash_attn_varlen_func
        self.version = version
        self.scale = scale
        self.query_per_kv = query_per_kv
        self._plan: StepPlan | None = None
        self._query = self._out = torch.empty(0)

    def begin_step(self, plan: StepPlan) -> None:
        self._plan = plan

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor) -> None:
        assert self._plan is not None
        self._query, self._out = query[: self._plan.num_tokens], out[: self._plan.num_tokens]

    def attend(self, first_head: int, unit: PageViews, table: PageTable) -> None:
        plan = self._plan
        assert plan is not None
        if plan.num_tokens == 0:
            return
        heads = slice(first_head * self.query_per_kv, (first_head + unit.pages.shape[3]) * self.query_per_kv)
        self._flash_attn_varlen_func(
            q=self._query[:, heads],
            k=unit.pages[:, 0],
            v=unit.pages[:, 1],
            cu_seqlens_q=plan.query_start_loc,
            max_seqlen_q=plan.max_query_len,
            seqused_k=plan.seq_lens,
            max_seqlen_k=plan.max_seq_len,
            softmax_scale=self.scale,
            causal=True,
            block_table=table.block_table,
            out=self._out[:, heads],
            fa_version=self.version,
        )

    def end_layer(self) -> None:
        pass


class TorchKernel:
    """Decode tokens in batches (:class:`DecodeBatch`); each prefill chunk through torch SDPA."""

    name = "sdpa"

    def __init__(self, *, scale: float, query_per_kv: int, dtype: torch.dtype, expand_grouped_heads: bool) -> None:
        self.scale = scale
        self.query_per_kv = query_per_kv
        self.compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
        """Of the decode product: one precision above the cache's (see :mod:`headinfer_vllm.core.decode`)."""
        self.expand_grouped_heads = expand_grouped_heads
        """Give each query head its own K/V copy for prefill chunks (see :func:`sdpa_needs_expanded_heads`)."""
        self._plan: StepPlan | None = None
        self._decodes: list[DecodeBatch] = []
        self._prefills: list[tuple[int, RequestSpan]] = []
        self._prefill_index: dict[tuple[PageTable, int, int], torch.Tensor] = {}
        self._query = self._out = torch.empty(0)

    def begin_step(self, plan: StepPlan) -> None:
        self._plan = plan
        self._decodes = [
            DecodeBatch(plan, batch, query_per_kv=self.query_per_kv, compute_dtype=self.compute_dtype)
            for batch in decode_batches(plan.requests)
        ]
        self._prefills = [(index, request) for index, request in enumerate(plan.requests) if request.query_len > 1]
        self._prefill_index = {}

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor) -> None:
        self._query, self._out = query, out
        for decode in self._decodes:
            decode.load_queries(query, self.scale)

    def attend(self, first_head: int, unit: PageViews, table: PageTable) -> None:
        heads = unit.pages.shape[3]
        for decode in self._decodes:
            decode.attend(first_head, unit.head_rows, heads, table)
        for index, request in self._prefills:
            self._attend_prefill(index, request, first_head, unit.head_rows, heads, table)

    def end_layer(self) -> None:
        for decode in self._decodes:
            decode.store_outputs(self._out)

    def _attend_prefill(
        self, index: int, request: RequestSpan, first_head: int, head_rows: torch.Tensor, heads: int, table: PageTable
    ) -> None:
        head_dim = head_rows.shape[1]
        gather_index = self._prefill_gather_index(index, request, table, heads, head_dim)
        # [2, 1, heads, seq_len, head_dim], contiguous: torch's fused kernels take 4-D inputs only.
        keys_values = torch.gather(head_rows, 0, gather_index).view(2, 1, heads, request.seq_len, head_dim)
        k, v = keys_values[0], keys_values[1]
        tokens = slice(request.query_start, request.query_start + request.query_len)
        query_heads = slice(first_head * self.query_per_kv, (first_head + heads) * self.query_per_kv)
        q = self._query[tokens, query_heads].transpose(0, 1)[None]  # [1, query_heads, query_len, head_dim]
        grouped = self.query_per_kv != 1
        if grouped and self.expand_grouped_heads:
            k, v = (t.repeat_interleave(self.query_per_kv, dim=1) for t in (k, v))
            grouped = False
        result = F.scaled_dot_product_attention(
            q, k, v, attn_mask=request.causal_mask(), scale=self.scale, enable_gqa=grouped
        )
        self._out[tokens, query_heads] = result[0].transpose(0, 1)

    def _prefill_gather_index(
        self, index: int, request: RequestSpan, table: PageTable, heads: int, head_dim: int
    ) -> torch.Tensor:
        """Rows of ``head_rows`` ``[2 * heads * seq_len, head_dim]`` (expanded) of a request's K, then V."""
        key = (table, index, heads)
        gather_index = self._prefill_index.get(key)
        if gather_index is None:
            assert self._plan is not None
            block_size, device = self._plan.block_size, table.block_table.device
            positions = torch.arange(request.seq_len, device=device)
            pages = table.block_table[index].long()[positions // block_size]
            key_rows = pages * (2 * block_size) + positions % block_size
            token_rows = torch.stack((key_rows, key_rows + block_size))  # [2, seq_len]
            source_rows = token_rows[:, None] * heads + torch.arange(heads, device=device)[:, None]
            gather_index = source_rows.flatten()[:, None].expand(-1, head_dim)
            self._prefill_index[key] = gather_index
        return gather_index


def decode_batches(requests: tuple[RequestSpan, ...], max_padding: float = 2.0) -> list[list[int]]:
    """Decode requests (query length 1) in batches, each request padded to at most ``max_padding``
    times its length; each batch in batch order. Similar lengths make one batch."""
    decode = sorted(
        (index for index, request in enumerate(requests) if request.query_len == 1),
        key=lambda index: -requests[index].seq_len,
    )
    batches: list[list[int]] = []
    longest = 0
    for index in decode:
        if batches and longest <= max_padding * requests[index].seq_len:
            batches[-1].append(index)
        else:
            batches.append([index])
            longest = requests[index].seq_len
    return [sorted(batch) for batch in batches]


def sdpa_needs_expanded_heads(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether SDPA must give each query head its own K/V copy for a lower-right causal mask.

    On CUDA, torch runs that mask with GQA only in FlashAttention (fp16 or bf16,
    head_dim a multiple of 8 up to 256, compute capability 8.0+); otherwise it
    materializes the ``[query_len, seq_len]`` mask for the math kernel, whose
    scores outgrow the GPU at long contexts. Without GQA the memory-efficient
    kernel applies the mask itself. (On CPU the mask is materialized either way.)
    """
    if device.type != "cuda":
        return False
    flash = (
        dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )
    return not flash


@functools.cache
def probe_flash_version() -> int | None:
    """The newest FlashAttention of the vLLM wheel that runs on this GPU (3, 2), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.vllm_flash_attn import is_fa_version_supported
    except Exception:  # ImportError, or a wheel built for another CUDA
        return None
    return next((version for version in (3, 2) if is_fa_version_supported(version)), None)


def select_kernel(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    head_dim: int,
    *,
    scale: float,
    query_per_kv: int,
    allow_flash: bool = True,
    flash_version: int | None = None,
) -> AttentionKernel:
    """The fastest exact kernel for this device, dtype, page size and head size; chosen once.

    ``flash_version``: the FlashAttention version to run (vLLM's adapter passes
    vLLM's own choice); None probes the wheel. FlashAttention needs CUDA, fp16
    or bf16, pages of a multiple of 16 tokens, and a head size that is a
    multiple of 8 up to 256; anything else runs on torch.
    """
    flash_fits = (
        allow_flash
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and block_size % 16 == 0
        and head_dim % 8 == 0
        and head_dim <= 256
    )
    version = (flash_version if flash_version is not None else probe_flash_version()) if flash_fits else None
    if version is not None:
        return FlashKernel(version=version, scale=scale, query_per_kv=query_per_kv)
    return TorchKernel(
        scale=scale,
        query_per_kv=query_per_kv,
        dtype=dtype,
        expand_grouped_heads=sdpa_needs_expanded_heads(device, dtype, head_dim),
    )
