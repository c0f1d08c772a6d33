"""Page loads: copy whole pages from the host tier to a staging buffer, stopping at a count on the device.

::

    src  [num_src_pages, page_words]   the host tier mapped into the device's address space, as words
    dst  [num_dst_pages, page_words]   a staging buffer
    for i < count:  dst[dst_rows[i]] = src[src_ids[i]]     (dst_rows None: row i, the front of dst)

``src_ids`` (and ``dst_rows``) hold ``capacity`` entries, a bound known on the
host; ``count <= capacity``, a 1-element integer tensor, is known only on the
device. The kernel reads and writes nothing past ``count``, so padded entries
cost no traffic and a step moves each distinct page once.

Two paths, chosen once per device (:func:`choose_path`) and logged on the
``headinfer_vllm`` logger:

- ``"triton"``: :func:`copy_pages`, a Triton kernel of a few CTAs
  (``num_ctas``) that loop with the grid's stride over the chunks of the pages
  (``BLOCK`` words, ``block_bytes`` per chunk: wide vector loads), so that
  even a one-page load spreads over every CTA.
  It reads ``count`` on the device (no sync) and leaves the other SMs to
  attention and GEMMs, where ``index_select`` launches ~1,000 CTAs that hold
  every SM for the whole transfer. Addresses are 64-bit (a host tier exceeds
  2^31 elements). Chosen on CUDA when Triton imports and a start-up self-check
  (a small random copy compared with ``index_select`` on the device) passes.
- ``"index_select"``: :func:`index_select_pages`, the fallback. On CPU it reads
  ``count`` on the host (free there) and copies exactly ``count`` pages. On a
  device, where reading it would sync, it copies every ``capacity`` entry:
  compact loads (``dst_rows`` None) fill rows ``count..capacity-1`` with the
  padding ids' pages, as ``index_select`` did before this module; scattered
  loads (``dst_rows`` given) leave every row but the first ``count`` entries'
  unchanged (entries past ``count`` repeat entry 0's copy).

``DEFAULT_NUM_CTAS`` (16) is a documented guess, not yet a GPU sweep's result:
a few SMs are known to saturate a PCIe host link (sglang PR #40278 reaches the
copy-engine ceiling on 4 of 152 SMs), and 16 CTAs keep 16 x 16 KiB of reads in
flight, above the ~150 KiB that ~55 GB/s over ~2.5 us of mapped-read latency
needs. ``benchmarks/bench_page_loader.py`` measures 4 to 64 CTAs against
``index_select`` and the copy engine.

Tests run the kernel through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set before Triton is imported) and compile it for
sm_90 without a GPU. The interpreter's behaviour differs between Triton
versions (how it stages tensor arguments, which language features it accepts:
its loop indices are Python ints, hence ``tl.cast`` over ``.to``). CI has
Triton 3.9.0; the tests also pass with 3.6.0, which the GPU machine compiles with.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from headinfer_vllm.core.host_memory import allocate_host, device_view, indexed

logger = logging.getLogger("headinfer_vllm")

PATHS = ("triton", "index_select")
"""The load paths: the Triton kernel and its ``index_select`` fallback."""
DEFAULT_NUM_CTAS = 16
"""CTAs of the Triton kernel (see the module docstring: a guess until a GPU sweep sets it)."""
DEFAULT_BLOCK_BYTES = 16384
"""Bytes each CTA moves per chunk of a page (16 KiB: 128 threads of 8 16-byte loads each)."""


def copy_pages(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    count: torch.Tensor,
    dst_rows: torch.Tensor | None = None,
    *,
    num_ctas: int = DEFAULT_NUM_CTAS,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> None:
    """``dst[dst_rows[i]] = src[src_ids[i]]`` for ``i < count`` with the Triton kernel (no host sync).

    Shapes: ``src [num_src_pages, page_words]``, ``dst [num_dst_pages, page_words]``
    (same integer or float dtype, rows contiguous, any row stride);
    ``src_ids [capacity]`` int64; ``dst_rows [capacity]`` int64, or None for rows
    ``0..count-1``; ``count`` one int32/int64 element; all on one device (the
    current CUDA device, or CPU under the interpreter). Runs on the current stream.
    Entries past ``count`` are never read, so they may hold anything.
    """
    _check(src, dst, src_ids, count, dst_rows)
    if num_ctas < 1 or block_bytes < dst.element_size():
        raise ValueError(f"headinfer: num_ctas {num_ctas} and block_bytes {block_bytes} must be positive")
    capacity, page_words = src_ids.shape[0], src.shape[1]
    if capacity == 0 or page_words == 0:
        return
    block = min(_power_of_two_at_most(block_bytes // dst.element_size()), _power_of_two_at_least(page_words))
    num_items = capacity * -(-page_words // block)
    if num_items >= 2**31:
        raise ValueError(f"headinfer: {capacity} pages of {page_words} words exceed the kernel's 2^31 chunks of work")
    _kernel()[(min(num_ctas, num_items),)](
        src, dst, src_ids, src_ids if dst_rows is None else dst_rows, count,
        page_words, src.stride(0), dst.stride(0),
        HAS_DST_ROWS=dst_rows is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip


def index_select_pages(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    count: torch.Tensor,
    dst_rows: torch.Tensor | None = None,
    *,
    read_count: bool | None = None,
) -> None:
    """The fallback of :func:`copy_pages`, with torch's indexing ops (same arguments).

    ``read_count``: whether to read ``count`` on the host and copy exactly
    ``count`` pages (default: on CPU only, where it costs no sync). Otherwise
    every entry's page is copied (see the module docstring), so entries past
    ``count`` must be valid ids and rows.
    """
    _check(src, dst, src_ids, count, dst_rows)
    if read_count is None:
        read_count = src.device.type == "cpu"
    capacity = src_ids.shape[0]
    if capacity == 0:
        return
    if read_count:
        num_pages = int(count.reshape(()))
        if not 0 <= num_pages <= capacity:
            raise ValueError(f"headinfer: page count {num_pages} outside 0..{capacity} (the ids given)")
        src_ids = src_ids[:num_pages]
        dst_rows = None if dst_rows is None else dst_rows[:num_pages]
    if dst_rows is None:
        torch.index_select(src, 0, src_ids, out=dst[: src_ids.shape[0]])
        return
    if read_count:
        dst.index_copy_(0, dst_rows, src.index_select(0, src_ids))
        return
    # Entries past count repeat entry 0 (same row, same page), so duplicate writes agree; with
    # count 0, entry 0 writes its row's own contents back.
    past_count = torch.arange(capacity, device=src_ids.device) >= count.reshape(())
    src_ids, dst_rows = src_ids.where(~past_count, src_ids[0]), dst_rows.where(~past_count, dst_rows[0])
    pages = src.index_select(0, src_ids).where(count.reshape(()) > 0, dst.index_select(0, dst_rows))
    dst.index_copy_(0, dst_rows, pages)


def accumulate_pages(total: torch.Tensor, count: torch.Tensor) -> None:
    """Each counter of ``total`` (int64, any shape) gains ``count`` (as in a load) on the device, no sync.

    Issue it on the load's stream; readers (metrics) fetch ``total`` lazily.
    """
    total.add_(count.reshape(1))


@functools.cache
def choose_path(device: torch.device, path: str = "auto") -> tuple[str, str]:
    """``(path, reason)`` for loads on ``device``, decided once per (device, path) and logged.

    ``path``: ``"auto"``, or one of :data:`PATHS` to force it (tests,
    benchmarks). Auto takes the Triton kernel on CUDA when Triton imports and
    passes :func:`self_check`, else ``index_select``. A forced ``"triton"`` that
    fails raises ``RuntimeError`` saying why.
    """
    if path not in ("auto", *PATHS):
        raise ValueError(f"headinfer: page load path {path!r} is none of auto, {', '.join(PATHS)}")
    if path == "index_select":
        chosen = ("index_select", "forced")
    elif path == "auto" and device.type != "cuda":
        chosen = ("index_select", f"{device.type} device: the count is read on the host for free")
    else:
        failure = _triton_failure(device)
        if failure is None:
            chosen = ("triton", "forced" if path == "triton" else "passed its self-check")
        elif path == "triton":
            raise RuntimeError(f"headinfer: the Triton page-load kernel cannot run on {device}: {failure}")
        else:
            chosen = ("index_select", f"the Triton kernel is unusable: {failure}")
    logger.info("headinfer: page loads through %s (%s)", *chosen)
    return chosen


class PageLoader:
    """Loads pages on one device through the path :func:`choose_path` picked."""

    def __init__(self, device: torch.device | str, path: str = "auto", num_ctas: int = DEFAULT_NUM_CTAS) -> None:
        self.device = indexed(device)
        self.path, self.reason = choose_path(self.device, path)
        self.num_ctas = num_ctas

    def load(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        src_ids: torch.Tensor,
        count: torch.Tensor,
        dst_rows: torch.Tensor | None = None,
    ) -> None:
        """``dst[dst_rows[i]] = src[src_ids[i]]`` for ``i < count`` (see :func:`copy_pages`)."""
        if self.path == "triton":
            copy_pages(src, dst, src_ids, count, dst_rows, num_ctas=self.num_ctas)
        else:
            index_select_pages(src, dst, src_ids, count, dst_rows)


def self_check(device: torch.device, num_ctas: int = DEFAULT_NUM_CTAS) -> None:
    """Copy random pages from mapped host memory with the kernel on ``device``; compare with ``index_select``.

    Syncs (start-up only). Covers duplicates, a count below the capacity, both row modes and a page
    that is not a whole number of chunks. Raises ``RuntimeError`` on a mismatch.
    """
    generator = torch.Generator().manual_seed(0)
    page_words = 2 * DEFAULT_BLOCK_BYTES // 8 + 40  # int64 words: the chunk size of real pages, and a remainder
    # The source as loads see it: host memory, pinned and mapped into the device's address space on CUDA.
    host = allocate_host((37, page_words), torch.int64, pin=device.type == "cuda")
    host.copy_(torch.randint(-(2**62), 2**62, (37, page_words), generator=generator))
    src = device_view(host, device)
    src_ids = torch.randint(0, 37, (24,), generator=generator).to(device)
    dst_rows = torch.randperm(40, generator=generator)[:24].to(device)
    count = torch.tensor([19], device=device)
    for rows in (None, dst_rows):
        expected = torch.full((40, page_words), -1, dtype=src.dtype, device=device)
        index_select_pages(src, expected, src_ids, count, rows, read_count=True)
        dst = torch.full_like(expected, -1)
        copy_pages(src, dst, src_ids, count, rows, num_ctas=num_ctas)
        if not torch.equal(dst, expected):
            mode = "compact" if rows is None else "scattered"
            raise RuntimeError(f"the kernel's pages differ from index_select's ({mode} rows)")


def _triton_failure(device: torch.device) -> str | None:
    """Why the Triton kernel cannot load pages on ``device``, or None if it passes its self-check."""
    try:
        _kernel()
    except ImportError as error:
        return f"Triton does not import ({error})"
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self_check(device)
    except Exception as error:  # any failure to compile, launch or match means: use the fallback
        return f"self-check failed: {type(error).__name__}: {error}"
    return None


def _check(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, count: torch.Tensor, dst_rows: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` on arguments that would make a load wrong (host metadata only, no sync).

    Runs per load, so it tests first and describes only on a failure.
    """
    device, rows = src.device, src_ids if dst_rows is None else dst_rows
    fits = (
        src.dim() == 2 and dst.dim() == 2 and src.shape[1] == dst.shape[1] and src.dtype == dst.dtype
        and (src.shape[1] <= 1 or src.stride(1) == dst.stride(1) == 1)
        and src_ids.dim() == 1 and src_ids.dtype == rows.dtype == torch.int64 and rows.shape == src_ids.shape
        and (dst_rows is not None or src_ids.shape[0] <= dst.shape[0])
        and count.numel() == 1 and count.dtype in (torch.int32, torch.int64)
        and dst.device == src_ids.device == rows.device == count.device == device
    )  # fmt: skip
    if not fits:
        raise ValueError("headinfer: bad page load: " + "; ".join(_problems(src, dst, src_ids, count, dst_rows)))


