"""Machine facts: what the GPU run ran on, and the bandwidths that bound HeadInfer there.

Writes ``facts.json`` to ``--out`` (rewritten after every section, so a run
stopped by a time limit keeps what it measured):

- ``machine``: GPU name, memory, compute capability, driver and PCIe link;
  torch, CUDA, transformers and triton versions; CPU model, cores and NUMA
  nodes; host memory (total and available, before and after the measurements
  and around the link test's pinning: a VM's memory may grow as it is used),
  the locked-memory limit and the transparent huge page mode (the host's read
  bandwidth depends on the page size).
- ``link``: pinned host-to-device and device-to-host copy bandwidth, each
  direction alone and both at once (two streams), in GB/s (10^9 bytes/s).
- ``host_memory``: host memory bandwidth with all cores (torch's threads set
  to the usable cores, ``threads``): ``read_gbps`` (a
  float32 sum, bytes read) and ``copy_gbps`` (a tensor copy, STREAM's
  convention: bytes read plus bytes written).
- ``cpu_attention``: decode attention on the CPU at Llama-3-8B head shapes
  (32 query heads, 8 KV heads, head_dim 128, bf16), as the rate at which it
  reads the KV, in GB/s: torch's SDPA, and any kernel in ``CPU_KERNELS``
  (headinfer's with the instruction path its build chose).

Without CUDA the GPU fields are null and the host fields are measured, so CI
can run it (``--smoke``: small buffers, under 30 s on 2 cores).

    python benchmarks/machine_facts.py --out benchmarks/out
    python benchmarks/machine_facts.py --smoke --out benchmarks/out
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import run_context
import torch
import torch.nn.functional as F

GB = 1e9
MIB = 1 << 20
LLAMA3_8B_HEADS = dict(num_query_heads=32, num_kv_heads=8, head_dim=128)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--smoke", action="store_true", help="small buffers (CI)")
    parser.add_argument("--link-mib", type=int, help="pinned buffer per direction (default 1024; smoke 64)")
    parser.add_argument("--host-mib", type=int, help="host bandwidth buffer (default 2048; smoke 128)")
    parser.add_argument("--attention-context", type=int, help="tokens of KV for CPU attention (default 131072)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    defaults = dict(link_mib=(64, 1024), host_mib=(128, 2048), attention_context=(8192, 131072))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def median_seconds(function: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall-clock seconds of ``function()`` after one untimed call; ``sync`` waits for queued work."""
    function()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# Machine description ---------------------------------------------------------------------------


