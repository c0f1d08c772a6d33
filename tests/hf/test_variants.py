"""Families with per-layer attention variants: windows, soft-capping, sinks; exact against transformers.

References run transformers' own attention with its default cache
(:data:`tests.hf.models.REFERENCE_ATTENTION`). Prompts are longer than every
window, and the windows (37 to 63 tokens) end inside 16-token pages.
"""

import pytest
import torch

import headinfer_vllm.hf as hf
from headinfer_vllm.hf.support import attention_geometry
from tests.hf.models import (
    FAMILY_SCORE_TOLERANCE,
    SCORE_TOLERANCE,
    VARIANT_CONFIGS,
    VARIANT_FAMILIES,
    assert_same,
    build_pair,
    greedy,
    make_cache,
    prompt,
)


def tolerance(family: str) -> float:
    return FAMILY_SCORE_TOLERANCE.get(family, SCORE_TOLERANCE)


@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_generate_matches_transformers(family):
    """model.generate with every head streamed, one forward pass for a 300-token prompt."""
    reference_model, model = build_pair(family)
    ids = prompt(1, 300)
    cache = make_cache(model)
    assert_same(greedy(reference_model, ids), greedy(model, ids, past_key_values=cache), tolerance(family))
    assert len(cache.store.streamed_units) == cache.plan.layout.num_units


@pytest.mark.parametrize("device_tier", ["units", "pages"])
@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_chunked_prefill_partially_resident(family, device_tier):
    """hf.generate: 2 rows prefilled in 50-token chunks, some head groups resident (or a page cache), the rest
    streamed."""
    reference_model, model = build_pair(family, seed=3)
    ids = prompt(2, 420, seed=4)
    unit_bytes = make_cache(model, head_group_size=2).plan.layout.unit_bytes
    cache = make_cache(model, head_group_size=2, prefill_chunk_size=50, gpu_kv_cache_gib=9 * unit_bytes / 2**30,
                       device_tier=device_tier)
    if device_tier == "units":
        assert 0 < cache.plan.num_resident_units < cache.plan.layout.num_units
    else:
        assert cache.plan.num_resident_units == 0 and cache.plan.cache_bytes > 0
    result = greedy(model, ids, generate=lambda **kw: hf.generate(model, past_key_values=cache, **kw))
    assert_same(greedy(reference_model, ids), result, tolerance(family))


@pytest.mark.parametrize(
    ("family", "windows", "soft_cap", "sinks", "scale"),
    [
        ("mistral_window", (45,) * 6, None, False, 32**-0.5),
        ("qwen2_window", (None,) * 3 + (41,) * 3, None, False, 32**-0.5),
        ("qwen3", (None,) * 6, None, False, 32**-0.5),
        ("phi3", (63,) * 6, None, False, 32**-0.5),
        ("gemma2", (37, None) * 3, 10.0, False, 48**-0.5),
        ("gemma3", (50,) * 5 + (None,), None, False, 32**-0.5),
        ("gpt_oss", (40, None) * 3, None, True, 32**-0.5),
    ],
)
def test_layer_variants_from_the_config(family, windows, soft_cap, sinks, scale):
    geometry = attention_geometry(VARIANT_CONFIGS[family]())
    assert (geometry.windows, geometry.soft_cap, geometry.sinks) == (windows, soft_cap, sinks)
    assert geometry.scale == pytest.approx(scale, rel=1e-12)


def test_sinks_are_read_at_every_call():
    """Sinks changed in the model between two generations through one cache are the ones attended with."""
    reference_model, model = build_pair("gpt_oss", seed=5)
    ids = prompt(1, 120, seed=6)
    cache = make_cache(model)
    greedy(model, ids, past_key_values=cache)
    cache.reset()
    with torch.no_grad():
        for module in (reference_model, model):
            for layer in module.model.layers:
                layer.self_attn.sinks.mul_(-1)
    result = greedy(model, ids, past_key_values=cache)
    assert_same(greedy(reference_model, ids), result, tolerance("gpt_oss"))


@pytest.mark.cuda
@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_variants_on_cuda(family):
    """The chunked check on a GPU: sinks copied on the device, windows loaded through side streams."""
    reference_model, model = (half.to("cuda") for half in build_pair(family, seed=11))
    ids = prompt(2, 420, seed=12).to("cuda")
    cache = make_cache(model, prefill_chunk_size=50)
    result = greedy(model, ids, generate=lambda **kw: hf.generate(model, past_key_values=cache, **kw))
    assert_same(greedy(reference_model, ids), result, tolerance(family))
    assert cache.store.device.type == "cuda" and len(cache.store.streamed_units) == cache.plan.layout.num_units
