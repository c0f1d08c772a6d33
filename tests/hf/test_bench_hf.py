"""The transformers benchmark: its time-bounded context search, and its CPU smoke run."""

import argparse
import importlib.util
import json
import math
import pathlib
import sys

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_hf.py"
K = 1024


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hf", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_hf"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeRunner:
    """Fits any context up to ``limit``; a trial of L tokens takes ``cost(L)`` seconds of a fake clock.

    Like the real runner, a trial still running at the deadline stops there.
    """

    setup, headinfer = "fake", None

    def __init__(self, bench, clock, *, limit=math.inf, upper=1 << 20, cost=lambda n: 1.0):
        self.bench, self.clock, self.limit, self.upper_bound, self.cost = bench, clock, limit, upper, cost
        self.tried = []

    def trial(self, context, deadline=math.inf):
        self.tried.append(context)
        start = self.clock.now
        if context > self.limit:  # runs out of memory halfway
            self.clock.now += self.cost(context) / 2
            return self.bench.Trial(context, ok=False, error="OutOfMemoryError")
        if start + self.cost(context) > deadline:
            self.clock.now = deadline
            return self.bench.Trial(context, ok=False, out_of_time=True, error="time budget")
        seconds = self.cost(context)
        self.clock.now += seconds
        return self.bench.Trial(context, ok=True, seconds=seconds, prefill_tok_per_s=1.0, decode_s_per_token=1.0)


@pytest.fixture
def clock(bench, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "monotonic", clock)
    return clock


def search_args(time_budget=600.0):
    return argparse.Namespace(
        time_budget=time_budget, max_context=1 << 21, resolution=4 * K, report_contexts=[32 * K, 128 * K]
    )


def test_a_failure_is_bisected_down_to_the_resolution(bench, clock):
    runner = FakeRunner(bench, clock, limit=300_000)
    result = bench.ContextSearch(runner, search_args()).run()
    assert runner.tried[:3] == [32 * K, 128 * K, 1 << 20]  # report contexts, then the upper bound
    assert result["longest_context"] <= 300_000 < result["longest_context"] + 4 * K
    assert result["stopped_by"] == "searched"
    assert result["reported"][str(128 * K)]["ok"]
    assert result["reported"]["longest"]["context"] == result["longest_context"]


def test_the_upper_bound_reached_is_host_capacity(bench, clock):
    runner = FakeRunner(bench, clock, upper=700_000)
    result = bench.ContextSearch(runner, search_args()).run()
    assert runner.tried == [32 * K, 128 * K, 700_000]
    assert (result["longest_context"], result["stopped_by"]) == (700_000, "host capacity")


def test_a_context_too_slow_for_the_budget_is_lowered_to_one_that_fits(bench, clock):
    cost = lambda n: (n / 1e4) ** 2  # noqa: E731  (32K: 11 s, 128K: 172 s, 700K: 4900 s)
    runner = FakeRunner(bench, clock, upper=700_000, cost=cost)
    result = bench.ContextSearch(runner, search_args(time_budget=600)).run()
    assert result["stopped_by"] == "time budget"
    assert 128 * K < result["longest_context"] < 700_000
    assert all(trial["ok"] for trial in result["trials"])  # no trial was started that could not finish
    assert clock.now <= 600


def test_a_trial_that_outruns_its_prediction_stops_at_the_deadline(bench, clock):
    cost = lambda n: (n / 2e4) ** 3  # noqa: E731  cubic: the quadratic fit underestimates longer contexts
    runner = FakeRunner(bench, clock, upper=700_000, cost=cost)
    result = bench.ContextSearch(runner, search_args(time_budget=1000)).run()
    assert result["stopped_by"] == "time budget"
    assert result["trials"][-1]["out_of_time"]
    assert result["longest_context"] == 128 * K  # an unfinished trial proves nothing
    assert clock.now == 1000


def test_time_model_recovers_linear_and_quadratic_terms(bench):
    a, b = 2e-3, 3e-9
    trials = [bench.Trial(n, ok=True, seconds=a * n + b * n * n) for n in (32 * K, 128 * K)]
    assert bench.time_model(trials) == pytest.approx((a, b))
    budget = a * 300_000 + b * 300_000**2
    assert bench.affordable_context(trials, budget, 4 * K) == 300_000 // (4 * K) * (4 * K)


def test_smoke_runs_merge_into_one_report(bench, tmp_path):
    """Two processes' worth of setups (as gpu_session.sh runs them) end in one JSON and table."""
    bench.main(["--smoke", "--setups", "dynamic", "--out", str(tmp_path)])
    results = bench.main(["--smoke", "--setups", "headinfer,offloaded", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_hf.json").read_text())
    assert (tmp_path / "bench_hf.png").stat().st_size > 0
    assert saved["setups"]["dynamic"]["longest_context"] == 1024
    assert saved["setups"]["dynamic"]["stopped_by"] == "max context"
    assert saved["setups"]["headinfer"]["stopped_by"] == "host capacity"
    assert results["setups"]["headinfer"]["longest_context"] == 1024 - 8
    assert "needs CUDA" in saved["setups"]["offloaded"]["skipped"]
    rows = (tmp_path / "bench_hf.md").read_text().splitlines()
    assert any(row.startswith("| dynamic | 1K (max context) |") for row in rows)
    assert any(row.startswith("| headinfer | 1016 (host capacity) |") for row in rows)


def test_headinfer_trial_after_a_failed_one_reuses_the_cache(bench):
    import torch

    args = bench.parse_args(["--smoke"])
    device = torch.device("cpu")
    runner = bench.Runner("headinfer", bench.build_model(True, device), args, device)
    cache = runner.headinfer
    failed = runner.trial(cache.max_tokens_per_row + 1)  # cut short: a row outgrows its pages
    assert not failed.ok and "CapacityError" in failed.error
    assert runner.trial(256).ok
    assert runner.headinfer is cache  # recovered by reset(), not re-allocated


def test_offloaded_trial_stops_before_it_could_exhaust_host_memory(bench, monkeypatch):
    """transformers' offloaded cache pins up to 2x its KV anew per chunk; the trial must fail, not be OOM-killed."""
    import torch

    args = bench.parse_args(["--smoke"])
    device = torch.device("cpu")
    runner = bench.Runner("offloaded", bench.build_model(True, device), args, device)
    tokens = 10_000
    needed = 2 * tokens * runner.token_bytes + bench.HOST_RESERVE_BYTES
    monkeypatch.setattr(bench, "free_host_bytes", lambda: needed)
    runner._check_host_memory(tokens)  # just enough
    monkeypatch.setattr(bench, "free_host_bytes", lambda: needed - 1)
    with pytest.raises(bench.HostMemoryLow):
        runner._check_host_memory(tokens)
    monkeypatch.setattr(bench, "free_host_bytes", lambda: bench.HOST_RESERVE_BYTES)
    trial = runner.trial(300)  # refused before its first forward pass (which would need CUDA here)
    assert not trial.ok and not trial.out_of_time and trial.error.startswith("HostMemoryLow")
