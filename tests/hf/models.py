"""Tiny random Llama, Mistral and Qwen2 models, and greedy runs to compare."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import headinfer_vllm.hf  # noqa: F401  (registers "headinfer")
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
KV_BYTES_PER_TOKEN_LAYER = 2 * 2 * 16 * 4
"""K and V of 2 KV heads of dim 16 in float32."""

CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=2, **SHAPE),
    "mistral": lambda: MistralConfig(num_hidden_layers=3, sliding_window=None, **SHAPE),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=2, **SHAPE),
}
FAMILIES = list(CONFIGS)


def build_pair(family: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random float32 model twice: with ``"sdpa"`` and with ``"headinfer"`` attention."""
    config = CONFIGS[family]()
    torch.manual_seed(seed)
    reference, model = (
        AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name, dtype=torch.float32)
        for name in ("sdpa", "headinfer")
    )
    model.load_state_dict(reference.state_dict())
    return reference.eval(), model.eval()


def make_cache(model: torch.nn.Module, capacity_tokens: int = 8192, **kwargs) -> HeadInferCache:
    """A cache holding about ``capacity_tokens`` tokens, all heads streamed one by one unless overridden."""
    host_bytes = capacity_tokens * KV_BYTES_PER_TOKEN_LAYER * model.config.num_hidden_layers
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
