"""CPU decode attention: each instruction path of the kernel against the machine's memory bandwidth.

Builds every instruction path this compiler and CPU allow
(``cpu_attention.available_isas()``: ``amx``, ``avx512bf16``, ``avx512``, and
``portable``, the 8-float vector-extension code that was the only kernel
before the explicit SIMD paths) and measures them side by side in one run,
their calls alternated (path A, B, C, A, B, C, ...) so that a shared machine's
drift hits them alike. One decode token per request attends one layer at
Llama-3-8B geometry (8 KV heads, 32 query heads, head_dim 128, bf16), read in
place from pages ``[N, 2, B, G, D]`` on shuffled block ids, all units of the
layer in one call (made once into ``cpu_attention.KernelUnits``, as the CUDA
split makes them), for units of one head and of 8 heads (vLLM's CPU platform
layout), at 1 request x 32K and 8 requests x 4K tokens. Measured:

- ``kv_read_gbps``: bytes of K and V attended / seconds per call, with every
  core (the kernel's threads), each call on another simulated layer so that
  K/V come from DRAM; ``read_gbps``: host memory read bandwidth (a float32
  sum) sampled between the calls; ``of_read`` = kv_read_gbps / read_gbps
  (goal: >= 0.7); medians over the repeats;
- ``per_core_gbps``: one thread on one small layer (K/V in the caches) read
  again and again, timed by the thread's CPU time (``time.thread_time``: time
  the scheduler gave other processes is not counted): the kernel's rate per
  core, a call's fixed cost (Python, ctypes, the kernel's setup) included;
  ``speedup_vs_portable`` is its ratio to the portable path's, a median of the
  per-repeat ratios; ``per_core_marginal_gbps``: the same layer over half the
  tokens timed in the same rounds, the added bytes over the added time (the
  arithmetic rate per key, the fixed cost apart: ``fixed_us`` a call), and
  ``marginal_speedup_vs_portable`` its ratio;
- ``contention``: the share of the CPUs that other processes used during the
  run (/proc/stat), and the load average: a shared machine's figures are only
  as good as these.

The machine's transparent huge page mode goes into the result too
(``machine.transparent_hugepages``): the read bandwidth, and so ``of_read``,
depends on the page size the buffers got.

The CPU model, its SIMD flags and each path's name go into the result.
Writes ``bench_cpu_attention.json`` and ``.png`` to ``--out`` (``--name`` changes the names).

    python benchmarks/bench_cpu_attention.py --out benchmarks/results   # about 2 minutes on 2 cores
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
import time
from pathlib import Path

import torch

from headinfer_vllm.core import cpu_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_facts import cpu_model, cpuinfo, transparent_hugepages, usable_cores

LLAMA3_8B = dict(num_query_heads=32, num_kv_heads=8, head_dim=128)
GB = 1e9
MIB = 1 << 20
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "asimd", "sve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (CI)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--isas", nargs="*", help="instruction paths (default: every one this CPU builds)")
    parser.add_argument("--shapes", nargs="*", help="REQUESTSxTOKENS (default 1x32768 8x4096)")
    parser.add_argument("--groups", type=int, nargs="*", default=[1, 8], help="KV heads per unit")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per page")
    parser.add_argument("--in-cache-tokens", type=int, help="tokens of the in-cache layer (default 1024)")
    parser.add_argument("--threads", type=int, help="OpenMP threads (default: the usable cores)")
    parser.add_argument("--min-resident-mib", type=int, help="layers simulated reach this much (default 256)")
    parser.add_argument("--name", default="bench_cpu_attention", help="result file names (.json, .png)")
    parser.add_argument("--repeats", type=int, help="timed calls per path and configuration (default 9; smoke 3)")
    args = parser.parse_args(argv)
    defaults = dict(shapes=(["1x512", "2x256"], ["1x32768", "8x4096"]), in_cache_tokens=(256, 1024),
                    min_resident_mib=(16, 256), repeats=(3, 9))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    args.shapes = [tuple(int(part) for part in shape.split("x")) for shape in args.shapes]
    return args


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


def simd_flags() -> list[str]:
    """The CPU's SIMD features that the kernel's paths use (from /proc/cpuinfo)."""
    info = cpuinfo()
    present = set((info.get("flags") or info.get("Features", "")).split())
    return [flag for flag in SIMD_FLAGS if flag in present]


def read_gbps(source: torch.Tensor) -> float:
    """Host memory read bandwidth: a float32 sum over ``source`` with torch's threads."""
    start = time.perf_counter()
    source.sum()
    return source.numel() * 4 / (time.perf_counter() - start) / GB


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
            self.layers.append(cpu_attention.KernelUnits(units))  # made once, as the CUDA split makes them
        # Every request's pages on shuffled block ids, as a fragmented cache would hold them.
        self.block_table = torch.randperm(num_blocks, generator=generator).int().view(requests, pages_per_request)
        self.seq_lens = torch.full((requests,), context, dtype=torch.int32)
        self.query = torch.randn(requests, LLAMA3_8B["num_query_heads"], head_dim, generator=generator).to(buffer.dtype)
        self.out = torch.empty_like(self.query)
        self.kv_bytes = 2 * requests * context * heads * head_dim * buffer.element_size()
        self.next = 0

    def call(self, isa: str, threads: int) -> None:
        units = self.layers[self.next]
        self.next = (self.next + 1) % len(self.layers)
        cpu_attention.decode_attention_units(
            self.query, units, self.block_table, self.seq_lens, LLAMA3_8B["head_dim"] ** -0.5,
            query_per_kv=LLAMA3_8B["num_query_heads"] // LLAMA3_8B["num_kv_heads"], out=self.out,
            num_threads=threads, isa=isa,
        )


