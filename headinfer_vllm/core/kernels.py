"""Exact causal attention of a range of KV heads over its paged K/V.

Per step the engine calls ``begin_step(plan)``; per layer ``begin_layer(query,
out, variant)``, then ``attend(first_head, unit, table)`` for each unit it
holds, then ``end_layer()``:

- ``unit``: the pages ``[num_pages, 2, block_size, heads, head_dim]`` of KV
  heads ``first_head .. first_head + heads`` (a staging buffer, or a run of
  resident head groups), in :class:`PageViews`; ``table`` says where the
  step's pages lie in it.
- ``query``, ``out``: ``[num_tokens, num_query_heads, head_dim]``. KV head
  ``h`` serves query heads ``h * q_per_kv .. (h + 1) * q_per_kv``. ``out`` is
  written in place; rows past ``plan.num_tokens`` (padding) are untouched.
- ``variant``: the layer's sliding window, soft-cap and sinks
  (:class:`LayerAttention`); sinks are read at every ``begin_layer``.

Three kernels, chosen once per device and dtype:

- ``flash`` (:class:`FlashKernel`): the FlashAttention that the CUDA vLLM
  wheel bundles reads the paged unit through the page table, for the whole
  batch in one call.
- ``sdpa`` (:class:`TorchKernel`; CPU, and CUDA without vLLM): the step's
  decode tokens in one batched product per unit (:mod:`headinfer_vllm.core.decode`;
  more batches only where lengths differ so much that padding would more than
  double the tokens); each prefill chunk with torch's
  ``scaled_dot_product_attention`` over its gathered K/V (the keys of its
  windows only; on the CPU, a long chunk after earlier tokens as two calls
  merged by log-sum-exp, :func:`split_causal_prefill`), or, in layers with
  soft-capping or sinks, with explicit scores one precision above the cache's.
- ``cpu`` (:class:`CpuKernel`; on the CPU, when asked for): headinfer's C++
  kernels (:mod:`headinfer_vllm.core.cpu_attention`), which read the pages
  where they lie: every decode token of the step in one call per unit, and
  every prefill chunk of the step in one causal, paged, variable-length call
  per unit (no gather); or prefill chunks as ``sdpa`` where torch's SDPA is
  the faster (bf16 on a CPU with AMX tiles that the kernel's build does not
  use; :func:`cpu_prefill_path`), but for chunks of a few tokens
  (:data:`KERNEL_MAX_QUERY_LEN`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Collection
from typing import Protocol

import torch
import torch.nn.functional as F

from headinfer_vllm.core.decode import DecodeBatch
from headinfer_vllm.core.page_store import PageViews
from headinfer_vllm.core.plan import PageTable, RequestSpan, StepPlan
from headinfer_vllm.core.variants import LayerAttention, soft_cap_, softmax_with_sinks_

logger = logging.getLogger(__name__)

SCORES_PER_CHUNK = 1 << 24
"""Scores of the explicit prefill path held at once (64 MiB in float32): longer chunks go by rows."""


class AttentionKernel(Protocol):
    name: str

    def begin_step(self, plan: StepPlan) -> None: ...

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor, variant: LayerAttention) -> None: ...

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
        self._variant_args: dict[str, object] = {}
        """This layer's window and soft-cap, as FlashAttention takes them."""
        self._sinks: torch.Tensor | None = None

    def begin_step(self, plan: StepPlan) -> None:
        self._plan = plan

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor, variant: LayerAttention) -> None:
        assert self._plan is not None
        self._query, self._out = query[: self._plan.num_tokens], out[: self._plan.num_tokens]
        window = variant.sliding_window
        # As vLLM's FlashAttention backend: keys p - (window - 1) .. p for the query at p; 0: no cap.
        self._variant_args = {
            "window_size": None if window is None else [window - 1, 0],
            "softcap": variant.logits_soft_cap or 0.0,
        }
        self._sinks = variant.sinks

    def attend(self, first_head: int, unit: PageViews, table: PageTable) -> None:
        plan = self._plan
        assert plan is not None
        if plan.num_tokens == 0:
            return
        heads = slice(first_head * self.query_per_kv, (first_head + unit.pages.shape[3]) * self.query_per_kv)
        # s_aux only with sinks: FlashAttention 2 (and older wheels) take no such argument.
        sinks = {} if self._sinks is None else {"s_aux": self._sinks[heads]}
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
            **self._variant_args,
            **sinks,
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
        """Of the decode product and explicit prefill scores: one precision above the cache's
        (see :mod:`headinfer_vllm.core.decode`)."""
        self.expand_grouped_heads = expand_grouped_heads
        """Give each query head its own K/V copy for prefill chunks (see :func:`sdpa_needs_expanded_heads`)."""
        self._plan: StepPlan | None = None
        self._decodes: list[DecodeBatch] = []
        self._prefills: list[tuple[int, RequestSpan]] = []
        self._prefill_index: dict[tuple[PageTable, int, int, int], torch.Tensor] = {}
        self._visible: dict[tuple[int, int | None], torch.Tensor] = {}
        self._query = self._out = torch.empty(0)
        self._variant = LayerAttention()
        self._sinks: torch.Tensor | None = None
        """shape: [num_query_heads], the compute dtype: this layer's sinks."""

    def begin_step(self, plan: StepPlan) -> None:
        self._plan = plan
        self._decodes = [
            DecodeBatch(plan, batch, query_per_kv=self.query_per_kv, compute_dtype=self.compute_dtype)
            for batch in decode_batches(plan.requests)
        ]
        self._prefills = [(index, request) for index, request in enumerate(plan.requests) if request.query_len > 1]
        self._prefill_index = {}
        self._visible = {}

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor, variant: LayerAttention) -> None:
        self._query, self._out, self._variant = query, out, variant
        sinks = variant.sinks
        self._sinks = None if sinks is None else sinks.to(query.device, self.compute_dtype)
        for decode in self._decodes:
            decode.load_queries(query, self.scale, variant, self._sinks)

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
        head_dim, window = head_rows.shape[1], self._variant.sliding_window
        first_key = request.window_start(window)
        num_keys = request.seq_len - first_key
        gather_index = self._prefill_gather_index(index, request, first_key, table, heads, head_dim)
        # [2, 1, heads, num_keys, head_dim], contiguous: torch's fused kernels take 4-D inputs only.
        keys_values = torch.gather(head_rows, 0, gather_index).view(2, 1, heads, num_keys, head_dim)
        k, v = keys_values[0], keys_values[1]
        tokens = slice(request.query_start, request.query_start + request.query_len)
        query_heads = slice(first_head * self.query_per_kv, (first_head + heads) * self.query_per_kv)
        if not self._variant.is_masked_softmax:
            self._attend_scores(tokens, query_heads, k[0], v[0], self._visible_keys(index, request, window))
            return
        q = self._query[tokens, query_heads].transpose(0, 1)[None]  # [1, query_heads, query_len, head_dim]
        causal = window is None or window >= request.seq_len
        if causal and split_causal_prefill(q, request):
            self._out[tokens, query_heads] = prefix_then_causal_attention(q, k, v, self.scale)[0].transpose(0, 1)
            return
        # A window hides keys that the causal mask shows.
        mask = request.causal_mask() if causal else self._visible_keys(index, request, window)
        grouped = self.query_per_kv != 1
        if grouped and self.expand_grouped_heads:
            k, v = (t.repeat_interleave(self.query_per_kv, dim=1) for t in (k, v))
            grouped = False
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=grouped)
        self._out[tokens, query_heads] = result[0].transpose(0, 1)

    def _attend_scores(
        self, tokens: slice, query_heads: slice, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
    ) -> None:
        """Soft-capped scores, the mask, the softmax with sinks, in the compute dtype, by chunks of query rows.

        ``keys``, ``values``: ``[heads, num_keys, head_dim]``; ``visible``: ``[query_len, num_keys]``.
        """
        heads, num_keys, head_dim = keys.shape
        per_kv, dtype = self.query_per_kv, self.compute_dtype
        keys_t, values = keys.transpose(1, 2).to(dtype), values.to(dtype)  # [heads, D, K], [heads, K, D]
        sinks = None if self._sinks is None else self._sinks[query_heads].view(heads, per_kv, 1, 1)
        rows_per_chunk = max(1, SCORES_PER_CHUNK // (heads * per_kv * num_keys))
        for first in range(0, tokens.stop - tokens.start, rows_per_chunk):
            rows = slice(tokens.start + first, min(tokens.start + first + rows_per_chunk, tokens.stop))
            num_rows = rows.stop - rows.start
            # [rows, heads * per_kv, D] -> [heads, per_kv, rows, D] -> [heads, per_kv * rows, D], copied.
            q = self._query[rows, query_heads].view(num_rows, heads, per_kv, head_dim).permute(1, 2, 0, 3)
            q = q.to(dtype, memory_format=torch.contiguous_format).view(heads, -1, head_dim).mul_(self.scale)
            scores = torch.bmm(q, keys_t).view(heads, per_kv, num_rows, num_keys)
            soft_cap_(scores, self._variant.logits_soft_cap)
            scores.masked_fill_(visible[first : first + num_rows].logical_not(), float("-inf"))
            if sinks is None:
                scores = torch.softmax(scores, -1)
            else:
                softmax_with_sinks_(scores, sinks)
            result = torch.bmm(scores.view(heads, -1, num_keys), values)  # [heads, per_kv * rows, D]
            self._out[rows, query_heads] = result.view(-1, num_rows, head_dim).transpose(0, 1)

    def _visible_keys(self, index: int, request: RequestSpan, window: int | None) -> torch.Tensor:
        """``[query_len, seq_len - first_key]`` bool: whether each query sees each key from the window's first."""
        visible = self._visible.get((index, window))
        if visible is None:
            device = self._query.device
            queries = torch.arange(request.seq_len - request.query_len, request.seq_len, device=device)[:, None]
            keys = torch.arange(request.window_start(window), request.seq_len, device=device)
            visible = keys <= queries
            if window is not None:
                visible &= keys > queries - window
            self._visible[(index, window)] = visible
        return visible

    def _prefill_gather_index(
        self, index: int, request: RequestSpan, first_key: int, table: PageTable, heads: int, head_dim: int
    ) -> torch.Tensor:
        """Rows of ``head_rows`` ``[2 * heads * num_keys, head_dim]`` (expanded) of a request's K, then V,
        from position ``first_key`` on."""
        key = (table, index, heads, first_key)
        gather_index = self._prefill_index.get(key)
        if gather_index is None:
            assert self._plan is not None
            block_size, device = self._plan.block_size, table.block_table.device
            positions = torch.arange(first_key, request.seq_len, device=device)
            pages = table.block_table[index].long()[positions // block_size]
            key_rows = pages * (2 * block_size) + positions % block_size
            token_rows = torch.stack((key_rows, key_rows + block_size))  # [2, num_keys]
            source_rows = token_rows[:, None] * heads + torch.arange(heads, device=device)[:, None]
            gather_index = source_rows.flatten()[:, None].expand(-1, head_dim)
            self._prefill_index[key] = gather_index
        return gather_index


PREFILL_ENV = "HEADINFER_CPU_PREFILL"
"""How :class:`CpuKernel` attends prefill chunks: ``kernel``, ``sdpa`` or ``auto`` (the default)."""


def cpu_prefill_path(dtype: torch.dtype) -> str:
    """``$HEADINFER_CPU_PREFILL`` if set, else ``sdpa`` for bfloat16 on a CPU with AMX tiles where the C++
    kernel's prefill does not multiply with them (a build without AMX: an older compiler,
    ``$HEADINFER_CPU_ATTENTION_ISA=avx512``), else ``kernel``.

    torch's SDPA multiplies bf16 there with AMX in large blocks, faster than the C++ kernel's fp32 FMAs
    (:class:`CpuKernel` still sends short chunks to the kernel). The kernel's own AMX prefill is faster
    than SDPA for every shape measured (``benchmarks/bench_sdpa_prefill.py``, ``amx`` rows, 2 Sapphire
    Rapids cores: SDPA's time over the kernel's from 1.14 for 1,024 query tokens over 4,096 keys to 2.36
    for 8 requests of 256 tokens over 500; see the README). Builds the C++ kernel (cached) to ask for its
    prefill path.

    Raises:
        ValueError: an unknown ``$HEADINFER_CPU_PREFILL``.
    """
    path = os.environ.get(PREFILL_ENV) or "auto"
    if path not in ("auto", "kernel", "sdpa"):
        raise ValueError(f"headinfer: ${PREFILL_ENV}={path!r}; choose one of auto, kernel, sdpa")
    if path != "auto":
        return path
    if dtype != torch.bfloat16 or not torch.cpu._is_amx_tile_supported():
        return "kernel"
    from headinfer_vllm.core import cpu_attention

    return "kernel" if cpu_attention.prefill_instruction_path() == "amx" else "sdpa"


SPLIT_MIN_QUERY_LEN = 512
"""Query tokens from which a causal chunk after earlier tokens goes through two flash calls on the CPU
(:func:`split_causal_prefill`). Measured by ``benchmarks/bench_sdpa_prefill.py`` (bf16, 32 query / 8 KV
heads, 2 Sapphire Rapids cores, medians of 5 alternated calls; ``benchmarks/results/bench_sdpa_prefill.json``),
masked time over split time after 500 / 4,000 earlier tokens: 0.63 / 0.98 for 16 query tokens, 0.50 / 1.01
for 64, 0.83 / 1.16 for 256, 0.94 / 1.15 for 1,024: below a few hundred query tokens the merge costs more
than the mask saves; the gain grows with the earlier tokens (1.34x per layer for an 8K prompt's chunks
of 2,048)."""


def split_causal_prefill(query: torch.Tensor, request: RequestSpan) -> bool:
    """Whether a causal chunk goes through :func:`prefix_then_causal_attention`: on the CPU, in the
    dtypes of torch's CPU flash kernel, for a chunk of at least :data:`SPLIT_MIN_QUERY_LEN` tokens that
    follows earlier tokens of its request.

    Why: torch runs a lower-right causal mask on the CPU by materializing it, which makes its flash
    kernel score every (query, key) pair and apply the mask. Measured on 2 Sapphire Rapids cores
    (bf16, 32 query / 8 KV heads, an 8,192-token prompt in chunks of 2,048, one layer, medians of 3
    alternated runs, `benchmarks/bench_cpu_prefill.py`'s layer): 2.20 s masked, 1.67 s split
    (1.34x). A first chunk (no earlier tokens) is causal as torch defines it already, and goes
    the usual way: torch's CPU flash kernel fails on an empty key set (SIGFPE, torch 2.13).
    """
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and SPLIT_MIN_QUERY_LEN <= request.query_len < request.seq_len
    )


def prefix_then_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of a chunk's queries that follow ``seq_len - query_len`` earlier tokens, as
    two calls of torch's CPU flash kernel merged by their log-sum-exps: every query over the earlier
    tokens' keys (no mask), and the chunk over its own keys (causal, square).

    ``query``: ``[1, query_heads, query_len, D]``; ``key``, ``value``: ``[1, kv_heads, seq_len, D]``
    (``query_heads`` a multiple of ``kv_heads``). Returns ``[1, query_heads, query_len, D]`` in the
    query's dtype; the merge is in float32.

    The unmasked call takes a KV head's query heads as one set of rows (``[1, kv_heads, query_len *
    per_kv, D]``, token-major): each key block then serves all of them at once. Measured 1.07x faster
    than torch's own grouping (1,024 queries over 3,072 keys, bf16, 32 query / 8 KV heads, one
    Sapphire Rapids core, CPU time, the query's copy included; median of 7 alternated calls, every
    one of them faster).
    """
    _, query_heads, query_len, head_dim = query.shape
    kv_heads = key.shape[1]
    per_kv, prefix_len = query_heads // kv_heads, key.shape[2] - query_len
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # [1, H, L, D] -> [kv_heads, L, per_kv, D] (row = token * per_kv + i), copied.
    rows = query[0].view(kv_heads, per_kv, query_len, head_dim).transpose(1, 2).reshape(1, kv_heads, -1, head_dim)
    prefix, prefix_lse = flash(rows, key[:, :, :prefix_len], value[:, :, :prefix_len], 0.0, False, scale=scale)[:2]
    prefix = prefix.view(kv_heads, query_len, per_kv, head_dim)
    prefix_lse = prefix_lse.view(kv_heads, query_len, per_kv)
    chunk, chunk_lse = flash(query, key[:, :, prefix_len:], value[:, :, prefix_len:], 0.0, True, scale=scale)[:2]
    # The softmax over both key sets weighs the two partial outputs by exp(lse) each: prefix by
    # w = sigmoid(prefix_lse - chunk_lse), chunk by 1 - w; in float32. The weights head by head, and
    # the rest in separate multiplies and adds (each rounded once, whatever the vector width), so that
    # a head's result does not depend on how many heads the call has: torch's elementwise kernels
    # take a scalar path for a tensor's last elements, whose exp can differ from the vector path's
    # in the last bit (the engine's streamed and resident units must agree bit for bit).
    weight = torch.stack([
        torch.sigmoid(prefix_lse[group, :, member] - chunk_lse[0, group * per_kv + member])
        for group in range(kv_heads) for member in range(per_kv)
    ]).unsqueeze(-1)  # [H, L, 1]
    # [kv_heads, L, per_kv, D] -> [H, L, D], copied in float32.
    prefix_rows = torch.empty(query_heads, query_len, head_dim, dtype=torch.float32)
    prefix_rows.view(kv_heads, per_kv, query_len, head_dim).copy_(prefix.transpose(1, 2))
    merged = chunk[0].float().mul_(1 - weight).add_(prefix_rows.mul_(weight))
    return merged.to(query.dtype)[None]


KERNEL_MAX_QUERY_LEN = 16
"""With ``prefill="sdpa"``, chunks of at most this many query tokens still go through the C++ prefill
kernel. Measured by ``benchmarks/bench_sdpa_prefill.py`` (one layer, bf16, 32 query / 8 KV heads, 8
requests over 500 keys, 2 Sapphire Rapids cores, medians of 5 alternated runs), SDPA's time over the
kernel's with its fp32 FMA prefill (the one this path runs with): 2.34 for 8 query tokens per request, 1.72
for 32, 0.99 for 64 (3.04, 2.45 and 2.17 with its AMX prefill): the gather and the SDPA call cost more than
a few queries' arithmetic.
Such chunks are a prompt's last tokens after a prefix-cache hit, or the tail of a chunked prefill."""


