"""The worker's decode-split decision at start-up (``cpu_attention`` on CUDA), with the rates stubbed.

The measurements need CUDA; the decision, its log line and its refusals run here on a CPU store.
"""

import logging

import pytest

pytest.importorskip("vllm")

from headinfer_vllm.core import cpu_attention
from headinfer_vllm.vllm_plugin import runtime
from tests.core.scenario import Scenario

pytestmark = pytest.mark.vllm


@pytest.fixture
def rates(monkeypatch):
    """The stubbed measurements, in bytes per second; a test may change them."""
    rates = {"h2d": 40e9, "cpu": 20e9, "overhead": 100e-6}
    monkeypatch.setattr(runtime, "measure_h2d_rate", lambda store: rates["h2d"])
    monkeypatch.setattr(runtime, "measure_cpu_rate", lambda store, **kwargs: rates["cpu"])
    monkeypatch.setattr(runtime, "measure_layer_overhead", lambda store, **kwargs: rates["overhead"])
    return rates


@pytest.fixture
def log(caplog):
    """headinfer's log records: its logger does not propagate once the plugin has loaded (compat.share_vllm_logging)."""
    logger = logging.getLogger("headinfer_vllm")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


@pytest.fixture
def store(rates):
    scenario = Scenario(num_layers=4, num_kv_heads=4, num_resident_units=4)
    scenario.build([40])
    return scenario.store


@pytest.mark.skipif(not cpu_attention.is_available(), reason="no C++ compiler with OpenMP")
def test_auto_balances_the_measured_rates_and_logs_it(store, log):
    split = runtime.plan_split_at_startup(store, "auto", query_per_kv=2, num_threads=3)
    # 12 streamed units, CPU half as fast as the link: 4 on the CPU, decode 1.5x faster.
    assert split.num_cpu_units == 4 and split.num_threads == 3
    assert split.cpu_groups == {0: (3,), 1: (3,), 2: (3,), 3: (3,)}
    # Split B bytes: B * 8/12 / 40e9 s on PCIe, B * 4/12 / 20e9 on the CPU, + 4 layers * 100 us of lockstep;
    # B / 40e9 >= 1.1 * (B / 60e9 + 400e-6) from B = 1.1 * 400e-6 / (1 / 40e9 - 1.1 / 60e9) = 66 MB (62.9 MiB).
    assert split.min_split_bytes == pytest.approx(66e6)
    assert split.pays(67e6) and not split.pays(65e6)
    assert "4 of 12 streamed units on the CPU in decode steps that stream at least 63 MiB of KV (per-layer " \
           "lockstep 100 us) (H2D 40.0 GB/s, CPU 20.0 GB/s with 3 threads: 1.50x" in log.text


@pytest.mark.skipif(not cpu_attention.is_available(), reason="no C++ compiler with OpenMP")
def test_auto_keeps_pcie_when_the_cpu_is_too_slow(store, rates, log):
    rates["cpu"] = 1e9
    assert runtime.plan_split_at_startup(store, "auto", query_per_kv=2, num_threads=1) is None
    assert "decode streams every unit over PCIe (cpu_attention=auto)" in log.text
    every = runtime.plan_split_at_startup(store, "all", query_per_kv=2, num_threads=1)
    assert every.num_cpu_units == 12 and every.pays(0)


def test_without_a_compiler_auto_streams_and_all_refuses(store, monkeypatch, log):
    def no_compiler():
        raise RuntimeError("headinfer: CPU attention needs a C++ compiler with OpenMP and none was found")

    monkeypatch.setattr(cpu_attention, "library", no_compiler)
    assert runtime.plan_split_at_startup(store, "auto", query_per_kv=2, num_threads=1) is None
    assert "CPU attention unavailable, decode streams every unit over PCIe" in log.text
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler"):
        runtime.plan_split_at_startup(store, "all", query_per_kv=2, num_threads=1)


def test_default_threads_leave_two_cores_to_vllm_and_share_the_rest_among_ranks(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert runtime.default_cpu_threads(1) == 14
    assert runtime.default_cpu_threads(4) == 3
    assert runtime.default_cpu_threads(32) == 1
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
    assert runtime.default_cpu_threads(1) == 1