def from_dram(layers: Layers, probe: torch.Tensor, args) -> dict:
    """Each path's calls with every thread, alternated, read bandwidth probes between rounds; medians."""
    for isa in args.isas:  # warm-up: touch every layer once
        for _ in range(len(layers.layers)):
            layers.call(isa, args.threads)
    seconds: dict[str, list[float]] = {isa: [] for isa in args.isas}
    reads = []
    for _ in range(args.repeats):
        reads.append(read_gbps(probe))
        for isa in args.isas:
            start = time.perf_counter()
            layers.call(isa, args.threads)
            seconds[isa].append(time.perf_counter() - start)
    read = statistics.median(reads)
    rows = {}
    for isa, times in seconds.items():
        rate = layers.kv_bytes / statistics.median(times) / GB
        rows[isa] = {"ms_per_call": 1e3 * statistics.median(times), "kv_read_gbps": rate, "of_read": rate / read}
    return {"read_gbps": read, "read_gbps_samples": reads, "paths": rows}


def in_cache(layers: Layers, half: Layers, args) -> dict:
    """Each path on one thread, K/V in the caches, alternated; thread CPU time of ``calls`` calls a sample.

    ``half``: the same layer shape over half the tokens, timed in the same rounds. A call costs a fixed
    part (Python, ctypes, the kernel's setup) plus a part per key; the difference of the two sizes is the
    per-key part alone: ``per_core_marginal_gbps`` (the arithmetic rate), and ``fixed_us`` the rest.
    """
    calls = 2 if args.smoke else 5
    for isa in args.isas:
        for _ in range(3):
            layers.call(isa, 1)
            half.call(isa, 1)
    seconds: dict[str, list[tuple[float, float]]] = {isa: [] for isa in args.isas}
    for _ in range(3 * args.repeats):
        for isa in args.isas:
            pair = []
            for sized in (layers, half):
                start = time.thread_time()
                for _ in range(calls):
                    sized.call(isa, 1)
                pair.append((time.thread_time() - start) / calls)
            seconds[isa].append((pair[0], pair[1]))
    added = layers.kv_bytes - half.kv_bytes
    rates = {isa: [layers.kv_bytes / whole / GB for whole, _ in pairs] for isa, pairs in seconds.items()}
    # Per round, the added keys' bytes over the added time; None where the larger call did not take
    # longer (the VM switched speed between the two), a round every ratio then skips.
    marginal = {isa: [added / (whole - part) / GB if whole > part else None for whole, part in pairs]
                for isa, pairs in seconds.items()}
    rows = {}
    for isa, pairs in seconds.items():
        measured = [(whole, rate) for (whole, _), rate in zip(pairs, marginal[isa], strict=True) if rate]
        rows[isa] = {"per_core_gbps": statistics.median(rates[isa]), "per_core_gbps_best": max(rates[isa]),
                     "per_core_marginal_gbps": statistics.median(rate for _, rate in measured),
                     "fixed_us": 1e6 * statistics.median(whole - layers.kv_bytes / (rate * GB)
                                                         for whole, rate in measured)}
    if "portable" in seconds:
        for isa in seconds:  # ratios within each round: drift cancels
            rows[isa]["speedup_vs_portable"] = statistics.median(
                rate / base for rate, base in zip(rates[isa], rates["portable"], strict=True))
            rows[isa]["marginal_speedup_vs_portable"] = statistics.median(
                rate / base for rate, base in zip(marginal[isa], marginal["portable"], strict=True) if rate and base)
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    isas = report["isas"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    width = 0.8 / len(isas)
    groups = sorted({row["group"] for row in report["in_cache"]})
    for i, isa in enumerate(isas):
        rows = [next(r["paths"][isa] for r in report["in_cache"] if r["group"] == g) for g in groups]
        positions = [g_index + i * width for g_index in range(len(groups))]
        bars = left.bar(positions, [row["per_core_gbps"] for row in rows], width, label=isa)
        left.bar_label(bars, fmt="%.1f", fontsize=7)
        left.scatter(positions, [row["per_core_marginal_gbps"] for row in rows], marker="_", s=400, color="k",
                     label="per key, fixed cost apart" if i == 0 else None)
    left.set_xticks([g_index + width * (len(isas) - 1) / 2 for g_index in range(len(groups))],
                    [f"units of {g} head{'s' if g > 1 else ''}" for g in groups])
    left.set(ylabel="GB/s of K/V per core (thread CPU time)", title="one core, K/V in cache: arithmetic rate")
    configs = report["results"]
    for i, isa in enumerate(isas):
        shares = [row["paths"][isa]["of_read"] for row in configs]
        bars = right.bar([c + i * width for c in range(len(configs))], shares, width, label=isa)
        right.bar_label(bars, fmt="%.2f", fontsize=7)
    right.set_xticks([c + width * (len(isas) - 1) / 2 for c in range(len(configs))],
                     [f"{r['requests']}x{r['context'] // 1024}K\n{r['group']}-head units" for r in configs], fontsize=8)
    right.axhline(0.7, color="r", linestyle="-.", label="goal 0.7")
    read = report["summary"]["read_gbps_median"]
    right.set(ylabel="K/V read rate / memory read bandwidth",
              title=f"all {report['machine']['threads']} threads, K/V from DRAM (read bandwidth {read:.1f} GB/s)")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    machine, contention = report["machine"], report["contention"]
    busy = "" if contention is None else f"; other processes used {contention:.0%} of the CPUs"
    figure.suptitle(f"CPU decode attention, Llama-3-8B layer (bf16, pages of {report['shapes']['block_size']}), "
                    f"{machine['cpu']} ({', '.join(machine['simd_flags'])}), {report['date']}{busy}\n"
                    f"{report['command']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarize(report: dict) -> dict:
    isas = report["isas"]
    summary = {"read_gbps_median": statistics.median(r["read_gbps"] for r in report["results"]),
               "auto_path": report["auto_path"], "contention": report["contention"], "paths": {}}
    for isa in isas:
        per_core = [r["paths"][isa] for r in report["in_cache"]]
        summary["paths"][isa] = {
            "of_read_median": statistics.median(r["paths"][isa]["of_read"] for r in report["results"]),
            "of_read_min": min(r["paths"][isa]["of_read"] for r in report["results"]),
            "per_core_gbps_median": statistics.median(row["per_core_gbps"] for row in per_core),
            "speedup_vs_portable_median": (statistics.median(row["speedup_vs_portable"] for row in per_core)
                                           if "speedup_vs_portable" in per_core[0] else None),
            "per_core_marginal_gbps_median": statistics.median(row["per_core_marginal_gbps"] for row in per_core),
            "marginal_speedup_vs_portable_median": (
                statistics.median(row["marginal_speedup_vs_portable"] for row in per_core)
                if "marginal_speedup_vs_portable" in per_core[0] else None),
            "fixed_us_median": statistics.median(row["fixed_us"] for row in per_core),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.threads = args.threads or usable_cores()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.isas = args.isas or cpu_attention.available_isas()
    contention = Contention()
    report: dict = {
        "benchmark": "bench_cpu_attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *(sys.argv if argv is None else ["bench_cpu_attention.py", *argv])]),
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "simd_flags": simd_flags(),
                    "logical_cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "transparent_hugepages": transparent_hugepages()},
        "shapes": {**LLAMA3_8B, "dtype": "bfloat16", "block_size": args.block_size},
        "isas": args.isas,
        "auto_path": cpu_attention.instruction_path("auto"),
        "paths": {isa: {"built": cpu_attention.instruction_path(isa), "library": str(cpu_attention.build(isa))}
                  for isa in args.isas},
        "results": [],
        "in_cache": [],
    }
    print(f"{report['machine']['cpu']}, {args.threads} threads, {' '.join(report['machine']['simd_flags'])}; "
          f"paths {args.isas}, auto takes {report['auto_path']}", flush=True)
    probe = torch.ones((16 if args.smoke else 256) * MIB // 4, dtype=torch.float32)
    token_bytes = 2 * LLAMA3_8B["num_kv_heads"] * LLAMA3_8B["head_dim"] * 2
    block = args.block_size

    def layer_count(requests: int, context: int) -> int:
        return max(1, -(-args.min_resident_mib * MIB // (requests * context * token_bytes)))

    def elements(requests: int, context: int, count: int) -> int:
        return count * requests * -(-context // block) * block * token_bytes // 2

    size = max(elements(r, c, layer_count(r, c)) for r, c in [*args.shapes, (1, args.in_cache_tokens)])
    buffer = torch.empty(size, dtype=torch.bfloat16)
    buffer.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))  # no denormals, every page mapped
    generator = torch.Generator().manual_seed(1)
    for group in args.groups:
        cached = Layers(buffer, requests=1, context=args.in_cache_tokens, block_size=block, group=group, count=1,
                        generator=generator)
        half = Layers(buffer, requests=1, context=args.in_cache_tokens // 2, block_size=block, group=group, count=1,
                      generator=generator)
        row = {"group": group, "context": args.in_cache_tokens, "kv_bytes": cached.kv_bytes,
               "half_context": args.in_cache_tokens // 2, "paths": in_cache(cached, half, args)}
        report["in_cache"].append(row)
        print(f"{group}-head units, one core, K/V in cache: " + ", ".join(
            f"{isa} {r['per_core_gbps']:.1f} GB/s" + (f" ({r['speedup_vs_portable']:.2f}x portable)"
                                                    if "speedup_vs_portable" in r else "")
            for isa, r in row["paths"].items()), flush=True)
        print(f"{group}-head units, one core, per key (the fixed cost of a call apart): " + ", ".join(
            f"{isa} {r['per_core_marginal_gbps']:.1f} GB/s"
            + (f" ({r['marginal_speedup_vs_portable']:.2f}x portable)" if "marginal_speedup_vs_portable" in r else "")
            + f", {r['fixed_us']:.0f} us a call" for isa, r in row["paths"].items()), flush=True)
        for requests, context in args.shapes:
            layers = Layers(buffer, requests=requests, context=context, block_size=block, group=group,
                            count=layer_count(requests, context), generator=generator)
            row = {"group": group, "requests": requests, "context": context, "layers_simulated": len(layers.layers),
                   "kv_bytes": layers.kv_bytes, **from_dram(layers, probe, args)}
            report["results"].append(row)
            print(f"{group}-head units, {requests} x {context} tokens, read {row['read_gbps']:.1f} GB/s: " + ", ".join(
                f"{isa} {r['kv_read_gbps']:.1f} GB/s ({r['of_read']:.0%})" for isa, r in row["paths"].items()),
                flush=True)
            del layers
    report["contention"] = contention.share()
    report["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["summary"] = summarize(report)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"summary: {json.dumps(report['summary'])}")
    try:
        plot(report, args.out / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"wrote {args.out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
