"""Core benchmark: streamed attention vs an all-resident cache, at model shapes.

Measures, for each context length:
- pinned host-to-device and device-to-host bandwidth (once);
- per-layer attention time of a prefill chunk, every head streamed vs every
  head resident on the device, and their ratio (resident / streamed; 1.0
  means the transfers are completely hidden);
- per-layer decode time with every head streamed, against the bandwidth
  bound (streamed KV bytes of a layer / measured H2D bandwidth), and the host
  time of a decode step beside it: the time the calls take to return, before
  waiting for the device (on CPU, the whole time). Host time above the bound
  means the step is bound by Python and op dispatch, not by the link;
- the decode step split between PCIe and CPU attention in the host tier
  (:mod:`headinfer_vllm.core.cpu_split`): the load and CPU-kernel rates the
  planner measures, its share, the split decode time against PCIe-only (same
  store, same run), every unit on the CPU, and the split's roofline (KV bytes
  over the two rates summed). On CPU (``--smoke``) half the units go to the
  kernel, which checks the path, not its speed;
- operations per decode step: aten ops (every ``aten::`` event, nested ones
  included) that ``torch.profiler`` records over one step, for the step plan
  (``build_step_plan``) and per layer (``begin_step`` and ``forward``);
- device memory of the KV path (store tiers and peak allocation);
- page-load rates (``load_rates``, :mod:`bench_page_loader`): the Triton
  kernel over a sweep of CTA counts, ``index_select`` and a copy-engine copy
  of the same bytes, and the path the engine chose (CUDA; CPU: the fallback);
- a decode step of 8 requests sharing a prefix (``shared_prefix``): pages
  loaded against distinct pages and page references;
- the device tier as a page cache against whole resident units of the same
  budget (``page_cache``): KV bytes loaded per steady decode step, the hit
  rate and the step's time, for 8 short requests that fit, one long request
  that does not, and both together;
- the attention of a prefill chunk alone and with page loads running beside
  it on the copy stream (``concurrency``, CUDA): what the loads' CTAs cost
  the attention's SMs;
- one streamed layer at 128K against a dense float32 reference on the device
  (``exactness``): max abs error, beside that of dense bf16 attention.

Sections run most important first and stop at the step's deadline
(``GPU_SESSION_DEADLINE``, see ``run_context``), the JSON rewritten after each.

A step simulates ``--layers`` layers (default 4; Llama-3-8B has 32): per-step
figures are the plan's plus ``--layers`` times the per-layer ones.

Writes ``bench_core.json`` and ``bench_core.png`` to ``--out`` (after every context).

    python benchmarks/bench_core.py --out benchmarks/out            # CUDA, Llama-3-8B layer shapes
    python benchmarks/bench_core.py --contexts 32768 131072 524288   # the GPU session's contexts
    python benchmarks/bench_core.py --smoke --out benchmarks/out    # CPU, small shapes (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import run_context
import torch
import torch.nn.functional as F
from bench_page_loader import measure_load_rates

from headinfer_vllm.core import HeadPageStore, KVLayout, StepPlan, StreamedAttention, build_step_plan, cpu_split
from headinfer_vllm.core.cpu_attention import is_available as cpu_kernel_available
from headinfer_vllm.core.host_memory import allocate_host, device_view, free_host_bytes
from headinfer_vllm.core.page_loader import copy_pages, index_select_pages
from headinfer_vllm.core.residency import SpreadAcrossLayers

LLAMA3_8B = dict(num_query_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
SMOKE = dict(num_query_heads=8, num_kv_heads=4, head_dim=64, dtype="float32")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small shapes on CPU, for CI")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--contexts", type=int, nargs="*", help="context lengths in tokens")
    parser.add_argument("--chunk", type=int, help="prefill chunk in tokens (default 8192; smoke 256)")
    parser.add_argument("--layers", type=int, default=4, help="layers simulated per step (pipelining crosses them)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per page")
    parser.add_argument("--head-group-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--host-fraction", type=float, default=0.6, help="share of free host memory usable")
    parser.add_argument("--host-gib", type=float,
                        help="host memory usable, GiB (stated for hosts whose memory grows on demand; default: "
                             "--host-fraction of MemAvailable)")
    return parser.parse_args()


def timed(device: torch.device, function, repeats: int) -> tuple[float, float]:
    """Median seconds of ``function()`` after one warm-up call: ``(total, host)``.

    ``host``: until ``function()`` returns, before waiting for the device; on CPU the same as ``total``.
    """
    function()
    totals, hosts = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        function()
        hosts.append(time.perf_counter() - start)
        _sync(device)
        totals.append(time.perf_counter() - start)
    return statistics.median(totals), statistics.median(hosts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def aten_ops(device: torch.device, function) -> int | None:
    """``aten::`` events (nested ones included) that ``torch.profiler`` records over one ``function()``;
    None if the profiler fails."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            function()
            _sync(device)
        return sum(1 for event in profiler.events() if event.name.startswith("aten::"))
    except RuntimeError as error:  # the benchmark's timings are worth keeping without the count
        print(f"torch.profiler failed: {error}", file=sys.stderr)
        return None


