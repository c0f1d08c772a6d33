"""End to end, every attention layout: headinfer's generations equal vLLM's stock CPU backend.

One tiny random float32 model per layout (``headinfer_vllm.tiny_models``):
a uniform sliding window (Mistral, Phi-3), Gemma-2's alternating window and
full layers with logits soft-capping, Gemma-3's five windowed layers to one
full, gpt-oss's attention sinks with alternating windows and a mixture of
experts, and Qwen3's q/k norms. Every window is far shorter than the
prompts, whose prefill runs in 128-token chunks, and a second batch reuses
the first batch's prefix (prefix caching). Both backends run with vLLM's
defaults: its hybrid KV-cache manager gives windowed layers KV-cache groups
of their own and frees their pages as they leave the window.
"""

import random

import pytest

pytest.importorskip("vllm")

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.tiny_models import SHAPE, save_tiny_model
from tests.vllm.stock_comparison import LOGPROB_TOLERANCE, assert_same_generations

pytestmark = pytest.mark.vllm

BLOCK_SIZE = 32  # vLLM's stock backend gives windowed layers blocks of at least 32 tokens
NUM_BLOCKS = 160
FREED = ", windowed layers free their pages as they leave the window"
KEPT = ", windowed layers keep every page, 83% of the host tier (they read only the pages in their window)"
LAYOUTS = {
    "mistral_window": "sliding window 45 in 6 of 6 layers" + FREED,
    "phi3": "sliding window 63 in 6 of 6 layers" + FREED,
    "gemma2": "sliding window 37 in 3 of 6 layers, soft-cap 10.0 in 6 of 6 layers" + FREED,
    "gemma3": "sliding window 50 in 5 of 6 layers" + FREED,
    "gpt_oss": "sliding window 40 in 3 of 6 layers, sinks in 6 of 6 layers" + FREED,
    "qwen3": "",
}
"""What the worker's log must report of each model's layers (the models' configs; vLLM passes
Gemma-3 no soft-cap, and gpt-oss windows its even layers)."""
UNIFORM_WINDOW = ("mistral_window", "phi3")
KV_CACHE_GROUPS = {"gemma2": (2, 3), "gemma3": (6, 1), "gpt_oss": (2, 3)}
"""(groups, slots) of the hybrid layouts as vLLM's hybrid KV-cache manager groups them: windowed and full
layers in groups of as many layers as the rarer kind has (Gemma-3: 1 full layer, so 6 groups of one);
the ``i``-th layers of all groups share slot ``i``. A uniform window is one group."""
BYTES_PER_BLOCK = SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * 2 * BLOCK_SIZE * SHAPE["head_dim"] * 4


LOGPROB_TOLERANCES = {"gpt_oss": 1e-3}
"""Where float32 noise outside attention exceeds the default 1e-4: in the tiny gpt-oss (its mixture of
experts), vLLM's stock backend and transformers' eager attention differ by up to 3.7e-4 and headinfer
and transformers by up to 3.3e-4 (headinfer and stock: 3.1e-4), with equal greedy tokens. A wrong
window or sink moves these logits by 8 to 15."""


def prompts(seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)]

    shared = tokens(200)
    first = [tokens(900), tokens(300), shared + tokens(40), tokens(45), tokens(5), shared + tokens(70)]
    return [first, [shared + tokens(30)]]


def engine(backend: str, in_place: bool = False, one_table: bool = False) -> dict:
    """``one_table``: vLLM's hybrid KV-cache manager off, every layer over one block table."""
    common = dict(
        dtype="float32", max_model_len=1024, block_size=BLOCK_SIZE, enforce_eager=True, seed=0,
        enable_chunked_prefill=True, max_num_batched_tokens=128, long_prefill_token_threshold=64,
        enable_prefix_caching=True, disable_hybrid_kv_cache_manager=one_table,
    )
    if backend == "stock":
        return {**common, "kv_cache_memory_bytes": 64 << 20}
    settings = {"headinfer": {"cpu_kv_cache_gib": NUM_BLOCKS * BYTES_PER_BLOCK / 2**30,
                              "cpu_attention": "auto" if in_place else "off"}}
    return {**common, "attention_backend": "headinfer", "additional_config": settings}


@pytest.fixture(scope="module", params=[*LAYOUTS, "gemma2-in-place", "gpt_oss-in-place", "gemma3-one-table"])
def runs(request, tmp_path_factory):
    """``-in-place``: the CPU platform's default, the KV attended where it lies by the C++ kernel.
    ``-one-table``: ``--disable-hybrid-kv-cache-manager`` in both backends."""
    family, _, variant = request.param.partition("-")
    in_place, one_table = variant == "in-place", variant == "one-table"
    model = save_tiny_model(tmp_path_factory.mktemp(request.param), family)
    spec = {"model": str(model), "batches": prompts(seed=len(family)), "max_tokens": 10, "logprobs": 3}
    results = {backend: run_in_subprocess({**spec, "engine": engine(backend, in_place, one_table)})
               for backend in ("stock", "headinfer")}
    return {**results, "family": family, "kernel": "cpu" if in_place else "sdpa", "one_table": one_table}


def test_tokens_and_logprobs_match_stock_backend(runs):
    tolerance = LOGPROB_TOLERANCES.get(runs["family"], LOGPROB_TOLERANCE)
    assert_same_generations(runs["stock"]["outputs"], runs["headinfer"]["outputs"], count=7, tolerance=tolerance)


def test_headinfer_ran_with_each_layers_variant_and_reused_the_prefix(runs):
    log = runs["headinfer"]["log"]
    store_lines = [line for line in log.splitlines() if "worker store ready" in line]
    assert store_lines, log[-4000:]
    layout = LAYOUTS[runs["family"]]
    kernel = f"kernel {runs['kernel']}"
    groups = ""
    if runs["one_table"]:  # every page stays in the host tier; NUM_BLOCKS blocks
        layout = layout.replace(FREED, KEPT)
        assert f"{NUM_BLOCKS} blocks of {BLOCK_SIZE} tokens" in log
    elif runs["family"] in KV_CACHE_GROUPS:
        # The whole budget in the shared slots: NUM_BLOCKS blocks of every layer, pooled.
        num_groups, slots = KV_CACHE_GROUPS[runs["family"]]
        blocks = NUM_BLOCKS * SHAPE["num_hidden_layers"] // slots
        groups = f"; {num_groups} KV-cache groups sharing {slots} slot{'s' if slots > 1 else ''} of {blocks} blocks"
    expected = f"{kernel}{groups}; {layout}" if layout else f"{kernel}{groups}"
    assert store_lines[0].rstrip().endswith(expected), store_lines
    # Both backends reuse what vLLM's KV-cache manager finds cached; with a uniform window alone, its
    # sliding-window manager finds no hit for these prompts, with either backend.
    cached = runs["headinfer"]["outputs"][-1]["cached_tokens"]
    assert cached == runs["stock"]["outputs"][-1]["cached_tokens"]
    assert cached > 0 or (runs["family"] in UNIFORM_WINDOW and not runs["one_table"])
