"""CPU prefill attention in place: the C++ paged prefill kernel against the gather + SDPA path it replaced.

One layer of Llama-3-8B attention (8 KV heads in one unit, as on vLLM's CPU
platform; 32 query heads, head_dim 128), pages ``[N, 2, B, 8, D]`` on shuffled
block ids, through the engine's kernel interface (``begin_step``,
``begin_layer``, ``attend``, ``end_layer``):

- ``new``: :class:`CpuKernel` with ``prefill="kernel"``, every chunk of the
  step in one call of the C++ kernel (``cpu_attention.prefill_attention_units``;
  bf16 with AMX tiles where the CPU has them: ``prefill_path``);
- ``old``: :class:`TorchKernel`, a gather of each request's K/V and one SDPA
  call per request (what ``CpuKernel`` ran for prefill chunks before, and
  still runs for bf16 on a CPU with AMX tiles where the kernel's build does
  not use them, but for short chunks: ``kernels.cpu_prefill_path``,
  ``CpuKernel._in_kernel``).

- ``stock`` (where vLLM's CPU ops import): vLLM's own CPU kernel
  (``cpu_attention_with_kv_cache``, what the stock ``CPU_ATTN`` backend runs:
  AMX for bf16 on a CPU with AMX tiles) over a copy of the same K/V in its
  layout ``[blocks, KV heads, 2 * 128 tokens, D]``, one call per step, its
  scheduler metadata built once per step outside the timing (as vLLM builds
  it once for all layers).

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


def steps_of(lengths: list[int], chunk: int) -> list[tuple[list[int], list[int], list[int]]]:
    """The steps that prefill prompts of ``lengths`` tokens with at most ``chunk`` tokens per step, as
    (request indices, query lengths, sequence lengths) of the requests each step carries."""
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        budget, requests, query_lens, seq_lens = chunk, [], [], []
        for index, length in enumerate(lengths):
            take = min(length - done[index], budget)
            if take > 0:
                done[index] += take
                budget -= take
                requests.append(index)
                query_lens.append(take)
                seq_lens.append(done[index])
        steps.append((requests, query_lens, seq_lens))
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
        self.steps, self.requests = [], []
        """Per step: its plan and queries; the indices of its requests."""
        for requests, query_lens, seq_lens in steps_of(lengths, args.chunk):
            starts = torch.tensor([0, *query_lens]).cumsum(0).int()
            rows = self.block_table[requests]
            plan = build_step_plan(query_start_loc=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                   block_table=rows, slot_mapping=torch.zeros(int(starts[-1]), dtype=torch.int64),
                                   block_size=block, device="cpu")
            query = torch.randn(int(starts[-1]), KV_HEADS * QUERY_PER_KV, HEAD_DIM, generator=generator).to(dtype)
            self.steps.append((plan, query))
            self.requests.append(requests)

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


class StockKernel:
    """vLLM's CPU attention op over a copy of ``layer``'s K/V in its own layout, behind the kernel interface
    :meth:`Layer.run` drives (``begin_step``, ``begin_layer``, ``attend``, ``end_layer``)."""

    BLOCK_SIZE = 128

    def __init__(self, layer: Layer, lengths: list[int], dtype: torch.dtype):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops = ops
        self.isa = _get_attn_isa(dtype, self.BLOCK_SIZE, HEAD_DIM)
        if self.isa == "amx":
            torch._C._cpu._init_amx()  # Linux's permission for AMX tiles, as vLLM's CPU worker asks at start-up
        block = self.BLOCK_SIZE
        pages_per = [-(-length // block) for length in lengths]
        cache = torch.zeros(sum(pages_per), KV_HEADS, 2 * block, HEAD_DIM, dtype=dtype)
        self.key_cache, self.value_cache = cache.chunk(2, dim=2)
        self.block_table = torch.zeros(len(lengths), max(pages_per), dtype=torch.int32)
        first = 0
        source = layer.unit.pages  # [N, 2, B, KV heads, D]
        source_block = source.shape[2]
        for r, (length, count) in enumerate(zip(lengths, pages_per, strict=True)):
            self.block_table[r, :count] = torch.arange(first, first + count, dtype=torch.int32)
            first += count
            tokens = torch.arange(length)
            pages = layer.block_table[r, tokens // source_block].long()
            slots = self.block_table[r, tokens // block].long() * block + tokens % block
            # vLLM's own cache write: its AMX layout is not a plain copy.
            offsets = tokens % source_block
            ops.cpu_attn_reshape_and_cache(source[pages, 0, offsets], source[pages, 1, offsets], self.key_cache,
                                           self.value_cache, slots, self.isa)
        self.steps = {}
        for (plan, _), requests in zip(layer.steps, layer.requests, strict=True):
            query_lens = [request.query_len for request in plan.requests]
            seq_lens = torch.tensor([request.seq_len for request in plan.requests], dtype=torch.int32)
            starts = torch.tensor([0, *query_lens]).cumsum(0).int()
            metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(query_lens), num_heads=KV_HEADS * QUERY_PER_KV, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                seq_lens=seq_lens, dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1,
                isa=self.isa, enable_kv_split=False)
            self.steps[id(plan)] = (starts, seq_lens, self.block_table[requests], metadata)

    @staticmethod
    def available() -> bool:
        try:
            from vllm import _custom_ops as ops
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: F401
        except ImportError:
            return False
        return hasattr(ops, "cpu_attention_with_kv_cache")

    def begin_step(self, plan) -> None:
        self.step = self.steps[id(plan)]

    def begin_layer(self, query: torch.Tensor, out: torch.Tensor, variant: LayerAttention) -> None:
        self.query, self.out = query, out

    def attend(self, first_head: int, unit: PageViews, table) -> None:
        starts, seq_lens, block_table, metadata = self.step
        self.ops.cpu_attention_with_kv_cache(
            query=self.query, key_cache=self.key_cache, value_cache=self.value_cache, output=self.out,
            query_start_loc=starts, seq_lens=seq_lens, scale=HEAD_DIM**-0.5, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None)

    def end_layer(self) -> None:
        pass


def measure(name: str, lengths_range: list[int], count: int, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    lengths = [rng.randint(*lengths_range) for _ in range(count)]
    layer = Layer(lengths, args)
    dtype = getattr(torch, args.dtype)
    kernels = {
        "old": TorchKernel(scale=HEAD_DIM**-0.5, query_per_kv=QUERY_PER_KV, dtype=dtype, expand_grouped_heads=False),
        "new": CpuKernel(scale=HEAD_DIM**-0.5, query_per_kv=QUERY_PER_KV, dtype=dtype, prefill="kernel"),
    }
    if StockKernel.available():
        kernels["stock"] = StockKernel(layer, lengths, dtype)
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
                                         for other in outputs if other != "new"
                                         for a, b in zip(outputs[other], outputs["new"], strict=True)))
    stock = {}
    if "stock" in times:
        stock = {"stock_isa": kernels["stock"].isa, "stock_s_per_layer": statistics.median(times["stock"]),
                 "new_over_stock": statistics.median(new / base for new, base in zip(times["new"], times["stock"],
                                                                                      strict=True)),
                 "stock_s": times["stock"]}
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
        **stock,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    axis.bar([p - 0.27 for p in positions], [row["old_s_per_layer"] * 1e3 for row in rows], 0.27,
             label="old: gather + SDPA per request")
    axis.bar(list(positions), [row["new_s_per_layer"] * 1e3 for row in rows], 0.27,
             label=f"new: C++ paged prefill ({report['prefill_path']})")
    for p, row in zip(positions, rows, strict=True):
        axis.annotate(f"{row['speedup']:.2f}x old", (p, row["new_s_per_layer"] * 1e3), ha="center", va="bottom",
                      fontsize=7)
    if all("stock_s_per_layer" in row for row in rows):
        axis.bar([p + 0.27 for p in positions], [row["stock_s_per_layer"] * 1e3 for row in rows], 0.27,
                 label=f"vLLM's stock CPU kernel ({rows[0]['stock_isa']})")
        for p, row in zip(positions, rows, strict=True):
            axis.annotate(f"new {row['new_over_stock']:.2f}x", (p + 0.27, row["stock_s_per_layer"] * 1e3),
                          ha="center", va="bottom", fontsize=7)
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
        "prefill_path": cpu_attention.prefill_instruction_path(),
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
              f"per layer ({row['speedup']:.2f}x), outputs differ by at most {row['max_abs_difference']:.2g}"
              + (f"; stock ({row['stock_isa']}) {row['stock_s_per_layer'] * 1e3:.0f} ms, new / stock "
                 f"{row['new_over_stock']:.2f}" if "stock_s_per_layer" in row else ""))
    return report


if __name__ == "__main__":
    main()
