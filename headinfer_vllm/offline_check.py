"""Run prompts through vLLM with one attention backend, in a fresh process.

The demo and the end-to-end tests compare headinfer with vLLM's stock
backend this way: each backend runs in its own Python process (vLLM keeps
global state), and reports greedy tokens, top logprobs, prefix-cache hits,
preemptions and, for headinfer, the size of each tier.

    python -m headinfer_vllm.offline_check < SPEC.json   # prints one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

RESULT_PREFIX = "OFFLINE_CHECK_RESULT "


def run_in_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run ``spec`` (see :func:`run`) in a new interpreter; returns its result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": spec.get("multiprocessing", "0")}
    completed = subprocess.run(
        [sys.executable, "-m", "headinfer_vllm.offline_check"],
        input=json.dumps(spec),  # on stdin: long prompts exceed the limit on argument length
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["log"] = completed.stderr + completed.stdout
            return result
    raise RuntimeError(f"offline_check failed (exit {completed.returncode}):\n{completed.stderr[-6000:]}")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Generate with vLLM as ``spec`` says.

    spec keys: ``model`` (directory), ``engine`` (kwargs for ``LLM``),
    ``batches`` (a list of batches, each a list of token-id prompts, run one
    after another), ``max_tokens``, ``logprobs``, and optionally
    ``prompt_logprobs`` (for teacher-forced logprobs of the prompt tokens).
    Each output also has the engine's timing of its request: ``prefill_s``
    (first scheduled to first token) and ``decode_s`` (first to last token).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], skip_tokenizer_init=True, disable_log_stats=False, **spec["engine"])
    sampling = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=spec["logprobs"],
                              prompt_logprobs=spec.get("prompt_logprobs"), ignore_eos=True)
    outputs = []
    for batch in spec["batches"]:
        for output in llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sampling, use_tqdm=False):
            completion, timing = output.outputs[0], output.metrics
            outputs.append({
                "tokens": list(completion.token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in completion.logprobs or []],
                "cached_tokens": output.num_cached_tokens or 0,
                # Logprob of each prompt token after the first, given the tokens before it.
                "prompt_logprobs": [
                    step[token].logprob
                    for token, step in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:], strict=True)
                ] if output.prompt_logprobs else [],
                "prefill_s": timing.first_token_ts - timing.scheduled_ts if timing else None,
                "decode_s": timing.last_token_ts - timing.first_token_ts if timing else None,
            })
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    return {"outputs": outputs, "preemptions": metrics.get("vllm:num_preemptions", 0), "tiers": _tiers()}


def _tiers() -> dict[str, int] | None:
    """headinfer's tier sizes and traffic totals, when its runtime lives in this process."""
    from headinfer_vllm.vllm_plugin.runtime import HeadInferRuntime

    for runtime in HeadInferRuntime.live:
        store, traffic = runtime.attention.store, runtime.attention.transfers.traffic
        return {
            "host_bytes": store.host_bytes,
            "device_bytes": store.device_bytes,
            "streamed_units": len(store.streamed_units),
            "num_blocks": store.layout.num_blocks,
            "cache_rows": store.cache_rows,
            "loaded_bytes": traffic.loaded_bytes,
            "pages_read": traffic.pages_read,
            "pages_hit": traffic.pages_hit,
        }
    return None


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(run(json.load(sys.stdin))), flush=True)