def bandwidth(device: torch.device, megabytes: int, repeats: int) -> dict[str, float]:
    """Pinned host <-> device copy bandwidth in GB/s (10^9 bytes per second)."""
    host = torch.empty(megabytes << 20, dtype=torch.uint8, pin_memory=device.type == "cuda")
    on_device = torch.empty_like(host, device=device)
    h2d = timed(device, lambda: on_device.copy_(host, non_blocking=True), repeats)[0]
    d2h = timed(device, lambda: host.copy_(on_device, non_blocking=True), repeats)[0]
    return {"h2d_gbps": host.numel() / h2d / 1e9, "d2h_gbps": host.numel() / d2h / 1e9}


def make_engine(layout: KVLayout, streamed: bool, device: torch.device, num_query_heads: int) -> StreamedAttention:
    units = layout.num_units
    resident = frozenset() if streamed else frozenset(
        (layer, group) for layer in range(layout.num_layers) for group in range(layout.num_groups)
    )
    store = HeadPageStore(layout, resident_units=resident, num_staging_buffers=2 if streamed else 0,
                          device=device, device_budget_bytes=(2 if streamed else units) * layout.unit_bytes)
    if device.type == "cpu":
        store.host.normal_()  # uninitialized host memory may hold denormals, which are slow on CPU
    return StreamedAttention(store, num_query_heads=num_query_heads, scale=layout.head_dim**-0.5)


