import pytest

from headinfer_vllm.config import HeadInferConfig


def test_defaults_are_valid():
    config = HeadInferConfig()
    assert config.gpu_kv_cache_bytes is None
    assert config.cpu_kv_cache_bytes == 4 << 30


def test_settings_override_environment():
    config = HeadInferConfig.from_sources(
        {"cpu_kv_cache_gib": 2, "head_group_size": "2"},
        environ={"HEADINFER_CPU_KV_CACHE_GIB": "8", "HEADINFER_GPU_KV_CACHE_GIB": "0.5"},
    )
    assert config.cpu_kv_cache_gib == 2.0
    assert config.gpu_kv_cache_gib == 0.5
    assert config.head_group_size == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cpu_kv_cache_gib": 0}, "cpu_kv_cache_gib must be > 0"),
        ({"gpu_kv_cache_gib": -1}, "gpu_kv_cache_gib must be >= 0"),
        ({"head_group_size": 0}, "head_group_size must be >= 1"),
        ({"head_group_size": 1.5}, "must be an integer"),
        ({"prefetch_depth": "x"}, "must be an integer"),
        ({"cpu_kv_cache": 1}, "unknown setting 'cpu_kv_cache'"),
        ({"cpu_attention": "gpu"}, "cpu_attention must be one of auto, all, off"),
        ({"cpu_attention": 1}, "setting 'cpu_attention' must be one of auto, all, off"),
        ({"host_memory_check": "lenient"}, "host_memory_check must be one of strict, warn"),
    ],
)
def test_bad_settings_are_refused_with_their_name(settings, message):
    with pytest.raises(ValueError, match=message):
        HeadInferConfig.from_sources(settings, environ={})


def test_host_memory_check_from_its_environment_variable():
    assert HeadInferConfig().host_memory_check == "strict"
    config = HeadInferConfig.from_sources(environ={"HEADINFER_HOST_MEMORY_CHECK": " WARN "})
    assert config.host_memory_check == "warn"


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="HEADINFER_CPU_KV_CACHE_GIB"):
        HeadInferConfig.from_sources(environ={"HEADINFER_CPU_KV_CACHE_GIB": "lots"})
