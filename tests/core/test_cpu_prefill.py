"""The CPU paged prefill kernel (``cpu_attention.prefill_attention_units``) against a dense float64 reference.

Requests have chunks of ``query_lens`` tokens at the end of ``seq_lens`` keys (a whole prompt, a
later chunk of one, a single token), on shuffled, interleaved blocks. Every key slot that no chunk
token may see holds NaN (past a sequence, before the window of its chunk's first token, blocks no
request owns), and every query row of no chunk holds a sentinel that must survive: the checks prove
what is not read or written as well as the values.

Every test runs on each instruction path this compiler and CPU can build (the ``isa`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from headinfer_vllm.core import cpu_attention
from headinfer_vllm.core.kernels import PREFILL_ENV, CpuKernel, cpu_prefill_path
from tests.core.test_cpu_attention import ISA_PATHS, TOLERANCE, relative_error

pytestmark = pytest.mark.skipif(
    cpu_attention.find_compiler() is None, reason="no C++ compiler ($CXX, c++, g++ or clang++) to build the kernel"
)

SENTINEL = 7.0
"""Output rows of no chunk start as this and must stay so."""


@pytest.fixture(autouse=True, params=ISA_PATHS or ["auto"])
def isa(request, monkeypatch) -> str:
    """The instruction path every kernel call of the test takes."""
    monkeypatch.setenv(cpu_attention.ISA_ENV, request.param)
    return request.param


class PrefillCase:
    """Requests of ``seq_lens`` keys whose last ``query_lens`` tokens are the chunk, their rows in
    ``query`` in shuffled order with a spare row before each chunk (a row of no chunk)."""

    def __init__(self, seq_lens, query_lens, *, heads=2, query_per_kv=2, head_dim=64, block_size=16,
                 dtype=torch.float32, sliding_window=0, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.heads, self.query_per_kv, self.head_dim, self.block_size = heads, query_per_kv, head_dim, block_size
        self.dtype, self.sliding_window = dtype, sliding_window
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.query_lens = torch.tensor(query_lens, dtype=torch.int32)
        num_pages = [-(-length // block_size) for length in seq_lens]
        self.num_blocks = sum(num_pages) + 3
        ids = torch.randperm(self.num_blocks, generator=self.generator).tolist()
        order = sorted((page, r) for r, pages in enumerate(num_pages) for page in range(pages))
        max_pages = max(num_pages, default=0) + 2
        self.block_table = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
        self.block_table[:, -1] = self.num_blocks + 1000
        for index, (page, r) in enumerate(order):
            self.block_table[r, page] = ids[index]
        self.pages = torch.full((self.num_blocks, 2, block_size, heads, head_dim), float("nan"), dtype=dtype)
        for r, (length, count) in enumerate(zip(seq_lens, query_lens, strict=True)):
            keys = torch.arange(self.first_key(length, count), length)
            blocks = self.block_table[r, keys // block_size].long()
            self.pages[blocks, :, keys % block_size] = self.random((len(keys), 2, heads, head_dim))
        # Rows: a spare row, then the chunk, per request, requests in reverse order.
        starts, row = [0] * len(seq_lens), 0
        for r in reversed(range(len(seq_lens))):
            starts[r] = row + 1
            row += 1 + query_lens[r]
        self.query_starts = torch.tensor(starts, dtype=torch.int32)
        self.query = self.random((row, heads * query_per_kv, head_dim))
        self.scale = head_dim**-0.5

    def first_key(self, length: int, count: int) -> int:
        """The first key the chunk's first token sees."""
        return max(0, length - count - self.sliding_window + 1) if self.sliding_window else 0

    def random(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.dtype)

    def run(self, query=None, out=None, **kwargs) -> torch.Tensor:
        kwargs.setdefault("sliding_window", self.sliding_window)
        query = self.query if query is None else query
        if out is None:
            out = torch.full(query.shape, SENTINEL, dtype=self.dtype)
        return cpu_attention.prefill_attention_units(
            query, [(0, self.pages)], self.query_starts, self.query_lens, self.block_table, self.seq_lens,
            self.scale, query_per_kv=self.query_per_kv, out=out, **kwargs,
        )

    def chunk_rows(self) -> torch.Tensor:
        """Whether each query row belongs to a chunk."""
        rows = torch.zeros(self.query.shape[0], dtype=torch.bool)
        for start, count in zip(self.query_starts.tolist(), self.query_lens.tolist(), strict=True):
            rows[start : start + count] = True
        return rows

    def reference(self, *, logits_soft_cap=0.0, sinks=None, sliding_window=None) -> torch.Tensor:
        """Dense causal attention in float64, the chunks' rows only (others zero)."""
        window = self.sliding_window if sliding_window is None else sliding_window
        out = torch.zeros(self.query.shape, dtype=torch.float64)
        heads, per_kv, head_dim = self.heads, self.query_per_kv, self.head_dim
        for r, (length, count) in enumerate(zip(self.seq_lens.tolist(), self.query_lens.tolist(), strict=True)):
            if count == 0:
                continue
            blocks = self.block_table[r, : -(-length // self.block_size)].long()
            kv = self.pages[blocks].double().transpose(0, 1).reshape(2, -1, heads, head_dim)[:, :length]
            start = int(self.query_starts[r])
            positions = torch.arange(length - count, length)[:, None]  # [count, 1]
            keys = torch.arange(length)
            visible = (keys <= positions) & ((keys > positions - window) if window else True)  # [count, L]
            q = self.query[start : start + count].double().view(count, heads, per_kv, head_dim)
            scores = torch.einsum("nhqd,lhd->hqnl", q, kv[0]) * self.scale
            if logits_soft_cap:
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
            scores = scores.masked_fill(~visible, float("-inf"))
            top = scores.amax(-1, keepdim=True)
            if sinks is not None:
                sink = sinks.double().view(heads, per_kv, 1, 1)
                top = torch.maximum(top, sink)
            weights = torch.exp(scores - top)
            denominator = weights.sum(-1, keepdim=True)
            if sinks is not None:
                denominator = denominator + torch.exp(sink - top)
            # NaN K/V of keys no token sees (before the first window) weigh 0 but would poison 0 * NaN.
            values = kv[1].nan_to_num(0.0)
            result = torch.einsum("hqnl,lhd->nhqd", weights / denominator, values)
            out[start : start + count] = result.reshape(count, heads * per_kv, head_dim)
        return out


def check(case: PrefillCase, tolerance: float | None = None, **kwargs) -> torch.Tensor:
    output = case.run(**kwargs)
    kwargs.pop("num_threads", None)
    rows = case.chunk_rows()
    assert torch.isfinite(output[rows]).all()
    assert (output[~rows] == SENTINEL).all()
    assert relative_error(output[rows], case.reference(**kwargs)[rows]) <= (tolerance or TOLERANCE[case.dtype])
    return output


WORKLOAD = ([37, 130, 16, 5, 300], [37, 130, 16, 1, 41])
"""Whole prompts (one shorter than a page, one of exactly one page), a single token, and a chunk at the
end of a longer sequence."""


@pytest.mark.parametrize("query_per_kv", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_fp32_shapes(query_per_kv, head_dim):
    check(PrefillCase(*WORKLOAD, heads=2, query_per_kv=query_per_kv, head_dim=head_dim, seed=head_dim + query_per_kv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("query_per_kv", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_half_precision_shapes(dtype, query_per_kv, head_dim):
    check(PrefillCase(*WORKLOAD, heads=2, query_per_kv=query_per_kv, head_dim=head_dim, dtype=dtype, seed=3))


@pytest.mark.parametrize("block_size", [5, 16, 24])
@pytest.mark.parametrize("query_per_kv", [3, 16])
def test_bf16_items_and_key_blocks_across_pages(block_size, query_per_kv):
    """bf16 chunks long enough for several items per request and head (the AMX path's items hold 1,024 rows:
    341 tokens of 3 query heads, then a partial group; 64 tokens of 16), more keys than the AMX path packs at
    once (512), key blocks of 32 that straddle pages of 5 or 24 tokens."""
    check(PrefillCase([700, 190, 33], [600, 190, 2], heads=2, query_per_kv=query_per_kv, head_dim=64,
                      block_size=block_size, dtype=torch.bfloat16, sliding_window=0, seed=block_size + query_per_kv))


def test_torch_sdpa_before_and_after_the_kernel(isa):
    """torch's bf16 SDPA (AMX tiles through oneDNN where the CPU has them) gives the same output around a
    kernel call that configures and releases the tiles on the same thread."""
    case = PrefillCase([300], [300], heads=2, query_per_kv=4, head_dim=64, dtype=torch.bfloat16, seed=47)
    query = torch.randn(1, 8, 256, 64, generator=case.generator).to(torch.bfloat16)
    keys, values = (torch.randn(1, 8, 256, 64, generator=case.generator).to(torch.bfloat16) for _ in range(2))

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=True)

    before = sdpa()
    check(case, num_threads=1)
    assert torch.equal(sdpa(), before)


def test_prefill_instruction_paths(isa):
    """bf16 prefill takes AMX tiles in the default and ``amx`` builds where the CPU and Linux allow them, else
    VDPBF16PS where the CPU has AVX-512 BF16 (always in the ``avx512bf16`` and ``avx512bf16pv`` builds); FMAs in
    the ``avx512`` build."""
    path = cpu_attention.prefill_instruction_path()
    if isa in ("avx512", "portable", "avx512bf16"):
        assert path == isa
    elif isa == "avx512bf16pv":
        assert path == "avx512bf16"
    elif isa == "amx":
        assert path == ("amx" if torch.cpu._is_amx_tile_supported() else "avx512bf16")
    else:
        assert path in ("amx", "avx512bf16", cpu_attention.instruction_path())


@pytest.mark.parametrize("head_dim", [1, 8, 24, 40])
@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_head_dims_and_page_sizes_off_the_vector_width(head_dim, block_size):
    check(PrefillCase([70, 9], [70, 4], heads=1, query_per_kv=3, head_dim=head_dim, block_size=block_size, seed=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 15, 16, 17, 100, 10_000])
def test_sliding_window_reads_no_page_outside_it(dtype, window):
    check(PrefillCase(*WORKLOAD, dtype=dtype, sliding_window=window, seed=window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_soft_cap(dtype):
    case = PrefillCase(*WORKLOAD, dtype=dtype, seed=17)
    case.query.mul_(4)  # scores past the cap
    check(case, logits_soft_cap=5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sink_scale", [0.0, 3.0, 30.0])
def test_sinks_join_the_denominator(dtype, sink_scale):
    case = PrefillCase(*WORKLOAD, dtype=dtype, seed=19)
    sinks = torch.randn(case.heads * case.query_per_kv, generator=case.generator) * sink_scale
    check(case, sinks=sinks)


@pytest.mark.parametrize("window", [0, 600])
@pytest.mark.parametrize("soft_cap", [0.0, 8.0])
def test_bf16_long_requests_with_every_variant(window, soft_cap):
    """bf16 requests longer than the AMX path packs at once (512 keys) and than its items (1,024 rows), with
    windows that start inside a packed range, soft-capping and sinks."""
    case = PrefillCase([1500, 700], [900, 700], heads=2, query_per_kv=4, head_dim=128, dtype=torch.bfloat16,
                       sliding_window=window, seed=29 + window)
    sinks = torch.randn(8, generator=case.generator)
    check(case, logits_soft_cap=soft_cap, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.0, -0.2])
def test_scales_of_any_sign(dtype, scale):
    """A scale of 0 or below (no model has one; the AMX path scales inside its exponent only for a positive one)."""
    case = PrefillCase(*WORKLOAD, dtype=dtype, seed=31)
    case.scale = scale
    check(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_all_variants_at_once(dtype, num_threads):
    case = PrefillCase([200, 90, 64], [150, 90, 3], heads=4, query_per_kv=4, head_dim=128, dtype=dtype,
                       sliding_window=48, seed=23)
    sinks = torch.randn(16, generator=case.generator)
    check(case, logits_soft_cap=8.0, sinks=sinks, num_threads=num_threads)


def test_thread_counts_give_equal_outputs():
    case = PrefillCase([400, 250], [400, 120], heads=2, query_per_kv=4, head_dim=64, dtype=torch.bfloat16, seed=29)
    assert torch.equal(case.run(num_threads=1), case.run(num_threads=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_query_and_output(dtype):
    case = PrefillCase(*WORKLOAD, heads=2, query_per_kv=2, dtype=dtype, seed=31)
    wide = torch.zeros(case.query.shape[0], 9, 70, dtype=dtype)  # [rows, heads, D] views with other strides
    query = wide[:, 2:6, 3:67]
    query.copy_(case.query)
    out_storage = torch.full((case.query.shape[0], 5, 64), SENTINEL, dtype=dtype)
    out = out_storage[:, 1:]
    case.run(query=query, out=out)
    rows = case.chunk_rows()
    assert relative_error(out[rows], case.reference()[rows]) <= TOLERANCE[dtype]
    assert (out_storage[:, 0] == SENTINEL).all() and (out[~rows] == SENTINEL).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_units_of_a_layer_in_one_call(dtype):
    """Two units (KV heads 0-1 and 2) of one layer; query heads of KV head 3 in no unit stay untouched."""
    case = PrefillCase(*WORKLOAD, heads=4, query_per_kv=2, head_dim=64, dtype=dtype, seed=37)
    first, second = case.pages[:, :, :, :2].contiguous(), case.pages[:, :, :, 2:3].contiguous()

    def attend(units):
        out = torch.full(case.query.shape, SENTINEL, dtype=dtype)
        return cpu_attention.prefill_attention_units(
            case.query, units, case.query_starts, case.query_lens, case.block_table, case.seq_lens,
            64**-0.5, query_per_kv=2, out=out,
        )

    units = [(0, first), (2, second)]
    out = attend(units)
    rows = case.chunk_rows()
    expected = case.reference()
    assert relative_error(out[rows, :6], expected[rows, :6]) <= TOLERANCE[dtype]
    assert (out[:, 6:] == SENTINEL).all()
    assert torch.equal(attend(cpu_attention.KernelUnits(units)), out)  # the units made once: the same


def test_one_decode_token_equals_the_decode_kernel():
    """A chunk of one token is decode: both kernels agree to fp32 rounding."""
    case = PrefillCase([300, 45, 700], [1, 1, 1], heads=2, query_per_kv=4, head_dim=128, seed=41)
    prefill = case.run()[case.query_starts.long()]
    decode = cpu_attention.decode_attention(case.query[case.query_starts.long()], case.pages, case.block_table,
                                            case.seq_lens, 128**-0.5)
    assert relative_error(prefill, decode.double()) <= TOLERANCE[torch.float32]


def test_tolerance_catches_a_shifted_causal_mask():
    """A kernel that let each token see one key more (or one less) fails the tolerance."""
    case = PrefillCase([60], [60], heads=1, query_per_kv=1, head_dim=64, seed=43)
    output = case.run()
    shifted = case.reference(sliding_window=59)  # the last token sees one key fewer; the others as before
    assert relative_error(output, shifted) > 10 * TOLERANCE[torch.float32]


def test_bad_inputs_are_refused():
    case = PrefillCase([20, 3], [5, 3], seed=47)
    with pytest.raises(ValueError, match="outside"):
        table = case.block_table.clone()
        table[0, 1] = case.num_blocks
        case.block_table = table
        case.run()
    case = PrefillCase([20, 3], [5, 3], seed=47)
    case.query_lens[1] = 4  # longer than its sequence
    with pytest.raises(ValueError, match="chunk is longer"):
        case.run()
    case = PrefillCase([20, 3], [5, 3], seed=47)
    case.query_starts[0] = case.query.shape[0] - 2
    with pytest.raises(ValueError, match="outside the query"):
        case.run()
    with pytest.raises(ValueError, match="int32"):
        cpu_attention.prefill_attention_units(
            case.query, [(0, case.pages)], case.query_starts.long(), case.query_lens, case.block_table,
            case.seq_lens, 1.0, query_per_kv=2,
        )


# CpuKernel's prefill path, end to end through the engine -------------------------------------


@pytest.mark.parametrize("prefill", ["kernel", "sdpa"])
@pytest.mark.parametrize(("dtype", "query_per_kv", "head_dim", "head_group_size", "residency", "pattern"), [
    (torch.float32, 2, 80, 2, "none", "gpt_oss"),
    (torch.float32, 4, 64, 4, "partial", "gemma2"),
    (torch.bfloat16, 4, 32, 2, "all", "windows"),
    (torch.float16, 2, 64, 1, "partial", "gpt_oss"),
])
def test_cpu_kernel_prefill_paths_match_the_reference(monkeypatch, isa, prefill, dtype, query_per_kv, head_dim,
                                                      head_group_size, residency, pattern):
    """Mixed prefill and decode steps through CpuKernel with each prefill path ($HEADINFER_CPU_PREFILL)."""
    from tests.core.test_variants import FIRST, HISTORY, SECOND, run_steps, variant_scenario
    from tests.core.test_variants import TOLERANCE as STEP_TOLERANCE

    if isa not in ("avx512", "portable", "auto") and prefill == "sdpa":
        pytest.skip("the SDPA prefill path does not depend on the kernel's instruction path")
    monkeypatch.setenv(PREFILL_ENV, prefill)
    num_units = 4 * (4 // head_group_size)
    scenario = variant_scenario(
        pattern, device="cpu", dtype=dtype, query_per_kv=query_per_kv, head_dim=head_dim,
        head_group_size=head_group_size,
        num_resident_units={"none": 0, "partial": num_units // 2, "all": num_units}[residency], seed=head_dim,
    )
    scenario.cpu_kernel = True
    assert run_steps(scenario, [FIRST, SECOND], HISTORY) <= STEP_TOLERANCE[dtype]
    assert scenario.attention.kernel_name == "cpu"


@pytest.mark.parametrize("amx_cpu", [True, False])
@pytest.mark.parametrize("kernel_prefill", ["amx", "avx512"])
def test_prefill_path_rule(monkeypatch, amx_cpu, kernel_prefill):
    """bf16 prefill goes through SDPA only on a CPU with AMX tiles that the kernel's prefill does not use."""
    monkeypatch.delenv(PREFILL_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx_cpu)
    monkeypatch.setattr(cpu_attention, "prefill_instruction_path", lambda: kernel_prefill)
    assert cpu_prefill_path(torch.bfloat16) == ("sdpa" if amx_cpu and kernel_prefill != "amx" else "kernel")
    assert cpu_prefill_path(torch.float32) == cpu_prefill_path(torch.float16) == "kernel"
    monkeypatch.setenv(PREFILL_ENV, "kernel")
    assert cpu_prefill_path(torch.bfloat16) == "kernel"
    monkeypatch.setenv(PREFILL_ENV, "sdpa")
    assert CpuKernel(scale=1.0, query_per_kv=1, dtype=torch.float32).prefill_path == "sdpa"
    monkeypatch.setenv(PREFILL_ENV, "fast")
    with pytest.raises(ValueError, match="auto, kernel, sdpa"):
        cpu_prefill_path(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_path_sends_short_chunks_to_the_kernel(monkeypatch, isa, dtype):
    """With ``prefill="sdpa"``, chunks of at most KERNEL_MAX_QUERY_LEN tokens go through the C++ kernel in
    one call per unit, longer ones through SDPA one request at a time; the steps stay exact."""
    from headinfer_vllm.core import kernels as kernels_module

    if isa != (ISA_PATHS or ["auto"])[0]:
        pytest.skip("the routing does not depend on the kernel's instruction path")
    monkeypatch.setenv(PREFILL_ENV, "sdpa")
    monkeypatch.setattr(kernels_module, "KERNEL_MAX_QUERY_LEN", 12)
    kernel_chunks, sdpa_chunks = run_routed_steps(monkeypatch, dtype)
    assert set(map(tuple, kernel_chunks)) == {(2, 12)}  # the first step's short chunks, together
    assert set(sdpa_chunks) == {13, 40}


def run_routed_steps(monkeypatch, dtype: torch.dtype) -> tuple[list[list[int]], list[int]]:
    """Two steps through CpuKernel; the chunk lengths of each C++ prefill call, and those SDPA took."""
    from tests.core.test_variants import TOLERANCE as STEP_TOLERANCE
    from tests.core.test_variants import run_steps, variant_scenario

    kernel_chunks, sdpa_chunks = [], []
    prefill_units = cpu_attention.prefill_attention_units

    def counting_kernel(query, units, starts, query_lens, *args, **kwargs):
        kernel_chunks.append(sorted(query_lens.tolist()))
        return prefill_units(query, units, starts, query_lens, *args, **kwargs)

    attend_prefill = CpuKernel._attend_prefill

    def counting_sdpa(self, index, request, *args):
        sdpa_chunks.append(request.query_len)
        return attend_prefill(self, index, request, *args)

    monkeypatch.setattr(cpu_attention, "prefill_attention_units", counting_kernel)
    monkeypatch.setattr(CpuKernel, "_attend_prefill", counting_sdpa)
    scenario = variant_scenario("windows", device="cpu", dtype=dtype, query_per_kv=2, head_dim=64,
                                head_group_size=4, num_resident_units=4, seed=5)
    scenario.cpu_kernel = True
    # Per request: history, then two steps: chunks of 12 and 13, decodes, 2 and 40.
    assert run_steps(scenario, [[12, 13, 1, 2], [1, 1, 40, 1]], [20, 0, 30, 5]) <= STEP_TOLERANCE[dtype]
    assert scenario.attention.kernel_name == "cpu"
    return kernel_chunks, sdpa_chunks
