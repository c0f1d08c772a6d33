"""The plugin's decisions at config time, through vLLM's own EngineArgs.

``create_engine_config`` loads the plugins, converts ``attention_backend`` and
runs the platform hook, exactly as ``LLM(...)`` and ``vllm serve`` do, without
starting an engine.
"""

import logging

import pytest
import torch

pytest.importorskip("vllm")

from vllm.engine.arg_utils import EngineArgs

from headinfer_vllm.tiny_models import SHAPE, save_tiny_model
from headinfer_vllm.vllm_plugin.compat import BACKEND_PATH

pytestmark = pytest.mark.vllm

BLOCK = 32
BYTES_PER_BLOCK = SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * 2 * BLOCK * SHAPE["head_dim"] * 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


def config_for(model, settings=None, **engine):
    args = dict(model=model, dtype="float32", max_model_len=1024, block_size=BLOCK)
    args.update(engine)
    if settings is not None:
        args.update(attention_backend="headinfer", additional_config={"headinfer": settings})
    return EngineArgs(**args).create_engine_config()


def test_not_selected_changes_nothing(model):
    config = config_for(model, kv_cache_memory_bytes=1 << 26)
    assert config.attention_config.backend is None or config.attention_config.backend.name != "CUSTOM"
    assert config.cache_config.num_gpu_blocks_override is None
    assert "headinfer" not in (config.additional_config or {})


