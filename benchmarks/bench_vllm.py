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

Both come from vLLM's own per-request timestamps. ``--min-length`` draws each
prompt's length uniformly from ``[--min-length, context]`` instead (the issue
#25 workload: ``--concurrency 8 --min-length 300 --contexts 650``).

``--rounds N`` alternates the engines N times (stock, headinfer, stock,
headinfer, ...: a slow spell of a shared machine hits both alike): each
backend's figures are medians over its rounds, and each ratio is the median of
the rounds' ratios. Every result records the CPU model, the instruction path of
headinfer's C++ kernel and the load average around the run (contention).

Backends (``--backends``, default all): ``stock`` (vLLM's own), ``headinfer``
(its default: on vLLM's CPU platform the KV attended in place by the C++
kernels, prefill and decode) and ``headinfer-streamed`` (``cpu_attention=off``:
every head group streamed through staging buffers, as on CUDA). Medians and the
ratios to stock go to ``bench_vllm.json`` and ``bench_vllm.png`` in ``--out``
(``--name`` changes the file names).

    python benchmarks/bench_vllm.py --out benchmarks/out
    python benchmarks/bench_vllm.py --smoke --out benchmarks/out     # CI: short contexts, one repeat
    python benchmarks/bench_vllm.py --geometry llama3-8b --dtype bfloat16 --concurrency 8 --min-length 300 \
        --contexts 650 --repeats 1 --rounds 3 --backends stock,headinfer --name bench_vllm_x8_bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import random
import shlex
import statistics
import sys
import tempfile
import textwrap
import time

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import SHAPE, save_tiny_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run_context
from machine_facts import cpu_model, cpuinfo

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
    parser.add_argument("--min-length", type=int, help="prompt lengths drawn from [this, context] (default: context)")
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the backends (medians over rounds)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated; stock first")
    parser.add_argument("--name", default="bench_vllm", help="result file names (.json, .png)")
    args = parser.parse_args(argv)
    contexts = args.contexts or ("256,1024" if args.smoke else "1024,2048,4096,7168")
    args.contexts = [int(n) for n in contexts.split(",")]
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if min(args.contexts) < 1 or max(args.contexts) + args.decode_tokens + 1 > 8192:
        parser.error("contexts must lie in 1 .. 8191 - decode tokens (the tiny model's positions)")
    if min(args.repeats, args.decode_tokens, args.chunk, args.concurrency, args.rounds) < 1 or args.cpu_kv_gib <= 0:
        parser.error("--repeats, --decode-tokens, --chunk, --concurrency, --rounds and --cpu-kv-gib must be positive")
    if args.min_length is not None and not 1 <= args.min_length <= min(args.contexts):
        parser.error("--min-length must lie in 1 .. the smallest context")
    args.backends = args.backends.split(",")
    if args.backends[0] != "stock" or not set(args.backends) <= set(BACKENDS) or len(set(args.backends)) < 2:
        parser.error(f"--backends: stock first, then one or more of {', '.join(BACKENDS[1:])}")
    return args


def workload(args: argparse.Namespace) -> list[list[list[int]]]:
    """Batches of ``--concurrency`` fresh random prompts: a warm-up, then ``--repeats`` per context (of the
    context's length, or of lengths drawn from ``[--min-length, context]``); the same for every backend."""
    rng = random.Random(0)
    contexts = [64] + [context for context in args.contexts for _ in range(args.repeats)]
    return [
        [[rng.randrange(3, VOCAB) for _ in range(rng.randint(min(args.min_length or context, context), context))]
         for _ in range(args.concurrency)]
        for context in contexts
    ]


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


def combine(rounds: list[dict]) -> dict:
    """One backend's rounds (``measure``'s results): per context, the median of each figure."""
    results = []
    for rows in zip(*(entry["results"] for entry in rounds), strict=True):
        prefill = statistics.median(row["prefill_s"] for row in rows)
        results.append({
            "context": rows[0]["context"],
            "prefill_s": prefill,
            "prefill_tok_per_s": rows[0]["context"] / prefill,
            "decode_s_per_token": statistics.median(row["decode_s_per_token"] for row in rows),
        })
    return {"results": results, "rounds": rounds}


def round_ratios(stock_rounds: list[dict], rounds: list[dict]) -> list[dict]:
    """Per context: the median over rounds of each round's headinfer / stock time (and the rounds' ratios)."""
    ratios = []
    for index, stock_row in enumerate(stock_rounds[0]["results"]):
        prefill = [ours["results"][index]["prefill_s"] / stock["results"][index]["prefill_s"]
                   for stock, ours in zip(stock_rounds, rounds, strict=True)]
        decode = [ours["results"][index]["decode_s_per_token"] / stock["results"][index]["decode_s_per_token"]
                  for stock, ours in zip(stock_rounds, rounds, strict=True)]
        ratios.append({"context": stock_row["context"], "prefill_time_ratio": statistics.median(prefill),
                       "decode_time_ratio": statistics.median(decode), "prefill_round_ratios": prefill,
                       "decode_round_ratios": decode})
    return ratios


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (prefill, decode) = plt.subplots(1, 2, figsize=(11, 4.5))
    for backend in report["backends"]:
        rows = report["backends"][backend]["results"]
        contexts = [row["context"] for row in rows]
        prefill.plot(contexts, [row["prefill_tok_per_s"] for row in rows], "o-", label=backend)
        decode.plot(contexts, [row["decode_s_per_token"] * 1e3 for row in rows], "o-", label=backend)
    prefill.set(xlabel="context (tokens)", ylabel="prefill tokens/s", xscale="log")
    decode.set(xlabel="context (tokens)", ylabel="decode ms/token", xscale="log")
    for axis in (prefill, decode):
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    settings = report["settings"]
    lengths = f", prompts of {settings['min_length']} .. context tokens" if settings["min_length"] else ""
    title = (f"tiny Llama ({settings['geometry']} attention, {settings['dtype']}), {settings['concurrency']} "
             f"requests{lengths}, medians of {report['rounds_done']} alternated rounds\n{report['device']}, "
             f"kernel path {report['cpu_attention_path']}, prefill {report['cpu_prefill_path']}, "
             f"load average {report['load_average']['before'][0]} -> "
             f"{report['load_average']['after'][0]}, {report['date']}")
    figure.suptitle(f"{title}\n" + "\n".join(textwrap.wrap(report["command"], 170)), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {os.cpu_count()} CPUs (vLLM's CPU platform)"


def cpu_attention_path() -> str:
    """The instruction path of headinfer's C++ kernel here (builds it), or why there is none."""
    from headinfer_vllm.core import cpu_attention

    try:
        return f"{cpu_attention.instruction_path()} (bf16 prefill: {cpu_attention.prefill_instruction_path()})"
    except RuntimeError as error:
        return f"none ({str(error).splitlines()[0]})"


def cpu_prefill_path(dtype: str) -> str:
    """How headinfer's in-place CPU kernel attends prefill chunks at ``dtype`` here (``kernel`` or ``sdpa``)."""
    import torch

    from headinfer_vllm.core.kernels import cpu_prefill_path as path_for

    return path_for(getattr(torch, dtype))


def cpu_flags() -> list[str]:
    """The CPU's AVX-512 and AMX flags (what the stock CPU backend's kernels choose by)."""
    return sorted(flag for flag in cpuinfo().get("flags", "").split() if flag.startswith(("avx512", "amx")))


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    model = save_tiny_model(tempfile.mkdtemp(prefix="headinfer-bench-"), "llama", **GEOMETRIES[args.geometry])
    report = {
        "benchmark": "bench_vllm",
        "device": _device(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_attention_path": cpu_attention_path(),
        "cpu_prefill_path": cpu_prefill_path(args.dtype),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "commit": run_context.commit(),
        "settings": {key: getattr(args, key) for key in ("contexts", "min_length", "repeats", "rounds", "decode_tokens",
                                                          "chunk", "cpu_kv_gib", "dtype", "geometry", "concurrency")},
        "backends": {},
    }
    load_before, started = os.getloadavg(), time.time()
    rounds: dict[str, list[dict]] = {backend: [] for backend in args.backends}
    for index in range(args.rounds):
        for backend in args.backends:
            rounds[backend].append(measure(backend, model, args))
            print(f"round {index + 1}/{args.rounds}, {backend}: {rounds[backend][-1]['results']}", flush=True)
        # After every round, so that a run stopped by a time limit keeps its finished rounds.
        report["rounds_done"] = index + 1
        report["wall_s"] = time.time() - started
        report["load_average"] = {"before": [round(x, 2) for x in load_before],
                                  "after": [round(x, 2) for x in os.getloadavg()],
                                  "note": "1/5/15-minute load averages of the machine: above its CPUs' count, "
                                          "other work shared the cores"}
        report["backends"] = {backend: combine(entries) for backend, entries in rounds.items()}
        report["ratios"] = {backend: round_ratios(rounds["stock"], rounds[backend]) for backend in args.backends[1:]}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, args.out / f"{args.name}.png")
    for backend, ratios in report["ratios"].items():
        for ratio in ratios:
            print(f"context {ratio['context']:>6}: {backend}/stock time, prefill {ratio['prefill_time_ratio']:.2f}, "
                  f"decode {ratio['decode_time_ratio']:.2f}")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
