"""The transformers benchmark: its time-bounded context search, and its CPU smoke run."""

import argparse
import importlib.util
import json
import math
import pathlib
import random
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

    Like the real runner, a trial still running at its deadline stops there.
    """

    setup, headinfer = "fake", None

    def __init__(self, bench, clock, *, limit=math.inf, upper=1 << 20, cost=lambda n: 1.0, resource="GPU memory"):
        self.bench, self.clock, self.limit, self.upper_bound, self.cost = bench, clock, limit, upper, cost
        self.resource = resource
        self.tried = []

    def trial(self, context, deadline=math.inf):
        self.tried.append(context)
        fails = context > self.limit  # runs out halfway
        seconds = self.cost(context) / 2 if fails else self.cost(context)
        if self.clock.now + seconds > deadline:
            self.clock.now = deadline
            return self.bench.Trial(context, ok=False, out_of_time=True, error="time budget")
        self.clock.now += seconds
        if fails:
            return self.bench.Trial(context, ok=False, error="out of it", limit=self.resource)
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


@pytest.mark.parametrize("resource", ["GPU memory", "host memory"])
def test_a_failure_is_bisected_down_to_the_resolution(bench, clock, resource):
    runner = FakeRunner(bench, clock, limit=300_000, resource=resource)
    result = bench.ContextSearch(runner, search_args()).run()
    assert runner.tried[:3] == [32 * K, 128 * K, 1 << 20]  # report contexts, then the upper bound
    assert result["longest_context"] <= 300_000 < result["longest_context"] + 4 * K
    assert 300_000 < result["smallest_failure"] <= result["longest_context"] + 4 * K
    assert result["stopped_by"] == resource
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


def test_a_trial_somewhat_slower_than_predicted_finishes_in_the_grace(bench, clock):
    cost = lambda n: (n / 1e4) ** 2 * (1.3 if n > 128 * K else 1.0)  # noqa: E731
    runner = FakeRunner(bench, clock, upper=700_000, cost=cost)
    result = bench.ContextSearch(runner, search_args(time_budget=600)).run()
    assert result["trials"][-1]["ok"] and result["longest_context"] > 128 * K
    assert 600 < clock.now <= 600 * (1 + bench.GRACE)


def test_a_trial_far_slower_than_predicted_is_stopped_after_the_grace(bench, clock):
    cost = lambda n: 100 * (n / (128 * K)) ** 3  # noqa: E731  cubic: the quadratic fit underestimates
    runner = FakeRunner(bench, clock, upper=700_000, cost=cost)
    result = bench.ContextSearch(runner, search_args(time_budget=1000)).run()
    assert result["stopped_by"] == "time budget"
    assert result["trials"][-1]["out_of_time"]
    assert result["longest_context"] == 128 * K  # an unfinished trial proves nothing
    assert clock.now == pytest.approx(1000 * (1 + bench.GRACE))


def test_search_invariants_over_random_cases(bench, clock):
    """Whatever the limits and costs: tried contexts stay within the bound and above the best so far,
    the longest context is a successful trial, and no trial runs past the budget and its grace."""
    rng = random.Random(0)
    for _ in range(300):
        clock.now = 0.0
        upper = rng.choice([200_000, 700_000, 1 << 20])
        a, b, power = rng.uniform(0, 1e-3), rng.uniform(0, 2e-9), rng.choice([1.0, 2.0, 2.3])
        runner = FakeRunner(
            bench, clock, limit=rng.choice([math.inf, rng.randrange(1, upper)]), upper=upper,
            cost=lambda n, a=a, b=b, power=power: 2 + a * n + b * n**power,
        )
        budget = rng.uniform(10, 1000)
        result = bench.ContextSearch(runner, search_args(time_budget=budget)).run()
        best = 0
        for trial in result["trials"]:
            assert best < trial["context"] <= upper
            best = trial["context"] if trial["ok"] else best
        assert result["longest_context"] == best
        assert result["stopped_by"] in ("host capacity", "GPU memory", "time budget")
        assert clock.now <= budget * (1 + bench.GRACE) + 1e-9


def test_time_budget_per_setup_and_default(bench):
    assert bench.parse_time_budget("300") == (300.0, {})
    assert bench.parse_time_budget("dynamic=40, headinfer=250") == (540.0, {"dynamic": 40.0, "headinfer": 250.0})
    assert bench.parse_time_budget("100,dynamic=40") == (100.0, {"dynamic": 40.0})
    for wrong in ("fast=40", "dynamic=0", "-5", "dynamic=soon"):
        with pytest.raises(ValueError):
            bench.parse_time_budget(wrong)
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--time-budget", "nosuch=4"])


def test_total_time_caps_each_setup_budget_with_room_for_the_grace(bench):
    args = bench.parse_args(["--smoke", "--time-budget", "100,dynamic=40"])
    assert bench.setup_budget(args, "dynamic", None, now=0.0) == 40.0
    assert bench.setup_budget(args, "headinfer", None, now=0.0) == 100.0
    assert bench.setup_budget(args, "dynamic", run_end=1000.0, now=0.0) == 40.0  # plenty left
    budget = bench.setup_budget(args, "headinfer", run_end=100.0, now=40.0)
    assert 0 < budget < 60 - bench.FINISH_RESERVE
    assert 40.0 + budget * (1 + bench.GRACE) + bench.FINISH_RESERVE == pytest.approx(100.0)
    assert bench.setup_budget(args, "headinfer", run_end=100.0, now=95.0) < 0


def test_a_setup_with_no_time_left_is_skipped_and_reported(bench, tmp_path):
    results = bench.main(["--smoke", "--setups", "dynamic", "--total-time", "1", "--out", str(tmp_path)])
    assert results["setups"]["dynamic"]["skipped"] == "no time left of --total-time"
    assert "| dynamic | no time left of --total-time |" in (tmp_path / "bench_hf.md").read_text()


def test_time_model_recovers_linear_and_quadratic_terms(bench):
    a, b = 2e-3, 3e-9
    trials = [bench.Trial(n, ok=True, seconds=a * n + b * n * n) for n in (32 * K, 128 * K)]
    assert bench.time_model(trials) == pytest.approx((a, b))
    budget = a * 300_000 + b * 300_000**2
    assert bench.affordable_context(trials, budget, 4 * K) == 300_000 // (4 * K) * (4 * K)


def test_time_model_falls_back_to_all_quadratic(bench):
    """One trial, or two that imply a negative term (a slow first trial): quadratic through the longest."""
    assert bench.time_model([bench.Trial(1000, ok=True, seconds=4.0)]) == (0.0, 4e-6)
    slow_first = [bench.Trial(1000, ok=True, seconds=10.0), bench.Trial(4000, ok=True, seconds=16.0)]
    assert bench.time_model(slow_first) == (0.0, 16.0 / 4000**2)
    assert bench.time_model([bench.Trial(1000, ok=False)]) is None
    linear = [bench.Trial(1000, ok=True, seconds=1.0), bench.Trial(2000, ok=True, seconds=2.0)]
    assert bench.time_model(linear) == pytest.approx((1e-3, 0.0))
    assert bench.affordable_context(linear, 10.0, 1000) == 10_000


def test_a_setup_that_raises_is_recorded_and_the_others_still_run(bench, tmp_path, monkeypatch):
    warm_up = bench.Runner.warm_up

    def broken_for_dynamic(runner):
        if runner.setup == "dynamic":
            raise RuntimeError("boom")
        warm_up(runner)

    monkeypatch.setattr(bench.Runner, "warm_up", broken_for_dynamic)
    with pytest.raises(SystemExit, match="1 setup"):
        bench.main(["--smoke", "--setups", "dynamic,headinfer", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_hf.json").read_text())
    assert saved["setups"]["dynamic"]["error"] == "RuntimeError: boom"
    assert saved["setups"]["headinfer"]["stopped_by"] == "host capacity"
    assert "| dynamic | RuntimeError: boom |" in (tmp_path / "bench_hf.md").read_text()


def test_smoke_runs_merge_into_one_report(bench, tmp_path):
    """Two processes' worth of setups end in one JSON and table."""
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


@pytest.mark.cuda_runtime  # transformers' offloaded cache makes a torch.Stream() when it is built
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


@pytest.mark.cuda
@pytest.mark.parametrize("setup", ["dynamic", "offloaded", "headinfer"])
def test_one_tiny_trial_per_setup_on_cuda(bench, setup):
    """Each setup's code path on a GPU, in seconds, before the long benchmark run depends on it."""
    import torch

    args = bench.parse_args(["--smoke"])
    device = torch.device("cuda")
    runner = bench.Runner(setup, bench.build_model(True, device), args, device)
    trial = runner.trial(512)
    assert trial.ok, trial.error
    assert trial.peak_gpu_gib > 0 and trial.prefill_s > 0
