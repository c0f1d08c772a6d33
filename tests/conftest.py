import os

import pytest
import torch

# vLLM's CPU platform attends the KV in place by default (cpu_attention=auto). The suite runs the
# streamed path there instead (staging buffers, loads, write-back: the design CUDA runs), which CI
# can only check on the CPU; tests of the in-place path ask for it in their settings, which take
# precedence. Engines started in subprocesses inherit this.
os.environ.setdefault("HEADINFER_CPU_ATTENTION", "off")

CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "vllm: needs vLLM installed (skipped without it)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)
