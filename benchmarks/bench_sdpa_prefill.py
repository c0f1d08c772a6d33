"""The two length thresholds of the CPU's SDPA prefill path (``headinfer_vllm/core/kernels.py``), measured.

Llama-3-8B attention (32 query / 8 KV heads, head_dim 128), the kernels' calls alternated ``--repeats``
times, medians of wall seconds and of the per-repeat ratios:

- ``split`` (``SPLIT_MIN_QUERY_LEN``): one chunk of ``query_len`` tokens after ``earlier`` tokens of its
  request, through torch's SDPA with the lower-right causal mask (``masked``, what torch materializes)
  against :func:`prefix_then_causal_attention` (``split``: two flash calls merged by log-sum-exp);
  ``masked_over_split`` above 1 means the split is faster.
- ``short`` (``KERNEL_MAX_QUERY_LEN``): one layer of a step of 8 requests with chunks of ``query_len``
  tokens over ``keys`` keys each, through :class:`TorchKernel` (a gather and one SDPA call per request)
  against :class:`CpuKernel` with ``prefill="kernel"`` (the C++ paged kernel, one call);
  ``sdpa_over_kernel`` above 1 means the C++ kernel is faster.
- ``amx`` (``kernels.cpu_prefill_path``): the same comparison for ``requests`` requests with chunks of
  ``query_len`` tokens over ``keys`` keys, long ones included, with the kernel's bf16 prefill path
  (``prefill_path``: ``amx`` where it multiplies with AMX tiles); ``cpu_prefill_path`` records where
  bf16 prefill goes by default on this machine (``kernel``, or ``sdpa``).

Writes ``bench_sdpa_prefill.json`` and ``.png`` to ``--out``.

    python benchmarks/bench_sdpa_prefill.py --out benchmarks/results     # about a minute on 2 cores
    python benchmarks/bench_sdpa_prefill.py --smoke --out benchmarks/out  # seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from headinfer_vllm.core.kernels import CpuKernel, TorchKernel, prefix_then_causal_attention
from headinfer_vllm.core.page_store import PageViews
from headinfer_vllm.core.plan import build_step_plan
from headinfer_vllm.core.variants import LayerAttention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_facts import cpu_model

KV_HEADS, QUERY_PER_KV, HEAD_DIM, BLOCK_SIZE, REQUESTS = 8, 4, 128, 16, 8
SCALE = HEAD_DIM**-0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small shapes, one repeat (CI)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--repeats", type=int, help="alternated calls per kernel (default 5; smoke 1)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 5)
    args.split = [(16, 64), (64, 64)] if args.smoke else [
        (query_len, earlier) for query_len in (16, 64, 256, 1024) for earlier in (500, 4000)]
    args.short = [(4, 64), (16, 64)] if args.smoke else [(8, 500), (32, 500), (64, 500)]
    args.amx = [(1, 64, 64)] if args.smoke else [
        (8, 64, 500), (8, 256, 500), (8, 500, 500), (1, 512, 512), (1, 1024, 1024), (1, 1536, 1536),
        (1, 2048, 2048), (1, 256, 4096), (1, 1024, 4096), (1, 512, 8192)]
    return args


def alternate(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each call per repeat, the calls alternated, after one warm-up each."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def summary(seconds: dict[str, list[float]], over: str, under: str) -> dict:
    ratios = [a / b for a, b in zip(seconds[over], seconds[under], strict=True)]
    return {**{f"{name}_ms": statistics.median(times) * 1e3 for name, times in seconds.items()},
            f"{over}_over_{under}": statistics.median(ratios), "ratios": ratios}


def measure_split(query_len: int, earlier: int, repeats: int, generator: torch.Generator) -> dict:
    seq_len = query_len + earlier
    query = torch.randn(query_len, KV_HEADS * QUERY_PER_KV, HEAD_DIM, generator=generator)
    query = query.to(torch.bfloat16).transpose(0, 1)[None]  # head-major view of token-major rows, as the engine's
    key, value = (torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=generator).to(torch.bfloat16)
                  for _ in range(2))
    mask = causal_lower_right(query_len, seq_len)
    seconds = alternate({
        "masked": lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=SCALE,
                                                         enable_gqa=True),
        "split": lambda: prefix_then_causal_attention(query, key, value, SCALE),
    }, repeats)
    return {"query_len": query_len, "earlier": earlier, **summary(seconds, "masked", "split")}


def measure_short(query_len: int, keys: int, repeats: int, generator: torch.Generator,
                  requests: int = REQUESTS) -> dict:
    pages = -(-keys // BLOCK_SIZE)
    num_blocks = requests * pages + 1
    block_table = torch.randperm(num_blocks, generator=generator)[: requests * pages].view(requests, pages).int()
    unit = PageViews.of(torch.randn(num_blocks, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
                        .to(torch.bfloat16))
    starts = torch.arange(requests + 1, dtype=torch.int32) * query_len
    plan = build_step_plan(query_start_loc=starts, seq_lens=torch.full((requests,), keys, dtype=torch.int32),
                           block_table=block_table, slot_mapping=torch.zeros(int(starts[-1]), dtype=torch.int64),
                           block_size=BLOCK_SIZE, device="cpu")
    query = torch.randn(int(starts[-1]), KV_HEADS * QUERY_PER_KV, HEAD_DIM, generator=generator).to(torch.bfloat16)
    kernels = {
        "sdpa": TorchKernel(scale=SCALE, query_per_kv=QUERY_PER_KV, dtype=torch.bfloat16, expand_grouped_heads=False),
        "kernel": CpuKernel(scale=SCALE, query_per_kv=QUERY_PER_KV, dtype=torch.bfloat16, prefill="kernel"),
    }

    def layer(kernel) -> None:
        kernel.begin_step(plan)
        kernel.begin_layer(query, torch.zeros_like(query), LayerAttention())
        kernel.attend(0, unit, plan.home)
        kernel.end_layer()

    seconds = alternate({name: (lambda kernel=kernel: layer(kernel)) for name, kernel in kernels.items()}, repeats)
    return {"query_len": query_len, "keys": keys, "requests": requests, **summary(seconds, "sdpa", "kernel")}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (split, short, amx) = plt.subplots(1, 3, figsize=(16, 4))
    for earlier in sorted({row["earlier"] for row in report["split"]}):
        rows = [row for row in report["split"] if row["earlier"] == earlier]
        split.plot([row["query_len"] for row in rows], [row["masked_over_split"] for row in rows], "o-",
                   label=f"after {earlier} tokens")
    split.set(xscale="log", xlabel="chunk's query tokens", ylabel="masked / split time",
              title=f"split from {report['split_min_query_len']} tokens")
    rows = report["short"]
    short.plot([row["query_len"] for row in rows], [row["sdpa_over_kernel"] for row in rows], "o-",
               label=f"{REQUESTS} requests")
    short.set(xscale="log", xlabel="query tokens per request", ylabel="SDPA / C++ kernel time",
              title=f"C++ kernel up to {report['kernel_max_query_len']} tokens")
    for requests in sorted({row["requests"] for row in report["amx"]}):
        rows = [row for row in report["amx"] if row["requests"] == requests]
        amx.plot([row["keys"] for row in rows], [row["sdpa_over_kernel"] for row in rows], "o",
                 label=f"{requests} request(s)")
        for row in rows:
            amx.annotate(str(row["query_len"]), (row["keys"], row["sdpa_over_kernel"]), fontsize=7)
    amx.set(xscale="log", xlabel="keys per request (labels: query tokens)", ylabel="SDPA / C++ kernel time",
            title=f"{report['prefill_path']} prefill kernel; bf16 prefill by default: {report['cpu_prefill_path']}")
    for axis in (split, short, amx):
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"{report['cpu_model']}, {report['threads']} threads, bf16, load average "
                    f"{report['load_average']['before'][0]} -> {report['load_average']['after'][0]}, "
                    f"{report['date']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    from headinfer_vllm.core import cpu_attention, kernels

    args = parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    report = {
        "benchmark": "bench_sdpa_prefill",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "split_min_query_len": kernels.SPLIT_MIN_QUERY_LEN,
        "kernel_max_query_len": kernels.KERNEL_MAX_QUERY_LEN,
        "cpu_prefill_path": kernels.cpu_prefill_path(torch.bfloat16),
        "prefill_path": cpu_attention.prefill_instruction_path(),
        "split": [measure_split(q, earlier, args.repeats, generator) for q, earlier in args.split],
        "short": [measure_short(q, keys, args.repeats, generator) for q, keys in args.short],
        "amx": [measure_short(q, keys, args.repeats, generator, requests) for requests, q, keys in args.amx],
    }
    report["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sdpa_prefill.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "bench_sdpa_prefill.png")
    for row in report["split"]:
        print(f"split: {row['query_len']:>5} tokens after {row['earlier']:>5}: masked {row['masked_ms']:.1f} ms, "
              f"split {row['split_ms']:.1f} ms ({row['masked_over_split']:.2f}x)")
    for row in report["short"]:
        print(f"short: {REQUESTS} x {row['query_len']:>3} tokens over {row['keys']}: SDPA {row['sdpa_ms']:.1f} ms, "
              f"C++ kernel {row['kernel_ms']:.1f} ms ({row['sdpa_over_kernel']:.2f}x)")
    for row in report["amx"]:
        print(f"{report['prefill_path']}: {row['requests']} x {row['query_len']:>4} tokens over {row['keys']:>4}: "
              f"SDPA {row['sdpa_ms']:.1f} ms, C++ kernel {row['kernel_ms']:.1f} ms ({row['sdpa_over_kernel']:.2f}x)")
    return report


if __name__ == "__main__":
    main()
