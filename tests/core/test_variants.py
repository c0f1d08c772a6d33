"""Per-layer attention variants (sliding windows, soft-capping, sinks) against a dense float64 reference.

The reference follows vLLM's semantics, one request at a time: the query at
absolute position ``p`` sees keys ``p - window < j <= p``;
scores ``scale * q . k`` are capped as ``cap * tanh(s / cap)`` before the
mask; a head's sink logit joins the softmax's denominator only.
"""

import sys
import types

import pytest
import torch

from headinfer_vllm.core import LayerAttention
from headinfer_vllm.core import kernels as kernels_module
from headinfer_vllm.core.kernels import FlashKernel, TorchKernel, select_kernel
from headinfer_vllm.core.plan import build_step_plan
from headinfer_vllm.core.staging import stage_pages
from tests.conftest import DEVICES
from tests.core.scenario import Scenario, relative_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
"""Relative to the largest output: float32 to its precision; half precision a few output roundings."""
CAP = 2.0
"""Small enough to bend scores of about unit size."""

# Per request: history, then the query tokens of two steps. Prompts longer than
# the windows (from scratch and on a prefix), decodes, chunks after decodes.
HISTORY = [37, 0, 130, 16, 75, 50]
FIRST = [12, 48, 1, 1, 75, 1]
SECOND = [1, 1, 20, 1, 1, 30]