class Step:
    """One step of one request: ``query_len`` new tokens ending at ``context``.

    ``plan()`` builds the step plan from host tensors (once per step in a model);
    ``layers(plan)`` runs every simulated layer over it.
    """

    def __init__(self, engine: StreamedAttention, context: int, query_len: int, shapes: dict, device: torch.device):
        self.engine, self.device = engine, device
        layout = engine.store.layout
        self.block_size = layout.block_size
        self.block_table = torch.arange(-(-context // layout.block_size))[None]
        self.seq_lens = torch.tensor([context])
        self.query_start_loc = torch.tensor([0, query_len])
        self.slots = torch.arange(context - query_len, context)
        dtype = layout.dtype
        self.query = torch.randn(query_len, shapes["num_query_heads"], layout.head_dim, device=device, dtype=dtype)
        self.key = torch.randn(query_len, layout.num_kv_heads, layout.head_dim, device=device, dtype=dtype)
        self.out = torch.empty_like(self.query)

    def plan(self) -> StepPlan:
        return build_step_plan(
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, block_table=self.block_table,
            slot_mapping=self.slots, block_size=self.block_size, device=self.device,
        )

    def layers(self, plan: StepPlan) -> None:
        self.engine.begin_step(plan)
        for layer in range(self.engine.store.layout.num_layers):
            self.engine.forward(layer, self.query, self.key, self.key, self.out)

    def seconds(self, repeats: int) -> tuple[float, float]:
        """``timed`` of ``layers`` over one plan: median ``(total, host)`` seconds."""
        plan = self.plan()
        return timed(self.device, lambda: self.layers(plan), repeats)


def measure_context(args, shapes, device, context, chunk, link) -> dict:
    dtype = getattr(torch, shapes["dtype"])
    num_blocks = -(-context // args.block_size)
    layout = KVLayout(args.layers, shapes["num_kv_heads"], shapes["head_dim"], args.block_size,
                      num_blocks, args.head_group_size, dtype)
    result = {"context": context, "chunk": chunk}
    streamed_bytes_per_layer = layout.num_groups * context * layout.unit_page_bytes // layout.block_size
    for mode in ("resident", "streamed"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        engine = make_engine(layout, mode == "streamed", device, shapes["num_query_heads"])
        prefill = Step(engine, context, chunk, shapes, device)
        result[f"prefill_{mode}_ms_per_layer"] = 1e3 * prefill.seconds(args.repeats)[0] / args.layers
        if mode == "streamed":
            result.update(measure_decode(Step(engine, context, 1, shapes, device), args, device))
            result.update(measure_split(engine, shapes, device, args, context, streamed_bytes_per_layer))
            result["decode_bound_ms_per_layer"] = 1e3 * streamed_bytes_per_layer / (link["h2d_gbps"] * 1e9)
            result["device_tier_bytes"] = engine.store.device_bytes
            result["kernel"] = engine.kernel_name
            if device.type == "cuda":
                result["device_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        del engine, prefill
    result["prefill_ratio"] = result["prefill_resident_ms_per_layer"] / result["prefill_streamed_ms_per_layer"]
    result["decode_over_bound"] = result["decode_streamed_ms_per_layer"] / result["decode_bound_ms_per_layer"]
    if "decode_split_ms_per_layer" in result:
        result["split_speedup"] = result["decode_streamed_ms_per_layer"] / result["decode_split_ms_per_layer"]
    result["decode_host_over_bound"] = result["decode_host_ms_per_layer"] / result["decode_bound_ms_per_layer"]
    return result


def measure_decode(step: Step, args, device: torch.device) -> dict:
    """One decode token, every head streamed: time, host time and aten ops, of the plan and per layer."""
    total, host = step.seconds(args.repeats)
    plan_host = timed(device, step.plan, args.repeats)[1]
    plan = step.plan()
    plan_ops, layer_ops = aten_ops(device, step.plan), aten_ops(device, lambda: step.layers(plan))
    return {
        "decode_streamed_ms_per_layer": 1e3 * total / args.layers,
        "decode_host_ms_per_layer": 1e3 * host / args.layers,
        "decode_plan_host_ms": 1e3 * plan_host,
        "decode_host_ms_per_step": 1e3 * (plan_host + host),
        "decode_plan_aten_ops": plan_ops,
        "decode_aten_ops_per_layer": None if layer_ops is None else layer_ops / args.layers,
        "decode_aten_ops_per_step": None if None in (plan_ops, layer_ops) else plan_ops + layer_ops,
    }


def measure_split(engine: StreamedAttention, shapes, device, args, context: int, layer_bytes: int) -> dict:
    """Decode split between PCIe and the CPU kernel, over the streamed engine's store, against it."""
    if not cpu_kernel_available():
        return {"split": "no C++ compiler with OpenMP: CPU attention unavailable"}
    store, threads = engine.store, len(os.sched_getaffinity(0))
    query_per_kv = shapes["num_query_heads"] // shapes["num_kv_heads"]
    cpu_rate = cpu_split.measure_cpu_rate(store, query_per_kv=query_per_kv, num_threads=threads)
    result: dict = {"split_cpu_threads": threads, "split_cpu_gbps": cpu_rate / 1e9}
    if device.type == "cuda":
        h2d_rate = cpu_split.measure_h2d_rate(store)
        # The balanced share, measured even where auto would not split.
        count = max(1, cpu_split.balanced_cpu_units(len(store.streamed_units), h2d_rate, cpu_rate))
        plan = cpu_split.split_units(store, count, num_threads=threads, h2d_bytes_per_s=h2d_rate,
                                     cpu_bytes_per_s=cpu_rate)
        result["split_load_gbps"] = h2d_rate / 1e9
        result["split_bound_ms_per_layer"] = 1e3 * layer_bytes / (h2d_rate + cpu_rate)
        result["split_predicted_speedup"] = plan.predicted_speedup(len(store.streamed_units))
    else:
        plan = cpu_split.split_units(store, len(store.streamed_units) // 2, num_threads=threads)
    every = cpu_split.split_units(store, len(store.streamed_units), num_threads=threads)
    for name, split in (("split", plan), ("cpu_all", every)):
        split_engine = StreamedAttention(store, num_query_heads=shapes["num_query_heads"],
                                         scale=store.layout.head_dim**-0.5, decode_split=split)
        total = Step(split_engine, context, 1, shapes, device).seconds(args.repeats)[0]
        result[f"decode_{name}_ms_per_layer"] = 1e3 * total / args.layers
    result["split_cpu_units"] = plan.num_cpu_units
    result["split_units"] = len(store.streamed_units)
    return result


def decode_plan(block_table: torch.Tensor, seq_lens: list[int], block_size: int, device: torch.device) -> StepPlan:
    """The plan of one decode token per request, over ``block_table [R, pages]``."""
    requests = len(seq_lens)
    rows = torch.arange(requests)
    last = block_table[rows, torch.tensor([(n - 1) // block_size for n in seq_lens])]
    return build_step_plan(
        query_start_loc=torch.arange(requests + 1), seq_lens=torch.tensor(seq_lens), block_table=block_table,
        slot_mapping=last * block_size + torch.tensor([(n - 1) % block_size for n in seq_lens]),
        block_size=block_size, device=device,
    )


def measure_shared_prefix(args, shapes, device, prefix_tokens: int, own_tokens: int, requests: int = 8) -> dict:
    """A decode step of ``requests`` requests sharing a ``prefix_tokens`` prompt, ``own_tokens`` each after it:
    pages loaded per unit against the distinct pages and the page references, and the step's time."""
    block = args.block_size
    prefix, own = prefix_tokens // block, own_tokens // block
    distinct = prefix + requests * own
    layout = KVLayout(args.layers, shapes["num_kv_heads"], shapes["head_dim"], block, distinct + 1,
                      args.head_group_size, getattr(torch, shapes["dtype"]))
    engine = make_engine(layout, True, device, shapes["num_query_heads"])
    shared = torch.arange(1, 1 + prefix)
    block_table = torch.stack([torch.cat((shared, 1 + prefix + own * r + torch.arange(own))) for r in range(requests)])
    seq_lens = [(prefix + own) * block - r for r in range(requests)]
    step = decode_step(engine, decode_plan(block_table, seq_lens, block, device), shapes["num_query_heads"])
    seconds = timed(device, step, args.repeats)[0]
    units = len(engine.store.streamed_units)
    return {
        "requests": requests, "prefix_tokens": prefix * block, "own_tokens": own * block,
        "pages_loaded_per_unit": engine.transfers.pages_loaded / units,
        "distinct_pages": distinct, "page_references": requests * (prefix + own),
        "loaded_over_distinct": engine.transfers.pages_loaded / units / distinct,
        "decode_ms_per_layer": 1e3 * seconds / args.layers, "load_path": engine.transfers.loader.path,
    }


def measure_page_cache(args, shapes, device, short_tokens: int, long_tokens: int, requests: int = 8) -> dict:
    """Steady decode steps with the device tier beside the staging ring as a page cache (``pages``) or as
    whole resident units (``units``), the same bytes: all ``requests`` short requests' pages and a quarter of
    the long one's per unit. Per case, the KV bytes loaded by one step after two warm-up steps, the hit rate
    of its pages (page cache) and its median time."""
    block, dtype = args.block_size, getattr(torch, shapes["dtype"])
    short_pages, long_pages = short_tokens // block, long_tokens // block
    layout = KVLayout(args.layers, shapes["num_kv_heads"], shapes["head_dim"], block,
                      requests * short_pages + long_pages + 1, args.head_group_size, dtype)
    cache_bytes = (requests * short_pages + long_pages // 4) * layout.unit_page_bytes * layout.num_units
    short = (1 + torch.arange(requests * short_pages)).view(requests, short_pages)
    long = 1 + requests * short_pages + torch.arange(long_pages)
    cases = {
        "short": (torch.nn.functional.pad(short, (0, long_pages - short_pages)), [short_pages * block] * requests),
        "long": (long[None], [long_pages * block]),
        "both": (torch.cat((torch.nn.functional.pad(short, (0, long_pages - short_pages)), long[None])),
                 [short_pages * block] * requests + [long_pages * block]),
    }
    results = {"requests": requests, "short_tokens": short_pages * block, "long_tokens": long_pages * block,
               "device_tier_bytes_beside_staging": cache_bytes}
    for tier in ("pages", "units"):
        resident = frozenset() if tier == "pages" else frozenset(
            SpreadAcrossLayers().select(layout.num_layers, layout.num_groups, cache_bytes // layout.unit_bytes))
        store = HeadPageStore(layout, resident_units=resident, num_staging_buffers=2, device=device,
                              cache_bytes=cache_bytes if tier == "pages" else 0)
        engine = StreamedAttention(store, num_query_heads=shapes["num_query_heads"], scale=layout.head_dim**-0.5)
        for case, (block_table, seq_lens) in cases.items():
            step = decode_step(engine, decode_plan(block_table, seq_lens, block, device), shapes["num_query_heads"])
            for _ in range(2):
                step()
            before = engine.transfers.traffic.snapshot()
            step()
            after = engine.transfers.traffic.snapshot()
            read = after.pages_read - before.pages_read
            results[f"{tier}/{case}"] = {
                "loaded_bytes_per_step": engine.transfers.pages_loaded * layout.unit_page_bytes,
                "kv_bytes_read": sum(-(-n // block) for n in seq_lens) * layout.unit_page_bytes * layout.num_units,
                "hit_rate": (after.pages_hit - before.pages_hit) / read if read else None,
                "decode_ms": 1e3 * timed(device, step, args.repeats)[0],
            }
    return results


def decode_step(engine: StreamedAttention, plan: StepPlan, num_query_heads: int):
    """A function that runs ``plan`` (one decode token per request) through every layer of ``engine``."""
    layout, device = engine.store.layout, engine.store.device
    requests = len(plan.requests)
    query = torch.randn(requests, num_query_heads, layout.head_dim, device=device, dtype=layout.dtype)
    key = torch.randn(requests, layout.num_kv_heads, layout.head_dim, device=device, dtype=layout.dtype)
    out = torch.empty_like(query)

    def step() -> None:
        engine.begin_step(plan)
        for layer in range(layout.num_layers):
            engine.forward(layer, query, key, key, out)

    return step


def measure_concurrency(shapes, device, context: int, chunk: int, load_pages: int, repeats: int) -> dict:
    """Prefill attention (SDPA, ``chunk`` queries over ``context`` keys, all query heads) alone, then with
    page loads (``load_pages`` pages of one head at a time, repeated for about the attention's time) queued
    before it on another stream, by the Triton kernel and by ``index_select``: the attention's time each way."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA (streams)"}
    dtype, heads, dim = getattr(torch, shapes["dtype"]), shapes["num_query_heads"], shapes["head_dim"]
    query = torch.randn(1, heads, chunk, dim, device=device, dtype=dtype)
    keys = torch.randn(1, heads, context, dim, device=device, dtype=dtype)
    page_words = 2 * 256 * dim * dtype.itemsize // 8
    tier = allocate_host((load_pages, page_words), torch.int64, pin=True)
    src = device_view(tier, device)
    dst = torch.empty_like(src)
    ids, count = torch.arange(load_pages, device=device), torch.tensor([load_pages], device=device)
    side = torch.cuda.Stream(device)

    def attention_ms(load=None, loads: int = 0) -> float:
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            if load is not None:
                with torch.cuda.stream(side):
                    for _ in range(loads):
                        load()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            F.scaled_dot_product_attention(query, keys, keys, is_causal=False)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times[1:])

    alone = attention_ms()
    load_s = timed(device, lambda: copy_pages(src, dst, ids, count), repeats)[0]
    loads = max(1, round(alone / 1e3 / load_s))
    result = {"context": context, "chunk": chunk, "attention_alone_ms": alone, "load_pages": load_pages,
              "loads_beside": loads}
    for name, load in (("triton", lambda: copy_pages(src, dst, ids, count)),
                       ("index_select", lambda: index_select_pages(src, dst, ids, count))):
        result[f"attention_with_{name}_ms"] = attention_ms(load, loads)
        result[f"attention_with_{name}_over_alone"] = result[f"attention_with_{name}_ms"] / alone
    return result


def measure_exactness(args, shapes, device, context: int, query_len: int = 16) -> dict:
    """One streamed layer at ``context`` tokens (``query_len`` new ones): max abs error against dense float32
    attention of the same K/V, beside dense attention in the model's dtype."""
    dtype, block = getattr(torch, shapes["dtype"]), args.block_size
    num_blocks = -(-context // block)
    layout = KVLayout(1, shapes["num_kv_heads"], shapes["head_dim"], block, num_blocks, args.head_group_size, dtype)
    engine = make_engine(layout, True, device, shapes["num_query_heads"])
    if device.type == "cuda":
        engine.store.host.normal_()
    step = Step(engine, context, query_len, shapes, device)
    step.layers(step.plan())
    out = step.out.float()
    # The host tier now holds every token's K/V, the new ones included: [pages, 2, B, G, D] per unit.
    host = engine.store.host.view(layout.num_kv_heads // layout.head_group_size, num_blocks, 2, block,
                                  layout.head_group_size, layout.head_dim)
    kv = host.permute(2, 1, 3, 0, 4, 5).reshape(2, num_blocks * block, layout.num_kv_heads, layout.head_dim)
    kv = kv[:, :context].to(device)
    keys, values = (side.transpose(0, 1)[None] for side in kv)  # [1, Hkv, context, D]
    query = step.query.transpose(0, 1)[None]  # [1, Hq, query_len, D]
    mask = torch.ones(query_len, context, dtype=torch.bool, device=device).tril(context - query_len)

    def dense(dtype_: torch.dtype) -> torch.Tensor:
        return F.scaled_dot_product_attention(query.to(dtype_), keys.to(dtype_), values.to(dtype_), attn_mask=mask,
                                              enable_gqa=True)[0].transpose(0, 1).float()

    reference = dense(torch.float32)
    return {
        "context": context, "query_len": query_len, "dtype": shapes["dtype"], "kernel": engine.kernel_name,
        "headinfer_max_abs_error": (out - reference).abs().max().item(),
        "dense_same_dtype_max_abs_error": (dense(dtype) - reference).abs().max().item(),
        "reference_max_abs": reference.abs().max().item(),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(contexts, [r["prefill_resident_ms_per_layer"] for r in results], "o-", label="all resident")
    left.plot(contexts, [r["prefill_streamed_ms_per_layer"] for r in results], "s-", label="all streamed")
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer",
             title=f"prefill chunk of {results[0]['chunk']} tokens")
    right.plot(contexts, [r["decode_streamed_ms_per_layer"] for r in results], "s-", label="all streamed")
    right.plot(contexts, [r["decode_host_ms_per_layer"] for r in results], "^:", label="host time (calls)")
    right.plot(contexts, [r["decode_bound_ms_per_layer"] for r in results], "k--", label="H2D bound")
    if all("decode_split_ms_per_layer" in r for r in results):
        right.plot(contexts, [r["decode_split_ms_per_layer"] for r in results], "D-", label="split PCIe + CPU")
        right.plot(contexts, [r["decode_cpu_all_ms_per_layer"] for r in results], "v-", label="all on the CPU")
    if all("split_bound_ms_per_layer" in r for r in results):
        right.plot(contexts, [r["split_bound_ms_per_layer"] for r in results], "k:", label="split bound")
    right.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer", title="decode")
    for axis in (left, right):
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    args = parse_args()
    if args.smoke:
        device, shapes = torch.device("cpu"), SMOKE
        contexts, chunk = args.contexts or [1024, 4096], args.chunk or 256
        args.block_size, args.repeats = min(args.block_size, 64), min(args.repeats, 3)
    else:
        if not torch.cuda.is_available():
            print("bench_core: no CUDA device; use --smoke for the CPU run", file=sys.stderr)
            return 2
        device, shapes = torch.device("cuda"), LLAMA3_8B
        contexts = args.contexts or [8192, 32768, 131072, 524288, 1048576]
        chunk = args.chunk or 8192
    args.out.mkdir(parents=True, exist_ok=True)
    link = bandwidth(device, 64 if args.smoke else 1024, args.repeats)
    print(f"link: {link}", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "benchmark": "bench_core",
        "device": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": run_context.commit(),
        "torch": torch.__version__,
        "shapes": shapes,
        "layers_simulated": args.layers,
        "block_size": args.block_size,
        "head_group_size": args.head_group_size,
        "link": link,
        "results": [],
        "skipped": [],
    }
    results = report["results"]

    def write() -> None:  # after every section, so a run stopped by its deadline keeps what it measured
        (args.out / "bench_core.json").write_text(json.dumps(report, indent=2) + "\n")
        if results:
            plot(results, args.out / "bench_core.png", f"headinfer core on {device_name}, {report['date']}\n"
                 f"{report['command']}")

    def context_section(context: int):
        def run() -> None:
            page = 2 * shapes["head_dim"] * torch.empty((), dtype=getattr(torch, shapes["dtype"])).element_size()
            host_needed = args.layers * shapes["num_kv_heads"] * context * page
            usable = args.host_gib * 2**30 if args.host_gib else args.host_fraction * (free_host_bytes() or 0)
            if host_needed > usable:
                report["skipped"].append(f"context {context}: needs {host_needed / 2**30:.1f} GiB of host memory")
                return
            result = measure_context(args, shapes, device, context, min(chunk, context), link)
            print(json.dumps(result), flush=True)
            results.append(result)
        return run

    def section(name: str, measure):
        def run() -> None:
            report[name] = measure()
            print(f"{name}: {json.dumps(report[name])}", flush=True)
        return run

    load_args = dict(page_bytes=4096, num_loads=16, tier_pages=64, ctas=(), repeats=3) if args.smoke else {}
    prefix, own = (4 * args.block_size, args.block_size) if args.smoke else (12288, 4096)
    exact_context = 1024 if args.smoke else 131072
    # (name, seconds it may take on the GPU, work), most important first.
    sections = [("load_rates", 15, section("load_rates", lambda: measure_load_rates(device, **load_args)))]
    sections += [(f"context {contexts[0]}", 40, context_section(contexts[0]))]
    short_tokens, long_tokens = (2 * args.block_size, 64 * args.block_size) if args.smoke else (4096, 131072)
    sections += [
        ("page_cache", 15, section("page_cache", lambda: measure_page_cache(args, shapes, device, short_tokens,
                                                                            long_tokens))),
        ("shared_prefix", 10, section("shared_prefix", lambda: measure_shared_prefix(args, shapes, device, prefix,
                                                                                      own))),
        ("concurrency", 10, section("concurrency", lambda: measure_concurrency(
            shapes, device, context=131072, chunk=16384, load_pages=512, repeats=args.repeats))),
        ("exactness", 10, section("exactness", lambda: measure_exactness(args, shapes, device, exact_context))),
    ]
    sections += [(f"context {context}", 45, context_section(context)) for context in contexts[1:]]
    for name, seconds, run in sections:
        if run_context.out_of_time(seconds if device.type == "cuda" else 0):
            report["skipped"].append(f"{name}: the step's deadline is less than {seconds} s away")
            print(f"{name}: skipped (deadline)", flush=True)
            continue
        run()
        write()
    print(f"wrote {args.out / 'bench_core.json'}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
