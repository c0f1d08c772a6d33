"""headinfer demo: generate with the KV cache streamed per head, check it is exact.

Builds a tiny random Llama (no download), generates a batch of mixed-length
prompts with vLLM's stock backend and with ``attention_backend="headinfer"``,
prints headinfer's plan and memory per tier, and checks that both produced
the same tokens and logprobs. Exit code 0 when they match.

    python examples/offline_demo.py
"""

import random
import sys
import tempfile

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import save_tiny_model

CPU_KV_CACHE_GIB = 0.05  # host tier: sets the capacity
ENGINE = dict(dtype="float32", max_model_len=4096, enforce_eager=True, seed=0, max_num_batched_tokens=1024)


def main() -> int:
    model = save_tiny_model(tempfile.mkdtemp(prefix="headinfer-demo-"), "llama")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (3000, 700, 64, 5)]
    spec = {"model": str(model), "batches": [prompts], "max_tokens": 16, "logprobs": 1}
    print(f"tiny Llama in {model}; prompts of {[len(p) for p in prompts]} tokens", flush=True)

    stock = run_in_subprocess({**spec, "engine": {**ENGINE, "kv_cache_memory_bytes": 64 << 20}})
    # cpu_attention off: stream head groups through the staging ring as on CUDA (on vLLM's CPU
    # platform the default attends the host tier in place, with no staging ring to show).
    settings = {"headinfer": {"cpu_kv_cache_gib": CPU_KV_CACHE_GIB, "cpu_attention": "off"}}
    ours = run_in_subprocess({**spec, "engine": {**ENGINE, "attention_backend": "headinfer",
                                                 "additional_config": settings}})
    for line in ours["log"].splitlines():
        if "headinfer: " in line:
            print("plan:", line.split("headinfer: ", 1)[1])
    tiers = ours["tiers"]
    print(f"host tier (every page's home): {tiers['host_bytes'] / 2**20:8.2f} MiB")
    print(f"device tier (staging ring):    {tiers['device_bytes'] / 2**20:8.2f} MiB")

    worst = 0.0
    for index, (want, got) in enumerate(zip(stock["outputs"], ours["outputs"], strict=True)):
        match = want["tokens"] == got["tokens"]
        for want_step, got_step in zip(want["logprobs"], got["logprobs"], strict=True):
            worst = max(worst, *(abs(got_step.get(t, float("inf")) - v) for t, v in want_step.items()))
        print(f"prompt {index} ({len(prompts[index])} tokens): tokens {'match' if match else 'DIFFER'}")
        if not match:
            worst = float("inf")
    ok = worst <= 1e-4
    print(f"largest logprob difference vs stock backend: {worst:.2e} -> {'EXACT' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
