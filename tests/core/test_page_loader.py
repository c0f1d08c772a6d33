"""Page loads: the Triton kernel (through Triton's interpreter on CPU, compiled on CUDA) and its fallback.

Triton reads ``TRITON_INTERPRET`` when it defines a kernel (and, in some
versions, when it is imported), so the ``test_kernel_*`` tests run on CPU in a
pytest subprocess with ``TRITON_INTERPRET=1`` (:func:`test_interpreter_run`);
this process's Triton, if other tests import it, is unaffected. On CUDA they
run compiled, in this process, against the host tier's pinned, mapped memory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headinfer_vllm.core import page_loader
from headinfer_vllm.core.host_memory import allocate_host, device_view
from headinfer_vllm.core.page_loader import (
    PageLoader,
    accumulate_pages,
    choose_path,
    copy_pages,
    index_select_pages,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_run's subprocess")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(INTERPRETED, reason="compiled, not interpreted")]),
]
"""Where ``test_kernel_*`` run: through the interpreter on CPU tensors, compiled on CUDA."""
SENTINEL = -7
WORD_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8]


def random_words(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype, generator=generator)


def reference(src, dst, src_ids, count: int, dst_rows=None) -> torch.Tensor:
    """``dst`` after the load, entry by entry in Python."""
    expected = dst.clone()
    for entry in range(count):
        row = entry if dst_rows is None else int(dst_rows[entry])
        expected[row] = src[int(src_ids[entry])]
    return expected


def padded(ids: list[int], capacity: int, padding: int) -> torch.Tensor:
    return torch.tensor(ids + [padding] * (capacity - len(ids)), dtype=torch.int64)


def host_tier(host: torch.Tensor, device: str) -> torch.Tensor:
    """``host`` as loads read it on ``device``: itself on CPU, a pinned copy mapped into the GPU on CUDA."""
    if device == "cpu":
        return host
    pinned = allocate_host(tuple(host.shape), host.dtype, pin=True)
    pinned.copy_(host)
    return device_view(pinned, torch.device(device))


def load(device: str, src: torch.Tensor, dst: torch.Tensor, src_ids, count, dst_rows=None, **options) -> torch.Tensor:
    """``dst`` (on CPU) after :func:`copy_pages` on ``device`` (``src``: already there; the rest: CPU tensors)."""
    dst = dst.to(device)
    rows = None if dst_rows is None else dst_rows.to(device)
    copy_pages(src, dst, src_ids.to(device), count.to(device), rows, **options)
    return dst.cpu()


def test_interpreter_run():
    """Runs this file's ``test_kernel_*`` tests in a subprocess with ``TRITON_INTERPRET=1``."""
    if INTERPRETED:
        pytest.skip("this is the interpreter's run")
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install -e '.[test]')")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_kernel_"]
    result = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", WORD_DTYPES)
@pytest.mark.parametrize("scattered", [False, True])
def test_kernel_matches_entry_by_entry(device, dtype, scattered):
    """Random ids with duplicates, a count below the capacity, pages of several chunks plus a remainder."""
    page_words = 3 * 64 + 5
    host = random_words((50, page_words), dtype, seed=1)
    generator = torch.Generator().manual_seed(2)
    ids = [*torch.randint(0, 50, (13,), generator=generator).tolist(), 4, 4]  # duplicates, for certain
    # Ids past the count are out of range: the kernel must never read them.
    src_ids = padded(ids, 20, padding=10**12)
    dst_rows = torch.randperm(32, generator=generator)[:20] if scattered else None
    dst = torch.full((32, page_words), SENTINEL, dtype=dtype)
    expected = reference(host, dst, src_ids, len(ids), dst_rows)
    options = dict(num_ctas=3, block_bytes=64 * dtype.itemsize)
    loaded = load(device, host_tier(host, device), dst, src_ids, torch.tensor([len(ids)]), dst_rows, **options)
    assert torch.equal(loaded, expected)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("num_ctas", [1, 4, 64])
