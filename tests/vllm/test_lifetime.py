"""An in-process engine frees headinfer's page store when it is deleted.

Three create / generate / delete cycles of ``LLM`` in one process (vLLM's
in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): after each delete no
runtime is alive, and the process's resident memory does not grow by a host
tier. Each cycle fills its host tier, so a leaked tier would be resident. The
test keeps each engine's attention modules alive, as a caller holding the
model would.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from headinfer_vllm.tiny_models import save_tiny_model

pytestmark = pytest.mark.vllm

HOST_TIER_GIB = 0.25

CYCLES = """
import gc, json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from headinfer_vllm.vllm_plugin.runtime import HeadInferRuntime

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

records, kept = [], []
for cycle in range(3):
    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32", max_model_len=1024, enforce_eager=True,
              attention_backend="headinfer", additional_config={"headinfer": {"cpu_kv_cache_gib": float(sys.argv[2])}})
    prompt = TokensPrompt(prompt_token_ids=[3 + i % 200 for i in range(300)])
    llm.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    (runtime,) = HeadInferRuntime.live
    runtime.attention.store.host.fill_(1)  # a full cache: every page resident in host memory
    host_bytes = runtime.attention.store.host_bytes
    # The model outlives the engine (vLLM allows it): its attention modules stay reachable.
    kept.append(list(llm.llm_engine.vllm_config.compilation_config.static_forward_context.values()))
    del runtime, llm
    gc.collect()
    records.append({"live": len(HeadInferRuntime.live), "rss": resident_bytes(), "host_bytes": host_bytes})
print("LIFETIME " + json.dumps(records))
"""


def test_deleted_engines_free_their_page_store(tmp_path):
    model = save_tiny_model(tmp_path, "llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    completed = subprocess.run([sys.executable, "-c", CYCLES, str(model), str(HOST_TIER_GIB)],
                               capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("LIFETIME ")]
    assert lines, completed.stderr[-4000:]
    records = json.loads(lines[0].removeprefix("LIFETIME "))
    assert [record["live"] for record in records] == [0, 0, 0]
    host_bytes = records[0]["host_bytes"]
    assert host_bytes > 0.9 * HOST_TIER_GIB * 2**30
    assert records[2]["rss"] - records[0]["rss"] < host_bytes / 2, records