class CpuKernel(TorchKernel):
    """Decode tokens through the C++ decode kernel over the pages in place, every decode token of the
    step in one call per unit; prefill chunks (query length > 1) through the C++ prefill kernel, every
    chunk of the step in one call per unit (``prefill="kernel"``), or, but for chunks of at most
    :data:`KERNEL_MAX_QUERY_LEN` tokens, as :class:`TorchKernel` (a gather and one SDPA call per request,
    ``prefill="sdpa"``); see :func:`cpu_prefill_path`."""

    name = "cpu"

    def __init__(self, *, scale: float, query_per_kv: int, dtype: torch.dtype, num_threads: int | None = None,
                 prefill: str | None = None) -> None:
        """``num_threads``: the C++ kernels' threads; None: torch's count. ``prefill``: ``kernel`` or
        ``sdpa``; None: :func:`cpu_prefill_path`."""
        from headinfer_vllm.core import cpu_attention

        super().__init__(scale=scale, query_per_kv=query_per_kv, dtype=dtype, expand_grouped_heads=False)
        self.prefill_path = prefill or cpu_prefill_path(dtype)
        if self.prefill_path not in ("kernel", "sdpa"):
            raise ValueError(f"headinfer: CpuKernel(prefill={prefill!r}); choose kernel or sdpa")
        path = cpu_attention.instruction_path()  # builds it now (cached): a missing compiler stops start-up
        logger.info(
            "headinfer: CPU attention in place: decode tokens through the C++ kernel (%s path), prefill chunks "
            "through %s", path,
            f"the C++ paged prefill kernel ({cpu_attention.prefill_instruction_path()} path)"
            if self.prefill_path == "kernel" else
            "a gather and torch's SDPA per request (bf16 on an AMX CPU, the kernel built without AMX; "
            f"$HEADINFER_CPU_PREFILL=kernel for the C++ kernel) but for chunks of <= {KERNEL_MAX_QUERY_LEN} tokens",
        )
        self._decode_attention = cpu_attention.decode_attention_units
        self._prefill_attention = cpu_attention.prefill_attention_units
        self._make_units = cpu_attention.KernelUnits
        self._kernel_units: dict[tuple[PageViews, int], cpu_attention.KernelUnits] = {}
        """Per (pages, first KV head) attended, the unit made once for the kernels (a fixed set: the staging
        buffers and resident runs, made once, times their heads)."""
        self._num_threads = num_threads
        self._decode = _RequestRows.empty()
        self._prefill = _RequestRows.empty()
        self._decode_query = self._decode_out = torch.empty(0)
        """shape: [R, num_query_heads, D]: this layer's decode queries and outputs."""
        self._kernel_sinks: torch.Tensor | None = None
        """shape: [num_query_heads], float32: this layer's sinks, as the C++ kernels take them."""

    def begin_step(self, plan: StepPlan) -> None:
        super().begin_step(plan)
        self._decodes = []  # decode tokens go through the C++ kernel instead
        self._decode = _RequestRows.of(plan, [i for i, request in enumerate(plan.requests) if request.query_len == 1])
        kernel_chunks, sdpa_chunks = [], []
        for index, request in self._prefills:
            (kernel_chunks if self._in_kernel(request) else sdpa_chunks).append((index, request))
        self._prefill = _RequestRows.of(plan, [index for index, _ in kernel_chunks])
        self._prefills = sdpa_chunks

    def _in_kernel(self, request: RequestSpan) -> bool:
        """Whether a prefill chunk goes through the C++ prefill kernel (else SDPA)."""
        return self.prefill_path == "kernel" or request.query_len <= KERNEL_MAX_QUERY_LEN

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor, variant: LayerAttention) -> None:
        super().begin_layer(query, out, variant)
        self._kernel_sinks = None if variant.sinks is None else variant.sinks.to(torch.float32).contiguous()
        if self._decode.count:
            self._decode_query = query.index_select(0, self._decode.starts.long())
            self._decode_out = torch.zeros_like(self._decode_query)

    def attend(self, first_head: int, unit: PageViews, table: PageTable) -> None:
        variant = self._variant
        options = {
            "query_per_kv": self.query_per_kv, "sliding_window": variant.sliding_window or 0,
            "logits_soft_cap": variant.logits_soft_cap or 0.0, "sinks": self._kernel_sinks,
            "num_threads": self._num_threads,
        }
        units = self._kernel_units.get((unit, first_head))
        if units is None:
            units = self._kernel_units[unit, first_head] = self._make_units([(first_head, unit.pages)])
        if self._prefill.count:
            prefill = self._prefill
            self._prefill_attention(
                self._query, units, prefill.starts, prefill.query_lens, prefill.block_table(table), prefill.seq_lens,
                self.scale, out=self._out, **options,
            )
        for index, request in self._prefills:
            self._attend_prefill(index, request, first_head, unit.head_rows, unit.pages.shape[3], table)
        if self._decode.count:
            decode = self._decode
            self._decode_attention(
                self._decode_query, units, decode.block_table(table), decode.seq_lens, self.scale,
                out=self._decode_out, **options,
            )

    def end_layer(self) -> None:
        if self._decode.count:
            self._out.index_copy_(0, self._decode.starts.long(), self._decode_out)


