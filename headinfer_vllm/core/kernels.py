"""Exact causal attention of one head group over its paged K/V.

Two kernels, chosen once per device and dtype:

- ``flash``: the FlashAttention that the CUDA vLLM wheel bundles
  (``vllm.vllm_flash_attn.flash_attn_varlen_func``), which reads the paged
  unit through the block table directly, for the whole batch in one call.
- ``sdpa``: torch's ``scaled_dot_product_attention`` per request, over the
  request's pages gathered into a contiguous K/V (CPU, and CUDA without vLLM).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from headinfer_vllm.core.plan import StepPlan

AttendFn = Callable[[torch.Tensor, torch.Tensor, StepPlan, float, torch.Tensor], None]
"""``attend(query, unit, plan, scale, out)``.

query: ``[num_tokens, num_query_heads_of_group, head_dim]``.
unit: ``[num_blocks, 2, block_size, head_group_size, head_dim]``.
out: same shape as query; written in place (rows of padding untouched).
"""


def attend_sdpa(
    query: torch.Tensor,
    unit: torch.Tensor,
    plan: StepPlan,
    scale: float,
    out: torch.Tensor,
    expand_grouped_heads: bool = False,
) -> None:
    """``expand_grouped_heads``: give each query head its own K/V copy for prefill chunks (see
    :func:`sdpa_needs_expanded_heads`)."""
    group, head_dim = unit.shape[3], unit.shape[4]
    for index, request in enumerate(plan.requests):
        rows = slice(request.query_start, request.query_start + request.query_len)
        pages = plan.pages(index)
        # One gather each for K and V ([num_pages, block_size, group, head_dim],
        # contiguous), so flattening the pages into tokens is a view.
        k = unit[pages, 0].reshape(-1, group, head_dim)[: request.seq_len]  # [seq_len, group, head_dim]
        v = unit[pages, 1].reshape(-1, group, head_dim)[: request.seq_len]
        # 4-D [1, heads, tokens, head_dim]: torch's fused kernels (flash, memory
        # efficient) take only 4-D inputs; 3-D falls back to the math kernel.
        q = query[rows].transpose(0, 1)[None]  # [1, query_heads, query_len, head_dim]
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, group, seq_len, head_dim]
        mask = request.causal_mask()
        grouped = q.shape[1] != group
        if grouped and mask is not None and expand_grouped_heads:
            k, v = (t.repeat_interleave(q.shape[1] // group, dim=1) for t in (k, v))
            grouped = False
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=grouped)
        out[rows] = result[0].transpose(0, 1)


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


def attend_flash(
    query: torch.Tensor, unit: torch.Tensor, plan: StepPlan, scale: float, out: torch.Tensor
) -> None:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    num_tokens = plan.num_tokens
    flash_attn_varlen_func(
        q=query[:num_tokens],
        k=unit[:, 0],
        v=unit[:, 1],
        cu_seqlens_q=plan.query_start_loc,
        max_seqlen_q=plan.max_query_len,
        seqused_k=plan.seq_lens,
        max_seqlen_k=plan.max_seq_len,
        softmax_scale=scale,
        causal=True,
        block_table=plan.block_table,
        out=out[:num_tokens],
        fa_version=flash_version(),
    )


@functools.cache
def flash_version() -> int | None:
    """The newest FlashAttention of the vLLM wheel that runs on this GPU (3, 2), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.vllm_flash_attn import is_fa_version_supported
    except Exception:  # ImportError, or a wheel built for another CUDA
        return None
    return next((version for version in (3, 2) if is_fa_version_supported(version)), None)


def select_kernel(
    device: torch.device, dtype: torch.dtype, block_size: int, head_dim: int, allow_flash: bool = True
) -> tuple[str, AttendFn]:
    """The fastest exact kernel for this device, dtype, page size and head size; chosen once."""
    flash_ok = (
        allow_flash
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and block_size % 16 == 0
        and flash_version() is not None
    )
    if flash_ok:
        return "flash", attend_flash
    if sdpa_needs_expanded_heads(device, dtype, head_dim):
        return "sdpa", functools.partial(attend_sdpa, expand_grouped_heads=True)
    return "sdpa", attend_sdpa
