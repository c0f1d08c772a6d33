"""A causal chunk after earlier tokens as two calls of torch's CPU flash kernel (earlier keys unmasked, the
chunk's own keys causal) merged by log-sum-exp, against the dense float64 reference."""

import pytest
import torch

from headinfer_vllm.core import LayerAttention
from headinfer_vllm.core import kernels as kernels_module
from headinfer_vllm.core.kernels import prefix_then_causal_attention
from headinfer_vllm.core.plan import RequestSpan
from tests.core.scenario import relative_error
from tests.core.test_variants import TOLERANCE, run_steps, variant_reference, variant_scenario


def random_chunk(dtype, query_heads, kv_heads, head_dim, query_len, seq_len, seed):
    """query [query_len, query_heads, D], keys and values [seq_len, kv_heads, D]: token-major, as in a step."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(query_len, query_heads, head_dim, generator=generator).to(dtype)
    keys, values = (torch.randn(seq_len, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    return query, keys, values


def split_attention(query, keys, values, scale):
    """Through :func:`prefix_then_causal_attention`, in the head-major layout it takes; token-major out."""
    head_major = [t.transpose(0, 1)[None] for t in (query, keys, values)]
    return prefix_then_causal_attention(*head_major, scale)[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("query_heads", "kv_heads"), [(4, 4), (8, 2), (12, 1)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize(("query_len", "seq_len"), [(2, 3), (17, 100), (160, 161), (300, 1000)])
def test_split_matches_the_reference(dtype, query_heads, kv_heads, head_dim, query_len, seq_len):
    query, keys, values = random_chunk(dtype, query_heads, kv_heads, head_dim, query_len, seq_len, seed=seq_len)
    scale = head_dim**-0.5
    reference = variant_reference(LayerAttention(), query, keys, values, scale)
    assert relative_error(split_attention(query, keys, values, scale), reference) <= TOLERANCE[dtype]


def test_tolerance_catches_a_diagonal_off_by_one():
    """Each query seeing the next token too (the chunk's causal mask one diagonal off) errs far beyond
    the tolerance."""
    query, keys, values = random_chunk(torch.bfloat16, 8, 2, 64, 17, 100, seed=0)
    scale = 64**-0.5
    output = split_attention(query, keys, values, scale)
    keys, values = (t.double().repeat_interleave(4, 1).transpose(0, 1) for t in (keys, values))  # [8, 100, 64]
    scores = scale * query.double().transpose(0, 1) @ keys.transpose(1, 2)
    one_more = torch.ones(17, 100, dtype=torch.bool).tril(100 - 17 + 1)
    shifted = scores.masked_fill(~one_more, float("-inf")).softmax(-1) @ values
    assert relative_error(output, shifted.transpose(0, 1)) > 10 * TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_kernel_splits_chunks_after_earlier_tokens(monkeypatch, dtype):
    """Steps of chunks on a prefix, after decodes and from scratch through TorchKernel on the CPU: the
    chunks that follow earlier tokens (and only those) go through the split, and the step is exact."""
    split_lengths = []

    def counting(query, key, value, scale):
        split_lengths.append((query.shape[2], key.shape[2]))
        return prefix_then_causal_attention(query, key, value, scale)

    monkeypatch.setattr(kernels_module, "prefix_then_causal_attention", counting)
    monkeypatch.setattr(kernels_module, "SPLIT_MIN_QUERY_LEN", 2)
    scenario = variant_scenario("windows", device="cpu", dtype=dtype, query_per_kv=4, head_dim=64,
                                head_group_size=2, num_resident_units=2, seed=3)
    history, first, second = [37, 0, 130, 16], [12, 48, 1, 1], [1, 20, 1, 30]
    assert run_steps(scenario, [first, second], history) <= TOLERANCE[dtype]
    assert scenario.attention.kernel_name == "sdpa"
    # Only the unwindowed layer without a cap or sinks (the second of four) is split; per unit per step:
    # request 0's chunk of 12 on 37, request 1's chunk of 20 on 48 and request 3's of 30 on 17 (not the
    # first chunk of request 1, which starts from scratch).
    assert set(split_lengths) == {(12, 49), (20, 68), (30, 47)}


def test_short_chunks_keep_the_mask():
    """Below SPLIT_MIN_QUERY_LEN query tokens, and for a first chunk, the masked call stays."""
    minimum = kernels_module.SPLIT_MIN_QUERY_LEN
    query = torch.zeros(1, 4, minimum, 64)
    assert kernels_module.split_causal_prefill(query, RequestSpan(0, minimum, 2 * minimum))
    assert not kernels_module.split_causal_prefill(query, RequestSpan(0, minimum - 1, 2 * minimum))
    assert not kernels_module.split_causal_prefill(query, RequestSpan(0, minimum, minimum))
    assert not kernels_module.split_causal_prefill(query.double(), RequestSpan(0, minimum, 2 * minimum))
