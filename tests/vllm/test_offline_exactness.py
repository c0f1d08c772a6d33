"""End to end: headinfer's generations equal vLLM's stock CPU backend.

One run per backend and model family covers, at once: a batch of mixed
lengths up to 4000 tokens, chunked prefill (256-token steps), prefix caching
(a second batch reusing the first batch's prefixes), and preemption (the
cache holds 4096 tokens in 128 usable blocks, the batch needs far more, and
prefill chunks of 128 tokens let several requests grow at once). The device tier is the
staging ring only, under 10% of the KV, and the longest prompt's KV is over
10x the device tier.
"""

import functools
import random

import pytest

pytest.importorskip("vllm")

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import SHAPE, save_tiny_model
from tests.vllm.stock_comparison import assert_same_generations

pytestmark = pytest.mark.vllm

BLOCK_SIZE = 32
NUM_BLOCKS = 129  # 128 usable: vLLM keeps a null block
UNITS = SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"]
BYTES_PER_BLOCK = UNITS * 2 * BLOCK_SIZE * SHAPE["head_dim"] * 4  # float32 K and V of every head


def prompts(seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)]

    shared = tokens(600)
    first = [tokens(4000), tokens(1200), shared + tokens(50), tokens(40), tokens(5), shared + tokens(90)]
    second = [shared + tokens(30), first[1][:900] + tokens(20)]
    return [first, second]


PAGE_CACHE_GIB = 40 * BYTES_PER_BLOCK / 2**30
"""A device tier with room for about 40 blocks of page cache beside the staging ring (2 x 129 blocks of one
unit, one KV head per unit): the 4000-token prompt (125 blocks) does not fit, the short requests do."""


def engine(backend: str, compiled: bool = False, in_place: bool = False, page_cache: bool = False) -> dict:
    common = dict(
        dtype="float32", max_model_len=4096, block_size=BLOCK_SIZE, enforce_eager=not compiled, seed=0,
        enable_chunked_prefill=True, max_num_batched_tokens=512, long_prefill_token_threshold=128,
        enable_prefix_caching=True,
    )
    if backend == "stock":
        return {**common, "num_gpu_blocks_override": NUM_BLOCKS, "kv_cache_memory_bytes": 64 << 20}
    cpu_gib = (NUM_BLOCKS + 0.5) * BYTES_PER_BLOCK / 2**30
    settings = {"headinfer": {"cpu_kv_cache_gib": cpu_gib, "cpu_attention": "auto" if in_place else "off"}}
    if page_cache:
        staging_gib = 2 * NUM_BLOCKS * BYTES_PER_BLOCK / UNITS / 2**30  # two one-head units
        settings["headinfer"].update(gpu_kv_cache_gib=PAGE_CACHE_GIB + staging_gib, head_group_size=1)
    return {**common, "attention_backend": "headinfer", "additional_config": settings}


@pytest.fixture(scope="module",
                params=["llama", "mistral", "qwen2", "llama-compiled", "llama-in-place", "qwen2-page-cache"])
def runs(request, tmp_path_factory):
    """``-compiled``: vLLM's torch.compile path (``enforce_eager=False``) for both backends.
    ``-in-place``: headinfer's default on the CPU platform, the KV attended where it lies (C++ kernel).
    ``-page-cache``: streamed, with a device page cache that holds part of the KV (``gpu_kv_cache_gib``)."""
    family = request.param.split("-")[0]
    compiled, in_place = request.param.endswith("-compiled"), request.param.endswith("-in-place")
    page_cache = request.param.endswith("-page-cache")
    model = save_tiny_model(tmp_path_factory.mktemp(request.param), family)
    spec = {"model": str(model), "batches": prompts(seed=len(family)), "max_tokens": 12, "logprobs": 3}
    results = {
        backend: run_in_subprocess({**spec, "engine": engine(backend, compiled, in_place, page_cache)})
        for backend in ("stock", "headinfer")
    }
    return {**results, "in_place": in_place, "page_cache": page_cache}


