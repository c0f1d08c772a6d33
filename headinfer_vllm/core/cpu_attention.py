"""Exact paged decode attention on the CPU, reading the pages in place.

A C++ kernel (``headinfer_vllm/csrc/cpu_decode_attention.cpp``), compiled on
first use with the system compiler and loaded with ctypes. It attends one
query token per request over the pages of one unit of KV heads, or of several
units of one layer in one call, straight from their tensors (the host tier's
``host[s]``, or a resident run on the CPU platform): no gather, fp32
accumulation, long sequences split over threads and merged by log-sum-exp::

    pages [N, 2, B, H, D]     N blocks, K then V, B tokens per block, H KV heads, D head dim
    query [R, H * q, D]   ->  out [R, H * q, D]      (q query heads per KV head)

KV head ``h`` serves query heads ``h * q .. (h + 1) * q - 1``. Request ``r``
attends keys ``0 .. seq_lens[r] - 1`` (its current token's K/V are already in
the pages), found in blocks ``block_table[r, 0], block_table[r, 1], ...``.

:func:`prefill_attention_units` is the causal, variable-length form for prefill
chunks, every request of a layer in one call: request ``r``'s chunk is rows
``query_starts[r] ..`` of ``query [T, H * q, D]``, its last ``query_lens[r]``
positions; work items are (request, KV head, tile of query tokens), so each
tile of keys read serves the tile's tokens and the query heads of its KV head.

The library is built once per source, compiler, flags and CPU into
``$HEADINFER_CACHE_DIR`` (default ``~/.cache/headinfer_vllm``).

Instruction paths (``ISAS``; :func:`instruction_path` names the one built and the
log says it): ``amx`` (bf16 keys scored with AMX tiles, the rest as avx512),
``avx512bf16pv`` (AVX-512, bf16 multiplied with VDPBF16PS: the keys' scores, and the
values weighted by the probabilities rounded to bf16), ``avx512bf16`` (the keys scored
with VDPBF16PS, the values weighted as avx512), ``avx512`` (AVX-512, elements widened
to fp32 in registers, fp32 FMAs), ``portable`` (8-float vector extensions: AVX2 on
x86, NEON on Arm). By default: avx512 on a CPU with AMX tiles (Sapphire Rapids:
VDPBF16PS at half the FMAs' rate); on one with AVX-512 BF16 and no AMX, avx512bf16pv
on AMD Zen 4 (family 0x19: its 512-bit FMAs run in two halves, VDPBF16PS at their
rate does twice their work) and avx512bf16 elsewhere (AMD Zen 5: the FMAs' weighted sum
took 0-7% longer in cache and read 5-17% faster from DRAM); else avx512 where the CPU
has AVX-512, else portable. The AVX-512 paths serve head dims that are a multiple
of 32 (AMX: bf16, blocks of >= 16 tokens, <= 16 query heads per KV head; VDPBF16PS:
bf16); other calls take the portable or avx512 code of the same build.
``$HEADINFER_CPU_ATTENTION_ISA`` (or ``library(isa)``) asks for another path: tests
and benchmarks build each. All accumulate in fp32.

The prefill kernel (:func:`prefill_instruction_path`) multiplies bf16 with AMX tiles in the default
and ``amx`` builds where the compiler and CPU have them and Linux permits (``amx``), else with
VDPBF16PS where the CPU has AVX-512 BF16 (``avx512bf16``; always in the two VDPBF16PS builds): the
scores' products summed in fp32, the probabilities rounded to bf16 for the product with V (as torch's
SDPA and vLLM's CPU kernel round them), accumulated in fp32. ``avx512`` keeps the fp32 FMA prefill
(and decode), so that tests cover it on every AVX-512 machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_decode_attention.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
PORTABLE_FLAGS = tuple(flag for flag in FLAGS if flag != "-march=native")
ABI_VERSION = 4
ISAS = ("amx", "avx512bf16pv", "avx512bf16", "avx512", "portable")
"""Instruction paths; ``auto`` builds avx512 on a CPU with AMX tiles, on one with AVX-512 BF16 and no AMX
avx512bf16pv (AMD Zen 4) or avx512bf16 (others, AMD Zen 5 among them), else avx512 where the CPU has
AVX-512, else portable (what each measured: the README's CPU attention results)."""
ISA_ENV = "HEADINFER_CPU_ATTENTION_ISA"
_ISA_DEFINES = {"auto": (), "amx": ("-DHEADINFER_CPU_ATTENTION_AMX",),
                "avx512bf16pv": ("-DHEADINFER_CPU_ATTENTION_BF16_PV",),
                "avx512bf16": ("-DHEADINFER_CPU_ATTENTION_BF16_DOT",),
                "avx512": ("-DHEADINFER_CPU_ATTENTION_FMA",),
                "portable": ("-DHEADINFER_CPU_ATTENTION_PORTABLE",)}
logger = logging.getLogger(__name__)
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""Page, query and output dtypes the kernel takes, with their code in the C ABI."""

_ERRORS = {
    1: "unsupported dtype",
    2: "bad shape (or request {index}'s chunk is longer than its sequence)",
    3: "a block id read for request {index} is outside [0, num_blocks)",
    4: "request {index}'s seq_len needs more pages than block_table has columns",
}


def decode_attention(
    query: torch.Tensor,
    pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Decode attention of one unit of KV heads over its pages, in place.

    Args:
        query: shape ``[R, H * q_per_kv, D]``, dtype of ``pages``. May be strided
            (any row and head stride); the last dim must be contiguous.
        pages: shape ``[N, 2, B, H, D]``, float32, float16 or bfloat16, contiguous
            (e.g. ``store.host[s]``). Read in place; only pages holding attended
            keys are read.
        block_table: shape ``[R, max_blocks]``, dtype int32, last dim contiguous.
            Block ids of each request's pages, in order; entries past a
            sequence (or before its window) are never read.
        seq_lens: shape ``[R]``, dtype int32, contiguous. Keys attended,
            the current token included; 0 gives a zero output.
        scale: multiplies ``q . k`` (usually ``D ** -0.5``).
        out: like ``query`` (may be strided the same way); allocated if None.
        sliding_window: 0 for none; else the query at position ``L - 1`` sees
            keys ``j > L - 1 - sliding_window`` only.
        logits_soft_cap: 0 for none; else scores become ``cap * tanh(s / cap)``
            after scaling.
        sinks: None, or shape ``[H * q_per_kv]``, dtype float32: a logit per
            query head that joins the softmax denominator only.
        num_threads: OpenMP threads; default ``torch.get_num_threads()``.

    Returns:
        ``out``, shape ``[R, H * q_per_kv, D]``.
    """
    if query.dim() != 3 or pages.dim() != 5:
        raise ValueError("headinfer: decode_attention needs query [R, H * q, D] and pages [N, 2, B, H, D]")
    heads = pages.shape[3]
    if query.shape[1] % heads:
        raise ValueError(f"headinfer: {query.shape[1]} query heads are not a multiple of {heads} KV heads")
    return decode_attention_units(
        query, [(0, pages)], block_table, seq_lens, scale, query_per_kv=query.shape[1] // heads,
        out=out, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
        num_threads=num_threads,
    )


def decode_attention_units(
    query: torch.Tensor,
    units: Sequence[tuple[int, torch.Tensor]] | KernelUnits,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    query_per_kv: int,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,
    num_threads: int | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """Decode attention of several units of one layer in one call: one OpenMP region for them all.

    Args:
        query: shape ``[R, num_query_heads, D]``, the layer's query heads; last
            dim contiguous, any row and head stride.
        units: ``(first_kv_head, pages)`` per unit: ``pages [N, 2, B, H_u, D]``,
            contiguous, holding the layer's KV heads ``first_kv_head ..
            first_kv_head + H_u - 1``. All units share N, B, D and the dtype;
            head counts may differ (a streamed unit and a resident run). Query
            heads of KV heads in no unit are left untouched in ``out``. Or the
            same units made once into :class:`KernelUnits` (not checked again).
        block_table, seq_lens, scale, sliding_window, logits_soft_cap,
            num_threads: as in :func:`decode_attention` (one block table for
            every unit: their pages share block ids).
        query_per_kv: query heads per KV head.
        out: like ``query``; allocated (zeros) if None.
        sinks: None, or shape ``[num_query_heads]``, dtype float32.
        isa: the instruction path (see ``ISAS``); default :func:`requested_isa`.

    Returns:
        ``out``, shape ``[R, num_query_heads, D]``.
    """
    if query.dim() == 3 and seq_lens.dim() == 1 and query.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"headinfer: decode needs one query row per request: {query.shape[0]} rows, "
                         f"{seq_lens.shape[0]} seq_lens")
    args = _unit_args(query, units, block_table, seq_lens, query_per_kv, out, sinks)
    out = args[-1]
    bad_index = ctypes.c_int64(-1)
    status = library(isa).headinfer_decode_attention(
        *args[:-1], seq_lens.data_ptr(), scale, sliding_window, logits_soft_cap,
        None if sinks is None else sinks.data_ptr(), num_threads or torch.get_num_threads(), ctypes.byref(bad_index),
    )
    _raise_for(status, bad_index)
    return out


def prefill_attention_units(
    query: torch.Tensor,
    units: Sequence[tuple[int, torch.Tensor]] | KernelUnits,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    query_per_kv: int,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,
    num_threads: int | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks (any number of query tokens per request) over the pages
    of several units of one layer, in place, in one call.

    Args:
        query: shape ``[T, num_query_heads, D]``, every chunk's tokens (rows of other requests,
            e.g. decode tokens, are neither read nor written); last dim contiguous, any row and
            head stride.
        units: ``(first_kv_head, pages)`` per unit, or :class:`KernelUnits`, as in :func:`decode_attention_units`.
        query_starts: shape ``[R]``, int32: the row of request ``r``'s first chunk token.
        query_lens: shape ``[R]``, int32: its chunk's tokens, ``0 <= query_lens[r] <= seq_lens[r]``
            (0: the request is skipped); they sit at positions ``seq_lens[r] - query_lens[r] ..
            seq_lens[r] - 1``, their K/V already in the pages.
        block_table: ``[R, max_blocks]`` int32, last dim contiguous.
        seq_lens: shape ``[R]``, int32, contiguous: keys of each request, the chunk's included.
        scale, logits_soft_cap, num_threads, isa: as in :func:`decode_attention_units`.
        query_per_kv: query heads per KV head.
        out: like ``query``; allocated (zeros) if None. Only the chunks' rows of the units' heads
            are written.
        sliding_window: 0 for none; else the token at position ``p`` sees keys ``j > p - sliding_window``.
        sinks: None, or shape ``[num_query_heads]``, float32.

    Returns:
        ``out``, shape ``[T, num_query_heads, D]``.

    Raises:
        ValueError: bad shapes or dtypes, a chunk outside ``query``, or a block id out of range.
    """
    args = _unit_args(query, units, block_table, seq_lens, query_per_kv, out, sinks)
    out = args[-1]
    num_requests = seq_lens.shape[0]
    _check_int32("query_starts", query_starts, 1, num_requests)
    _check_int32("query_lens", query_lens, 1, num_requests)
    if num_requests and (
        int(query_lens.min()) < 0 or int(query_starts.min()) < 0
        or int((query_starts.long() + query_lens.long()).max()) > query.shape[0]
    ):
        raise ValueError(f"headinfer: a prefill chunk lies outside the query's {query.shape[0]} rows")
    bad_index = ctypes.c_int64(-1)
    status = library(isa).headinfer_prefill_attention(
        *args[:-4], query_starts.data_ptr(), query_lens.data_ptr(), *args[-4:-1], seq_lens.data_ptr(),
        scale, sliding_window, logits_soft_cap, None if sinks is None else sinks.data_ptr(),
        num_threads or torch.get_num_threads(), ctypes.byref(bad_index),
    )
    _raise_for(status, bad_index)
    return out


class KernelUnits:
    """The units of one layer checked once and laid out as the C kernels take them.

    ``units``: ``(first_kv_head, pages)`` per unit, ``pages [N, 2, B, H_u, D]`` contiguous CPU tensors
    that share N, B, D and the dtype (see :func:`decode_attention_units`). Checking a unit and filling
    the C arrays costs about 1.5 µs a unit (AMD Zen 4) on every call that passes a list; a caller that
    attends the same units every step (a layer's host pages) makes this once and passes it instead. It
    holds the tensors, and the C arrays hold their data pointers: the pages must not be resized or
    replaced while it is in use (refilling them in place is what they are for).

    Raises:
        ValueError: no units, a unit that is not ``[N, 2, B, H, D]``, contiguous, on the CPU and of a
            dtype in ``DTYPES``, units that differ in N, B, D or dtype, or a negative first head.
    """

    __slots__ = ("block_size", "count", "dtype", "end_head", "end_unit_first_head", "first_heads", "head_dim",
                 "heads", "num_blocks", "pages", "units")

    def __init__(self, units: Sequence[tuple[int, torch.Tensor]]) -> None:
        if not units:
            raise ValueError("headinfer: the CPU attention kernel needs at least one unit")
        self.units = tuple(units)
        self.count = count = len(self.units)
        self.pages = (ctypes.c_void_p * count)()
        self.heads = (ctypes.c_int64 * count)()
        self.first_heads = (ctypes.c_int64 * count)()
        first_pages = self.units[0][1]
        self.end_head = 0
        """One past the last KV head of any unit (the query needs ``end_head * query_per_kv`` heads)."""
        self.end_unit_first_head = 0
        """The first KV head of the unit that ends at ``end_head`` (for the error message)."""
        for i, (first_head, pages) in enumerate(self.units):
            _check_pages(pages, first_pages)
            heads = pages.shape[3]
            if first_head < 0:
                raise ValueError(f"headinfer: a unit starts at KV head {first_head}: units need first heads >= 0")
            if first_head + heads > self.end_head:
                self.end_head, self.end_unit_first_head = first_head + heads, first_head
            self.pages[i], self.heads[i], self.first_heads[i] = pages.data_ptr(), heads, first_head
        self.dtype = first_pages.dtype
        self.num_blocks, _, self.block_size, _, self.head_dim = first_pages.shape

    def check_query_heads(self, query_per_kv: int, num_query_heads: int) -> None:
        """Raises ValueError if a unit's KV heads need more than ``num_query_heads`` query heads."""
        if self.end_head * query_per_kv > num_query_heads:
            raise ValueError(
                f"headinfer: KV heads {self.end_unit_first_head} .. {self.end_head - 1} need "
                f"{self.end_head * query_per_kv} query heads, query has {num_query_heads}"
            )


def _unit_args(
    query: torch.Tensor,
    units: Sequence[tuple[int, torch.Tensor]] | KernelUnits,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_per_kv: int,
    out: torch.Tensor | None,
    sinks: torch.Tensor | None,
) -> tuple:
    """Checks the arguments both kernels share; returns their C arguments up to the output's
    strides, then the block table's three (pointer, row stride, columns), then ``out`` (allocated if
    None). Each tensor's strides are read once: a ``stride(i)`` call costs about a third of a
    microsecond, and this runs once per layer and step."""
    if not isinstance(units, KernelUnits):
        units = KernelUnits(units)
    if query.dim() != 3:
        raise ValueError(f"headinfer: query must be [rows, num_query_heads, D], got {list(query.shape)}")
    num_rows, num_query_heads = query.shape[0], query.shape[1]
    units.check_query_heads(query_per_kv, num_query_heads)
    if out is None:
        out = torch.zeros(query.shape, dtype=query.dtype)
    shape = (num_rows, num_query_heads, units.head_dim)
    query_strides = _check_rows("query", query, units.dtype, shape)
    out_strides = _check_rows("out", out, units.dtype, shape)
    num_requests = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    table_strides = _check_int32("block_table", block_table, 2, num_requests)
    _check_int32("seq_lens", seq_lens, 1, num_requests)
    if sinks is not None and (
        sinks.dtype != torch.float32 or sinks.shape != (num_query_heads,) or not sinks.is_contiguous()
        or not sinks.is_cpu
    ):
        raise ValueError(f"headinfer: sinks must be a contiguous CPU float32 tensor [{num_query_heads}]")
    return (
        DTYPES[units.dtype],
        units.count,
        units.pages,
        units.heads,
        units.first_heads,
        units.num_blocks, units.block_size, units.head_dim, query_per_kv, num_requests,
        query.data_ptr(), query_strides[0], query_strides[1],
        out.data_ptr(), out_strides[0], out_strides[1],
        block_table.data_ptr(), table_strides[0], block_table.shape[1],
        out,
    )


def _raise_for(status: int, bad_index: ctypes.c_int64) -> None:
    if status:
        raise ValueError("headinfer: " + _ERRORS.get(status, f"error {status}").format(index=bad_index.value))


def _check_pages(pages: torch.Tensor, first: torch.Tensor) -> None:
    shape = pages.shape
    if len(shape) != 5 or shape[1] != 2:
        raise ValueError(f"headinfer: pages must be [N, 2, B, H, D], got {list(shape)}")
    if pages.dtype not in DTYPES:
        raise ValueError(f"headinfer: pages of dtype {pages.dtype}; the CPU kernel takes {list(DTYPES)}")
    if not pages.is_cpu or not pages.is_contiguous():
        raise ValueError("headinfer: pages must be a contiguous CPU tensor")
    if pages is first:
        return
    first_shape = first.shape
    same = (shape[0], shape[2], shape[4]) == (first_shape[0], first_shape[2], first_shape[4])
    if not same or pages.dtype != first.dtype:
        raise ValueError("headinfer: every unit needs the same block count, block size, head dim and dtype")


def _check_rows(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int, int]) -> tuple[int, ...]:
    """Raises ValueError unless ``tensor`` is a CPU ``dtype`` tensor of ``shape`` whose last dim is
    contiguous; returns its strides."""
    if tensor.shape != shape or tensor.dtype != dtype or not tensor.is_cpu:
        raise ValueError(
            f"headinfer: {name} must be a CPU {dtype} tensor {list(shape)}, got {tensor.dtype} "
            f"{list(tensor.shape)} on {tensor.device}"
        )
    strides = tensor.stride()
    if strides[2] != 1 and shape[2] > 1:
        raise ValueError(f"headinfer: {name}'s last dim must be contiguous")
    return strides


def _check_int32(name: str, tensor: torch.Tensor, dims: int, rows: int) -> tuple[int, ...]:
    """Raises ValueError unless ``tensor`` is a ``dims``-d CPU int32 tensor of ``rows`` rows whose last
    dim is contiguous; returns its strides."""
    if tensor.dtype != torch.int32 or tensor.dim() != dims or tensor.shape[0] != rows or not tensor.is_cpu:
        raise ValueError(f"headinfer: {name} must be a {dims}-d CPU int32 tensor with {rows} rows")
    strides = tensor.stride()
    if tensor.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"headinfer: {name}'s last dim must be contiguous")
    return strides