def variant_reference(
    variant: LayerAttention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """query: [query_len, num_query_heads, D] at the end of keys, values: [seq_len, num_kv_heads, D].

    Returns [query_len, num_query_heads, D] float64.
    """
    query_len, num_query_heads, _ = query.shape
    seq_len, num_kv_heads = keys.shape[:2]
    # Query head h reads KV head h // (num_query_heads // num_kv_heads): [num_query_heads, seq_len, D].
    keys, values = (t.double().repeat_interleave(num_query_heads // num_kv_heads, 1).transpose(0, 1)
                    for t in (keys, values))
    query_positions = torch.arange(seq_len - query_len, seq_len)[:, None]
    key_positions = torch.arange(seq_len)[None, :]
    seen = key_positions <= query_positions  # [query_len, seq_len]
    if variant.sliding_window is not None:
        seen &= key_positions > query_positions - variant.sliding_window
    scores = scale * (query.double().transpose(0, 1) @ keys.transpose(1, 2))  # [heads, query_len, seq_len]
    if variant.logits_soft_cap is not None:
        scores = variant.logits_soft_cap * torch.tanh(scores / variant.logits_soft_cap)
    scores = scores.masked_fill(~seen, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    if variant.sinks is not None:
        sink = variant.sinks.double().cpu()[:, None, None]  # [heads, 1, 1]
        top = torch.maximum(top, sink)
    weights = (scores - top).exp()
    denominator = weights.sum(-1, keepdim=True)
    if variant.sinks is not None:
        denominator = denominator + (sink - top).exp()
    return (weights @ values / denominator).transpose(0, 1)


def make_layers(pattern: str, num_query_heads: int, dtype: torch.dtype, device: str) -> list[LayerAttention]:
    """Four layers. Sinks start at zero: the test fills them after the engine is built, as vLLM loads weights."""

    def sinks():
        return torch.zeros(num_query_heads, dtype=dtype, device=device)

    return {
        # Gemma-2: local and global layers alternate, every one capped.
        "gemma2": [LayerAttention(24, CAP), LayerAttention(None, CAP)] * 2,
        # gpt-oss: local and global layers alternate, every one with sinks.
        "gpt_oss": [LayerAttention(7, sinks=sinks()), LayerAttention(sinks=sinks())] * 2,
        # Windows alone (torch's SDPA path), a one-token window, and everything together.
        "windows": [LayerAttention(24), LayerAttention(), LayerAttention(1), LayerAttention(40, CAP, sinks())],
    }[pattern]


def fill_sinks(layers: list[LayerAttention], generator: torch.Generator) -> None:
    for variant in layers:
        if variant.sinks is not None:
            # Around the log of a softmax denominator over tens of keys: the sinks weigh.
            values = 3.0 + 2.0 * torch.randn(variant.sinks.shape, generator=generator)
            variant.sinks.copy_(values.to(variant.sinks.dtype))


def variant_scenario(pattern: str, **fields) -> Scenario:
    fields.setdefault("num_layers", 4)
    scenario = Scenario(**fields)
    scenario.layers = make_layers(
        pattern, scenario.num_kv_heads * scenario.query_per_kv, scenario.dtype, scenario.device
    )
    scenario.reference = lambda layer, *args: variant_reference(scenario.layers[layer], *args)
    return scenario


def run_steps(scenario: Scenario, steps: list[list[int]], history: list[int]) -> float:
    """The largest relative error over the steps."""
    scenario.build([h + sum(step[r] for step in steps) for r, h in enumerate(history)])
    fill_sinks(scenario.layers, scenario.generator)
    scenario.write_history(history)
    worst = 0.0
    for query_lens in steps:
        output, reference = scenario.step(query_lens)
        assert torch.isfinite(output).all()
        worst = max(worst, relative_error(output, reference))
    return worst


CASES = [
    # dtype, query_per_kv, head_dim, head_group_size, residency, pattern
    (torch.float32, 1, 64, 1, "partial", "gemma2"),
    (torch.float32, 2, 80, 2, "none", "gpt_oss"),
    (torch.float32, 4, 32, 1, "all", "windows"),
    (torch.float32, 4, 64, 4, "partial", "gpt_oss"),
    (torch.float32, 2, 32, 1, "partial", "windows"),
    (torch.float32, 1, 80, 2, "partial", "gemma2"),
    (torch.bfloat16, 2, 64, 1, "partial", "gemma2"),
    (torch.bfloat16, 4, 32, 2, "none", "gpt_oss"),
    (torch.bfloat16, 4, 80, 1, "partial", "windows"),
    (torch.float16, 2, 80, 2, "partial", "gpt_oss"),
    (torch.float16, 1, 64, 1, "all", "windows"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "query_per_kv", "head_dim", "head_group_size", "residency", "pattern"), CASES)
def test_variants_match_the_reference(device, dtype, query_per_kv, head_dim, head_group_size, residency, pattern):
    num_units = 4 * (4 // head_group_size)
    scenario = variant_scenario(
        pattern, device=device, dtype=dtype, query_per_kv=query_per_kv, head_dim=head_dim,
        head_group_size=head_group_size,
        num_resident_units={"none": 0, "partial": num_units // 2, "all": num_units}[residency],
        seed=head_dim + 7 * query_per_kv + 31 * head_group_size,
    )
    assert run_steps(scenario, [FIRST, SECOND], HISTORY) <= TOLERANCE[dtype]


@pytest.mark.parametrize(("dtype", "query_per_kv", "head_dim", "head_group_size", "residency", "pattern"), CASES)
def test_cpu_kernel_matches_the_reference(dtype, query_per_kv, head_dim, head_group_size, residency, pattern):
    """The same steps with decode tokens through the C++ kernel, reading the pages in place."""
    from headinfer_vllm.core import cpu_attention

    if not cpu_attention.is_available():
        pytest.skip("no C++ compiler with OpenMP for the CPU kernel")
    num_units = 4 * (4 // head_group_size)
    scenario = variant_scenario(
        pattern, device="cpu", dtype=dtype, query_per_kv=query_per_kv, head_dim=head_dim,
        head_group_size=head_group_size,
        num_resident_units={"none": 0, "partial": num_units // 2, "all": num_units}[residency],
        seed=head_dim + 7 * query_per_kv + 31 * head_group_size,
    )
    scenario.cpu_kernel = True
    assert run_steps(scenario, [FIRST, SECOND], HISTORY) <= TOLERANCE[dtype]
    assert scenario.attention.kernel_name == "cpu"


def test_a_window_off_by_one_is_caught():
    """The half-precision check is sharp enough to see a window one token too wide."""
    scenario = variant_scenario("gemma2", dtype=torch.bfloat16, query_per_kv=2)
    wider = [LayerAttention(24 + 1, CAP), LayerAttention(None, CAP)] * 2
    scenario.reference = lambda layer, *args: variant_reference(wider[layer], *args)
    assert run_steps(scenario, [FIRST, SECOND], HISTORY) > 4 * TOLERANCE[torch.bfloat16]


def test_a_wrong_sink_head_is_caught():
    scenario = variant_scenario("gpt_oss", dtype=torch.bfloat16, query_per_kv=2)
    scenario.build([h + a for h, a in zip(HISTORY, FIRST, strict=True)])
    fill_sinks(scenario.layers, scenario.generator)
    rolled = [LayerAttention(v.sliding_window, sinks=v.sinks.roll(1)) for v in scenario.layers]
    scenario.reference = lambda layer, *args: variant_reference(rolled[layer], *args)
    scenario.write_history(HISTORY)
    output, reference = scenario.step(FIRST)
    assert relative_error(output, reference) > 4 * TOLERANCE[torch.bfloat16]


def pages_in_window(seq_len: int, query_len: int, window: int | None, block_size: int) -> range:
    """Page indices, in the request's sequence, holding a key that one of its queries sees."""
    first_key = 0 if window is None else max(0, seq_len - query_len - window + 1)
    return range(first_key // block_size, -(-seq_len // block_size))


def test_streamed_window_layers_load_only_pages_in_their_window():
    """Counted over every load of the step; out-of-window pages poisoned with NaN are never read either."""
    window = 20
    windows = [window, None, 1000]  # a window longer than every sequence loads what no window does
    scenario = Scenario(num_layers=3, num_kv_heads=2, query_per_kv=2, block_size=16, spare_blocks=3)
    scenario.layers = [LayerAttention(w) for w in windows]
    scenario.reference = lambda layer, *args: variant_reference(scenario.layers[layer], *args)
    history, query_lens = [100, 0, 64, 33], [1, 40, 17, 1]
    seq_lens = [h + n for h, n in zip(history, query_lens, strict=True)]
    scenario.build(seq_lens)
    scenario.write_history(history)
    # in_window[i][r]: block ids of request r's pages that layer i reads.
    in_window = [
        [[scenario.block_ids[r][page] for page in pages_in_window(seq_lens[r], query_lens[r], w, 16)]
         for r in range(len(seq_lens))]
        for w in windows
    ]
    read_by_layer_0 = {block for blocks in in_window[0] for block in blocks}
    out_of_window = sorted(set().union(*scenario.block_ids) - read_by_layer_0)
    assert out_of_window  # the case leaves pages out
    for group in range(scenario.layout.num_groups):
        scenario.store.host_unit(0, group)[out_of_window] = float("nan")

    output, reference = scenario.step(query_lens)

    assert relative_error(output, reference) <= TOLERANCE[torch.float32]
    pages_per_layer = [sum(len(blocks) for blocks in layer) for layer in in_window]
    assert pages_per_layer[0] < pages_per_layer[1] == pages_per_layer[2]
    assert scenario.attention.transfers.pages_loaded == scenario.layout.num_groups * sum(pages_per_layer)
    staging = stage_pages(scenario.plan, scenario.layout.num_blocks, window)
    assert sorted(staging.load_pages.tolist()) == sorted(read_by_layer_0)


def test_window_staging_leaves_out_pages_before_every_window():
    plan = build_step_plan(
        query_start_loc=torch.tensor([0, 3, 4]),
        seq_lens=torch.tensor([6, 9]),  # 2 and 3 pages of 4 tokens
        block_table=torch.tensor([[7, 8, 99], [2, 3, 4]]),
        slot_mapping=torch.tensor([8 * 4 + 1, 8 * 4 + 2, 8 * 4 + 3, 4 * 4 + 0]),
        block_size=4,
        device="cpu",
    )
    # Window 2: request 0's queries at 3..5 see keys from 2 on (pages 0, 1); request 1's query at 8
    # sees keys 7, 8 (pages 1, 2): block 2 is left out.
    staging = stage_pages(plan, num_blocks=100, window=2)
    assert staging.load_pages.tolist() == [3, 4, 7, 8]
    # Blocks 3, 4, 7, 8 at positions 0..3; block 2's entry points at some loaded page, never read.
    assert staging.table.block_table[0, :2].tolist() == [2, 3]
    assert staging.table.block_table[1, 1:].tolist() == [0, 1]
    assert 0 <= staging.table.block_table[1, 0].item() < 4
    assert staging.table.new_rows.tolist() == [25, 29, 26, 30, 27, 31, 8, 12]
    # Window 5 shows request 1's query keys 4..8, no earlier page either; window 6 reaches block 2.
    assert stage_pages(plan, num_blocks=100, window=5).load_pages.tolist() == [3, 4, 7, 8]
    assert stage_pages(plan, num_blocks=100, window=6).load_pages.tolist() == [2, 3, 4, 7, 8]


def emulated_flash_attn_varlen_func(
    *, q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale, causal, block_table, out,
    fa_version, window_size=None, softcap=0.0, s_aux=None,
):
    """vLLM's FlashAttention as documented, on CPU: query ``i`` of a request with ``sq`` queries and ``sk``
    keys sees keys ``i + sk - sq - window_size[0] .. i + sk - sq + window_size[1]`` (-1: unbounded), and
    ``i + sk - sq`` at most when causal; ``s_aux[h]`` joins head ``h``'s softmax denominator."""
    assert causal and fa_version == 3
    left, right = window_size if window_size is not None else (-1, -1)
    right = 0 if causal else right
    block_size, num_kv_heads = k.shape[1], k.shape[2]
    per_kv = q.shape[1] // num_kv_heads
    starts = cu_seqlens_q.tolist()
    for request, num_keys in enumerate(seqused_k.tolist()):
        rows = slice(starts[request], starts[request + 1])
        num_queries = rows.stop - rows.start
        pages = block_table[request, : -(-num_keys // block_size)].long()
        keys = k[pages].reshape(-1, num_kv_heads, k.shape[-1])[:num_keys].double()
        values = v[pages].reshape(-1, num_kv_heads, v.shape[-1])[:num_keys].double()
        diagonal = torch.arange(num_queries)[:, None] + num_keys - num_queries
        key_index = torch.arange(num_keys)[None, :]
        seen = key_index <= diagonal + right
        if left >= 0:
            seen &= key_index >= diagonal - left
        for head in range(q.shape[1]):
            scores = softmax_scale * q[rows, head].double() @ keys[:, head // per_kv].T
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~seen, float("-inf"))
            head_values = values[:, head // per_kv]
            if s_aux is not None:  # a key of score s_aux[h] and value 0
                scores = torch.cat((scores, s_aux[head].double().expand(num_queries, 1)), dim=1)
                head_values = torch.cat((head_values, head_values.new_zeros(1, head_values.shape[1])))
            out[rows, head] = (scores.softmax(-1) @ head_values).to(out.dtype)


@pytest.mark.parametrize("pattern", ["gemma2", "gpt_oss", "windows"])
def test_flash_kernel_passes_the_variants_as_vllm_does(monkeypatch, pattern):
    """The FlashKernel's arguments, checked end to end through an emulation of the function it calls."""
    fake = types.ModuleType("vllm.vllm_flash_attn")
    fake.flash_attn_varlen_func = emulated_flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fake)
    scenario = variant_scenario(pattern, query_per_kv=2, head_group_size=1, num_resident_units=8)
    steps = [FIRST, SECOND]
    scenario.build([h + a + b for h, a, b in zip(HISTORY, *steps, strict=True)])
    attention = scenario.attention
    attention._kernel = FlashKernel(version=3, scale=attention.scale, query_per_kv=2)
    # FlashAttention reads keys by tiles, masked ones included, through the page table; their values must
    # be finite, as in host memory fresh from the system, not in the recycled memory of a test process.
    scenario.store.host.zero_()
    fill_sinks(scenario.layers, scenario.generator)
    scenario.write_history(HISTORY)
    for query_lens in steps:
        output, reference = scenario.step(query_lens)
        assert relative_error(output, reference) <= TOLERANCE[torch.float32]


def test_sinks_need_flash_attention_3_and_bfloat16(monkeypatch):
    monkeypatch.setattr(kernels_module, "FlashKernel", lambda **kwargs: kwargs)
    monkeypatch.setattr(kernels_module, "sdpa_needs_expanded_heads", lambda *args: False)

    def select(version, sinks_dtypes):
        return select_kernel(
            torch.device("cuda"), torch.bfloat16, 16, 64, scale=0.125, query_per_kv=2,
            flash_version=version, sinks_dtypes=sinks_dtypes,
        )

    assert isinstance(select(2, {torch.bfloat16}), TorchKernel)
    assert isinstance(select(3, {torch.float32}), TorchKernel)
    assert isinstance(select(3, {torch.bfloat16, torch.float32}), TorchKernel)
    assert select(3, {torch.bfloat16})["version"] == 3
    assert select(2, ())["version"] == 2


def test_invalid_variants_are_refused():
    with pytest.raises(ValueError, match="sliding_window"):
        LayerAttention(sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        LayerAttention(logits_soft_cap=0.0)
    with pytest.raises(ValueError, match="1-D"):
        LayerAttention(sinks=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="4 logits for 8 query heads"):
        Scenario(layers=[LayerAttention(sinks=torch.zeros(4))] * 2, query_per_kv=2).build([10])
    with pytest.raises(ValueError, match="3 layer variants for 2 layers"):
        Scenario(layers=[LayerAttention()] * 3).build([10])
