"""Tensor and pipeline parallelism: per-rank plans and budgets, and tensor-parallel exactness end to end.

``cpu_kv_cache_gib`` is one engine's total across its TP × PP ranks, split
evenly; every rank holds the same block count (vLLM's scheduler is shared),
set by the pipeline stage with the most layers. The plans and budgets are
checked here through vLLM's own ``EngineArgs`` without starting an engine.
End to end, tensor-parallel 2 runs on vLLM's CPU platform (one core per
rank) against the stock backend with the same layout. Pipeline parallelism
fails in vLLM 0.32's CPU runner even with the stock backend, so its end-to-end
test needs two CUDA GPUs.
"""

import json
import os
import random
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm.engine.arg_utils import EngineArgs

from headinfer_vllm.config import HeadInferConfig
from headinfer_vllm.core import host_memory, plan_capacity
from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import SHAPE, save_tiny_model
from headinfer_vllm.vllm_plugin import capacity, defaults
from headinfer_vllm.vllm_plugin.runtime import numa_pages
from tests.vllm.stock_comparison import assert_same_generations

pytestmark = pytest.mark.vllm

BLOCK = 32
LAYERS, KV_HEADS = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"]
PAGE = 2 * BLOCK * SHAPE["head_dim"] * 4
"""Bytes of one block of one (layer, KV head), float32 K and V."""
BYTES_PER_BLOCK = LAYERS * KV_HEADS * PAGE
"""One block of the whole model."""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory):
    """Fewer KV heads than tensor-parallel ranks: vLLM replicates the head on every rank."""
    return str(save_tiny_model(tmp_path_factory.mktemp("llama_mqa"), "llama", num_key_value_heads=1))


def config_for(model, settings_=None, **engine):
    args = dict(model=model, dtype="float32", max_model_len=1024, block_size=BLOCK,
                distributed_executor_backend="mp", attention_backend="headinfer",
                additional_config={"headinfer": settings_ or {"cpu_kv_cache_gib": 300 * BYTES_PER_BLOCK / 2**30}})
    args.update(engine)
    return EngineArgs(**args).create_engine_config()


def plans(config):
    """Each rank's capacity plan, as its worker builds it (``parallel_config.rank`` set per worker)."""
    resolved = HeadInferConfig.from_sources(config.additional_config["headinfer"], environ={})
    return [
        capacity.capacity_for(config, resolved, capacity.pipeline_stage(config.parallel_config, rank))
        for rank in range(capacity.parallel_ranks(config.parallel_config))
    ]


