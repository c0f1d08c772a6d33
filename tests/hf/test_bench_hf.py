"""The transformers benchmark: its context search, and its CPU smoke run."""

import argparse
import importlib.util
import json
import pathlib
import sys

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_hf.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hf", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_hf"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FakeRunner:
    """Fits any context up to ``limit``; records what was tried."""

    setup, headinfer, upper_bound = "fake", None, 1 << 20

    def __init__(self, bench, limit):
        self.bench, self.limit, self.tried = bench, limit, []

    def trial(self, context):
        self.tried.append(context)
        if context > self.limit:
            return self.bench.Trial(context, ok=False, error="OutOfMemoryError")
        return self.bench.Trial(context, ok=True, prefill_tok_per_s=1.0, decode_s_per_token=1.0)


def test_search_doubles_then_bisects(bench):
    args = argparse.Namespace(
        time_budget=60.0, start_context=32768, max_context=1 << 20, resolution=4096, report_contexts=[32768, 131072]
    )
    runner = FakeRunner(bench, limit=300_000)
    result = bench.search(runner, args)
    assert runner.tried[:5] == [32768, 65536, 131072, 262144, 524288]
    assert result["longest_context"] <= 300_000 < result["longest_context"] + 4096
    assert result["reported"]["131072"]["ok"]
    assert result["reported"]["longest"]["context"] == result["longest_context"]


def test_smoke_run(bench, tmp_path):
    results = bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_hf.json").read_text())
    assert (tmp_path / "bench_hf.png").stat().st_size > 0
    assert saved["setups"]["dynamic"]["longest_context"] == 1024
    assert saved["setups"]["headinfer"]["stopped_by"] == "host capacity"
    assert results["setups"]["headinfer"]["longest_context"] == 1024 - 8


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
