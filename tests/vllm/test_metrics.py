"""headinfer's Prometheus metrics of the device page cache, recorded from a store's running totals."""

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import REGISTRY

from headinfer_vllm.core.transfer import Traffic
from headinfer_vllm.vllm_plugin.metrics import HeadInferMetrics

NAMES = ("headinfer:cache_pages_read_total", "headinfer:cache_pages_hit_total", "headinfer:cache_hit_rate",
         "headinfer:cached_bytes")


def values() -> dict[str, float]:
    return {name: REGISTRY.get_sample_value(name) or 0.0 for name in NAMES}


def test_page_cache_hits_and_cached_bytes_reach_the_metrics():
    metrics = HeadInferMetrics.get()
    metrics.describe_store(resident_units=0, streamed_units=4, cpu_decode_units=0, host_bytes=1 << 20)
    before = values()
    metrics.record(Traffic(pages_read=10, pages_hit=4, pages_admitted=6, cached_bytes=4096))
    metrics.record(Traffic(pages_read=30, pages_hit=24, pages_admitted=6, cached_bytes=8192))
    after = values()
    assert after["headinfer:cache_pages_read_total"] - before["headinfer:cache_pages_read_total"] == 30
    assert after["headinfer:cache_pages_hit_total"] - before["headinfer:cache_pages_hit_total"] == 24
    assert after["headinfer:cache_hit_rate"] == pytest.approx(24 / 30)
    assert after["headinfer:cached_bytes"] == 8192