@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64])
def test_kernel_stops_at_the_count(device, num_ctas, count_dtype):
    host = random_words((9, 40), torch.int64, seed=3)
    src = host_tier(host, device)
    src_ids = padded([8, 0, 8, 3], 7, padding=-(10**12))
    for count in range(5):
        dst = torch.full((7, 40), SENTINEL, dtype=torch.int64)
        expected = reference(host, dst, src_ids, count)
        loaded = load(device, src, dst, src_ids, torch.tensor(count, dtype=count_dtype), num_ctas=num_ctas)
        assert torch.equal(loaded, expected), count
        assert bool((loaded[count:] == SENTINEL).all())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_reads_strided_pages(device):
    """Pages that are rows of a wider tensor (row stride > page words) land in a strided buffer."""
    wide = random_words((12, 100), torch.int32, seed=4)
    src = host_tier(wide, device)[:, 10:70]
    src_ids, dst_rows = padded([11, 2, 2], 5, padding=0), torch.tensor([5, 0, 3, 1, 2])
    dst = torch.full((6, 90), SENTINEL, dtype=torch.int32).to(device)
    expected = reference(wide[:, 10:70], dst[:, 20:80].cpu(), src_ids, 3, dst_rows)
    rows = dst_rows.to(device)
    copy_pages(src, dst[:, 20:80], src_ids.to(device), torch.tensor([3], device=device), rows, block_bytes=64)
    assert torch.equal(dst[:, 20:80].cpu(), expected)
    assert bool((dst[:, :20] == SENTINEL).all() and (dst[:, 80:] == SENTINEL).all())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_addresses_past_2_to_the_31_elements(device):
    """Pages near the end of a tier of more than 2^31 bytes (uint8 words): 64-bit offsets.

    On CPU the tier is an uninitialised ``torch.empty``: only the pages written
    and read take memory, which the test checks. On CUDA it is pinned and mapped.
    """
    page_words = 4096
    num_pages = (2**31 + 2**22) // page_words
    rss_before = resident_bytes()
    host = allocate_host((num_pages, page_words), torch.uint8, pin=device == "cuda")
    last = [num_pages - 1, num_pages - 2, num_pages - 600]
    assert last[-1] * page_words > 2**31
    host[last] = random_words((3, page_words), torch.uint8, seed=5)
    host[1] = random_words((page_words,), torch.uint8, seed=6)
    src_ids = padded([*last, 1, last[0]], 8, padding=0)
    dst = torch.full((8, page_words), 3, dtype=torch.uint8)
    expected = reference(host, dst, src_ids, 5)
    loaded = load(device, device_view(host, torch.device(device)), dst, src_ids, torch.tensor([5]))
    assert torch.equal(loaded, expected)
    if device == "cpu":
        assert resident_bytes() - rss_before < 2**28, "the load touched the whole tier"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_path_forced_passes_its_self_check_and_loads(device):
    choose_path.cache_clear()
    loader = PageLoader(device, path="triton", num_ctas=2)
    assert (loader.path, loader.reason) == ("triton", "forced")
    host = random_words((5, 16), torch.int64, seed=7)
    dst = torch.full((4, 16), SENTINEL, dtype=torch.int64)
    src_ids = padded([4, 1], 4, padding=99)
    expected = reference(host, dst, src_ids, 2)
    dst = dst.to(device)
    loader.load(host_tier(host, device), dst, src_ids.to(device), torch.tensor([2], device=device))
    assert torch.equal(dst.cpu(), expected)


@pytest.mark.parametrize("dtype", WORD_DTYPES)
@pytest.mark.parametrize("scattered", [False, True])
def test_fallback_on_cpu_copies_exactly_count_pages(dtype, scattered):
    src = random_words((30, 21), dtype, seed=8)
    generator = torch.Generator().manual_seed(9)
    ids = [*torch.randint(0, 30, (9,), generator=generator).tolist(), 7, 7]
    src_ids = padded(ids, 16, padding=10**12)  # out of range past the count: never read on CPU
    dst_rows = torch.randperm(20, generator=generator)[:16] if scattered else None
    for count in (0, 5, len(ids)):
        dst = torch.full((20, 21), 9, dtype=dtype)
        expected = reference(src, dst, src_ids, count, dst_rows)
        index_select_pages(src, dst, src_ids, torch.tensor([count]), dst_rows)
        assert torch.equal(dst, expected), count