def test_host_budget_sets_block_count(model):
    config = config_for(model, {"cpu_kv_cache_gib": 300 * BYTES_PER_BLOCK / 2**30})
    assert config.attention_config.backend.name == "CUSTOM"
    assert config.cache_config.num_gpu_blocks_override == 300
    # vLLM's own tensor is tiny: one element per token and layer (plus slack).
    assert config.cache_config.kv_cache_memory_bytes <= max(1 << 20, 2 * 300 * BYTES_PER_BLOCK // 64)
    resolved = config.additional_config["headinfer"]
    assert resolved["gpu_kv_cache_gib"] is None and resolved["prefetch_depth"] == 1


def test_settings_from_environment(model, monkeypatch):
    monkeypatch.setenv("HEADINFER_CPU_KV_CACHE_GIB", str(200 * BYTES_PER_BLOCK / 2**30))
    assert config_for(model, {}).cache_config.num_gpu_blocks_override == 200


@pytest.mark.parametrize(
    "settings, engine, message",
    [
        ({"cpu_kv_cache_gib": 0.01, "gpu_kv_cache_gib": 1e-6}, {}, r"cannot hold the staging buffers.*minimum is"),
        ({"cpu_kv_cache_gib": 1 << 20}, {}, "only .* GiB is available"),
        ({"cpu_kv_cache_gib": 0.01, "gpu_kv_cache_gib": 1e5}, {}, r"is host memory too.*lower gpu_kv_cache"),
        ({"cpu_kv_cache_gib": 20 * BYTES_PER_BLOCK / 2**30}, {}, "holds 608 tokens but max_model_len is 1024"),
        ({"cpu_kv_cache": 1}, {}, "unknown setting 'cpu_kv_cache'"),
        ({"head_group_size": 3}, {}, "must divide num_kv_heads"),
        ({}, {"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8 is not supported"),
    ],
)
def test_bad_configurations_are_refused_clearly(model, settings, engine, message):
    with pytest.raises(ValueError, match=message):
        config_for(model, settings, **engine)


def test_sliding_window_model_lets_vllm_size_the_pool_for_its_kv_cache_groups(tmp_path):
    """With windows, vLLM's hybrid manager knows how many layers share a block only once the workers report
    their layers: it sizes the pool from kv_cache_memory_bytes, the budget in its placeholder's units."""
    model = str(save_tiny_model(tmp_path, "mistral_window"))
    config = config_for(model, {"cpu_kv_cache_gib": 0.01}, max_model_len=512)
    assert config.attention_config.backend.name == "CUSTOM"
    assert config.model_config.get_sliding_window() is not None
    assert config.cache_config.num_gpu_blocks_override is None
    # One placeholder element per token and layer stands for K and V of every KV head.
    per_element = 2 * SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    assert config.cache_config.kv_cache_memory_bytes == int(0.01 * 2**30) // per_element


def test_sliding_window_model_without_the_hybrid_manager_gets_the_planned_block_count(tmp_path):
    model = str(save_tiny_model(tmp_path, "mistral_window"))
    config = config_for(model, {"cpu_kv_cache_gib": 0.01}, max_model_len=512, disable_hybrid_kv_cache_manager=True)
    assert config.cache_config.num_gpu_blocks_override == int(0.01 * 2**30) // BYTES_PER_BLOCK


def test_stateful_layers_are_refused_before_the_engine_starts(tmp_path):
    """A hybrid Mamba model (Jamba) has layers without a KV cache, which headinfer cannot page."""
    transformers = pytest.importorskip("transformers")
    transformers.JambaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_experts=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4,
    ).save_pretrained(tmp_path)
    refusal = r"headinfer: it does not support Mamba, linear-attention and other stateful layers.*default attention"
    with pytest.raises(ValueError, match=refusal):
        config_for(str(tmp_path), {"cpu_kv_cache_gib": 0.01}, max_model_len=512)


@pytest.mark.parametrize(
    "layer, reason",
    [
        ({"use_mla": True}, "MLA"),
        ({"attn_type": "encoder_decoder"}, "attention type encoder_decoder"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
        ({"use_kv_connector": True}, "KV connector"),
    ],
)
def test_backend_selection_refuses_unsupported_layers(layer, reason):
    """What each attention layer asks of the backend is checked where vLLM picks it."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from headinfer_vllm.vllm_plugin import register

    register()
    platform = type(current_platform)
    selector = AttentionSelectorConfig(head_size=32, dtype=torch.float32, kv_cache_dtype="auto", block_size=32)
    assert platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector) == BACKEND_PATH
    assert platform.get_attn_backend_cls(None, selector) != BACKEND_PATH  # not selected: vLLM's own choice
    windowed = selector._replace(has_sliding_window=True, has_sink=True)
    assert platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, windowed) == BACKEND_PATH
    with pytest.raises(ValueError, match=f"{reason} not supported by headinfer.*default attention backend"):
        platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector._replace(**layer))


def test_register_is_idempotent():
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from headinfer_vllm.vllm_plugin import register

    register()
    platform = type(current_platform)
    hooks = (platform.check_and_update_config, platform.get_attn_backend_cls)
    register()
    register()
    assert (platform.check_and_update_config, platform.get_attn_backend_cls) == hooks
    assert AttentionBackendEnum["HEADINFER"] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
         r"KV connectors are not supported \(--kv-transfer-config uses ExampleConnector\).*drop --kv-transfer-config"),
        ({"kv_offloading_size": 1.0}, r"KV offloading \(--kv-offloading-size\) is not supported"),
    ],
)
def test_engine_features_are_refused_by_name(model, engine, message):
    with pytest.raises(ValueError, match=message):
        config_for(model, {"cpu_kv_cache_gib": 0.01}, **engine)


def test_draft_model_speculation_is_refused_by_name(model):
    speculative = {"method": "draft_model", "model": model, "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match=r"speculative decoding with method 'draft_model' is not supported.*ngram"):
        config_for(model, {"cpu_kv_cache_gib": 0.01}, speculative_config=speculative)


def test_draft_free_speculation_is_accepted(model):
    speculative = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    config = config_for(model, {"cpu_kv_cache_gib": 0.01}, speculative_config=speculative)
    assert config.cache_config.num_gpu_blocks_override


def test_host_check_counts_every_data_parallel_engine(model, monkeypatch):
    from headinfer_vllm.core import host_memory

    budget = 300 * BYTES_PER_BLOCK
    monkeypatch.setattr(host_memory, "free_host_bytes", lambda: int(1.5 * budget) + (4 << 20))
    config_for(model, {"cpu_kv_cache_gib": budget / 2**30})  # one engine fits
    with pytest.raises(ValueError, match=r"× 2 data-parallel engines asks for .* GiB"):
        config_for(model, {"cpu_kv_cache_gib": budget / 2**30}, data_parallel_size=2)


def test_host_check_warns_instead_where_the_user_trusts_the_host(model, monkeypatch, caplog):
    """``host_memory_check=warn`` (hosts whose memory grows on demand): the plan goes on, the log says why."""
    from headinfer_vllm.core import host_memory
    from headinfer_vllm.vllm_plugin import defaults

    budget = 300 * BYTES_PER_BLOCK
    monkeypatch.setattr(host_memory, "free_host_bytes", lambda: budget // 2)
    monkeypatch.setattr(defaults, "long_context_defaults_apply", lambda: True)  # CUDA: staging is not host memory
    monkeypatch.setattr(logging.getLogger("headinfer_vllm"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="headinfer_vllm")
    with pytest.raises(ValueError, match=r"only .* GiB is available; lower cpu_kv_cache_gib, or set host_memory_che"):
        config_for(model, {"cpu_kv_cache_gib": budget / 2**30})
    config = config_for(model, {"cpu_kv_cache_gib": budget / 2**30, "host_memory_check": "warn"})
    assert config.cache_config.num_gpu_blocks_override == 300
    assert "host memory check (warn)" in caplog.text


def test_host_check_counts_vllm_buffers_that_grow_with_context(model, monkeypatch):
    from headinfer_vllm.core import host_memory
    from headinfer_vllm.vllm_plugin import defaults

    monkeypatch.setattr(defaults, "long_context_defaults_apply", lambda: True)  # CUDA: staging is not host memory

    budget = 300 * BYTES_PER_BLOCK
    monkeypatch.setattr(host_memory, "free_host_bytes", lambda: budget + (1 << 20))
    config_for(model, {"cpu_kv_cache_gib": budget / 2**30}, max_num_seqs=4)
    # 256 requests × 1024 tokens × 5 bytes of token buffers no longer fit in the 1 MiB left.
    with pytest.raises(ValueError, match=r"only .* GiB is available"):
        config_for(model, {"cpu_kv_cache_gib": budget / 2**30}, max_num_seqs=256)


def test_long_context_defaults_on_cuda(model, monkeypatch):
    from headinfer_vllm.vllm_plugin import defaults

    monkeypatch.setattr(defaults, "long_context_defaults_apply", lambda: True)
    budget = {"cpu_kv_cache_gib": 40 * BYTES_PER_BLOCK * 8 / 2**30}
    chosen = config_for(model, budget, block_size=None, max_num_batched_tokens=None)
    assert chosen.cache_config.block_size == defaults.LONG_CONTEXT_BLOCK_SIZE
    assert chosen.cache_config.user_specified_block_size  # the worker keeps it
    assert chosen.scheduler_config.max_num_batched_tokens >= defaults.LONG_CONTEXT_PREFILL_TOKENS
    kept = config_for(model, budget, block_size=BLOCK, max_num_batched_tokens=2048)
    assert kept.cache_config.block_size == BLOCK
    assert kept.scheduler_config.max_num_batched_tokens == 2048
    stock = EngineArgs(model=model, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=1 << 26)
    assert stock.create_engine_config().cache_config.block_size != defaults.LONG_CONTEXT_BLOCK_SIZE


def test_full_cuda_graphs_fall_back_to_piecewise(model):
    from vllm.config.compilation import CUDAGraphMode

    config = config_for(model, {"cpu_kv_cache_gib": 0.01}, compilation_config={"cudagraph_mode": "FULL"})
    assert config.compilation_config.cudagraph_mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE)


def test_flash_attention_version_is_vllms_choice(model, monkeypatch):
    """The runtime asks vLLM's own selection, under the engine's config (so --attention-config is honoured)."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import fa_utils

    from headinfer_vllm.vllm_plugin.compat import flash_attn_version

    asked = []

    def vllm_choice(head_size, head_size_v=None, **_):
        asked.append((head_size, head_size_v))
        return get_current_vllm_config().attention_config.flash_attn_version

    config = config_for(model, {"cpu_kv_cache_gib": 0.01}, attention_config={"flash_attn_version": 2})
    assert flash_attn_version(config, 128) is None  # not CUDA: no FlashAttention
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    monkeypatch.setattr(fa_utils, "get_flash_attn_version", vllm_choice)
    assert flash_attn_version(config, 128) == 2
    assert asked == [(128, 128)]


def test_gemma3_27b_layout_groups_as_the_readme_says(model):
    """vLLM's own grouping of Gemma-3 27B's 62 layers (every sixth full, the rest windowed), with headinfer's
    specs: 7 KV-cache groups of at most 10 layers, so the store has 10 slots (10/62 of one table's pages)."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from headinfer_vllm.vllm_plugin.backend import HeadInferBackend

    config = config_for(model, {"cpu_kv_cache_gib": 0.01})
    config.cache_config.kv_cache_layout = "LBNHC"  # the engine core resolves it at start-up; as it does on CPU
    common = dict(block_size=BLOCK, num_kv_heads=16, head_size=128, dtype=torch.bfloat16)
    specs = {
        f"model.layers.{i}.self_attn.attn": HeadInferBackend.customize_spec(
            FullAttentionSpec(**common) if (i + 1) % 6 == 0 else SlidingWindowSpec(**common, sliding_window=1024)
        )
        for i in range(62)
    }
    groups = get_kv_cache_groups(config, specs)
    assert len(groups) == 7
    assert max(len(group.layer_names) for group in groups) == 10
    assert sorted(type(group.kv_cache_spec).__name__ for group in groups) == ["FullAttentionSpec"] + [
        "SlidingWindowSpec"
    ] * 6