def test_tokens_and_logprobs_match_stock_backend(runs):
    assert_same_generations(runs["stock"]["outputs"], runs["headinfer"]["outputs"], count=8)


def test_run_exercised_preemption_and_prefix_caching(runs):
    for backend in ("stock", "headinfer"):
        assert runs[backend]["preemptions"] > 0, backend
        assert any(output["cached_tokens"] > 0 for output in runs[backend]["outputs"][-2:]), backend
    hits = [[output["cached_tokens"] for output in runs[b]["outputs"]] for b in ("stock", "headinfer")]
    assert hits[0] == hits[1]


def test_device_tier_is_small_and_kv_is_streamed(runs):
    tiers = runs["headinfer"]["tiers"]
    if runs["in_place"]:  # one tier, read in place by the CPU kernel: nothing streamed, no staging
        assert tiers["streamed_units"] == 0 and tiers["device_bytes"] == NUM_BLOCKS * BYTES_PER_BLOCK
        assert "kernel cpu" in runs["headinfer"]["log"]
        return
    assert tiers["num_blocks"] == NUM_BLOCKS
    assert tiers["streamed_units"] == UNITS
    total_kv = NUM_BLOCKS * BYTES_PER_BLOCK
    assert tiers["host_bytes"] == total_kv
    if runs["page_cache"]:  # the cache holds about 40 of the 129 blocks; hits spare their loads
        assert 35 <= tiers["cache_rows"] <= 40
        assert 0 < tiers["pages_hit"] < tiers["pages_read"]
        assert "device page cache (device_tier=pages)" in runs["headinfer"]["log"]
        return
    assert tiers["cache_rows"] == 0
    assert tiers["device_bytes"] <= 0.10 * total_kv
    longest_prompt_kv = 4000 * BYTES_PER_BLOCK // BLOCK_SIZE
    assert longest_prompt_kv >= 10 * tiers["device_bytes"]
    assert "headinfer: 0 of 24 (layer, KV head) pairs resident" in runs["headinfer"]["log"]
    assert "headinfer" not in runs["stock"]["log"]  # not selected: the stock backend ran untouched


# Half precision: the backends round differently, so neither logprobs nor
# long greedy continuations match exactly (a near-tie can flip a token, and
# the continuations part there). What must hold is accuracy: teacher-forced
# prompt logprobs, compared with the stock backend in float32, are as close
# for headinfer as for the stock backend in the same dtype, streamed and in
# place (the C++ prefill kernel). (Measured here: mean error 0.19 for both in
# bfloat16, 0.024 for both in float16, streamed or in place on AMD Zen 4;
# pairing each KV group with the wrong query heads gives 2.8 in float16, and
# the in-place bf16 kernel's scores scaled 5% too much give 0.33.)
HALF_PRECISION = ("bfloat16", "float16")


def half_precision_engine(dtype: str, backend: str, in_place: bool = False, **options) -> dict:
    """Engine arguments of the half-precision runs: the stock backend, or headinfer with a small host tier,
    attending in place (the C++ kernels) or streamed; ``options``: more engine arguments."""
    engine = dict(dtype=dtype, max_model_len=2048, enforce_eager=True, seed=0, max_num_batched_tokens=512, **options)
    if backend == "stock":
        return {**engine, "kv_cache_memory_bytes": 64 << 20}
    settings = {"cpu_kv_cache_gib": 0.02, "cpu_attention": "auto" if in_place else "off"}
    return {**engine, "attention_backend": "headinfer", "additional_config": {"headinfer": settings}}


