"""vLLM-level benchmark: headinfer against vLLM's stock backend, same model, same prompts.

Each backend runs in its own process (one engine each) on the built-in tiny
Llama (random weights, nothing downloaded), on whatever platform vLLM runs
on here; ``--geometry llama3-8b`` gives it Llama-3-8B's attention (32 layers,
32 query and 8 KV heads of 128) with a tiny MLP. For each context length and
repeat, ``--concurrency`` requests at once:

- prefill: seconds from a request's first scheduling to its first token,
  for fresh random prompts of that length (chunked by ``--chunk`` tokens per
  step; fresh, so prefix caching does not help);
- decode: seconds per token of the next ``--decode-tokens`` tokens.

Both come from vLLM's own per-request timestamps.

Backends: ``stock`` (vLLM's own), ``headinfer`` (its default: on vLLM's CPU
platform the KV attended in place by the C++ kernel) and
``headinfer-streamed`` (``cpu_attention=off``: every head group streamed
through staging buffers, as on CUDA). Medians over ``--repeats`` and the
ratios to stock go to ``bench_vllm.json`` and ``bench_vllm.png`` in ``--out``.

    python benchmarks/bench_vllm.py --out benchmarks/out
    python benchmarks/bench_vllm.py --smoke --out benchmarks/out     # CI: short contexts, one repeat
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import shlex
import statistics
import sys
import tempfile

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import SHAPE, save_tiny_model

BACKENDS = ("stock", "headinfer", "headinfer-streamed")
VOCAB = 256
GEOMETRIES = {
    "tiny": {},
    "llama3-8b": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}
"""Model shapes (overrides of the tiny Llama): ``llama3-8b`` is Llama-3-8B's attention with a tiny MLP."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="contexts 256 and 1024, one repeat")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
    parser.add_argument("--contexts", help="comma-separated prompt lengths (default 1024,2048,4096,7168)")
    parser.add_argument("--repeats", type=int, help="prompts per context and measurement (default 3; smoke 1)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens: prefill tokens per step")
    parser.add_argument("--cpu-kv-gib", type=float, default=0.1, help="headinfer's host tier")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="tiny")
    parser.add_argument("--concurrency", type=int, default=1, help="requests prefilled and decoded together")
    args = parser.parse_args(argv)
    contexts = args.contexts or ("256,1024" if args.smoke else "1024,2048,4096,7168")
    args.contexts = [int(n) for n in contexts.split(",")]
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if min(args.contexts) < 1 or max(args.contexts) + args.decode_tokens + 1 > 8192:
        parser.error("contexts must lie in 1 .. 8191 - decode tokens (the tiny model's positions)")
    if min(args.repeats, args.decode_tokens, args.chunk, args.concurrency) < 1 or args.cpu_kv_gib <= 0:
        parser.error("--repeats, --decode-tokens, --chunk, --concurrency and --cpu-kv-gib must be positive")
    return args


def workload(args: argparse.Namespace) -> list[list[list[int]]]:
    """Batches of ``--concurrency`` fresh random prompts: a warm-up, then ``--repeats`` per context."""
    rng = random.Random(0)
    lengths = [64] + [context for context in args.contexts for _ in range(args.repeats)]
    return [[[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(args.concurrency)] for length in lengths]


def kv_gib(args: argparse.Namespace) -> float:
    """KV cache (GiB) for the largest batch with a third to spare, or ``--cpu-kv-gib`` if more."""
    shape = {**SHAPE, **GEOMETRIES[args.geometry]}
    itemsize = 4 if args.dtype == "float32" else 2
    per_token = shape["num_hidden_layers"] * shape["num_key_value_heads"] * 2 * shape["head_dim"] * itemsize
    tokens = args.concurrency * (max(args.contexts) + args.decode_tokens + 256)
    return max(args.cpu_kv_gib, 1.34 * tokens * per_token / 2**30)


def measure(backend: str, model: pathlib.Path, args: argparse.Namespace) -> dict:
    engine = dict(
        dtype=args.dtype, max_model_len=max(args.contexts) + args.decode_tokens + 16, enforce_eager=True, seed=0,
        max_num_batched_tokens=args.chunk, max_num_seqs=max(4, args.concurrency),
    )
    if backend.startswith("headinfer"):
        cpu_attention = "off" if backend.endswith("streamed") else "auto"
        settings = {"cpu_kv_cache_gib": kv_gib(args), "cpu_attention": cpu_attention}
        engine.update(attention_backend="headinfer", additional_config={"headinfer": settings})
    else:
        engine.update(kv_cache_memory_bytes=int(kv_gib(args) * 2**30))
    spec = {"model": str(model), "engine": engine, "batches": workload(args),
            "max_tokens": 1 + args.decode_tokens, "logprobs": None}
    outputs = run_in_subprocess(spec)["outputs"][args.concurrency:]  # without the warm-up
    measured = []
    per_context = args.repeats * args.concurrency
    for index, context in enumerate(args.contexts):
        runs = outputs[per_context * index : per_context * (index + 1)]
        prefill = statistics.median(run["prefill_s"] for run in runs)
        measured.append({
            "context": context,
            "prefill_s": prefill,
            "prefill_tok_per_s": context / prefill,
            "decode_s_per_token": statistics.median(run["decode_s"] for run in runs) / args.decode_tokens,
        })
    return {"results": measured}


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (prefill, decode) = plt.subplots(1, 2, figsize=(11, 4))
    for backend in BACKENDS:
        rows = report["backends"][backend]["results"]
        contexts = [row["context"] for row in rows]
        prefill.plot(contexts, [row["prefill_tok_per_s"] for row in rows], "o-", label=backend)
        decode.plot(contexts, [row["decode_s_per_token"] * 1e3 for row in rows], "o-", label=backend)
    prefill.set(xlabel="context (tokens)", ylabel="prefill tokens/s", xscale="log")
    decode.set(xlabel="context (tokens)", ylabel="decode ms/token", xscale="log")
    for axis in (prefill, decode):
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    title = f"tiny Llama ({report['settings']['geometry']} attention) on {report['device']}, {report['date']}"
    figure.suptitle(f"{title}\n{report['command']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (vLLM's CPU platform)"


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    model = save_tiny_model(tempfile.mkdtemp(prefix="headinfer-bench-"), "llama", **GEOMETRIES[args.geometry])
    report = {
        "benchmark": "bench_vllm",
        "device": _device(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "settings": {key: getattr(args, key) for key in ("contexts", "repeats", "decode_tokens", "chunk",
                                                          "cpu_kv_gib", "dtype", "geometry", "concurrency")},
        "backends": {},
    }
    for backend in BACKENDS:
        report["backends"][backend] = measure(backend, model, args)
    stock_rows = report["backends"]["stock"]["results"]
    report["ratios"] = {
        backend: [
            {
                "context": stock["context"],
                "prefill_time_ratio": ours["prefill_s"] / stock["prefill_s"],
                "decode_time_ratio": ours["decode_s_per_token"] / stock["decode_s_per_token"],
            }
            for stock, ours in zip(stock_rows, report["backends"][backend]["results"], strict=True)
        ]
        for backend in BACKENDS[1:]
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_vllm.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "bench_vllm.png")
    for backend, ratios in report["ratios"].items():
        for ratio in ratios:
            print(f"context {ratio['context']:>6}: {backend}/stock time, prefill {ratio['prefill_time_ratio']:.2f}, "
                  f"decode {ratio['decode_time_ratio']:.2f}")
    print(f"wrote {args.out / 'bench_vllm.json'} and {args.out / 'bench_vllm.png'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