# Building and loading ----------------------------------------------------------------------


def requested_isa() -> str:
    """``$HEADINFER_CPU_ATTENTION_ISA`` (one of ``ISAS``), else ``auto``.

    Raises:
        ValueError: an unknown name.
    """
    isa = os.environ.get(ISA_ENV) or "auto"
    if isa not in _ISA_DEFINES:
        raise ValueError(f"headinfer: ${ISA_ENV}={isa!r}; choose one of auto, {', '.join(ISAS)}")
    return isa


def library(isa: str | None = None) -> ctypes.CDLL:
    """The compiled kernel for instruction path ``isa`` (default :func:`requested_isa`), built on
    first use (seconds) and cached on disk.

    Raises:
        RuntimeError: no C++ compiler, the build failed (with the compiler's output), or this
            compiler and CPU cannot take the path asked for.
    """
    return _load(isa or requested_isa())


def instruction_path(isa: str | None = None) -> str:
    """The path the library of :func:`library` takes for head dims that are a multiple of 32."""
    return library(isa).headinfer_cpu_attention_isa().decode()


def prefill_instruction_path(isa: str | None = None) -> str:
    """The path the prefill kernel of :func:`library` takes for bf16 head dims that are a multiple of 32:
    ``amx`` (AMX tiles), ``avx512bf16`` (VDPBF16PS: the ``avx512bf16`` and ``avx512bf16pv`` builds, and the
    default build on a CPU with AVX-512 BF16 but no AMX tiles), else the decode path's
    (:func:`instruction_path`)."""
    return library(isa).headinfer_cpu_prefill_isa().decode()


