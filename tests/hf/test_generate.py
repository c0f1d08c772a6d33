"""Greedy generation through HeadInferCache equals SDPA with transformers' default cache."""

import pytest
import torch

import headinfer_vllm.hf as hf
from tests.hf.models import FAMILIES, assert_same, build_pair, greedy, make_cache, prompt


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [1, 37, 700, 2600])
def test_generate_matches_sdpa(family, length):
    """The issue's usage: model.generate(ids, past_key_values=HeadInferCache(...)), every head streamed."""
    reference_model, model = build_pair(family)
    ids = prompt(1, length)
    cache = make_cache(model)
    result = greedy(model, ids, past_key_values=cache)
    assert_same(greedy(reference_model, ids), result)
    assert len(cache.store.streamed_units) == cache.plan.layout.num_units
    assert cache.get_seq_length() == length + 8 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_batch_of_two(family):
    """hf.generate prefills 2 equal-length rows in chunks of 256 tokens, then decodes."""
    reference_model, model = build_pair(family, seed=3)
    ids = prompt(2, 1500, seed=4)
    cache = make_cache(model, prefill_chunk_size=256, head_group_size=2)
    result = greedy(model, ids, generate=lambda **kw: hf.generate(model, past_key_values=cache, **kw))
    assert_same(greedy(reference_model, ids), result)
    assert cache.store.streamed_units
    assert cache.get_seq_length() == 1500 + 8 - 1


@pytest.mark.parametrize("device_tier", ["units", "pages"])
def test_partially_resident_and_deeper_prefetch(device_tier):
    """A device budget beside the staging ring: some head groups resident (``units``) or a page cache that
    holds part of the prompt in every head group (``pages``); the rest streams 2 ahead."""
    reference_model, model = build_pair("mistral", seed=5)
    probe = make_cache(model, prefetch_depth=2)
    unit_bytes = probe.plan.layout.unit_bytes
    cache = make_cache(model, prefetch_depth=2, gpu_kv_cache_gib=7 * unit_bytes / 2**30, device_tier=device_tier)
    ids = prompt(1, 900, seed=6)
    assert_same(greedy(reference_model, ids), greedy(model, ids, past_key_values=cache))
    if device_tier == "units":
        assert 0 < cache.plan.num_resident_units < cache.plan.layout.num_units
        return
    traffic = cache.attention.transfers.traffic
    assert cache.plan.num_resident_units == 0 and cache.store.cache_rows > 0
    assert 0 < traffic.pages_hit < traffic.pages_read


def test_generate_continues_a_cache():
    """prefill, then generate, then generate again from the returned sequence: one exact run."""
    reference_model, model = build_pair("llama", seed=7)
    ids = prompt(1, 600, seed=8)
    reference = greedy(reference_model, ids, max_new_tokens=10)
    cache = make_cache(model, prefill_chunk_size=128)
    cache.prefill(model, ids[:, :-1])
    first, first_scores = greedy(model, ids, past_key_values=cache, max_new_tokens=4)
    second, second_scores = greedy(model, first, past_key_values=cache, max_new_tokens=6)
    assert_same(reference, (second, torch.cat([first_scores, second_scores])))


def test_corrupted_host_page_changes_the_output():
    """The comparison is sharp: one streamed page of the prompt, perturbed, changes the scores."""
    reference_model, model = build_pair("qwen2", seed=9)
    ids = prompt(1, 400, seed=10)
    reference = greedy(reference_model, ids)
    cache = make_cache(model)
    cache.prefill(model, ids[:, :-1])
    layer, group = cache.store.streamed_units[0]
    cache.store.host_unit(layer, group)[3] += 1.0  # block 3: tokens 48..63 of row 0, K and V
    _, scores = greedy(model, ids, past_key_values=cache)
    assert (scores - reference[1]).abs().max().item() > 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_generation_on_cuda(family):
    """The same check on a GPU: pinned host tier, side streams and events."""
    reference_model, model = (half.to("cuda") for half in build_pair(family, seed=11))
    ids = prompt(2, 3000, seed=12).to("cuda")
    cache = make_cache(model, prefill_chunk_size=512)
    result = greedy(model, ids, generate=lambda **kw: hf.generate(model, past_key_values=cache, **kw))
    assert_same(greedy(reference_model, ids), result)
    assert cache.store.device.type == "cuda" and cache.store.host.is_pinned()
    assert len(cache.store.streamed_units) == cache.plan.layout.num_units
