"""Unsupported models and uses are refused with clear errors, never run silently."""

import pytest
import torch
from transformers import GPT2Config, MistralConfig, Qwen2Config

from headinfer_vllm.hf import CapacityError, HeadInferCache
from tests.hf.models import SHAPE, build_pair, greedy, make_cache, prompt


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="Llama, Mistral and Qwen2"):
        HeadInferCache(GPT2Config(n_layer=2, n_head=4, n_embd=64))


@pytest.mark.parametrize(
    "config",
    [
        MistralConfig(num_hidden_layers=2, sliding_window=64, **SHAPE),
        Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64, max_window_layers=1, **SHAPE),
    ],
    ids=["mistral", "qwen2"],
)
def test_sliding_window_below_capacity(config):
    with pytest.raises(ValueError, match="sliding window of 64 tokens"):
        HeadInferCache(config, cpu_kv_cache_gib=1 / 1024, block_size=16)


def test_model_without_headinfer_attention():
    reference_model, _ = build_pair("llama")
    with pytest.raises(ValueError, match="attn_implementation='headinfer'"):
        greedy(reference_model, prompt(1, 20), past_key_values=make_cache(reference_model))


def test_headinfer_attention_without_its_cache():
    _, model = build_pair("llama")
    with pytest.raises(RuntimeError, match="needs past_key_values=HeadInferCache"):
        greedy(model, prompt(1, 20))


def test_padded_batch():
    _, model = build_pair("qwen2")
    ids = prompt(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model.generate(ids, attention_mask=mask, past_key_values=make_cache(model), max_new_tokens=2)


def test_beam_search():
    _, model = build_pair("llama")
    with pytest.raises(NotImplementedError, match="does not support"):
        greedy(model, prompt(1, 20), past_key_values=make_cache(model), num_beams=2)


def test_capacity_exceeded():
    _, model = build_pair("llama")
    cache = make_cache(model, capacity_tokens=256)
    with pytest.raises(CapacityError, match="exceeds the 128 tokens each of the 2 rows can hold"):
        cache.prefill(model, prompt(2, 200))


def test_layer_skipped_in_a_forward_pass():
    """A forward pass that stops after layer 0 is caught before the cache is used again."""
    _, model = build_pair("mistral")
    cache = make_cache(model)
    model.config.num_hidden_layers = 1  # the model now runs layer 0 only
    with pytest.raises(RuntimeError, match="stopped at layer 0 of 3"):
        cache.prefill(model, prompt(1, 20))


def test_attention_not_routed_for_a_layer():
    """K/V staged by update() but never attended are caught at the next layer's update()."""
    _, model = build_pair("llama")
    cache = make_cache(model)
    key = torch.zeros(1, 2, 4, 16)
    cache.update(key, key, 0)
    with pytest.raises(RuntimeError, match="attention of layer 0 did not run"):
        cache.update(key, key, 1)
