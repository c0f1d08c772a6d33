"""Tiny random models of every supported family, and greedy runs to compare.

Llama, Mistral and Qwen2 come in a small shape of their own (2-3 layers,
head_dim 16) for the long-prompt tests; the families with per-layer
attention variants come from :mod:`headinfer_vllm.tiny_models` (6 layers,
windows of 37 to 63 tokens).
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import headinfer_vllm.hf  # noqa: F401  (registers "headinfer")
from headinfer_vllm import tiny_models
from headinfer_vllm.hf import HeadInferCache

VOCAB = 128
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=8192,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=2, **SHAPE),
    "mistral": lambda: MistralConfig(num_hidden_layers=3, sliding_window=None, **SHAPE),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=2, **SHAPE),
}
FAMILIES = list(CONFIGS)
"""Full attention in every layer."""

VARIANT_CONFIGS = {
    family: functools.partial(tiny_models.model_config, family)
    for family in ("mistral_window", "qwen3", "phi3", "gemma2", "gemma3", "gpt_oss")
}
# Qwen2's windows: layers from max_window_layers on (a 41-token window in layers 3..5).
VARIANT_CONFIGS["qwen2_window"] = functools.partial(
    tiny_models.model_config, "qwen2", use_sliding_window=True, sliding_window=41, max_window_layers=3
)
VARIANT_FAMILIES = list(VARIANT_CONFIGS)
"""Sliding windows, soft-capping or sinks in some layers (Qwen3: q/k norms, full attention)."""

REFERENCE_ATTENTION = {"gemma2": "eager", "gpt_oss": "eager"}
"""Transformers' SDPA drops Gemma-2's soft-cap silently, and refuses gpt-oss (sinks)."""


SCORE_TOLERANCE = 1e-4
"""Largest difference of any greedy score (logit) from the reference's."""

FAMILY_SCORE_TOLERANCE = {"gpt_oss": 1e-3}
"""gpt-oss's float32 forward pass is itself about 5e-4 off a float64 one (its reference and HeadInfer
alike, measured on these tests' prompts: the logits' own rounding, not attention's); every other
family's is within 7e-5."""


def assert_same(reference, result, tolerance: float = SCORE_TOLERANCE) -> None:
    """Equal greedy tokens, and scores within ``tolerance``; each a (sequences, scores) pair."""
    sequences, scores = result
    assert torch.equal(sequences, reference[0])
    assert (scores - reference[1]).abs().max().item() <= tolerance


def build_pair(family: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random float32 model twice: with transformers' attention (``"sdpa"``, or
    ``"eager"`` where SDPA is not exact) and with ``"headinfer"`` attention."""
    config = (CONFIGS.get(family) or VARIANT_CONFIGS[family])()
    torch.manual_seed(seed)
    reference, model = (
        AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name, dtype=torch.float32)
        for name in (REFERENCE_ATTENTION.get(family, "sdpa"), "headinfer")
    )
    if family == "gpt_oss":  # as tiny_models.save_tiny_model: sinks large enough to matter
        with torch.no_grad():
            for layer in reference.model.layers:
                layer.self_attn.sinks.normal_(tiny_models.SINK_MEAN, tiny_models.SINK_STD)
    model.load_state_dict(reference.state_dict())
    return reference.eval(), model.eval()


def make_cache(model: torch.nn.Module, capacity_tokens: int = 8192, **kwargs) -> HeadInferCache:
    """A cache holding about ``capacity_tokens`` tokens, all heads streamed one by one unless overridden."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes_per_token_layer = 2 * config.num_key_value_heads * head_dim * 4  # K and V in float32
    host_bytes = capacity_tokens * kv_bytes_per_token_layer * config.num_hidden_layers
    settings = dict(cpu_kv_cache_gib=host_bytes / 2**30, head_group_size=1, block_size=16)
    settings.update(kwargs)
    return HeadInferCache(model.config, **settings)


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]`` avoiding the pad id 0."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def greedy(model, input_ids: torch.Tensor, generate=None, max_new_tokens: int = 8, **kwargs):
    """Greedy generation; returns (sequences [B, L + new], scores [new, B, vocab])."""
    generate = generate or model.generate
    out = generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores)
