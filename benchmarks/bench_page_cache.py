"""The device page cache through vLLM: KV bytes loaded per decode step and the hit rate, per workload.

On vLLM's CPU platform, headinfer's streamed path (``cpu_attention=off``, the
path CUDA runs) with a device tier beside the staging ring: as a page cache
(``device_tier=pages``) and as whole resident head groups (``units``), the
same ``gpu_kv_cache_gib``. Three workloads of a tiny random Llama (6 layers,
4 KV heads, head_dim 32, float32, 16-token pages):

- ``short``: 8 requests of 240 prompt tokens, whose KV fits in the cache;
- ``long``: one request of 3,000 prompt tokens, which does not;
- ``both``: the two together.

Bytes are headinfer's own count (on the device, from the same count the
loads stop at: what CUDA would move). Per decode step: the bytes of a run
generating ``1 + D`` tokens less those of a run generating 1 token (the
prefill), over ``D``; the hit rate of pages read over the whole run.

    python benchmarks/bench_page_cache.py --out benchmarks/results    # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import tempfile
from pathlib import Path

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import SHAPE, save_tiny_model

BLOCK_SIZE = 16
NUM_BLOCKS = 400
UNIT_PAGE_BYTES = 2 * BLOCK_SIZE * SHAPE["head_dim"] * 4  # one KV head's page, float32
UNITS = SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"]
CACHE_PAGES = 150
"""Page-cache rows per head group: the short requests' 8 x 16 pages fit, the long request's 188 do not."""
DECODE_TOKENS = 8


def workloads(seed: int = 0) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)]

    short, long = [tokens(240) for _ in range(8)], [tokens(3000)]
    return {"short": short, "long": long, "both": short + long}


def engine(tier: str) -> dict:
    staging_gib = 2 * NUM_BLOCKS * UNIT_PAGE_BYTES / 2**30
    settings = {
        "cpu_kv_cache_gib": (NUM_BLOCKS + 0.5) * UNIT_PAGE_BYTES * UNITS / 2**30,
        "gpu_kv_cache_gib": staging_gib + CACHE_PAGES * UNIT_PAGE_BYTES * UNITS / 2**30,
        "cpu_attention": "off", "head_group_size": 1, "device_tier": tier,
    }
    return dict(dtype="float32", max_model_len=4096, block_size=BLOCK_SIZE, enforce_eager=True, seed=0,
                enable_prefix_caching=False, max_num_batched_tokens=4096, attention_backend="headinfer",
                additional_config={"headinfer": settings})


def measure(model: Path, tier: str, prompts: list[list[int]]) -> dict:
    runs = {
        max_tokens: run_in_subprocess({"model": str(model), "batches": [prompts], "max_tokens": max_tokens,
                                       "logprobs": 0, "engine": engine(tier)})
        for max_tokens in (1, 1 + DECODE_TOKENS)
    }
    prefill, full = runs[1]["tiers"], runs[1 + DECODE_TOKENS]["tiers"]
    return {
        "cache_rows": full["cache_rows"],
        "loaded_bytes_per_decode_step": (full["loaded_bytes"] - prefill["loaded_bytes"]) / DECODE_TOKENS,
        "kv_bytes_of_requests": sum(-(-len(p) // BLOCK_SIZE) for p in prompts) * UNIT_PAGE_BYTES * UNITS,
        "hit_rate": full["pages_hit"] / full["pages_read"] if full["pages_read"] else None,
        "tokens": [output["tokens"] for output in runs[1 + DECODE_TOKENS]["outputs"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as directory:
        model = save_tiny_model(directory, "llama")
        for name, prompts in workloads().items():
            for tier in ("pages", "units"):
                results[f"{tier}/{name}"] = measure(model, tier, prompts)
                print(name, tier, {k: v for k, v in results[f"{tier}/{name}"].items() if k != "tokens"}, flush=True)
            same = results[f"pages/{name}"].pop("tokens") == results[f"units/{name}"].pop("tokens")
            results[f"pages/{name}"]["tokens_equal_to_units"] = same
    report = {
        "benchmark": "bench_page_cache",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"processor": platform.processor(), "platform": "vLLM CPU, streamed (cpu_attention=off)"},
        "conditions": {"block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS, "cache_pages_per_unit": CACHE_PAGES,
                       "decode_tokens": DECODE_TOKENS, "model": "tiny random llama", **SHAPE},
        "results": results,
    }
    (args.out / "bench_page_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_page_cache.json'}")
    return 0 if all(r.get("tokens_equal_to_units", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