def test_fallback_without_reading_the_count_copies_every_compact_entry():
    """As on a device: no host read of the count, so compact rows past it get the padding ids' pages."""
    src = random_words((10, 8), torch.int64, seed=10)
    src_ids = padded([3, 9, 3], 6, padding=0)
    dst = torch.full((7, 8), SENTINEL, dtype=torch.int64)
    expected = reference(src, dst, src_ids, 6)
    index_select_pages(src, dst, src_ids, torch.tensor([3]), read_count=False)
    assert torch.equal(dst, expected)
    assert bool((dst[6] == SENTINEL).all())


@pytest.mark.parametrize("count", [0, 1, 3])
def test_fallback_without_reading_the_count_leaves_other_scattered_rows_alone(count):
    """Entries past the count (padding row 0, also a real entry's row) change nothing but what entries below do."""
    src = random_words((10, 8), torch.int64, seed=11)
    src_ids, dst_rows = padded([3, 9, 3], 6, padding=5), torch.tensor([4, 0, 2, 0, 0, 0])
    dst = torch.full((7, 8), SENTINEL, dtype=torch.int64)
    expected = reference(src, dst, src_ids, count, dst_rows)
    index_select_pages(src, dst, src_ids, torch.tensor([count]), dst_rows, read_count=False)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(src_ids=torch.zeros(3, dtype=torch.int32)), "src_ids must be"),
        (dict(dst_rows=torch.zeros(2, dtype=torch.int64)), "dst_rows must be"),
        (dict(count=torch.tensor([1.0])), "count must be"),
        (dict(dst=torch.zeros(4, 5, dtype=torch.int64)), "differ"),
        (dict(dst=torch.zeros(2, 8, dtype=torch.int64)), "3 ids for 2 rows"),
        (dict(src=torch.zeros(8, 16, dtype=torch.int64)[:, ::2]), "contiguous rows"),
    ],
)
def test_bad_loads_raise(change, message):
    arguments = dict(
        src=torch.zeros(5, 8, dtype=torch.int64), dst=torch.zeros(4, 8, dtype=torch.int64),
        src_ids=torch.zeros(3, dtype=torch.int64), count=torch.tensor([1]), dst_rows=None,
    )  # fmt: skip
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        index_select_pages(**arguments)


def test_kernel_refuses_more_work_items_than_int32_counts():
    """Entries times chunks per page must stay below 2^31 (the kernel's item index is int32)."""
    pages = torch.empty((0, 2**24), dtype=torch.int64)  # 2^24 words: 2^13 chunks of 16 KiB
    ids = torch.zeros(2**18, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"262144 pages of 16777216 words exceed the kernel's 2\^31 chunks"):
        copy_pages(pages, pages, ids, torch.tensor([1]), ids)


def test_fallback_rejects_a_count_past_the_ids():
    src, dst = torch.zeros(5, 8, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        index_select_pages(src, dst, torch.zeros(3, dtype=torch.int64), torch.tensor([4]))


def test_accumulate_pages_sums_counts_on_the_device_tensor():
    total = torch.zeros(2, dtype=torch.int64)  # e.g. (since start, this step)
    for count in (torch.tensor([3], dtype=torch.int32), torch.tensor([0]), torch.tensor(5)):
        accumulate_pages(total, count)
    assert total.tolist() == [8, 8]


@pytest.mark.skipif(INTERPRETED, reason="the main run's paths")
def test_auto_path_on_cpu_is_index_select_and_logged(caplog):
    choose_path.cache_clear()
    with caplog.at_level(logging.INFO, logger="headinfer_vllm"):
        loader = PageLoader("cpu")
        PageLoader("cpu")
    assert loader.path == "index_select"
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "headinfer: page loads through index_select (cpu device: the count is read on the host for free)"
    ]


def test_forced_and_unknown_paths():
    assert choose_path(torch.device("cpu"), "index_select") == ("index_select", "forced")
    with pytest.raises(ValueError, match="none of auto, triton, index_select"):
        choose_path(torch.device("cpu"), "memcpy")