def meminfo() -> dict[str, int | None]:
    """``MemTotal`` and ``MemAvailable`` in bytes (None where /proc/meminfo lacks them)."""
    fields = {"MemTotal": None, "MemAvailable": None}
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                name, _, rest = line.partition(":")
                if name in fields:
                    fields[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return {"total_bytes": fields["MemTotal"], "available_bytes": fields["MemAvailable"]}


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo(path: Path = CPUINFO) -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (``model name``, ``cpu family``, ``flags`` or, on Arm,
    ``Features``, ...), values stripped; empty where the file is missing."""
    fields: dict[str, str] = {}
    try:
        with open(path) as lines:
            for line in lines:
                if not line.strip():
                    break  # the first CPU's block ends
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(path: Path = CPUINFO) -> str:
    """The first CPU's model name, and on x86 its family, model and stepping numbers (decimal, as
    /proc/cpuinfo gives them): a VM may name the CPU only "AMD EPYC", and AMD Zen 4 (family 25) and
    Zen 5 (family 26) differ in the kernel's rates (README). Falls back to ``platform``'s words."""
    fields = cpuinfo(path)
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [(word, fields[key]) for word, key in (("family", "cpu family"), ("model", "model"),
                                                      ("stepping", "stepping")) if key in fields]
    return f"{name} ({', '.join(f'{word} {value}' for word, value in numbers)})" if numbers else name


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict[str, str] | None:
    """Driver and PCIe link as ``nvidia-smi`` reports them (None without it)."""
    fields = ["driver_version", "pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current"]
    command = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(zip(fields, (value.strip() for value in output.strip().split(",")), strict=False))


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_hugepages(enabled: Path = THP_ENABLED) -> dict[str, str | None]:
    """Linux's transparent huge page mode (the bracketed word of ``enabled``: ``always``, ``madvise`` or
    ``never``; None where the file is missing) and ``$THP_MEM_ALLOC_ENABLE``, which makes torch's CPU
    allocator ask for huge pages in ``madvise`` mode. Host memory read rates depend on the page size: on
    the 2-core AMD EPYC VM of the README, in ``madvise`` mode, a float32 sum read 31-33 GB/s over 4 KiB
    pages and 46-53 GB/s over 2 MiB pages (``THP_MEM_ALLOC_ENABLE=1``)."""
    try:
        text = enabled.read_text()
        mode = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        mode = None
    return {"mode": mode, "torch_thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe_machine() -> dict:
    cuda = torch.cuda.is_available()
    gpu = None
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        gpu = {
            "name": properties.name,
            "memory_bytes": properties.total_memory,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "nvidia_smi": nvidia_smi(),
        }
    locked_soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "transformers": package_version("transformers"),
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_default_threads": torch.get_num_threads(),
        "numa_nodes": len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or None,
        "host_memory_at_start": meminfo(),
        "transparent_hugepages": transparent_hugepages(),
        "locked_memory_limit_bytes": None if locked_soft == resource.RLIM_INFINITY else locked_soft,
    }


# Bandwidths -----------------------------------------------------------------------------------


def link_bandwidth(mebibytes: int, repeats: int) -> dict[str, float]:
    """Pinned host <-> GPU copy bandwidth, GB/s: each direction alone, then both at once."""
    size = mebibytes * MIB
    host_in = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    device_in = torch.empty(size, dtype=torch.uint8, device="cuda")
    device_out = torch.empty(size, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def h2d() -> None:
        with torch.cuda.stream(up):
            device_in.copy_(host_in, non_blocking=True)

    def d2h() -> None:
        with torch.cuda.stream(down):
            host_out.copy_(device_out, non_blocking=True)

    def both() -> None:
        h2d()
        d2h()

    sync = torch.cuda.synchronize
    h2d_s, d2h_s, both_s = (median_seconds(f, repeats, sync) for f in (h2d, d2h, both))
    return {
        "buffer_mib": mebibytes,
        "h2d_gbps": size / h2d_s / GB,
        "d2h_gbps": size / d2h_s / GB,
        "bidirectional_gbps": 2 * size / both_s / GB,
        "bidirectional_each_way_gbps": size / both_s / GB,
    }


def host_bandwidth(mebibytes: int, repeats: int) -> dict[str, float]:
    """Host memory bandwidth with all of torch's threads, GB/s."""
    source = torch.ones(mebibytes * MIB // 4, dtype=torch.float32)  # written: every page is mapped
    destination = torch.empty_like(source)
    destination.zero_()
    read_s = median_seconds(source.sum, repeats)
    copy_s = median_seconds(lambda: destination.copy_(source), repeats)
    nbytes = source.numel() * 4
    return {
        "buffer_mib": mebibytes,
        "threads": torch.get_num_threads(),
        "read_gbps": nbytes / read_s / GB,
        "copy_gbps": 2 * nbytes / copy_s / GB,
    }


def torch_sdpa_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One decode token: each KV head's query heads as rows, so one pass over each head's KV.

    query: ``[1, kv_heads, query_heads_per_kv_head, head_dim]``; key, value: ``[1, kv_heads, context, head_dim]``.
    """
    return F.scaled_dot_product_attention(query, key, value)


class HeadinferCpuDecode:
    """headinfer's C++ kernel (``core.cpu_attention``) over pages of 256 tokens, laid out once per K/V
    (outside the timing), the page store's layout ``[N, 2, B, H, D]``."""

    BLOCK = 256

    def __init__(self) -> None:
        self._paged: tuple | None = None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        from headinfer_vllm.core.cpu_attention import decode_attention

        kv_heads, context, head_dim = key.shape[1:]
        if self._paged is None or self._paged[0] is not key:
            pages = -(-context // self.BLOCK)
            padded = torch.zeros(2, pages * self.BLOCK, kv_heads, head_dim, dtype=key.dtype)
            padded[0, :context], padded[1, :context] = key[0].transpose(0, 1), value[0].transpose(0, 1)
            store = padded.view(2, pages, self.BLOCK, kv_heads, head_dim).transpose(0, 1).contiguous()
            table = torch.arange(pages, dtype=torch.int32)[None]
            self._paged = (key, store, table, torch.tensor([context], dtype=torch.int32))
        _, store, table, seq_lens = self._paged
        q = query.reshape(1, -1, head_dim)  # [1, query heads, D], KV head h serving rows h * group ..
        return decode_attention(q, store, table, seq_lens, head_dim**-0.5)


CPU_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "torch_sdpa": torch_sdpa_decode,
    "headinfer_cpu": HeadinferCpuDecode(),
}
"""CPU decode attention kernels measured (a kernel that cannot run here is reported with its error)."""


def cpu_attention(context: int, repeats: int) -> dict:
    """KV read rate (K and V bytes / seconds per decode token) of each kernel in ``CPU_KERNELS``."""
    heads = LLAMA3_8B_HEADS
    kv_heads, head_dim = heads["num_kv_heads"], heads["head_dim"]
    group = heads["num_query_heads"] // kv_heads
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, kv_heads, group, head_dim, generator=generator).to(torch.bfloat16)
    key = torch.randn(1, kv_heads, context, head_dim, generator=generator).to(torch.bfloat16)
    value = torch.randn(1, kv_heads, context, head_dim, generator=generator).to(torch.bfloat16)
    kv_bytes = 2 * key.numel() * key.element_size()
    result = {
        "shape": {**heads, "dtype": "bfloat16", "context": context},
        "threads": torch.get_num_threads(),
        "kv_bytes": kv_bytes,
        "kernels": {},
    }
    with torch.inference_mode():
        reference = torch_sdpa_decode(query.float(), key.float(), value.float()).reshape(1, -1, head_dim)
        for name, kernel in CPU_KERNELS.items():
            try:
                error = (kernel(query, key, value).float().reshape(1, -1, head_dim) - reference).abs().max().item()
                seconds = median_seconds(lambda kernel=kernel: kernel(query, key, value), repeats)
            except Exception as failure:  # e.g. no C++ compiler on this machine for headinfer's kernel
                result["kernels"][name] = {"error": f"{type(failure).__name__}: {failure}"[:500]}
                continue
            result["kernels"][name] = {"ms_per_token": 1e3 * seconds, "kv_read_gbps": kv_bytes / seconds / GB,
                                       "max_abs_error_vs_float32": error}
    if "error" not in result["kernels"].get("headinfer_cpu", {"error": None}):
        from headinfer_vllm.core.cpu_attention import instruction_path

        result["kernels"]["headinfer_cpu"]["instruction_path"] = instruction_path()
    return result


# Report ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "facts.json"
    cuda = torch.cuda.is_available()
    facts: dict = {
        "benchmark": "machine_facts",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "commit": run_context.commit(),
    }
    sections: list[tuple[str, Callable[[], object]]] = [
        ("machine", describe_machine),
        ("threads", lambda: (torch.set_num_threads(usable_cores()), torch.get_num_threads())[1]),
        ("host_memory_before_pinning", meminfo),
        ("link", lambda: link_bandwidth(args.link_mib, args.repeats) if cuda else None),
        ("host_memory_after_pinning", meminfo),
        ("host_memory", lambda: host_bandwidth(args.host_mib, args.repeats)),
        ("cpu_attention", lambda: cpu_attention(args.attention_context, args.repeats)),
        ("host_memory_at_end", meminfo),
    ]
    failed = 0
    for name, measure in sections:
        if run_context.out_of_time():
            facts[name] = {"skipped": "the facts step's time allotment ran out"}
            failed += 1
        else:
            try:
                facts[name] = measure()
            except Exception as error:  # one section's failure must not lose the others
                facts[name] = {"error": f"{type(error).__name__}: {error}"}
                failed += 1
        print(f"{name}: {json.dumps(facts[name])}", flush=True)
        path.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
