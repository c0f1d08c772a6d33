"""CPU prefill attention in place: the C++ paged prefill kernel against the gather + SDPA path it replaced.

One layer of Llama-3-8B attention (8 KV heads in one unit, as on vLLM's CPU
platform; 32 query heads, head_dim 128), pages ``[N, 2, B, 8, D]`` on shuffled
block ids, through the engine's kernel interface (``begin_step``,
``begin_layer``, ``attend``, ``end_layer``):

- ``new``: :class:`CpuKernel` with ``prefill="kernel"``, every chunk of the
  step in one call of the C++ kernel (``cpu_attention.prefill_attention_units``);
- ``old``: :class:`TorchKernel`, a gather of each request's K/V and one SDPA
  call per request (what ``CpuKernel`` ran for prefill chunks before, and
  still runs for bf16 on a CPU with AMX: ``kernels.cpu_prefill_path``).

Workloads: ``8x300-650`` (8 requests of 300 to 650 tokens, one step) and
``1x8192`` (one prompt of 8192 tokens in chunks of ``--chunk`` tokens, one step
per chunk, summed). The two kernels' layers alternate (old, new, old, new, ...)
``--repeats`` times; medians of wall seconds per layer, the ratio old / new per
repeat (median), the largest difference between their outputs, the CPU model,
the kernel's instruction path and the load average go to
``bench_cpu_prefill.json`` and ``.png`` in ``--out`` (``--name`` changes the names).

    python benchmarks/bench_cpu_prefill.py --out benchmarks/results     # about 3 minutes on 2 cores
    python benchmarks/bench_cpu_prefill.py --smoke --out benchmarks/out  # seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from headinfer_vllm.core import cpu_attention
from headinfer_vllm.core.kernels import CpuKernel, TorchKernel
from headinfer_vllm.core.page_store import PageViews
from headinfer_vllm.core.plan import build_step_plan
from headinfer_vllm.core.variants import LayerAttention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_facts import cpu_model

KV_HEADS, QUERY_PER_KV, HEAD_DIM = 8, 4, 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="short prompts, one repeat (CI)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--repeats", type=int, help="alternated layers per kernel (default 3; smoke 1)")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step of the long prompt")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--name", default="bench_cpu_prefill", help="result file names (.json, .png)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.workloads = {"8x30-65": ([30, 65], 8), "1x512": ([512, 512], 1)} if args.smoke else {
        "8x300-650": ([300, 650], 8), "1x8192": ([8192, 8192], 1)}
    return args


def steps_of(lengths: list[int], chunk: int) -> list[tuple[list[int], list[int]]]:
    """The steps that prefill prompts of ``lengths`` tokens with at most ``chunk`` tokens per step, as
    (query lengths, sequence lengths) of the requests each step carries."""
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        budget, query_lens, seq_lens = chunk, [], []
        for index, length in enumerate(lengths):
            take = min(length - done[index], budget)
            if take > 0:
                done[index] += take
                budget -= take
                query_lens.append(take)
                seq_lens.append(done[index])
        steps.append((query_lens, seq_lens))
    return steps


class Layer:
    """One layer's pages on shuffled blocks for requests of ``lengths`` tokens, and queries per step."""

    def __init__(self, lengths: list[int], args: argparse.Namespace, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        dtype, block = getattr(torch, args.dtype), args.block_size
        pages_per = [-(-length // block) for length in lengths]
        num_blocks = sum(pages_per) + 1
        ids = torch.randperm(num_blocks, generator=generator)
        self.block_table = torch.zeros(len(lengths), max(pages_per), dtype=torch.int32)
        first = 0
        for r, count in enumerate(pages_per):
            self.block_table[r, :count] = ids[first : first + count].int()
            first += count
        shape = (num_blocks, 2, block, KV_HEADS, HEAD_DIM)
        self.unit = PageViews.of(torch.randn(shape, generator=generator).to(dtype))
        self.steps = []
        for query_lens, seq_lens in steps_of(lengths, args.chunk):
            starts = torch.tensor([0, *query_lens]).cumsum(0).int()
            rows = self.block_table[: len(seq_lens)]
            plan = build_step_plan(query_start_loc=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                   block_table=rows, slot_mapping=torch.zeros(int(starts[-1]), dtype=torch.int64),
                                   block_size=block, device="cpu")
            query = torch.randn(int(starts[-1]), KV_HEADS * QUERY_PER_KV, HEAD_DIM, generator=generator).to(dtype)
            self.steps.append((plan, query))

    def run(self, kernel) -> tuple[float, list[torch.Tensor]]:
        """Seconds of every step's layer through ``kernel``, and the outputs."""
        outputs, seconds = [], 0.0
        for plan, query in self.steps:
            out = torch.zeros_like(query)
            started = time.perf_counter()
            kernel.begin_step(plan)
            kernel.begin_layer(query, out, LayerAttention())
            kernel.attend(0, self.unit, plan.home)
            kernel.end_layer()
            seconds += time.perf_counter() - started
            outputs.append(out)
        return seconds, outputs


def measure(name: str, lengths_range: list[int], count: int, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    lengths = [rng.randint(*lengths_range) for _ in range(count)]
    layer = Layer(lengths, args)
    dtype = getattr(torch, args.dtype)
    kernels = {
        "old": TorchKernel(scale=HEAD_DIM**-0.5, query_per_kv=QUERY_PER_KV, dtype=dtype, expand_grouped_heads=False),
        "new": CpuKernel(scale=HEAD_DIM**-0.5, query_per_kv=QUERY_PER_KV, dtype=dtype, prefill="kernel"),
    }
    for kernel in kernels.values():  # warm-up
        layer.run(kernel)
    times: dict[str, list[float]] = {key: [] for key in kernels}
    difference = 0.0
    for _ in range(args.repeats):
        outputs = {}
        for key, kernel in kernels.items():
            seconds, outputs[key] = layer.run(kernel)
            times[key].append(seconds)
        difference = max(difference, max((a.float() - b.float()).abs().max().item()
                                         for a, b in zip(outputs["old"], outputs["new"], strict=True)))
    return {
        "workload": name,
        "prompt_lengths": lengths,
        "steps": len(layer.steps),
        "old_s_per_layer": statistics.median(times["old"]),
        "new_s_per_layer": statistics.median(times["new"]),
        "speedup": statistics.median(old / new for old, new in zip(times["old"], times["new"], strict=True)),
        "old_s": times["old"],
        "new_s": times["new"],
        "max_abs_difference": difference,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [row["old_s_per_layer"] * 1e3 for row in rows], 0.4,
             label="old: gather + SDPA per request")
    axis.bar([p + 0.2 for p in positions], [row["new_s_per_layer"] * 1e3 for row in rows], 0.4,
             label=f"new: C++ paged prefill ({report['instruction_path']})")
    for p, row in zip(positions, rows, strict=True):
        axis.annotate(f"{row['speedup']:.2f}x", (p + 0.2, row["new_s_per_layer"] * 1e3), ha="center",
                      va="bottom")
    axis.set_xticks(list(positions), [row["workload"] for row in rows])
    axis.set(ylabel="ms per layer (median)")
    axis.legend()
    load = report["load_average"]
    figure.suptitle(f"{report['cpu_model']}, {report['threads']} threads, {report['dtype']}, load average "
                    f"{load['before'][0]} -> {load['after'][0]}\n{report['date']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()
    report = {
        "benchmark": "bench_cpu_prefill",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "instruction_path": cpu_attention.instruction_path(),
        "dtype": args.dtype,
        "geometry": {"kv_heads": KV_HEADS, "query_per_kv": QUERY_PER_KV, "head_dim": HEAD_DIM,
                     "block_size": args.block_size, "chunk": args.chunk},
        "results": [measure(name, lengths, count, args) for name, (lengths, count) in args.workloads.items()],
    }
    report["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / f"{args.name}.png")
    for row in report["results"]:
        print(f"{row['workload']}: old {row['old_s_per_layer'] * 1e3:.0f} ms, "
              f"new {row['new_s_per_layer'] * 1e3:.0f} ms "
              f"per layer ({row['speedup']:.2f}x), outputs differ by at most {row['max_abs_difference']:.2g}")
    return report


if __name__ == "__main__":
    main()