def test_tensor_parallel_splits_heads_and_budget(model):
    """Each rank keeps its own KV heads; the total budget holds as many tokens as on one rank."""
    one, two = config_for(model), config_for(model, tensor_parallel_size=2)
    assert one.cache_config.num_gpu_blocks_override == two.cache_config.num_gpu_blocks_override == 300
    (whole,), ranks = plans(one), plans(two)
    assert [plan.layout.num_kv_heads for plan in ranks] == [KV_HEADS // 2] * 2
    assert [plan.layout.num_layers for plan in ranks] == [LAYERS] * 2
    assert sum(plan.host_bytes for plan in ranks) == whole.host_bytes == 300 * BYTES_PER_BLOCK


def test_fewer_kv_heads_than_ranks_replicate_the_head(one_kv_head):
    """One KV head over 2 ranks: each rank holds a copy, so the same total holds half the tokens."""
    budget = {"cpu_kv_cache_gib": 300 * LAYERS * PAGE / 2**30}
    one = config_for(one_kv_head, budget)
    two = config_for(one_kv_head, budget, tensor_parallel_size=2)
    assert one.cache_config.num_gpu_blocks_override == 300
    assert two.cache_config.num_gpu_blocks_override == 150
    assert [plan.layout.num_kv_heads for plan in plans(two)] == [1, 1]


@pytest.mark.parametrize(
    "tp, pp, stage_layers",
    [(1, 2, [3, 3]), (1, 4, [1, 2, 2, 1]), (2, 2, [3, 3]), (1, 5, [1, 1, 1, 2, 1])],
)
def test_pipeline_stages_keep_their_own_layers_with_one_block_count(model, tp, pp, stage_layers):
    """vLLM gives uneven stages the remainder before the last; the largest stage sets the block count."""
    config = config_for(model, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert capacity.stage_layer_counts(config) == stage_layers
    ranks = plans(config)
    num_blocks = config.cache_config.num_gpu_blocks_override
    # Each rank's share of the total budget holds num_blocks blocks of the largest stage.
    assert num_blocks == (300 * BYTES_PER_BLOCK // (tp * pp)) // (max(stage_layers) * (KV_HEADS // tp) * PAGE)
    assert {plan.layout.num_blocks for plan in ranks} == {num_blocks}
    assert [plan.layout.num_layers for plan in ranks] == [n for n in stage_layers for _ in range(tp)]
    assert all(plan.host_bytes <= 300 * BYTES_PER_BLOCK // (tp * pp) for plan in ranks)
    tiers, _ = capacity.host_tier_bytes(config, HeadInferConfig(**config.additional_config["headinfer"]))
    assert tiers == sum(plan.host_bytes for plan in ranks) == num_blocks * BYTES_PER_BLOCK
    # vLLM's own KV tensor is sized for the largest stage.
    assert config.cache_config.kv_cache_memory_bytes >= num_blocks * BLOCK * max(stage_layers) * 4


def test_the_worker_plans_its_own_stage(model):
    """A worker's ``capacity_for`` (no stage given) follows ``parallel_config.rank`` as vLLM sets it."""
    config = config_for(model, tensor_parallel_size=2, pipeline_parallel_size=4)
    resolved = HeadInferConfig(**config.additional_config["headinfer"])
    layers = []
    for rank in range(8):
        config.parallel_config.rank = rank
        assert config.model_config.get_num_layers(config.parallel_config) == capacity.stage_layer_counts(config)[
            capacity.pipeline_stage(config.parallel_config)]
        layers.append(capacity.capacity_for(config, resolved).layout.num_layers)
    assert layers == [1, 1, 2, 2, 2, 2, 1, 1]


@pytest.mark.parametrize("device_units", [None, 2, 3, 7, 12, 14, 100])
def test_smaller_stages_never_exceed_the_largest_stage_s_tiers(device_units):
    """With any device budget, a smaller stage's plan keeps the block count and fits both budgets."""
    page = 2 * 16 * 64 * 2  # one block of one KV head
    # The largest stage: 3 layers × 4 KV heads = 12 single-head units of 1000 blocks each.
    host, device = 12 * 1000 * page, None if device_units is None else device_units * 1000 * page
    common = dict(num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.float16, host_bytes=host,
                  device_bytes=device, head_group_size=None if device else 1, prefetch_depth=1)
    largest = plan_capacity(num_layers=3, **common)
    for layers in (1, 2):
        stage = capacity.stage_capacity(largest, layers, device_budget=device is not None)
        assert stage.layout.num_blocks == largest.layout.num_blocks
        assert stage.layout.num_layers == layers
        assert stage.host_bytes <= largest.host_bytes and stage.device_bytes <= largest.device_bytes
        if device is None:
            assert stage.num_resident_units == 0 and stage.num_staging_buffers == 2


def test_host_check_counts_every_rank_and_engine_on_the_host(model, monkeypatch):
    budget = 300 * BYTES_PER_BLOCK
    monkeypatch.setattr(host_memory, "free_host_bytes", lambda: int(1.5 * budget) + (4 << 20))
    config_for(model, tensor_parallel_size=2, pipeline_parallel_size=2)  # the total across 4 ranks fits
    with pytest.raises(ValueError, match=r"× 2 data-parallel engines \(4 ranks on this host\) asks for"):
        config_for(model, tensor_parallel_size=2, data_parallel_size=2)


def test_host_ranks_follow_the_executor(model):
    """Multiprocessing across nodes: this node's consecutive ranks; Ray: one rank of the largest stage."""
    config = config_for(model, tensor_parallel_size=2, pipeline_parallel_size=3)
    assert capacity.host_ranks(config) == list(range(6))
    parallel = types.SimpleNamespace(
        tensor_parallel_size=2, pipeline_parallel_size=3, distributed_executor_backend="mp",
        local_world_size=2, node_rank_within_dp=1,
    )
    on_node = types.SimpleNamespace(parallel_config=parallel, model_config=config.model_config)
    assert capacity.host_ranks(on_node) == [2, 3]
    parallel.distributed_executor_backend = "ray"
    assert capacity.host_ranks(on_node) == [0]  # 6 layers over 3 stages: [2, 2, 2], stage 0 is the largest


def test_budget_errors_name_the_per_rank_share(model):
    tiny_device = {"cpu_kv_cache_gib": 0.05, "gpu_kv_cache_gib": 1e-5}
    with pytest.raises(ValueError, match=r"the total of 2 ranks, 0\.0250 GiB each; gpu_kv_cache_gib is per rank"):
        config_for(model, tiny_device, tensor_parallel_size=2)


def test_context_parallelism_is_refused_by_name(one_kv_head):
    """vLLM allows decode context parallelism only with more ranks than KV heads."""
    with pytest.raises(ValueError, match=r"context parallelism .* is not supported"):
        config_for(one_kv_head, tensor_parallel_size=2, decode_context_parallel_size=2)


def test_start_up_line_gives_the_rank_and_the_host(model, monkeypatch):
    lines = []
    monkeypatch.setattr(capacity.logger, "info", lambda message, *args: lines.append(message % args))
    config_for(model, tensor_parallel_size=2, pipeline_parallel_size=4)
    (line,) = [line for line in lines if "per rank" in line]
    assert "tensor-parallel 2 × pipeline-parallel 4 = 8 ranks; 2 of 4 KV heads, 2 of 6 layers" in line
    assert "layers per stage: 1, 2, 2, 1" in line and "= cpu_kv_cache_gib / 8" in line
    assert "host tiers of the 8 ranks on this host" in line


def test_numa_advice_on_multi_node_cuda_hosts(model, monkeypatch, tmp_path):
    for name in ("node0", "node1", "has_cpu", "online"):
        (tmp_path / name).mkdir()
    assert capacity.numa_node_count(str(tmp_path)) == 2
    assert capacity.numa_node_count(str(tmp_path / "missing")) == 1
    warnings = []
    monkeypatch.setattr(capacity.logger, "warning", lambda message, *args: warnings.append(message % args))
    monkeypatch.setattr(capacity, "numa_node_count", lambda: 2)
    config = config_for(model, tensor_parallel_size=2)
    capacity.recommend_numa_binding(config)
    assert not warnings  # CPU platform: no GPU to be near
    monkeypatch.setattr(defaults, "long_context_defaults_apply", lambda: True)  # as on CUDA
    capacity.recommend_numa_binding(config)
    assert len(warnings) == 1 and "pass --numa-bind" in warnings[0]
    config.parallel_config.numa_bind = True
    capacity.recommend_numa_binding(config)
    assert len(warnings) == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/numa_maps"), reason="kernel without NUMA support")
def test_numa_pages_of_a_touched_tensor():
    tensor = torch.ones(1 << 20)  # 4 MiB, every page written
    pages = numa_pages(tensor)
    nodes = {int(name[4:]) for name in os.listdir("/sys/devices/system/node") if name[4:].isdigit()}
    assert pages and set(pages) <= nodes and sum(pages.values()) > 0


# End to end: tensor-parallel 2 on vLLM's CPU platform, one core per rank.

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
"""One OpenMP core per rank: vLLM's CPU platform binds each rank's threads."""
TP_NUM_BLOCKS = 65  # 64 usable: vLLM keeps a null block


def tp_prompts(seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)]

    shared = tokens(300)
    first = [tokens(900), shared + tokens(40), tokens(60), tokens(5)]
    second = [shared + tokens(20)]
    return [first, second]


def tp_engine(backend: str, bytes_per_block: int, stock_blocks: int = TP_NUM_BLOCKS) -> dict:
    common = dict(
        dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
        tensor_parallel_size=2, distributed_executor_backend="mp",
        enable_chunked_prefill=True, max_num_batched_tokens=256, enable_prefix_caching=True,
    )
    if backend == "stock":
        return {**common, "num_gpu_blocks_override": stock_blocks, "kv_cache_memory_bytes": 32 << 20}
    settings_ = {"cpu_kv_cache_gib": (TP_NUM_BLOCKS + 0.5) * bytes_per_block / 2**30}
    return {**common, "attention_backend": "headinfer", "additional_config": {"headinfer": settings_}}


@pytest.fixture(scope="module", params=["llama", "qwen2-one-kv-head", "gemma3"])
def tp_runs(request, tmp_path_factory):
    """Stock and headinfer, tensor-parallel 2: 4 KV heads (2 per rank), 1 KV head (replicated, GQA 8:1), and
    Gemma-3's windowed and full layers in KV-cache groups of their own (vLLM's hybrid KV-cache manager)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU platform needs a core per rank")
    family = request.param.split("-")[0]
    kv_heads = 1 if request.param.endswith("one-kv-head") else KV_HEADS
    model = save_tiny_model(tmp_path_factory.mktemp(request.param), family, num_key_value_heads=kv_heads)
    spec = {"model": str(model), "batches": tp_prompts(seed=len(family)), "max_tokens": 8, "logprobs": 3}
    bytes_per_block = LAYERS * max(kv_heads, 2) * PAGE  # the total of both ranks: a replicated head counts twice
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TP_ENV.items():
            patch.setenv(name, os.environ.get(name, value))
        runs = {
            # Gemma-3's six KV-cache groups share one slot: the same budget pools six times the blocks.
            backend: run_in_subprocess({**spec, "engine": tp_engine(
                backend, bytes_per_block, TP_NUM_BLOCKS * (LAYERS if family == "gemma3" else 1))})
            for backend in ("stock", "headinfer")
        }
    return request.param, kv_heads, runs


def test_tensor_parallel_tokens_and_logprobs_match_stock_backend(tp_runs):
    name, _, runs = tp_runs
    assert_same_generations(runs["stock"]["outputs"], runs["headinfer"]["outputs"], count=5)
    cached = {backend: runs[backend]["outputs"][-1]["cached_tokens"] for backend in ("stock", "headinfer")}
    assert cached["headinfer"] == cached["stock"]
    # Prefix caching across ranks (Gemma-3's sliding-window groups find no hit for these prompts, in either).
    assert cached["headinfer"] > 0 or name == "gemma3"


def test_tensor_parallel_ranks_each_keep_their_own_heads(tp_runs):
    _, kv_heads, runs = tp_runs
    log = runs["headinfer"]["log"]
    per_rank = kv_heads // 2 or 1
    hybrid = tp_runs[0] == "gemma3"  # vLLM sizes the block pool: the engine plans no block count
    if not hybrid:
        assert f"per rank (tensor-parallel 2 × pipeline-parallel 1 = 2 ranks; {per_rank} of {kv_heads} KV heads" in log
        assert f"{TP_NUM_BLOCKS} blocks of {BLOCK} tokens" in log
    for rank in (0, 1):
        line = next(line for line in log.splitlines() if f"(rank {rank}: tensor-parallel rank {rank} of 2" in line)
        assert f"{LAYERS} layers, {per_rank} of {kv_heads} KV heads" in line
        if kv_heads == 1:
            assert "replicated on 2 ranks" in line
        if hybrid:
            assert "6 KV-cache groups sharing 1 slot of " in line


# Pipeline parallelism end to end: vLLM 0.32's CPU runner fails with it even
# with the stock backend (an assertion in sync_and_gather_intermediate_tensors
# on the second stage), so the comparison runs only on two CUDA GPUs. On CPU,
# what headinfer owns runs before that failure: each stage's store.

def test_pipeline_stages_build_their_own_stores_on_cpu(model):
    """Each stage's worker builds the store of its own layers, with the engine's one block count."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("pipeline parallelism on vLLM's CPU platform needs a core per rank")
    budget = (TP_NUM_BLOCKS + 0.5) * BYTES_PER_BLOCK
    engine = dict(dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
                  pipeline_parallel_size=2, distributed_executor_backend="mp", attention_backend="headinfer",
                  additional_config={"headinfer": {"cpu_kv_cache_gib": budget / 2**30}})
    spec = {"model": model, "batches": [[[5, 6, 7] * 10]], "max_tokens": 2, "logprobs": 1, "engine": engine}
    env = {**TP_ENV, **os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    completed = subprocess.run(  # not run_in_subprocess: the run itself fails in vLLM's CPU runner
        [sys.executable, "-m", "headinfer_vllm.offline_check"], input=json.dumps(spec),
        capture_output=True, text=True, timeout=600, env=env,
    )
    log = completed.stdout + completed.stderr
    assert f"3 of 6 layers; host budget {budget / 2 / 2**30:.3f} GiB = cpu_kv_cache_gib / 2" in log
    assert f"{TP_NUM_BLOCKS} blocks of {BLOCK} tokens" in log  # half the budget for half the layers
    for stage in (0, 1):
        assert f"pipeline stage {stage} of 2; 3 layers, 4 of 4 KV heads" in log, log[-3000:]


@pytest.mark.cuda
def test_pipeline_parallel_matches_stock_backend_on_cuda(model):
    if torch.cuda.device_count() < 2:
        pytest.skip("pipeline parallelism needs two GPUs")
    common = dict(dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
                  pipeline_parallel_size=2, distributed_executor_backend="mp", gpu_memory_utilization=0.3)
    engines = {
        "stock": {**common, "num_gpu_blocks_override": TP_NUM_BLOCKS},
        "headinfer": {**common, "attention_backend": "headinfer", "additional_config": {
            "headinfer": {"cpu_kv_cache_gib": (TP_NUM_BLOCKS + 0.5) * BYTES_PER_BLOCK / 2**30}}},
    }
    spec = {"model": model, "batches": tp_prompts(seed=3), "max_tokens": 8, "logprobs": 3}
    runs = {backend: run_in_subprocess({**spec, "engine": engine}) for backend, engine in engines.items()}
    stock, ours = runs["stock"]["outputs"], runs["headinfer"]["outputs"]
    assert_same_generations(stock, ours, count=len(stock))
    log = runs["headinfer"]["log"]
    assert "pipeline stage 0 of 2; 3 layers" in log and "pipeline stage 1 of 2; 3 layers" in log