@pytest.mark.parametrize(
    ("failure", "chosen"),
    [
        (None, ("triton", "passed its self-check")),
        (
            "Triton does not import (no module)",
            ("index_select", "the Triton kernel is unusable: Triton does not import (no module)"),
        ),
    ],
)
def test_auto_path_on_cuda_takes_the_kernel_only_when_it_passes(monkeypatch, caplog, failure, chosen):
    """The choice's logic, with the check's verdict given (a ``cuda`` device object needs no GPU)."""
    monkeypatch.setattr(page_loader, "_triton_failure", lambda device: failure)
    choose_path.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="headinfer_vllm"):
            assert choose_path(torch.device("cuda", 0)) == chosen
        assert [record.getMessage() for record in caplog.records] == [
            f"headinfer: page loads through {chosen[0]} ({chosen[1]})"
        ]
        if failure is not None:
            with pytest.raises(RuntimeError, match="cannot run on cuda:0: Triton does not import"):
                choose_path(torch.device("cuda", 0), "triton")
    finally:
        choose_path.cache_clear()


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="the main run, with Triton")
def test_self_check_fails_a_kernel_that_drops_a_page(monkeypatch):
    def drops_the_last_page(src, dst, src_ids, count, dst_rows=None, **options):
        index_select_pages(src, dst, src_ids, count - 1, dst_rows)

    monkeypatch.setattr(page_loader, "copy_pages", drops_the_last_page)
    failure = page_loader._triton_failure(torch.device("cpu"))
    assert failure == "self-check failed: RuntimeError: the kernel's pages differ from index_select's (compact rows)"


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON or torch.cuda.is_available(), reason="CPU run with Triton only")
def test_forced_triton_without_a_gpu_or_interpreter_says_why():
    choose_path.cache_clear()
    with pytest.raises(RuntimeError, match="cannot run on cpu: self-check failed"):
        choose_path(torch.device("cpu"), "triton")


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="compiles with Triton, outside the interpreter")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(("dtype", "vector_load"), [("i64", "ld.global.v2.b64"), ("i32", "ld.global.v4.b32")])
def test_compiles_for_sm90_with_16_byte_loads(dtype, vector_load):
    """Triton's compiler (no GPU needed) emits 16-byte loads and stores for the page chunks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = page_loader._kernel()
    pointers = ("src", "dst", "src_ids", "dst_rows", "count_ptr")
    signature = {name: "*i64" for name in pointers} | {"src": f"*{dtype}", "dst": f"*{dtype}"}
    signature |= {"page_words": "i32", "src_stride": "i64", "dst_stride": "i32"}
    signature |= {"HAS_DST_ROWS": "constexpr", "BLOCK": "constexpr"}
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in signature if name.islower()}
    source = ASTSource(kernel, signature, constexprs={"HAS_DST_ROWS": True, "BLOCK": 1024}, attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert vector_load in ptx and vector_load.replace("ld.", "st.") in ptx


@pytest.mark.cuda
def test_auto_path_on_cuda_is_the_kernel_and_counts_pages_on_the_device():
    device = torch.device("cuda")
    choose_path.cache_clear()
    loader = PageLoader(device)
    assert loader.path == ("triton" if HAS_TRITON else "index_select")
    host = random_words((300, 4096 + 8), torch.int64, seed=12)
    src = host_tier(host, "cuda")
    ids = [*torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(13)).tolist(), 299, 0]
    src_ids, count = padded(ids, 200, padding=0).to(device), torch.tensor([len(ids)], device=device)
    total = torch.zeros(1, dtype=torch.int64, device=device)
    dst = torch.empty((200, host.shape[1]), dtype=torch.int64, device=device)
    for _ in range(3):
        dst.fill_(SENTINEL)
        loader.load(src, dst, src_ids, count)
        accumulate_pages(total, count)
        assert torch.equal(dst[: len(ids)].cpu(), host[ids])
    assert total.item() == 3 * len(ids)


def resident_bytes() -> int:
    """This process's resident set size (``VmRSS``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
