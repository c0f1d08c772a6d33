"""compat's version glue on stand-ins for each release's objects (the real ones: test_vllm_config_hook.py)."""

from __future__ import annotations

import enum
import logging
import types

import pytest

from headinfer_vllm.vllm_plugin import compat


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.0", "0.34.0"])
def test_tested_releases_start_without_warning(version):
    assert compat.untested_vllm_warning(version) is None


@pytest.mark.parametrize("version", ["0.31.2", "0.34.1", "0.35.0", "0.35.0rc1", "1.0.0", "not-a-version"])
def test_other_releases_are_warned_about_naming_the_tested_range(version):
    warning = compat.untested_vllm_warning(version)
    assert warning.startswith(f"headinfer: vLLM {version} is not a release headinfer is tested against")
    assert "0.32.0, 0.33.0, 0.34.0; install vllm>=0.32.0,<0.35" in warning


def test_the_warning_is_logged_at_start_up_once(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    compat.warn_if_untested_vllm.cache_clear()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append((record.levelno, record.getMessage()))
    logger = logging.getLogger("headinfer_vllm")  # vLLM's handlers may not propagate it: read it directly
    logger.addHandler(handler)
    try:
        compat.warn_if_untested_vllm()
        compat.warn_if_untested_vllm()
    finally:
        logger.removeHandler(handler)
        compat.warn_if_untested_vllm.cache_clear()
    assert lines == [(logging.WARNING, compat.untested_vllm_warning("0.35.0"))]


class CacheConfig034:
    """vLLM 0.34's CacheConfig as far as compat reads it: an optional field and its resolution."""

    DEFAULT_GPU_MEMORY_UTILIZATION = 0.92

    def __init__(self, gpu_memory_utilization=None, enable_extensible_kv_cache=None):
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_extensible_kv_cache = enable_extensible_kv_cache

    @property
    def resolved_gpu_memory_utilization(self):
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return 1.0 if self.enable_extensible_kv_cache else self.DEFAULT_GPU_MEMORY_UTILIZATION


@pytest.mark.parametrize(
    "cache, expected",
    [
        (types.SimpleNamespace(gpu_memory_utilization=0.8), 0.8),  # 0.32, 0.33: a float in the field
        (CacheConfig034(), 0.92),
        (CacheConfig034(enable_extensible_kv_cache=False), 0.92),
        (CacheConfig034(gpu_memory_utilization=0.5), 0.5),
    ],
)
def test_gpu_memory_utilization_is_vllm_s_resolution(cache, expected):
    assert compat.gpu_memory_utilization(cache) == expected


@pytest.mark.parametrize(
    "cache, requested",
    [
        (types.SimpleNamespace(), False),  # 0.32, 0.33: no such option
        (CacheConfig034(), False),  # unset: vLLM decides (off, as headinfer sets kv_cache_memory_bytes)
        (CacheConfig034(enable_extensible_kv_cache=False), False),
        (CacheConfig034(enable_extensible_kv_cache=True), True),
    ],
)
def test_extensible_kv_cache_requested(cache, requested):
    assert compat.extensible_kv_cache_requested(cache) is requested


class AttentionType033(str, enum.Enum):
    DECODER = "decoder"
    ENCODER = "encoder"


class AttentionType034(str, enum.Enum):
    """``enum.StrEnum`` (Python 3.11 on), written out: ``str()`` and format give the value."""

    __str__ = str.__str__
    __format__ = str.__format__

    DECODER = "decoder"
    ENCODER = "encoder"


@pytest.mark.parametrize("kind", [AttentionType033, AttentionType034])
def test_attention_type_is_named_by_its_value_on_every_release(kind):
    assert compat.attention_type_name(kind.ENCODER) == "encoder"
    assert compat.attention_type_name("encoder") == "encoder"
    assert kind.DECODER == "decoder"  # the backend's comparisons hold on both


@pytest.mark.parametrize(
    "text_config, differs",
    [
        ({}, False),
        ({"v_head_dim": 32}, False),
        ({"v_head_dim": 16}, True),  # MLA-like
        ({"swa_head_dim": 64, "swa_v_head_dim": 64}, False),
        ({"swa_head_dim": 192, "swa_v_head_dim": 128}, True),  # MiMo-V2's windowed layers
    ],
)
def test_v_head_sizes_unlike_k_are_refused_before_vllm_0_34_picks_another_backend(text_config, differs):
    """vLLM 0.34 gives layers whose V head size differs a backend that can serve them (``supports_head_size_v``;
    headinfer's says no), so headinfer must refuse such models itself, at config time."""
    from headinfer_vllm.vllm_plugin.backend import HeadInferBackend
    from headinfer_vllm.vllm_plugin.refusals import _v_head_size_differs

    model = types.SimpleNamespace(hf_text_config=types.SimpleNamespace(**text_config), get_head_size=lambda: 32)
    assert _v_head_size_differs(model) is differs
    assert HeadInferBackend.supports_head_size_v(32, 32) and not HeadInferBackend.supports_head_size_v(192, 128)