def _problems(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, count: torch.Tensor, dst_rows: torch.Tensor | None
) -> list[str]:
    """What :func:`_check` found wrong, in words."""
    problems = []
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1] or src.dtype != dst.dtype:
        problems.append(f"src {tuple(src.shape)} {src.dtype} and dst {tuple(dst.shape)} {dst.dtype} differ")
    elif src.shape[1] > 1 and (src.stride(1) != 1 or dst.stride(1) != 1):
        problems.append("pages must be contiguous rows")
    indices = [("src_ids", src_ids)] + ([] if dst_rows is None else [("dst_rows", dst_rows)])
    for name, index in indices:
        if index.dim() != 1 or index.dtype != torch.int64 or index.shape != src_ids.shape:
            problems.append(f"{name} must be [capacity] int64, is {tuple(index.shape)} {index.dtype}")
    if count.numel() != 1 or count.dtype not in (torch.int32, torch.int64):
        problems.append(f"count must be one int32/int64 element, is {tuple(count.shape)} {count.dtype}")
    devices = {tensor.device for tensor in (src, dst, count, *(index for _, index in indices))}
    if len(devices) > 1:
        problems.append(f"tensors on several devices: {sorted(map(str, devices))}")
    if dst_rows is None and src_ids.dim() == 1 and src_ids.shape[0] > dst.shape[0]:
        problems.append(f"{src_ids.shape[0]} ids for {dst.shape[0]} rows of dst")
    return problems


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _power_of_two_at_least(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is optional; raises ``ImportError`` without it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_pages_kernel(
        src, dst, src_ids, dst_rows, count_ptr,
        page_words, src_stride, dst_stride,
        HAS_DST_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # Work items are (entry, chunk of its page) pairs, dealt to the CTAs in turn: even a one-page
        # load keeps every CTA busy. Items and words within a page are int32 (the host checks the bound).
        chunks_per_page = tl.cdiv(page_words, BLOCK)
        num_items = tl.load(count_ptr).to(tl.int32) * chunks_per_page
        words_of_chunk = tl.arange(0, BLOCK)
        for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
            entry = item // chunks_per_page
            words = (item % chunks_per_page) * BLOCK + words_of_chunk
            src_page = tl.load(src_ids + entry).to(tl.int64)
            dst_row = tl.load(dst_rows + entry).to(tl.int64) if HAS_DST_ROWS else tl.cast(entry, tl.int64)
            in_page = words < page_words
            # 64-bit page offsets: the host tier exceeds 2^31 elements.
            page = tl.load(src + src_page * src_stride + words, mask=in_page)
            tl.store(dst + dst_row * dst_stride + words, page, mask=in_page)

    return copy_pages_kernel
