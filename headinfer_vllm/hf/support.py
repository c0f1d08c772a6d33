"""Which transformers models the HeadInfer cache serves, and each layer's attention.

Every supported family's attention layer calls the attention function with
``scaling=self.scaling`` and some of ``sliding_window``, ``softcap`` and
``s_aux`` (transformers' ``models/<family>/modeling_<family>.py``). The core
must know each layer's window before a step starts (it loads only the pages
in a window), so :func:`attention_geometry` derives them from the config the
way the modeling code does; the ``"headinfer"`` attention function then
checks, layer by layer, that what transformers passes agrees
(:meth:`AttentionGeometry.check_call`).
"""

from __future__ import annotations

import dataclasses
import math

ATTN_IMPLEMENTATION = "headinfer"

ALTERNATIVE = "run it without HeadInfer (transformers' own cache and attention)"


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family's attention layers call the attention function."""

    name: str
    soft_capped: bool = False
    """Passes ``softcap=config.attn_logit_softcapping`` (in every layer)."""
    sinks: bool = False
    """Passes ``s_aux=self.sinks``: one learned logit per query head."""
    query_pre_attn_scalar: bool = False
    """Scales scores by ``config.query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``."""


FAMILIES = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),
    "phi3": Family("Phi-3"),
    "gemma2": Family("Gemma-2", soft_capped=True, query_pre_attn_scalar=True),
    "gemma3_text": Family("Gemma-3 text", query_pre_attn_scalar=True),
    "gpt_oss": Family("gpt-oss", sinks=True),
}
"""Supported ``config.model_type`` values. Windows come from ``layer_types`` where the config has
them (sliding layers: ``config.sliding_window``, the others none), else ``config.sliding_window``
in every layer (Mistral, Phi-3; Llama has none)."""

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
"""``config.model_type`` of the families whose attention routes through ``"headinfer"``."""

ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}

REFUSED_MODEL_TYPES = {
    "gemma3": "Gemma-3 with vision lets image tokens attend to each other bidirectionally; "
    "its text-only models (model_type 'gemma3_text', Gemma3ForCausalLM) are supported",
    "llama4": "Llama-4 uses chunked attention in 3 of 4 layers, which the core does not compute",
}
"""Well-known model types refused for a reason beyond not being listed."""


def refuse_padding(attention_mask) -> None:
    """Raise if ``attention_mask`` (``[B, tokens]``, or None) marks any padding: rows must be equal-length."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "headinfer: padded batches are not supported (the attention_mask has zeros); "
            "batch only prompts of equal length, or run them one at a time"
        )


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
    """Head counts and sizes of a model's attention layers, and how each layer attends."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    """Softmax scale of every layer (the core takes one for the whole model)."""
    windows: tuple[int | None, ...]
    """Sliding window of each layer in tokens (a query sees itself and ``window - 1`` keys
    before it), None for full attention."""
    soft_cap: float | None
    """``cap`` of ``cap * tanh(score / cap)`` in every layer, None for none."""
    sinks: bool
    """Whether every layer has attention sinks (one logit per query head, from the module)."""

    def check_call(self, layer: int, scaling: float | None, window, softcap, sinks) -> None:
        """Refuse a call of ``layer``'s attention function whose arguments differ from the config's.

        Args:
            scaling, window, softcap, sinks: what transformers passed as
                ``scaling``, ``sliding_window``, ``softcap`` and ``s_aux``
                (None where absent); ``sinks`` ``[num_query_heads]``.
        """
        scale = scaling if scaling is not None else self.head_dim**-0.5
        if not math.isclose(scale, self.scale, rel_tol=1e-6):
            raise ValueError(
                f"headinfer: layer {layer} scales attention by {scale}, but the config gives {self.scale}; "
                f"HeadInfer takes one scale for all layers, so models whose layers differ in scale are "
                f"not supported; {ALTERNATIVE}"
            )
        found = {"sliding_window": window, "softcap": softcap or None, "s_aux": sinks is not None}
        expected = {"sliding_window": self.windows[layer], "softcap": self.soft_cap, "s_aux": self.sinks}
        differing = [
            f"{name}={found[name]!r} (config: {expected[name]!r})" for name in found if found[name] != expected[name]
        ]
        if differing:
            raise ValueError(
                f"headinfer: the attention of layer {layer} got {', '.join(differing)}; build "
                f"HeadInferCache from this model's own config (model.config), unchanged since loading"
            )


def attention_geometry(config) -> AttentionGeometry:
    """Validate a model config and return its attention geometry.

    Raises ``ValueError`` naming the supported families for any other model
    type, and for what the core cannot compute: layers other than full or
    sliding attention, chunked and bidirectional attention.
    """
    model_type = getattr(config, "model_type", None)
    refuse_unservable(config, model_type)
    family = FAMILIES[model_type]
    num_layers, num_query_heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_query_heads
    scalar = config.query_pre_attn_scalar if family.query_pre_attn_scalar else head_dim
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        windows = (window,) * num_layers
    else:
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return AttentionGeometry(
        num_layers=num_layers,
        num_query_heads=num_query_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_query_heads,
        head_dim=head_dim,
        scale=scalar**-0.5,
        windows=windows,
        soft_cap=(config.attn_logit_softcapping or None) if family.soft_capped else None,
        sinks=family.sinks,
    )


def refuse_unservable(config, model_type: str | None) -> None:
    """Raise ``ValueError`` with the reason if the core cannot serve this model exactly."""
    layer_types = set(getattr(config, "layer_types", None) or ())
    if "chunked_attention" in layer_types or getattr(config, "attention_chunk_size", None):
        raise ValueError(
            f"headinfer: chunked attention (attention_chunk_size, as in Llama-4) is not supported: the core "
            f"computes full and sliding-window attention only; {ALTERNATIVE}"
        )
    others = sorted(layer_types - ATTENTION_LAYER_TYPES)
    if others:
        raise ValueError(
            f"headinfer: this {model_type} model has {others} layers; HeadInfer serves models whose every layer "
            f"is full or sliding-window attention (no linear-attention, state-space or convolution layers); "
            f"{ALTERNATIVE}"
        )
    if getattr(config, "use_bidirectional_attention", None):
        raise ValueError(
            f"headinfer: bidirectional attention (use_bidirectional_attention) is not supported: HeadInfer "
            f"attention is causal; {ALTERNATIVE}"
        )
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"headinfer: model type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in FAMILIES:
        names = ", ".join(family.name for family in FAMILIES.values())
        raise ValueError(
            f"headinfer: model type {model_type!r} is not supported; HeadInferCache supports the {names} "
            f"families (model_type in {SUPPORTED_MODEL_TYPES}); {ALTERNATIVE}"
        )