@functools.cache  # the stock runs serve both of headinfer's (streamed and in place)
def prompt_logprobs_run(model, dtype: str, backend: str, in_place: bool = False) -> list[float]:
    """Teacher-forced logprobs of three prompts' tokens, prefilled in chunks of up to 512 tokens; `in_place`:
    headinfer attends in place (the C++ prefill kernel), else streamed."""
    rng = random.Random(1)
    batch = [[rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)] for n in (1500, 300, 7)]
    spec = {"model": str(model), "batches": [batch], "max_tokens": 1, "logprobs": 1, "prompt_logprobs": 1}
    result = run_in_subprocess({**spec, "engine": half_precision_engine(dtype, backend, in_place)})
    return [logprob for output in result["outputs"] for logprob in output["prompt_logprobs"]]


@pytest.fixture(scope="module")
def half_model(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("qwen2_half"), "qwen2")
    return model, prompt_logprobs_run(model, "float32", "stock")


@pytest.mark.parametrize("in_place", [False, True], ids=["streamed", "in_place"])
@pytest.mark.parametrize("dtype", HALF_PRECISION)
def test_half_precision_is_as_accurate_as_stock_backend(dtype, in_place, half_model):
    model, reference = half_model

    def mean_error(logprobs):
        assert len(logprobs) == len(reference) == 1804
        return sum(abs(a - b) for a, b in zip(logprobs, reference, strict=True)) / len(reference)

    stock = mean_error(prompt_logprobs_run(model, dtype, "stock"))
    ours = mean_error(prompt_logprobs_run(model, dtype, "headinfer", in_place))
    assert ours <= 1.1 * stock + 1e-4, (ours, stock)


def greedy_decode_run(model, dtype: str, backend: str) -> list[list[tuple[int, float]]]:
    """Greedy continuations of a batch of 16 prompts: per request, (token, logprob) of each token a decode
    step chose (the first token, chosen by the prefill, left out). headinfer attends in place (the C++
    kernels), not streamed as the suite's default (conftest.py) has it."""
    rng = random.Random(2)
    lengths = (700, 300, 90, 33, 17, 400, 5, 150, 1000, 64, 250, 9, 500, 120, 41, 800)
    batch = [[rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)] for n in lengths]
    spec = {"model": str(model), "batches": [batch], "max_tokens": 16, "logprobs": 1}
    engine = half_precision_engine(dtype, backend, in_place=True, max_num_seqs=16)
    result = run_in_subprocess({**spec, "engine": engine})
    return [[(token, step[str(token)]) for token, step in zip(output["tokens"], output["logprobs"], strict=True)][1:]
            for output in result["outputs"]]


def test_bf16_decode_is_as_accurate_as_stock_backend(half_model):
    """Decode steps in bf16 (the CPU kernel's decode path: on a CPU with AVX-512 BF16, VDPBF16PS with the
    probabilities rounded to bf16) against the stock backend in float32: over the steps where both bf16
    backends still chose the float32 run's tokens, headinfer's logprobs are about as close as stock's (within
    1.2x: measured 1.04x over 50 steps on AMD Zen 4; the values of every second key dropped, or another
    head's values, change the first decoded token)."""
    model, _ = half_model
    reference = greedy_decode_run(model, "float32", "stock")
    stock, ours = (greedy_decode_run(model, "bfloat16", backend) for backend in ("stock", "headinfer"))
    stock_errors, our_errors = [], []
    for want, theirs, mine in zip(reference, stock, ours, strict=True):
        for (token, logprob), (stock_token, stock_logprob), (our_token, our_logprob) in zip(
            want, theirs, mine, strict=True
        ):
            if not token == stock_token == our_token:
                break
            stock_errors.append(abs(stock_logprob - logprob))
            our_errors.append(abs(our_logprob - logprob))
    assert len(our_errors) >= 30, f"only {len(our_errors)} decode steps chose the float32 run's tokens"
    stock_mean, our_mean = sum(stock_errors) / len(stock_errors), sum(our_errors) / len(our_errors)
    assert our_mean <= 1.2 * stock_mean + 1e-4, (our_mean, stock_mean, len(our_errors))
