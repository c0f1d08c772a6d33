"""The ``"headinfer"`` attention function and mask function for transformers.

transformers looks both up by ``config._attn_implementation``:

- the attention function replaces SDPA in every attention layer and routes the
  layer through :meth:`HeadInferCache.attend`, with the ``sliding_window``,
  ``softcap`` and ``s_aux`` (sinks) that the layer passes;
- the mask function replaces the dense causal mask: HeadInfer builds causal
  masks itself from the step plan, so it only refuses padded batches.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from headinfer_vllm.hf.cache import active_cache
from headinfer_vllm.hf.support import ATTN_IMPLEMENTATION, refuse_padding


def headinfer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact causal attention of one layer over its HeadInferCache.

    Args:
        query: ``[B, Hq, L, D]``.
        key, value: ``[B, Hkv, L, D]``, the new tokens as ``update()`` returned them.
        attention_mask: must be None (see :func:`headinfer_mask`).
        **kwargs: ``sliding_window``, ``softcap`` and ``s_aux`` (``[Hq]``
            sinks) where the family passes them; ``is_causal`` must not be False.

    Returns ``([B, L, Hq, D], None)``: the output, and no attention weights.
    """
    cache = active_cache()
    if cache is None:
        raise RuntimeError(
            f"headinfer: attn_implementation={ATTN_IMPLEMENTATION!r} needs "
            f"past_key_values=HeadInferCache(model.config) and use_cache=True"
        )
    if dropout:
        raise ValueError("headinfer: attention dropout is not supported (inference only; call model.eval())")
    if attention_mask is not None:
        raise ValueError("headinfer: custom attention masks are not supported; attention is always causal")
    is_causal = kwargs.get("is_causal")  # as transformers' SDPA: the argument, else the module's flag
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise ValueError("headinfer: bidirectional attention is not supported; attention is always causal")
    return cache.attend(
        module.layer_idx,
        query,
        key,
        value,
        scaling,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        sinks=kwargs.get("s_aux"),
    ), None


def headinfer_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """No mask: causality comes from the step plan. Refuses padding.

    Args:
        attention_mask: ``[B, past + L]`` bool, or None; False marks padding.
    """
    refuse_padding(attention_mask)


def register() -> None:
    """Register ``"headinfer"`` with transformers' attention and mask interfaces."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, headinfer_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, headinfer_mask)
