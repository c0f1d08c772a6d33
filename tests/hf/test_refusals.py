"""Unsupported models and uses are refused with clear errors, never run silently."""

import pytest
import torch
from transformers import Gemma3Config, GPT2Config, Llama4TextConfig, Qwen3NextConfig

from headinfer_vllm import tiny_models
from headinfer_vllm.hf import CapacityError, HeadInferCache
from tests.hf.models import build_pair, greedy, make_cache, prompt


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (GPT2Config(n_layer=2, n_head=4, n_embd=64), r"supports the Llama, .*, gpt-oss families"),
        (Qwen3NextConfig(num_hidden_layers=4), r"\['linear_attention'\] layers"),
        (Llama4TextConfig(num_hidden_layers=4), "chunked attention"),
        (Gemma3Config(), "model_type 'gemma3_text'"),
        (tiny_models.model_config("gemma3", use_bidirectional_attention=True), "bidirectional attention"),
    ],
    ids=["gpt2", "linear-attention", "chunked", "gemma3-vision", "bidirectional"],
)
def test_unservable_model(config, reason):
    with pytest.raises(ValueError, match=reason):
        HeadInferCache(config)


def test_layer_attending_unlike_the_config():
    """A layer whose window differs from the config's is refused at its call, not attended wrongly."""
    _, model = build_pair("gemma2")
    model.model.layers[2].self_attn.sliding_window = None
    with pytest.raises(ValueError, match=r"layer 2 got sliding_window=None \(config: 37\)"):
        greedy(model, prompt(1, 20), past_key_values=make_cache(model))


def test_bidirectional_layer():
    _, model = build_pair("gemma3")
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match="bidirectional attention is not supported"):
        greedy(model, prompt(1, 20), past_key_values=make_cache(model))


def test_layers_with_different_scales():
    _, model = build_pair("gemma2")
    model.model.layers[3].self_attn.scaling = 0.5
    with pytest.raises(ValueError, match=r"layer 3 scales attention by 0\.5.*one scale for all layers"):
        greedy(model, prompt(1, 20), past_key_values=make_cache(model))


def test_sinks_that_the_cache_would_round():
    _, model = build_pair("gpt_oss")
    sinks = model.model.layers[0].self_attn.sinks
    sinks.data = sinks.data.double()
    with pytest.raises(ValueError, match=r"sinks of layer 0 are \(8,\) torch.float64"):
        greedy(model, prompt(1, 20), past_key_values=make_cache(model))


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


def test_host_budget_over_available_memory_refused_unless_the_check_warns(monkeypatch, caplog):
    """A host whose memory grows on demand reports little MemAvailable: ``warn`` (or its variable) trusts it."""
    from headinfer_vllm.core import host_memory

    monkeypatch.setattr(host_memory, "free_host_bytes", lambda: 1 << 20)
    config = tiny_models.model_config("llama")
    with pytest.raises(ValueError, match=r"cpu_kv_cache_gib asks for .* only 0.00 GiB is available"):
        HeadInferCache(config, cpu_kv_cache_gib=0.01, device="cpu")
    cache = HeadInferCache(config, cpu_kv_cache_gib=0.01, host_memory_check="warn", device="cpu")
    assert cache.store is not None and "host memory check (warn)" in caplog.text
    monkeypatch.setenv("HEADINFER_HOST_MEMORY_CHECK", "warn")
    assert HeadInferCache(config, cpu_kv_cache_gib=0.01, device="cpu").store is not None
    with pytest.raises(ValueError, match="host_memory_check must be one of strict, warn"):
        HeadInferCache(config, host_memory_check="lenient")