def available_isas() -> list[str]:
    """The paths this compiler and CPU can build, fastest first (builds each)."""
    found = []
    for isa in ISAS:
        try:
            library(isa)
        except RuntimeError:
            continue
        found.append(isa)
    return found


@functools.cache
def _load(isa: str) -> ctypes.CDLL:
    if isa not in _ISA_DEFINES:
        raise ValueError(f"headinfer: unknown CPU attention path {isa!r}; choose one of auto, {', '.join(ISAS)}")
    lib = ctypes.CDLL(str(build(isa)))
    if lib.headinfer_cpu_attention_abi_version() != ABI_VERSION:
        raise RuntimeError("headinfer: the CPU attention library's ABI does not match this Python module")
    lib.headinfer_cpu_attention_isa.restype = ctypes.c_char_p
    lib.headinfer_cpu_prefill_isa.restype = ctypes.c_char_p
    built = lib.headinfer_cpu_attention_isa().decode()
    if isa != "auto" and built != isa:
        raise RuntimeError(f"headinfer: this compiler and CPU cannot build the {isa} CPU attention path ({built})")
    logger.info("headinfer: CPU attention kernel takes the %s path, its bf16 prefill the %s path (%s requested)",
                built, lib.headinfer_cpu_prefill_isa().decode(), isa)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    units_and_rows = [
        ctypes.c_int, ctypes.c_int, ptr, ptr, ptr,  # dtype, units: pages, heads, first heads
        i64, i64, i64, i64, i64,  # num_blocks, block_size, head_dim, query_per_kv, num_requests
        ptr, i64, i64,  # query, row stride, head stride
        ptr, i64, i64,  # out, row stride, head stride
    ]
    keys_and_variant = [
        ptr, i64, i64,  # block_table, row stride, max_blocks
        ptr,  # seq_lens
        ctypes.c_float, i64, ctypes.c_float, ptr,  # scale, sliding_window, logits_soft_cap, sinks
        ctypes.c_int, ptr,  # num_threads, bad_index
    ]
    lib.headinfer_decode_attention.restype = ctypes.c_int
    lib.headinfer_decode_attention.argtypes = units_and_rows + keys_and_variant
    lib.headinfer_prefill_attention.restype = ctypes.c_int
    lib.headinfer_prefill_attention.argtypes = [*units_and_rows, ptr, ptr, *keys_and_variant]  # query starts, lens
    return lib


