"""Which transformers models the HeadInfer cache serves, and their KV geometry."""

from __future__ import annotations

import dataclasses

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""``config.model_type`` of the families whose attention routes through ``"headinfer"``."""

ATTN_IMPLEMENTATION = "headinfer"


def refuse_padding(attention_mask) -> None:
    """Raise if ``attention_mask`` (``[B, tokens]``, or None) marks any padding: rows must be equal-length."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "headinfer: padded batches are not supported (the attention_mask has zeros); "
            "batch only prompts of equal length, or run them one at a time"
        )


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
    """Head counts and sizes of a model's attention layers."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    """Tokens each query sees in a windowed model, None for full attention."""


def attention_geometry(config) -> AttentionGeometry:
    """Validate a model config and return its attention geometry.

    Raises ``ValueError`` naming the supported families for any other model
    type, and for layer types other than full or sliding attention.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"headinfer: model type {model_type!r} is not supported; HeadInferCache supports the "
            f"Llama, Mistral and Qwen2 families (model_type in {SUPPORTED_MODEL_TYPES})"
        )
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"headinfer: layer types {unknown} of this {model_type} model cannot be routed")
    windowed = model_type == "mistral" or "sliding_attention" in layer_types
    num_query_heads = config.num_attention_heads
    return AttentionGeometry(
        num_layers=config.num_hidden_layers,
        num_query_heads=num_query_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_query_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_query_heads,
        sliding_window=getattr(config, "sliding_window", None) if windowed else None,
    )


def check_window(geometry: AttentionGeometry, max_tokens: int) -> None:
    """Refuse a sliding window that a sequence of ``max_tokens`` would exceed.

    A query at position ``i`` sees keys ``j`` with ``i - j < window``, so a
    window of at least the cache's capacity never masks anything and
    attention stays exact.
    """
    window = geometry.sliding_window
    if window is not None and window < max_tokens:
        raise ValueError(
            f"headinfer: this model uses a sliding window of {window} tokens, below the cache capacity "
            f"of {max_tokens} tokens; windowed attention is not supported (use a config with "
            f"sliding_window=None, or a cache of at most {window} tokens)"
        )
