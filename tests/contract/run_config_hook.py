"""Run headinfer's config-time hook under another vLLM release's sources (a subprocess of test_vllm_config_hook).

    PYTHONPATH=<release's import root> VLLM_TARGET_DEVICE=cpu python -m tests.contract.run_config_hook MODEL_DIR

Prints one line, ``RESULT <json>``: what vLLM's own ``EngineArgs(...).create_engine_config()``
(plugins loaded, the platform hook run, as ``LLM(...)`` and ``vllm serve`` do)
made of each scenario, or the error it raised. The CUDA wheels' Python code
imports under the installed (CPU) torch; their compiled kernels are absent
and nothing here needs them. Two stand-ins, both at config time only:

- ``VLLM_TARGET_DEVICE=cpu`` selects vLLM's CPU platform (the wheel's
  distribution is not installed, so vLLM cannot tell its build);
- 0.34's CPU platform refuses x86 without triton-cpu at config time
  (``CpuPlatform.check_and_update_config``): ``HAS_TRITON`` is set, as
  nothing runs a kernel.

``cuda_defaults`` runs the hook as on CUDA (``defaults.long_context_defaults_apply``
answering True) to exercise the long-context defaults against the release's
config classes: vLLM's own platform stays the CPU one.
"""

from __future__ import annotations

import json
import logging
import sys

RESULT_PREFIX = "RESULT "
BLOCK = 32


def config_for(model: str, settings: dict | None = None, **engine):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=model, dtype="float32", max_model_len=1024)
    args.update(engine)
    if settings is not None:
        args.update(attention_backend="headinfer", additional_config={"headinfer": settings})
    return EngineArgs(**args).create_engine_config()


def error_of(model: str, settings: dict | None = None, **engine) -> str | None:
    try:
        config_for(model, settings, **engine)
    except Exception as error:  # the message is what is checked
        return f"{type(error).__name__}: {error}"
    return None


def bytes_per_block() -> int:
    """One block of the tiny model's KV (all layers, K and V, float32)."""
    from headinfer_vllm.tiny_models import SHAPE

    return SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * 2 * BLOCK * SHAPE["head_dim"] * 4


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(model: str) -> dict:
    import vllm
    import vllm.triton_utils

    vllm.triton_utils.HAS_TRITON = True
    from headinfer_vllm.core.device_memory import device_budget_error
    from headinfer_vllm.vllm_plugin import compat, defaults

    log = Lines()
    logging.getLogger("headinfer_vllm").addHandler(log)
    gib = 2**30
    result: dict = {"version": vllm.__version__, "file": vllm.__file__}

    stock = config_for(model, kv_cache_memory_bytes=1 << 26)
    result["not_selected"] = {
        "backend": getattr(stock.attention_config.backend, "name", None),
        "num_gpu_blocks_override": stock.cache_config.num_gpu_blocks_override,
        "additional_config": stock.additional_config or {},
        "default_block_size": stock.cache_config.block_size,
    }

    log.lines.clear()
    selected = config_for(model, {"cpu_kv_cache_gib": 300 * bytes_per_block() / gib}, block_size=BLOCK)
    cache = selected.cache_config
    utilization = compat.gpu_memory_utilization(cache)
    try:
        device_budget_error(1 << 30, 40 * gib, 80 * gib, cache.gpu_memory_utilization)
        raw_field_arithmetic = "ok"
    except TypeError as error:
        raw_field_arithmetic = f"TypeError: {error}"
    result["selected"] = {
        "backend": selected.attention_config.backend.name,
        "num_gpu_blocks_override": cache.num_gpu_blocks_override,
        "kv_cache_memory_bytes": cache.kv_cache_memory_bytes,
        "block_size": cache.block_size,
        "gpu_memory_utilization_field": cache.gpu_memory_utilization,
        "gpu_memory_utilization": utilization,
        "raw_field_arithmetic": raw_field_arithmetic,
        "device_budget_error": device_budget_error(int(80 * gib * utilization), 80 * gib, 80 * gib, utilization),
        "enable_extensible_kv_cache": getattr(cache, "enable_extensible_kv_cache", "absent"),
        "log": list(log.lines),
    }

    result["refused"] = {
        "host budget below max_model_len": error_of(model, {"cpu_kv_cache_gib": 20 * bytes_per_block() / gib},
                                                    block_size=BLOCK),
        "more host memory than free": error_of(model, {"cpu_kv_cache_gib": 1 << 20}, block_size=BLOCK),
        "kv_cache_dtype": error_of(model, {}, block_size=BLOCK, kv_cache_dtype="fp8"),
        "unknown setting": error_of(model, {"cpu_kv_cache": 1}, block_size=BLOCK),
    }
    if hasattr(cache, "enable_extensible_kv_cache"):
        result["refused"]["extensible KV cache"] = error_of(
            model, {"cpu_kv_cache_gib": 0.05}, block_size=BLOCK, enable_extensible_kv_cache=True
        )

    defaults.long_context_defaults_apply = lambda: True
    cuda = config_for(model, {"cpu_kv_cache_gib": 0.05})
    result["cuda_defaults"] = {
        "block_size": cuda.cache_config.block_size,
        "user_specified_block_size": cuda.cache_config.user_specified_block_size,
        "max_num_batched_tokens": cuda.scheduler_config.max_num_batched_tokens,
    }
    return result


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(run(sys.argv[1]), default=str), flush=True)
