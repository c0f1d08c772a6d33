import os
import pathlib
import sys
import time

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import their neighbour run_context, as when run

import run_context  # noqa: E402

# vLLM's CPU platform attends the KV in place by default (cpu_attention=auto). The suite runs the
# streamed path there instead (staging buffers, loads, write-back: the design CUDA runs), which CI
# can only check on the CPU; tests of the in-place path ask for it in their settings, which take
# precedence. Engines started in subprocesses inherit this.
os.environ.setdefault("HEADINFER_CPU_ATTENTION", "off")

CUDA = torch.cuda.is_available()
DRIVERLESS_CUDA_BUILD = torch.version.cuda is not None and not CUDA
"""A CUDA build of torch on a machine without a driver (the GPU rehearsal, ``make gpu-rehearsal``): CUDA
streams and pinned memory fail there, even for work that runs on the CPU."""

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "vllm: needs vLLM installed (skipped without it)")
    config.addinivalue_line(
        "markers", "cuda_runtime: makes a CUDA stream or pins memory even on CPU (skipped under a CUDA build of "
        "torch without a driver)",
    )


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_runtime = pytest.mark.skip(reason="needs a CUDA driver under this CUDA build of torch")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)
        if "cuda_runtime" in item.keywords and DRIVERLESS_CUDA_BUILD:
            item.add_marker(skip_runtime)


def pytest_runtest_setup(item):
    """Inside gpu_session.sh's plan: once the tests step's allotment is spent, the rest is skipped, not killed."""
    if time.time() > run_context.deadline():
        pytest.skip("the tests step's time allotment ran out (gpu_session.sh plan)")
