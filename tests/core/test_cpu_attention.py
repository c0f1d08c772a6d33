"""The CPU paged decode-attention kernel against a dense float64 reference.

Every token slot that no request attends (past a sequence's end, before its
window, in blocks no request owns) holds NaN, so a kernel that reads one
gives a NaN and fails: the checks prove what is not read as well as what is.

Every test runs on each instruction path this compiler and CPU can build
(``cpu_attention.available_isas()``: amx, avx512bf16pv, avx512bf16, avx512, portable).
"""

from __future__ import annotations

import math

import machine_facts
import pytest
import torch

from headinfer_vllm.core import cpu_attention

pytestmark = pytest.mark.skipif(
    cpu_attention.find_compiler() is None, reason="no C++ compiler ($CXX, c++, g++ or clang++) to build the kernel"
)

ISA_PATHS = cpu_attention.available_isas() if cpu_attention.find_compiler() else []


@pytest.fixture(autouse=True, params=ISA_PATHS or ["auto"])
def isa(request, monkeypatch) -> str:
    """The instruction path every kernel call of the test takes."""
    monkeypatch.setenv(cpu_attention.ISA_ENV, request.param)
    return request.param


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""Largest error over largest |reference|: fp32 accumulation, plus one rounding of the output
(2**-11 for fp16, 2**-8 for bf16). A wrong head or token errs by about 1 (see
``test_tolerances_catch_a_wrong_head``)."""


class Case:
    """Pages of ``num_blocks`` blocks, requests of ``seq_lens`` tokens each on shuffled, interleaved
    blocks, NaN in every slot that no request attends."""

    def __init__(self, seq_lens, *, heads=2, query_per_kv=2, head_dim=64, block_size=16, dtype=torch.float32,
                 sliding_window=0, spare_blocks=3, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.heads, self.query_per_kv, self.head_dim, self.block_size = heads, query_per_kv, head_dim, block_size
        self.dtype, self.sliding_window = dtype, sliding_window
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        num_pages = [-(-length // block_size) for length in seq_lens]
        self.num_blocks = sum(num_pages) + spare_blocks
        # Interleaved: request r's page i gets the (i * R + r)-th id of a permutation.
        ids = torch.randperm(self.num_blocks, generator=self.generator).tolist()
        order = sorted(((page, r) for r, pages in enumerate(num_pages) for page in range(pages)))
        owner = {key: ids[index] for index, key in enumerate(order)}
        max_pages = max(num_pages, default=0) + 2
        # Padding entries past a sequence: ids that would fault or point at NaN pages if read.
        self.block_table = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
        self.block_table[:, -1] = self.num_blocks + 1000
        for (page, r), block in owner.items():
            self.block_table[r, page] = block
        shape = (self.num_blocks, 2, block_size, heads, head_dim)
        self.pages = torch.full(shape, float("nan"), dtype=dtype)
        for r, length in enumerate(seq_lens):
            first = max(0, length - sliding_window) if sliding_window else 0
            keys = torch.arange(first, length)
            blocks = self.block_table[r, keys // block_size].long()
            self.pages[blocks, :, keys % block_size] = self.random((len(keys), 2, heads, head_dim))
        self.query = self.random((len(seq_lens), heads * query_per_kv, head_dim))

    def random(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.dtype)

    def run(self, **kwargs) -> torch.Tensor:
        kwargs.setdefault("sliding_window", self.sliding_window)
        return cpu_attention.decode_attention(
            self.query, self.pages, self.block_table, self.seq_lens, self.head_dim**-0.5, **kwargs
        )

    def reference(self, **kwargs) -> torch.Tensor:
        kwargs.setdefault("sliding_window", self.sliding_window)
        return reference(self.query, [(0, self.pages)], self.block_table, self.seq_lens, self.head_dim**-0.5,
                         query_per_kv=self.query_per_kv, **kwargs)


def reference(query, units, block_table, seq_lens, scale, *, query_per_kv, sliding_window=0, logits_soft_cap=0.0,
              sinks=None) -> torch.Tensor:
    """Dense attention in float64 over each request's keys, rebuilt from its pages; zeros where no unit is."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    for first_head, pages in units:
        _, _, block_size, heads, head_dim = pages.shape
        for r, length in enumerate(seq_lens.tolist()):
            if length == 0:
                continue
            blocks = block_table[r, : -(-length // block_size)].long()
            kv = pages[blocks].double().transpose(0, 1).reshape(2, -1, heads, head_dim)[:, :length]
            first = max(0, length - sliding_window) if sliding_window else 0
            keys, values = kv[0, first:], kv[1, first:]  # [L, H, D]
            rows = slice(first_head * query_per_kv, (first_head + heads) * query_per_kv)
            q = query[r, rows].double().view(heads, query_per_kv, head_dim)
            scores = torch.einsum("hqd,lhd->hql", q, keys) * scale
            if logits_soft_cap:
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
            top = scores.amax(-1, keepdim=True)
            if sinks is not None:
                sink = sinks[rows].double().view(heads, query_per_kv, 1)
                top = torch.maximum(top, sink)
            weights = torch.exp(scores - top)
            denominator = weights.sum(-1, keepdim=True)
            if sinks is not None:
                denominator = denominator + torch.exp(sink - top)
            result = torch.einsum("hql,lhd->hqd", weights / denominator, values)
            out[r, rows] = result.reshape(heads * query_per_kv, head_dim)
    return out


def relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return ((output.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def check(case: Case, tolerance: float | None = None, **kwargs) -> torch.Tensor:
    output = case.run(**kwargs)
    kwargs.pop("num_threads", None)
    assert torch.isfinite(output).all()
    assert relative_error(output, case.reference(**kwargs)) <= (tolerance or TOLERANCE[case.dtype])
    return output


# Shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_per_kv", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_fp32_shapes(query_per_kv, head_dim, heads):
    block_size = [16, 5, 1, 32][(head_dim + heads) % 4]
    lengths = [1, block_size, block_size - 1 or 2, block_size + 1, 2 * block_size, 7 * block_size + 3, 131]
    case = Case(lengths, heads=heads, query_per_kv=query_per_kv, head_dim=head_dim, block_size=block_size,
                seed=head_dim * 31 + heads * 7 + query_per_kv)
    check(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("query_per_kv", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_half_precision_shapes(dtype, query_per_kv, head_dim):
    case = Case([1, 16, 15, 17, 300, 64], heads=2, query_per_kv=query_per_kv, head_dim=head_dim, dtype=dtype,
                seed=query_per_kv * 13 + head_dim)
    check(case)


@pytest.mark.parametrize("head_dim", [1, 8, 24, 40, 72])
def test_head_dims_off_the_vector_width(head_dim):
    check(Case([1, 9, 40], head_dim=head_dim, block_size=4, seed=head_dim))
    check(Case([1, 9, 40], head_dim=head_dim, block_size=4, dtype=torch.bfloat16, seed=head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
def test_long_sequences_split_over_threads(dtype, num_threads):
    """Small blocks and long sequences: one request's keys split in many ranges, merged by log-sum-exp."""
    case = Case([6000, 1, 2500], heads=1, query_per_kv=4, head_dim=64, block_size=2, dtype=dtype, seed=num_threads)
    output = check(case, num_threads=num_threads)
    assert torch.allclose(output, case.run(num_threads=1), rtol=0, atol=2 * TOLERANCE[dtype] * output.abs().max())


def test_zero_length_sequence_gives_zeros():
    case = Case([0, 5, 0], seed=3)
    output = case.run(out=torch.full(case.query.shape, 7.0))
    assert torch.equal(output[0], torch.zeros_like(output[0])) and torch.equal(output[2], torch.zeros_like(output[2]))
    assert relative_error(output[1], case.reference()[1]) <= TOLERANCE[torch.float32]


# Variants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 15, 16, 17, 100, 10_000])
def test_sliding_window_reads_no_page_outside_it(dtype, window):
    # Slots before each window hold NaN: any read of them would show in the output.
    case = Case([1, 16, 17, 99, 700], block_size=16, sliding_window=window, dtype=dtype, seed=window)
    check(case, num_threads=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_soft_cap(dtype):
    case = Case([1, 33, 400], query_per_kv=4, dtype=dtype, seed=5)
    case.query.mul_(8)  # scores past the cap, where tanh bends
    check(case, logits_soft_cap=5.0)
    check(case, logits_soft_cap=50.0, sliding_window=30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sink_scale", [0.0, 3.0, 30.0])
def test_sinks_join_the_denominator(dtype, sink_scale):
    case = Case([1, 40, 900], heads=2, query_per_kv=4, dtype=dtype, seed=11)
    sinks = torch.randn(8, generator=case.generator) * sink_scale
    check(case, sinks=sinks, num_threads=4)
    check(case, sinks=sinks, sliding_window=20, logits_soft_cap=10.0)


def test_all_variants_at_once_with_splits():
    case = Case([5000, 3], heads=2, query_per_kv=2, block_size=4, sliding_window=3000, seed=17)
    sinks = torch.randn(4, generator=case.generator)
    check(case, sinks=sinks, logits_soft_cap=20.0, num_threads=8)


# Layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_query_and_output(dtype):
    case = Case([3, 50, 129], heads=2, query_per_kv=4, head_dim=64, dtype=dtype, seed=23)
    reference_out = case.reference()
    # query: every third head of a wider buffer, rows padded
    wide = torch.randn(3, 8 * 3 + 1, 72).to(dtype)
    wide[:, 0 : 24 : 3, :64] = case.query
    query = wide[:, 0:24:3, :64]
    canvas = torch.randn(3, 17, 80).to(dtype)
    before = canvas.clone()
    out = canvas[:, 1:17:2, 8:72]
    assert query.stride(1) == 3 * 72 and out.stride(1) == 2 * 80
    cpu_attention.decode_attention(query, case.pages, case.block_table, case.seq_lens, 64**-0.5, out=out)
    assert relative_error(out, reference_out) <= TOLERANCE[dtype]
    untouched = torch.ones_like(canvas, dtype=torch.bool)
    untouched[:, 1:17:2, 8:72] = False
    assert torch.equal(canvas[untouched], before[untouched])


def test_block_table_view_with_row_stride():
    case = Case([20, 70], seed=29)
    wide = torch.full((2, case.block_table.shape[1] + 5), -7, dtype=torch.int32)
    wide[:, : case.block_table.shape[1]] = case.block_table
    output = cpu_attention.decode_attention(
        case.query, case.pages, wide[:, : case.block_table.shape[1]], case.seq_lens, 64**-0.5
    )
    assert relative_error(output, case.reference()) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_far_above_the_running_max_in_any_lane(dtype):
    """Request 0's keys 48-63 (the second half of its second tile of 32 keys) and request 1's keys 64-79 (the
    first half of its third) score about 200 above every other key: the running max must follow them, or
    exp(score - max) overflows."""
    case = Case([100, 100], heads=2, query_per_kv=4, head_dim=128, dtype=dtype, seed=71)
    case.query = torch.ones_like(case.query)
    keys = torch.arange(100)
    for request, jump in enumerate([slice(48, 64), slice(64, 80)]):
        level = torch.zeros(100)
        level[jump] = 17.7  # score = level * 128 / sqrt(128)
        blocks = case.block_table[request, keys // case.block_size].long()
        case.pages[blocks, 0, keys % case.block_size] = (level[:, None, None] * torch.ones(2, 128)).to(dtype)
    check(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_units_of_a_layer_in_one_call(dtype):
    """Streamed units of 2 heads and a resident run of 4 heads, given out of order; KV heads 2-3 in no unit."""
    generator = torch.Generator().manual_seed(31)
    num_kv_heads, query_per_kv, head_dim, block_size = 10, 2, 64, 8
    seq_lens = torch.tensor([1, 8, 9, 200], dtype=torch.int32)
    num_blocks = 40
    block_table = torch.stack([torch.randperm(num_blocks, generator=generator)[:26] for _ in range(4)]).int()
    query = torch.randn(4, num_kv_heads * query_per_kv, head_dim, generator=generator).to(dtype)

    def pages(heads):
        return torch.randn(num_blocks, 2, block_size, heads, head_dim, generator=generator).to(dtype)

    units = [(6, pages(4)), (0, pages(2)), (4, pages(2))]
    out = torch.full(query.shape, 5.0, dtype=dtype)
    cpu_attention.decode_attention_units(query, units, block_table, seq_lens, 0.1, query_per_kv=query_per_kv,
                                         out=out, num_threads=3)
    expected = reference(query, units, block_table, seq_lens, 0.1, query_per_kv=query_per_kv)
    covered = torch.ones(num_kv_heads * query_per_kv, dtype=torch.bool)
    covered[2 * query_per_kv : 4 * query_per_kv] = False
    assert relative_error(out[:, covered], expected[:, covered]) <= TOLERANCE[dtype]
    assert (out[:, ~covered] == 5.0).all()
    # The same as one call per unit.
    for first_head, unit_pages in units:
        rows = slice(first_head * query_per_kv, (first_head + unit_pages.shape[3]) * query_per_kv)
        alone = cpu_attention.decode_attention(query[:, rows], unit_pages, block_table, seq_lens, 0.1)
        assert torch.equal(alone, out[:, rows])
    # Made once into KernelUnits: the same output; pages refilled in place are read as they are now.
    prepared = cpu_attention.KernelUnits(units)

    def attend(units):
        result = torch.full(query.shape, 5.0, dtype=dtype)
        return cpu_attention.decode_attention_units(query, units, block_table, seq_lens, 0.1,
                                                    query_per_kv=query_per_kv, out=result, num_threads=3)

    assert torch.equal(attend(prepared), out)
    for _, unit_pages in units:
        unit_pages.copy_(torch.randn(unit_pages.shape, generator=generator))
    refilled = attend(prepared)
    assert torch.equal(refilled, attend(units)) and not torch.equal(refilled, out)


def test_pages_of_a_host_tier():
    """``host[s]`` of a ``[S, N, 2, B, G, D]`` tier, read in place."""
    case = Case([7, 90], heads=2, seed=37)
    host = torch.zeros(3, *case.pages.shape)
    host[1] = case.pages
    output = cpu_attention.decode_attention(case.query, host[1], case.block_table, case.seq_lens, 64**-0.5)
    assert relative_error(output, case.reference()) <= TOLERANCE[torch.float32]


# Exactness of the conversions and the tolerances --------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_key_returns_its_value_bit_for_bit(dtype):
    """softmax of one key is 1: out = V exactly, for every finite half-precision bit pattern (but bf16
    subnormals on the avx512bf16pv path: VDPBF16PS reads them as zeros, an error below 2^-126; avx512bf16
    weights the values with fp32 FMAs, which take them exactly)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = bits[torch.isfinite(bits.float())]
    head_dim = 128
    values = torch.cat([values, values[: (-values.numel()) % head_dim]]).view(-1, 1, head_dim)
    rows = values.shape[0]
    pages = torch.zeros(rows, 2, 1, 1, head_dim, dtype=dtype)
    pages[:, 1, 0] = values
    block_table = torch.arange(rows, dtype=torch.int32)[:, None]
    seq_lens = torch.ones(rows, dtype=torch.int32)
    query = torch.ones(rows, 1, head_dim, dtype=dtype)
    output = cpu_attention.decode_attention(query, pages, block_table, seq_lens, 1.0)
    expected = values
    if dtype == torch.bfloat16 and cpu_attention.instruction_path() == "avx512bf16pv":
        expected = torch.where(values.float().abs() < torch.finfo(torch.float32).tiny, 0.0, values)
    assert torch.equal(output, expected)  # bit for bit, but for the sign of zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_rounds_to_nearest_even(dtype):
    """Two equal keys: out = (v0 + v1) / 2, exact in fp32, then rounded like torch rounds."""
    generator = torch.Generator().manual_seed(41)
    rows, head_dim = 512, 64
    pages = torch.zeros(rows, 2, 2, 1, head_dim, dtype=dtype)
    pages[:, 0] = torch.randn(rows, 1, 1, head_dim, generator=generator).to(dtype)  # the same key twice
    pages[:, 1] = (torch.randn(rows, 2, 1, head_dim, generator=generator) * 1e3 ** torch.rand(rows, 1, 1, 1)).to(dtype)
    values = pages[:, 1, :, 0].float()
    expected = ((values[:, 0] + values[:, 1]) / 2).to(dtype)
    query = torch.randn(rows, 1, head_dim, generator=generator).to(dtype)
    block_table = torch.arange(rows, dtype=torch.int32)[:, None]
    output = cpu_attention.decode_attention(query, pages, block_table, torch.full((rows,), 2, dtype=torch.int32), 1.0)
    assert torch.equal(output[:, 0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tolerances_catch_a_wrong_head(dtype):
    """The check fails when one KV head's queries are attended over its neighbour's keys."""
    case = Case([1, 40, 300], heads=2, query_per_kv=4, dtype=dtype, seed=43)
    output = case.run()
    swapped = case.pages.flip(3).contiguous()
    wrong = cpu_attention.decode_attention(case.query, swapped, case.block_table, case.seq_lens, 64**-0.5)
    assert relative_error(output, case.reference()) <= TOLERANCE[dtype]
    assert relative_error(wrong, case.reference()) > 10 * TOLERANCE[dtype]


# Errors and the build -----------------------------------------------------------------------


def test_bad_inputs_are_refused():
    case = Case([20, 3], seed=47)
    with pytest.raises(ValueError, match="outside"):
        table = case.block_table.clone()
        table[0, 1] = case.num_blocks
        cpu_attention.decode_attention(case.query, case.pages, table, case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="columns"):
        cpu_attention.decode_attention(case.query, case.pages, case.block_table[:, :1], case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.empty(*case.pages.shape[:4], 128)[..., :64]
        cpu_attention.decode_attention(case.query, strided, case.block_table, case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        cpu_attention.decode_attention(case.query.double(), case.pages.double(), case.block_table, case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="int32"):
        cpu_attention.decode_attention(case.query, case.pages, case.block_table.long(), case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        cpu_attention.decode_attention(case.query[:, :3], case.pages, case.block_table, case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="sinks"):
        cpu_attention.decode_attention(case.query, case.pages, case.block_table, case.seq_lens, 1.0,
                                       sinks=torch.zeros(3))


def test_bad_units_are_refused():
    case = Case([20, 3], heads=2, seed=48)  # pages [N, 2, B, 2, 64]: KV heads 0 and 1

    def run(units):
        return cpu_attention.decode_attention_units(case.query, units, case.block_table, case.seq_lens, 1.0,
                                                    query_per_kv=case.query_per_kv)

    head = case.pages[:, :, :, :1].contiguous()
    with pytest.raises(ValueError, match="at least one unit"):
        run([])
    with pytest.raises(ValueError, match="every unit needs the same"):
        run([(0, head), (1, head[:, :, :8].contiguous())])  # another block size
    with pytest.raises(ValueError, match="contiguous"):
        run([(0, head), (1, case.pages[:, :, :, 1:])])  # the second unit a strided view
    with pytest.raises(ValueError, match=r"\[N, 2, B, H, D\]"):
        run([(0, case.pages[0])])
    with pytest.raises(ValueError, match="need 6 query heads, query has 4"):
        run([(0, head), (2, head)])  # a KV head the layer does not have
    with pytest.raises(ValueError, match="need"):
        run([(-1, head)])
    prepared = cpu_attention.KernelUnits([(0, head), (2, head)])  # checked against a query at each call
    with pytest.raises(ValueError, match=r"KV heads 2 \.\. 2 need 6 query heads, query has 4"):
        run(prepared)


def test_the_path_asked_for_is_the_path_taken(isa):
    assert cpu_attention.instruction_path() == isa
    assert isa in cpu_attention.ISAS


def test_the_default_weights_values_in_bf16_only_on_amd_zen4(monkeypatch):
    """On a CPU with AVX-512 BF16 and no AMX the default build takes avx512bf16pv on AMD family 25 (Zen 4),
    avx512bf16 on any other (bf16_values() reads CPUID; this reads /proc/cpuinfo)."""
    info = machine_facts.cpuinfo()  # benchmarks/, on the path (tests/conftest.py)
    flags = set(info.get("flags", "").split())
    if "avx512_bf16" not in flags or "amx_tile" in flags or "avx512bf16" not in ISA_PATHS:
        pytest.skip("the default build takes the VDPBF16PS paths only on a CPU with AVX-512 BF16 and no AMX")
    monkeypatch.setenv(cpu_attention.ISA_ENV, "auto")
    zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    assert cpu_attention.instruction_path() == ("avx512bf16pv" if zen4 else "avx512bf16")


def test_an_unknown_path_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_attention.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="amx, avx512bf16pv, avx512bf16, avx512, portable"):
        Case([5]).run()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_more_query_heads_than_a_tile_holds(dtype):
    check(Case([70, 33], heads=2, query_per_kv=20, head_dim=64, dtype=dtype, seed=61))


def test_build_is_cached_and_keyed(tmp_path, monkeypatch):
    path = cpu_attention.build()
    assert path.exists() and cpu_attention.build() == path
    monkeypatch.setenv("HEADINFER_CACHE_DIR", str(tmp_path))
    source = cpu_attention.SOURCE.read_bytes()
    compiler = cpu_attention.find_compiler()
    keys = {cpu_attention._build_key(source, compiler, flags)
            for flags in (cpu_attention.FLAGS, cpu_attention.PORTABLE_FLAGS)}
    assert len(keys) == 2
    assert cpu_attention._build_key(source + b" ", compiler, cpu_attention.FLAGS) not in keys


def test_build_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match=r"apt install g\+\+.*turn CPU attention off"):
        cpu_attention.build()
    assert all(path.suffix == ".failed" for path in tmp_path.iterdir())  # no temporary file left behind
    with pytest.raises(RuntimeError, match="output of an earlier build"):  # remembered: no compile again
        cpu_attention.build()
    monkeypatch.setattr(cpu_attention, "find_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="none was found"):
        cpu_attention.build()


def test_a_failed_native_build_is_logged(tmp_path, monkeypatch, caplog):
    """A source the native flags cannot build (as an AMX intrinsic given a tile number that is no constant was)
    still loads through the portable flags, and the log says so with the compiler's output; the failed
    compile is remembered, so a later build (another process) falls back without compiling again."""
    monkeypatch.setenv("HEADINFER_CACHE_DIR", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    compiler = tmp_path / "fake-c++"
    compiler.write_text(  # refuses -march=native; else writes an empty "library" to the path after -o
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "fake c++ 1.0"; exit 0; fi\n'
        f'echo "$@" >> {calls}\n'
        'case "$*" in *-march=native*) echo "Error: bad register name"; exit 1;; esac\n'
        'while [ "$1" != "-o" ]; do shift; done; : > "$2"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    for attempt in range(2):  # built, then from the cache: said both times
        caplog.clear()
        with caplog.at_level("WARNING", logger=cpu_attention.logger.name):
            path = cpu_attention.build()
        assert path.exists() and "-march=native failed" in caplog.text and "bad register name" in caplog.text
        assert ("output of an earlier build" in caplog.text) == (attempt == 1)
    compiles = calls.read_text().splitlines()
    assert len(compiles) == 2 and "-march=native" in compiles[0]  # native once, portable once


def test_torch_thread_count_is_the_default(monkeypatch):
    case = Case([3000], heads=1, query_per_kv=1, block_size=2, seed=53)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = case.run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, case.run(num_threads=1))
    assert math.isfinite(relative_error(single, case.reference()))
