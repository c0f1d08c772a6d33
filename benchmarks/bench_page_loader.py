"""Page-load rates: the Triton kernel (a sweep over its CTAs) vs ``index_select`` vs the copy engine.

Loads ``--loads`` (each value a run) random distinct pages of ``--page-kib`` KiB from a pinned,
device-mapped host tier of ``--tier-pages`` pages into a staging buffer, as
the transfer scheduler does (:mod:`headinfer_vllm.core.page_loader`), and
times, in one run, on one stream:

- ``triton``: :func:`~headinfer_vllm.core.page_loader.copy_pages` for each
  ``--ctas`` (the sweep that sets ``DEFAULT_NUM_CTAS``);
- ``index_select``: the fallback (launches about 8 CTAs per SM);
- ``copy_engine``: ``dst.copy_(pinned, non_blocking=True)`` (``cudaMemcpyAsync``)
  of the same bytes from one contiguous pinned range: the link's ceiling with no SM;
- ``padded``: the kernel and ``index_select`` with twice the ids but the same
  count: the kernel's time should not change, ``index_select`` moves the padding.

Each row gives the median device time of one load (CUDA events), its rate, and
the host time of the call (launch overhead, no sync). Every path's pages are
checked against ``index_select``'s before timing.

    python benchmarks/bench_page_loader.py --out benchmarks/out        # CUDA
    python benchmarks/bench_page_loader.py --smoke --out benchmarks/out  # CPU: index_select and copy only (CI)

bench_core calls :func:`measure_load_rates`. Writes ``bench_page_loader.json``
and ``bench_page_loader.png``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from headinfer_vllm.core.host_memory import allocate_host, device_view
from headinfer_vllm.core.page_loader import DEFAULT_NUM_CTAS, copy_pages, index_select_pages

CTA_SWEEP = (4, 8, 16, 32, 64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small shapes on CPU, for CI")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--page-kib", type=int, default=128, help="page size (Llama-3-8B, block 256, one head: 128)")
    parser.add_argument(
        "--loads", type=int, nargs="+", default=[8, 64, 512], help="pages per load, one run each (512: a unit at 128K)"
    )
    parser.add_argument("--tier-pages", type=int, default=4096, help="pages of the host tier loads pick from")
    parser.add_argument("--ctas", type=int, nargs="*", default=list(CTA_SWEEP), help="the kernel's CTAs to sweep")
    parser.add_argument("--repeats", type=int, default=20)
    return parser.parse_args()


def measure_load_rates(
    device: torch.device,
    page_bytes: int = 128 * 1024,
    num_loads: int = 512,
    tier_pages: int = 4096,
    ctas: Sequence[int] = CTA_SWEEP,
    repeats: int = 20,
) -> dict:
    """Load rates of each path on ``device`` (see the module docstring); a JSON-able dict.

    ``rows``: one per measurement, ``{"path", "num_ctas" (triton only),
    "padded", "bytes", "seconds", "gb_per_s", "host_us"}``; ``best_num_ctas``:
    the sweep's fastest (None without the kernel). The Triton rows run only on
    CUDA with Triton installed.
    """
    page_words = page_bytes // 8
    generator = torch.Generator().manual_seed(0)
    host = allocate_host((tier_pages, page_words), torch.int64, pin=device.type == "cuda")
    torch.arange(host.numel(), out=host.view(-1))  # every word distinct
    src = device_view(host, device)  # [tier_pages, page_words] words, mapped on CUDA
    src_ids = torch.randperm(tier_pages, generator=generator)[:num_loads].to(device)
    padded_ids = torch.cat([src_ids, src_ids])
    count = torch.tensor([num_loads], device=device)
    dst = torch.empty((2 * num_loads, page_words), dtype=torch.int64, device=device)
    expected = src.index_select(0, src_ids)
    pinned = host[:num_loads]  # the same bytes, one contiguous pinned range
    load_bytes = num_loads * page_words * 8

    def checked(function: Callable[[], None], source_rows: torch.Tensor) -> Callable[[], None]:
        dst.fill_(-1)
        function()
        if not torch.equal(dst[:num_loads], source_rows):
            raise AssertionError("a load path copied the wrong pages")
        return function

    measured = []

    def add(path: str, function: Callable[[], None], source_rows: torch.Tensor, **labels) -> None:
        seconds, host_seconds = _timed(device, checked(function, source_rows), repeats)
        measured.append(
            dict(path=path, **labels, bytes=load_bytes, seconds=seconds, gb_per_s=load_bytes / seconds / 1e9,
                 host_us=host_seconds * 1e6)
        )  # fmt: skip
        print(json.dumps(measured[-1]), flush=True)

    with_kernel = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    for num_ctas in ctas if with_kernel else ():
        kernel = functools.partial(copy_pages, src, dst, src_ids, count, num_ctas=num_ctas)
        add("triton", kernel, expected, num_ctas=num_ctas, padded=False)
    add("index_select", functools.partial(index_select_pages, src, dst, src_ids, count), expected, padded=False)
    add("copy_engine", lambda: dst[:num_loads].copy_(pinned, non_blocking=True), host[:num_loads].to(device),
        padded=False)  # fmt: skip
    if with_kernel:
        kernel = functools.partial(copy_pages, src, dst, padded_ids, count, num_ctas=DEFAULT_NUM_CTAS)
        add("triton", kernel, expected, num_ctas=DEFAULT_NUM_CTAS, padded=True)
    add("index_select", functools.partial(index_select_pages, src, dst, padded_ids, count), expected, padded=True)
    kernel_rows = [row for row in measured if row["path"] == "triton" and not row["padded"]]
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=_triton_version(),
        page_bytes=page_words * 8,
        num_loads=num_loads,
        tier_pages=tier_pages,
        repeats=repeats,
        rows=measured,
        best_num_ctas=min(kernel_rows, key=lambda row: row["seconds"])["num_ctas"] if kernel_rows else None,
    )


def _timed(device: torch.device, function: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median ``(device seconds, host seconds)`` of one ``function()`` after a warm-up call.

    On CUDA the device time comes from events around the call; on CPU both are wall time.
    """
    function()
    devices, hosts = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
        began = time.perf_counter()
        function()
        hosts.append(time.perf_counter() - began)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            devices.append(start.elapsed_time(end) / 1000)
        else:
            devices.append(hosts[-1])
    return statistics.median(devices), statistics.median(hosts)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def plot(runs: list[dict], path: Path) -> None:
    """One panel per load size: GB/s of each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [0.35 * len(run["rows"]) + 1.0 for run in runs]
    figure, axes = plt.subplots(len(runs), 1, figsize=(8, sum(heights)), height_ratios=heights, squeeze=False)
    for axis, run in zip(axes[:, 0], runs, strict=True):
        labels = [_label(row) for row in run["rows"]]
        axis.barh(labels, [row["gb_per_s"] for row in run["rows"]])
        axis.invert_yaxis()
        axis.set_title(f"{run['num_loads']} pages of {run['page_bytes'] // 1024} KiB per load", fontsize=9)
    axes[-1, 0].set_xlabel("GB/s (median of one load)")
    figure.suptitle(f"Page loads on {runs[0]['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _label(row: dict) -> str:
    ctas = f" {row['num_ctas']} CTAs" if "num_ctas" in row else ""
    return row["path"] + ctas + (" (2x ids)" if row["padded"] else "")


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    page_bytes, loads, tier_pages, repeats = args.page_kib * 1024, args.loads, args.tier_pages, args.repeats
    if args.smoke:
        page_bytes, loads, tier_pages, repeats = 4096, [1, 16], 64, 3
    runs = []
    for num_loads in loads:
        runs.append(measure_load_rates(device, page_bytes, num_loads, tier_pages, args.ctas, repeats))
        print(f"{num_loads} pages: best num_ctas {runs[-1]['best_num_ctas']}", flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(date=date, smoke=args.smoke, runs=runs)
    (args.out / "bench_page_loader.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, args.out / "bench_page_loader.png")
    print(f"wrote {args.out / 'bench_page_loader.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