def is_available() -> bool:
    """Whether the kernel builds and loads here (builds it if needed)."""
    try:
        library()
    except RuntimeError:
        return False
    return True


def find_compiler() -> list[str] | None:
    """``$CXX`` (split like a shell would), else the first of ``c++``, ``g++``, ``clang++`` on PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("HEADINFER_CACHE_DIR") or Path.home() / ".cache" / "headinfer_vllm")


def build(isa: str = "auto") -> Path:
    """Path of the compiled library for ``isa`` (see ``ISAS``): from the cache, else compiled now (with, then
    without ``-march=native``). A compile that the compiler refused is remembered beside the library it
    would have made (``<library>.failed``, the compiler's output), so later processes fall back at once
    instead of failing the same compile again; the key changes with the source, compiler, flags and CPU."""
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError(
            "headinfer: CPU attention needs a C++ compiler with OpenMP and none was found "
            "(set $CXX, or install one: `apt install g++`, `dnf install gcc-c++`); "
            "or turn CPU attention off"
        )
    source = SOURCE.read_bytes()
    errors = []
    for flags in (FLAGS + _ISA_DEFINES[isa], PORTABLE_FLAGS + _ISA_DEFINES[isa]):
        path = cache_dir() / f"cpu_decode_attention-{_build_key(source, compiler, flags)}.so"
        failed = path.with_suffix(".failed")
        if path.exists():
            error = None
        elif failed.exists():
            error = (f"{failed.read_text(errors='replace')}\n(the output of an earlier build, kept in {failed}: "
                     "delete it to build again)")
        else:
            error = _compile(compiler, flags, path)
        if error is None:
            if errors:  # the native build failed: this one runs, but without the CPU's own instructions
                logger.warning("headinfer: building the CPU attention kernel with -march=native failed; using a "
                               "portable build (slower). Compiler output, last lines:\n%s", errors[0])
            return path
        errors.append(f"$ {shlex.join([*compiler, *flags])} ...\n{error}")
    raise RuntimeError(
        "headinfer: building the CPU attention kernel failed (a C++17 compiler with OpenMP is needed: "
        "`apt install g++`; or turn CPU attention off). Compiler output, last lines:\n" + "\n".join(errors)
    )


def _remember_failure(path: Path, error: str) -> None:
    """Writes a failed build's output to ``path``, atomically."""
    try:
        handle, temporary = tempfile.mkstemp(suffix=".failed", dir=path.parent)
    except OSError:
        return  # a cache that cannot be written: the next process compiles again
    try:
        with os.fdopen(handle, "w") as file:
            file.write(error)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _build_key(source: bytes, compiler: list[str], flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256(source)
    for part in (*compiler, _compiler_version(compiler), *flags, platform.machine(), _cpu_flags()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _compiler_version(compiler: list[str]) -> str:
    try:
        return subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_flags() -> str:
    """The CPU's feature flags (a library built with -march=native must not run on an older CPU)."""
    try:
        with open("/proc/cpuinfo") as lines:
            return next((line for line in lines if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compile(compiler: list[str], flags: tuple[str, ...], path: Path) -> str | None:
    """Compiles to a temporary file then renames it to ``path`` (atomic: concurrent builds are safe).

    Returns None, or the tail of the compiler's output on failure. Where the compiler ran and refused
    the source, its output is also kept in ``path.with_suffix(".failed")`` (see :func:`build`); a
    compiler that could not run or timed out is tried again next time.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError as error:
        return f"cannot write to {path.parent}: {error} (set $HEADINFER_CACHE_DIR)"
    os.close(handle)
    command = [*compiler, *flags, "-o", temporary, str(SOURCE)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        os.unlink(temporary)
        return str(error)
    if result.returncode != 0:
        os.unlink(temporary)
        error = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        if result.returncode > 0:  # refused; a negative code is a signal (killed, out of memory): not kept
            _remember_failure(path.with_suffix(".failed"), error)
        return error
    os.replace(temporary, path)
    return None
