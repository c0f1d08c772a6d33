"""Which of vLLM's defaults headinfer changes for long contexts (on CUDA, only where the user chose none)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("headinfer_vllm")

LONG_CONTEXT_BLOCK_SIZE = 256
"""Tokens per page on CUDA when the user sets no --block-size.

vLLM's CUDA default of 16 makes each page of one KV head 8 KiB (Llama-3-8B,
bf16): copies that small run far below PCIe bandwidth, and the block table of
a 1M-token request has 65,536 columns."""
LONG_CONTEXT_PREFILL_TOKENS = 16384
"""Smallest chunked-prefill step on CUDA when the user sets no --max-num-batched-tokens.

Each chunk re-streams the whole past KV over PCIe, so a prompt of n tokens
moves about n²/(2·chunk) tokens of KV: small chunks make prefill PCIe-bound."""


def long_context_defaults_apply() -> bool:
    """Whether headinfer changes vLLM's defaults for long contexts: on CUDA, where pages cross PCIe."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def set_long_context_defaults(vllm_config: VllmConfig) -> None:
    """A page size of at least :data:`LONG_CONTEXT_BLOCK_SIZE` where the user chose none.

    (The chunked-prefill step is raised earlier, where vLLM still knows whether
    the user chose it: ``compat._patch_prefill_chunk_default``.)
    """
    cache = vllm_config.cache_config
    if not long_context_defaults_apply() or getattr(cache, "user_specified_block_size", True):
        return
    if cache.block_size < LONG_CONTEXT_BLOCK_SIZE:
        logger.info(
            "headinfer: block_size %d -> %d tokens (long-context default: fewer, larger page copies; "
            "set --block-size to choose)", cache.block_size, LONG_CONTEXT_BLOCK_SIZE,
        )
        cache.block_size = LONG_CONTEXT_BLOCK_SIZE
    # Why: the worker re-derives the block size from the backend's preference
    # unless the user chose one (Platform.update_block_size_for_backend), which
    # would no longer match num_gpu_blocks_override. Marking it chosen keeps it.
    cache.user_specified_block_size = True


def choose_piecewise_graphs(vllm_config: VllmConfig) -> None:
    """``-cc.cudagraph_mode=FULL`` would raise at KV-cache start-up; fall back with a warning.

    headinfer's attention streams pages and waits on events, so it cannot be
    captured in a CUDA graph; vLLM runs it eagerly between graph pieces.
    """
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode != CUDAGraphMode.FULL:
        return  # every other mode is downgraded by vLLM itself, or has no full graphs
    piecewise = compilation.mode == CompilationMode.VLLM_COMPILE and compilation.splitting_ops_contain_attention()
    compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE if piecewise else CUDAGraphMode.NONE
    logger.warning(
        "headinfer: cudagraph_mode=FULL cannot capture attention that streams KV pages; using %s instead",
        compilation.cudagraph_mode.name,
    )
