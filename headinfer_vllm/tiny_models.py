"""Built-in tiny random models (Llama, Mistral, Qwen2 shapes), made offline.

Used by the demo, the tests and the benchmarks' smoke runs: a config is
built in code, weights are drawn at random with a large init range (so that
attention visibly changes the output) and saved with ``save_pretrained``;
nothing is downloaded. ``with_tokenizer=True`` adds a character-level
tokenizer built with ``tokenizers``, for the OpenAI server.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2")

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
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


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
