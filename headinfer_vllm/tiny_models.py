"""Built-in tiny random models of the decoder layouts vLLM serves, made offline.

Used by the demo, the tests and the benchmarks' smoke runs: a config is
built in code, weights are drawn at random with a large init range (so that
attention visibly changes the output) and saved with ``save_pretrained``;
nothing is downloaded. ``with_tokenizer=True`` adds a character-level
tokenizer built with ``tokenizers``, for the OpenAI server.

Families and the attention layout each exercises (windows are small and odd,
so that test prompts of a few hundred tokens cross them at no block edge):

- ``llama``: full attention in every layer, grouped-query (8 query, 4 KV heads).
- ``mistral``: Llama's layout under Mistral's architecture, no window.
- ``qwen2``: full attention with q/k/v biases.
- ``mistral_window``: one 45-token sliding window in every layer (no
  ``layer_types``: vLLM sets the window model-wide, ``CacheConfig.sliding_window``).
- ``gemma2``: sliding (37 tokens) and full layers alternating, starting with a
  sliding one; attention logit soft-capping (10) and final logit soft-capping
  (15); scale ``query_pre_attn_scalar**-0.5`` with 48, not ``head_dim``.
- ``gemma3``: Gemma-3 text (``Gemma3ForCausalLM``, ``gemma3_text``): 5 sliding
  (50 tokens) : 1 full layer, q/k RMS norms, a different RoPE base per layer type.
- ``gpt_oss``: attention sinks (one learned logit per query head, drawn large
  enough to matter), sliding (40 tokens) and full layers alternating, q/k/v
  and o biases, YaRN RoPE, and a mixture of experts (4 experts, top 2).
- ``qwen3``: full attention with q/k RMS norms and an explicit ``head_dim``.
- ``phi3``: fused qkv and gate/up projections, one 63-token sliding window in
  every layer (like Phi-3-mini's 2047: one less than a power of two).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "mistral_window", "gemma2", "gemma3", "gpt_oss", "qwen3", "phi3")

SHAPE = dict(
    hidden_size=256,  # = num_attention_heads * head_dim (Qwen2 derives head_dim from it)
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,  # vLLM's CPU backend needs head_dim >= 32
    vocab_size=256,
    max_position_embeddings=8192,
    initializer_range=0.15,
    tie_word_embeddings=False,
)

CHAR_SYMBOLS = ["<unk>", "<s>", "</s>", *sorted(set(string.printable))]
"""The character tokenizer's vocabulary: ids 0, 1, 2 are unk, bos, eos."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def model_config(family: str, **overrides):
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(**{**SHAPE, **overrides})
    if family == "mistral":
        return transformers.MistralConfig(**{**SHAPE, "sliding_window": None, **overrides})
    if family == "qwen2":  # q/k/v projections carry biases
        return transformers.Qwen2Config(**{**SHAPE, "use_sliding_window": False, **overrides})
    if family == "mistral_window":
        return transformers.MistralConfig(**{**SHAPE, "sliding_window": 45, **overrides})
    if family == "gemma2":  # layer_types default: sliding, full, sliding, ...
        return transformers.Gemma2Config(**{
            **SHAPE, "sliding_window": 37, "attn_logit_softcapping": 10.0, "final_logit_softcapping": 15.0,
            "query_pre_attn_scalar": 48, "tie_word_embeddings": True,  # vLLM's Gemma-2 has no lm_head
            **TOKEN_IDS, **overrides})
    if family == "gemma3":  # layer_types default: 5 sliding, then 1 full (sliding_window_pattern 6)
        return transformers.Gemma3TextConfig(**{
            **SHAPE, "sliding_window": 50, "query_pre_attn_scalar": SHAPE["head_dim"], "tie_word_embeddings": True,
            **TOKEN_IDS, **overrides})
    if family == "gpt_oss":  # layer_types default: sliding, full, sliding, ...
        return transformers.GptOssConfig(**{
            **SHAPE, "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2,
            "sliding_window": 40, "max_position_embeddings": 131072,  # = YaRN's 4096 x 32: no mismatch warning
            **TOKEN_IDS, **overrides})
    if family == "qwen3":
        return transformers.Qwen3Config(**{**SHAPE, "use_sliding_window": False, **TOKEN_IDS, **overrides})
    if family == "phi3":  # head_dim = hidden_size / num_attention_heads
        shape = {k: v for k, v in SHAPE.items() if k != "head_dim"}
        return transformers.Phi3Config(**{**shape, "sliding_window": 63, **TOKEN_IDS, **overrides})
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
"""Special ids inside the tiny vocabulary (some families' defaults lie beyond it)."""

SINK_MEAN, SINK_STD = 4.0, 3.0
"""gpt-oss attention sinks: the default init (std ``initializer_range``) leaves
them invisible next to the tiny models' large attention logits."""


def save_tiny_model(directory: str | Path, family: str = "llama", *, seed: int = 0,
                    with_tokenizer: bool = False, **overrides) -> Path:
    """Write a random float32 model of ``family`` to ``directory``; returns it.

    With a tokenizer, the vocabulary is the tokenizer's, so every id decodes.
    """
    import torch
    import transformers

    directory = Path(directory)
    if with_tokenizer:
        overrides.setdefault("vocab_size", len(CHAR_SYMBOLS))
    config = model_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(SINK_MEAN, SINK_STD)
    model.save_pretrained(directory)
    if with_tokenizer:
        save_char_tokenizer(directory)
    return directory


def save_char_tokenizer(directory: Path) -> None:
    """A character-level WordLevel tokenizer with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(CHAR_SYMBOLS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 8192, "chat_template": CHAT_TEMPLATE,
    }))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.update(bos_token_id=1, eos_token_id=2)
    config_path.write_text(json.dumps(config, indent=2))