class _RequestRows:
    """Some requests of a step as the C++ kernels take them: int32 ``[R]`` tensors of their first
    query row, query length and sequence length, and their rows of each page table (cached)."""

    def __init__(self, indices: torch.Tensor, starts: torch.Tensor, query_lens: torch.Tensor, seq_lens: torch.Tensor):
        self.indices, self.starts, self.query_lens, self.seq_lens = indices, starts, query_lens, seq_lens
        self.count = len(indices)
        self._tables: dict[PageTable, torch.Tensor] = {}

    @classmethod
    def of(cls, plan: StepPlan, indices: list[int]) -> _RequestRows:
        requests = [plan.requests[index] for index in indices]
        return cls(
            torch.tensor(indices, dtype=torch.int64),
            torch.tensor([request.query_start for request in requests], dtype=torch.int32),
            torch.tensor([request.query_len for request in requests], dtype=torch.int32),
            torch.tensor([request.seq_len for request in requests], dtype=torch.int32),
        )

    @classmethod
    def empty(cls) -> _RequestRows:
        none = torch.empty(0, dtype=torch.int32)
        return cls(torch.empty(0, dtype=torch.int64), none, none, none)

    def block_table(self, table: PageTable) -> torch.Tensor:
        """``[R, max_blocks]`` int32, contiguous: these requests' rows of ``table``."""
        rows = self._tables.get(table)
        if rows is None:
            rows = table.block_table.index_select(0, self.indices).to(torch.int32).contiguous()
            self._tables[table] = rows
        return rows


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
    sinks_dtypes: Collection[torch.dtype] = (),
    cpu_kernel: bool = False,
    cpu_threads: int | None = None,
) -> AttentionKernel:
    """The fastest exact kernel for this device, dtype, page size and head size; chosen once.

    ``flash_version``: the FlashAttention version to run (vLLM's adapter passes
    vLLM's own choice); None probes the wheel. FlashAttention needs CUDA, fp16
    or bf16, pages of a multiple of 16 tokens, and a head size that is a
    multiple of 8 up to 256; attention sinks (``sinks_dtypes``: the dtypes of
    the layers' sinks, empty without any) need version 3 or later, and
    bfloat16 sinks (what its ``s_aux`` takes). Anything else runs on torch,
    on the CPU with headinfer's C++ decode kernel if ``cpu_kernel`` (with
    ``cpu_threads`` threads; None: torch's count).
    """
    if cpu_kernel and device.type == "cpu":
        return CpuKernel(scale=scale, query_per_kv=query_per_kv, dtype=dtype, num_threads=cpu_threads)
    flash_fits = (
        allow_flash
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and block_size % 16 == 0
        and head_dim % 8 == 0
        and head_dim <= 256
    )
    version = (flash_version if flash_version is not None else probe_flash_version()) if flash_fits else None
    takes_sinks = not sinks_dtypes or (version is not None and version >= 3 and set(sinks_dtypes) == {torch.bfloat16})
    if version is not None and takes_sinks:
        return FlashKernel(version=version, scale=scale, query_per_kv=query_per_kv)
    return TorchKernel(
        scale=scale,
        query_per_kv=query_per_kv,
        dtype=dtype,
        expand_grouped_heads=sdpa_needs_expanded_heads(device, dtype, head_dim),
    )
