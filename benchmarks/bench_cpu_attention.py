"""CPU decode attention: the kernel's KV read rate against the machine's memory bandwidth.

One decode token per request attends one layer at Llama-3-8B geometry (8 KV
heads, 32 query heads, head_dim 128, bf16), every head in a streamed unit of
``--head-group-size`` heads read in place from pages ``[N, 2, B, G, D]`` on
shuffled block ids, all units of the layer in one call
(``decode_attention_units``). Measured, for each block size, request count
and context length:

- ``kv_read_gbps``: bytes of K and V attended / seconds per call (10^9 B/s);
- the host memory bandwidth, sampled between the kernel's calls (a shared
  machine's bandwidth drifts): ``read_gbps``, a float32 sum (bytes read), and
  ``copy_gbps``, a tensor copy (STREAM's convention: bytes read plus written);
- ``of_read``: kv_read_gbps / read_gbps, the share of the machine's read
  bandwidth that the kernel reaches (goal: >= 0.6); medians over the
  repeats, and ``*_best`` (fastest call, highest bandwidth sample) beside
  them: on a shared machine, the figures of its quiet moments.

Each call reads a different simulated layer, enough layers that they do not
fit in the caches, so small contexts read DRAM as they would in a model.
Also measured:

- ``in_cache``: the same call on one small layer read again and again, its
  K/V in the caches: the kernel's arithmetic rate, the ceiling that memory
  cannot lift (``of_read`` far below 1 with ``in_cache`` near the DRAM
  rate means the machine's cores, not its memory, bound the kernel);
- ``matmul_gflops``: a float32 matrix product with torch's threads, the
  machine's arithmetic rate; decode attention does ``2 * q_per_kv /
  element_size`` flops per K/V byte (4 for bf16 at 4 query heads per KV
  head), so ``arithmetic_ceiling_gbps`` = matmul_gflops / that is the most
  any fp32-accumulating kernel could read;
- ``contention``: the share of the CPUs that other processes used during the
  run (from /proc/stat): a shared machine's figures are only as good as this;
- ``build_seconds``: a cold build of the kernel.

Writes ``bench_cpu_attention.json`` and ``.png`` to ``--out``.

    python benchmarks/bench_cpu_attention.py --out benchmarks/results   # about 3 minutes on 2 cores
    python benchmarks/bench_cpu_attention.py --smoke --out benchmarks/out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from headinfer_vllm.core import cpu_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_facts import cpu_model, usable_cores

LLAMA3_8B = dict(num_query_heads=32, num_kv_heads=8, head_dim=128)
GB = 1e9
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (CI)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--contexts", type=int, nargs="*", help="tokens per request")
    parser.add_argument("--requests", type=int, nargs="*", help="decode requests per call (default 1 8)")
    parser.add_argument("--block-sizes", type=int, nargs="*", help="tokens per page (default 16 256)")
    parser.add_argument("--head-group-size", type=int, default=1, help="KV heads per unit")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, help="OpenMP threads (default: the usable cores)")
    parser.add_argument("--max-kv-mib", type=int, help="largest K/V of one layer (default 1024; smoke 32)")
    parser.add_argument("--min-resident-mib", type=int, help="layers simulated reach this much (default 256)")
    parser.add_argument("--repeats", type=int, help="timed calls per configuration (default 9; smoke 3)")
    parser.add_argument("--no-build-time", action="store_true", help="skip the cold build measurement")
    args = parser.parse_args(argv)
    defaults = dict(
        contexts=([512, 2048], [2048, 8192, 32768, 131072]),
        requests=([1, 2], [1, 8]),
        block_sizes=([16], [16, 256]),
        max_kv_mib=(32, 1024),
        min_resident_mib=(16, 256),
        repeats=(3, 9),
    )
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    args.no_build_time = args.no_build_time or args.smoke
    return args


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def busy_jiffies() -> int | None:
    """CPU time of every process, in clock ticks (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as lines:
            fields = [int(value) for value in lines.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


class Contention:
    """Share of the CPUs that other processes use between ``__init__`` and ``share()``."""

    def __init__(self) -> None:
        self.start = time.perf_counter(), busy_jiffies(), sum(os.times()[:2])

    def share(self) -> float | None:
        wall, busy, own = self.start
        now_busy = busy_jiffies()
        if busy is None or now_busy is None:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        others = (now_busy - busy) / ticks - (sum(os.times()[:2]) - own)
        return max(0.0, others / ((time.perf_counter() - wall) * (os.cpu_count() or 1)))


class Bandwidth:
    """Host memory bandwidth probes over ``mebibytes`` of float32 (written first: every page mapped)."""

    def __init__(self, mebibytes: int) -> None:
        self.source = torch.ones(mebibytes * MIB // 4, dtype=torch.float32)
        self.destination = torch.zeros_like(self.source)
        self.bytes = self.source.numel() * 4

    def read_gbps(self) -> float:
        return self.bytes / seconds(self.source.sum) / GB

    def copy_gbps(self) -> float:
        return 2 * self.bytes / seconds(lambda: self.destination.copy_(self.source)) / GB


def matmul_gflops(repeats: int, size: int = 1024) -> float:
    """Best float32 matrix-product rate with torch's threads, GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / min(seconds(lambda: a @ b) for _ in range(repeats)) / GB


def cold_build_seconds() -> float:
    """Seconds to compile the kernel into an empty cache directory."""
    previous = os.environ.get("HEADINFER_CACHE_DIR")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["HEADINFER_CACHE_DIR"] = directory
        try:
            return seconds(cpu_attention.build)
        finally:
            if previous is None:
                del os.environ["HEADINFER_CACHE_DIR"]
            else:
                os.environ["HEADINFER_CACHE_DIR"] = previous


class Layers:
    """``count`` simulated layers of one configuration, carved out of one preallocated buffer."""

    def __init__(self, buffer: torch.Tensor, *, requests: int, context: int, block_size: int, group: int,
                 count: int, generator: torch.Generator) -> None:
        heads, head_dim = LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]
        pages_per_request = -(-context // block_size)
        num_blocks = requests * pages_per_request
        shape = (num_blocks, 2, block_size, group, head_dim)
        unit_elements = num_blocks * 2 * block_size * group * head_dim
        self.layers = []
        offset = 0
        for _ in range(count):
            units = []
            for first_head in range(0, heads, group):
                units.append((first_head, buffer[offset : offset + unit_elements].view(shape)))
                offset += unit_elements
            self.layers.append(units)
        # Every request's pages on shuffled block ids, as a fragmented cache would hold them.
        self.block_table = torch.randperm(num_blocks, generator=generator).int().view(requests, pages_per_request)
        self.seq_lens = torch.full((requests,), context, dtype=torch.int32)
        dtype = buffer.dtype
        self.query = torch.randn(requests, LLAMA3_8B["num_query_heads"], head_dim, generator=generator).to(dtype)
        self.out = torch.empty_like(self.query)
        self.kv_bytes = 2 * requests * context * heads * head_dim * buffer.element_size()
        self.next = 0

    def call(self, threads: int) -> None:
        units = self.layers[self.next]
        self.next = (self.next + 1) % len(self.layers)
        cpu_attention.decode_attention_units(
            self.query, units, self.block_table, self.seq_lens, LLAMA3_8B["head_dim"] ** -0.5,
            query_per_kv=LLAMA3_8B["num_query_heads"] // LLAMA3_8B["num_kv_heads"], out=self.out,
            num_threads=threads,
        )


def measure(layers: Layers, bandwidth: Bandwidth, args) -> dict:
    """Kernel calls and bandwidth probes, interleaved; medians."""
    for _ in range(len(layers.layers)):  # warm-up: touch every layer once
        layers.call(args.threads)
    call_s, reads, copies = [], [], []
    for _ in range(args.repeats):
        reads.append(bandwidth.read_gbps())
        call_s.append(seconds(lambda: layers.call(args.threads)))
        copies.append(bandwidth.copy_gbps())
    call = statistics.median(call_s)
    read, copy = statistics.median(reads), statistics.median(copies)
    rate, best = layers.kv_bytes / call / GB, layers.kv_bytes / min(call_s) / GB
    return {
        "ms_per_call": 1e3 * call,
        "kv_read_gbps": rate,
        "read_gbps": read,
        "copy_gbps": copy,
        "of_read": rate / read,
        "of_copy": rate / copy,
        # Best of the repeats: what a quiet machine gives, where other processes come and go.
        "kv_read_gbps_best": best,
        "read_gbps_best": max(reads),
        "of_read_best": best / max(reads),
    }


def in_cache(buffer: torch.Tensor, block_size: int, args, generator: torch.Generator) -> dict:
    """One request of 4096 tokens on one layer (16 MiB of bf16 K/V: in a server's L3), called again and again."""
    context = 512 if args.smoke else 4096
    layers = Layers(buffer, requests=1, context=context, block_size=block_size, group=args.head_group_size, count=1,
                    generator=generator)
    for _ in range(5):
        layers.call(args.threads)
    call = statistics.median(seconds(lambda: layers.call(args.threads)) for _ in range(10 * args.repeats))
    return {"block_size": block_size, "context": context, "ms_per_call": 1e3 * call,
            "kv_read_gbps": layers.kv_bytes / call / GB}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 6.5))
    series = sorted({(r["block_size"], r["requests"]) for r in results})
    for block_size, requests in series:
        rows = [r for r in results if (r["block_size"], r["requests"]) == (block_size, requests)]
        contexts = [r["context"] for r in rows]
        label = f"{requests} request{'s' if requests > 1 else ''}, block {block_size}"
        line = left.plot(contexts, [r["kv_read_gbps"] for r in rows], "o-", label=label)[0]
        left.plot(contexts, [r["kv_read_gbps_best"] for r in rows], ":", color=line.get_color())
        right.plot(contexts, [r["of_read"] for r in rows], "o-", color=line.get_color(), label=label)
        right.plot(contexts, [r["of_read_best"] for r in rows], ":", color=line.get_color())
    read = statistics.median(r["read_gbps"] for r in results)
    copy = statistics.median(r["copy_gbps"] for r in results)
    left.axhline(read, color="k", linestyle="--", label=f"memory read (sum) {read:.1f} GB/s")
    left.axhline(copy, color="gray", linestyle=":", label=f"memory copy (read + write) {copy:.1f} GB/s")
    left.axhline(0.6 * read, color="r", linestyle="-.", label="60% of read")
    cached = statistics.median(r["kv_read_gbps"] for r in report["in_cache"])
    left.axhline(cached, color="g", linestyle="--", label=f"kernel, K/V in cache {cached:.1f} GB/s")
    ceiling = report["arithmetic_ceiling_gbps"]
    left.axhline(ceiling, color="m", linestyle=":", label=f"arithmetic ceiling (fp32 matmul) {ceiling:.1f} GB/s")
    left.set(xscale="log", xlabel="context (tokens per request)", ylabel="GB/s of K/V read",
             title="kernel KV read rate (solid: median, dotted: best call)", ylim=(0, None))
    right.axhline(0.6, color="r", linestyle="-.", label="goal 0.6")
    right.set(xscale="log", xlabel="context (tokens per request)", ylabel="kernel rate / read bandwidth",
              title="share of the memory read bandwidth (dotted: best / best)",
              ylim=(0, max(1.05, *(r["of_read_best"] for r in results))))
    for axis in (left, right):
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        axis.grid(True, which="both", alpha=0.3)
    machine = report["machine"]
    contention = report["contention"]
    busy = "" if contention is None else f", other processes used {contention:.0%} of the CPUs"
    figure.suptitle(
        f"CPU decode attention, Llama-3-8B layer ({report['shapes']['dtype']}), {machine['cpu']}, "
        f"{machine['threads']} threads{busy}, {report['date']}\n{report['command']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.threads = args.threads or usable_cores()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    report: dict = {
        "benchmark": "bench_cpu_attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *(sys.argv if argv is None else ["bench_cpu_attention.py", *argv])]),
        "machine": {
            "cpu": cpu_model(),
            "arch": platform.machine(),
            "logical_cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "shapes": {**LLAMA3_8B, "dtype": args.dtype, "head_group_size": args.head_group_size},
        "build_seconds": None if args.no_build_time else cold_build_seconds(),
        "results": [],
    }
    contention = Contention()
    cpu_attention.library()
    print(f"build: {report['build_seconds']} s; library {cpu_attention.build()}", flush=True)
    bandwidth = Bandwidth(64 if args.smoke else 256)
    element = torch.empty((), dtype=dtype).element_size()
    token_bytes = 2 * LLAMA3_8B["num_kv_heads"] * LLAMA3_8B["head_dim"] * element
    max_bytes = args.max_kv_mib * MIB
    configs = [
        (block_size, requests, context)
        for block_size in args.block_sizes
        for requests in args.requests
        for context in args.contexts
        if requests * context * token_bytes <= max_bytes
    ]
    # One buffer for every configuration: the most any needs, layers included.
    def layer_count(requests: int, context: int) -> int:
        return max(1, -(-args.min_resident_mib * MIB // (requests * context * token_bytes)))

    def needed(block_size: int, requests: int, context: int) -> int:
        padded = requests * -(-context // block_size) * block_size
        return layer_count(requests, context) * padded * token_bytes // element

    buffer = torch.empty(max(needed(*config) for config in configs), dtype=dtype)
    buffer.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))  # no denormals, every page mapped
    generator = torch.Generator().manual_seed(1)
    for block_size, requests, context in configs:
        layers = Layers(buffer, requests=requests, context=context, block_size=block_size, group=args.head_group_size,
                        count=layer_count(requests, context), generator=generator)
        result = {"block_size": block_size, "requests": requests, "context": context,
                  "layers_simulated": len(layers.layers), "kv_bytes": layers.kv_bytes,
                  **measure(layers, bandwidth, args)}
        report["results"].append(result)
        print(
            f"block {block_size:4d}, {requests} x {context:7d} tokens: {result['ms_per_call']:8.3f} ms, "
            f"KV {result['kv_read_gbps']:5.1f} GB/s; memory read {result['read_gbps']:5.1f}, "
            f"copy {result['copy_gbps']:5.1f} GB/s; {result['of_read']:.0%} of read",
            flush=True,
        )
        del layers
    report["in_cache"] = [in_cache(buffer, block_size, args, generator) for block_size in args.block_sizes]
    for row in report["in_cache"]:
        print(f"block {row['block_size']:4d}, K/V in cache: KV {row['kv_read_gbps']:5.1f} GB/s", flush=True)
    report["matmul_gflops"] = matmul_gflops(3 * args.repeats)
    flops_per_byte = 2 * (LLAMA3_8B["num_query_heads"] // LLAMA3_8B["num_kv_heads"]) / element
    report["arithmetic_ceiling_gbps"] = report["matmul_gflops"] / flops_per_byte
    print(f"matmul {report['matmul_gflops']:.1f} GFLOP/s: arithmetic ceiling "
          f"{report['arithmetic_ceiling_gbps']:.1f} GB/s of K/V", flush=True)
    report["contention"] = contention.share()
    report["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    rates = [r["of_read"] for r in report["results"]]
    report["summary"] = {
        "read_gbps_median": statistics.median(r["read_gbps"] for r in report["results"]),
        "copy_gbps_median": statistics.median(r["copy_gbps"] for r in report["results"]),
        "of_read_median": statistics.median(rates),
        "of_read_min": min(rates),
        "of_read_max": max(rates),
        "of_read_best_median": statistics.median(r["of_read_best"] for r in report["results"]),
        "in_cache_gbps_median": statistics.median(r["kv_read_gbps"] for r in report["in_cache"]),
        "arithmetic_ceiling_gbps": report["arithmetic_ceiling_gbps"],
        "contention": report["contention"],
    }
    (args.out / "bench_cpu_attention.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"summary: {json.dumps(report['summary'])}")
    try:
        plot(report, args.out / "bench_cpu_attention.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"wrote {args.out / 'bench_cpu_attention.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
