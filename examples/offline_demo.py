"""headinfer demo: a real model answers real questions, its KV cache paged per head in host memory, exactly.

SmolLM2-135M-Instruct (from the package registry, converted to a float32
checkpoint once: see :mod:`headinfer_vllm.real_models`) answers a few chat
questions, one of them about a whole essay, through vLLM with
``attention_backend="headinfer"``; the demo prints the answers, headinfer's
plan and KV memory, and checks that vLLM's stock backend produced the same
tokens and logprobs. Exit code 0 when they match.

    python examples/offline_demo.py
"""

import sys

from transformers import AutoTokenizer

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.real_models import SMOLLM2, chat_prompt, checkpoint, essays

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for writing clear code, one line each.",
]
ESSAY_QUESTION = "According to the essay above, what do hard liquor, cigarettes, heroin, and crack have in common?"
MAX_TOKENS = 40
CPU_KV_CACHE_GIB = 0.2  # host tier: sets the capacity (45 KiB of float32 K and V per token: about 4,600 tokens)
ENGINE = dict(dtype="float32", max_model_len=4096, enforce_eager=True, seed=0, max_num_batched_tokens=1024,
              enable_prefix_caching=False)


def main() -> int:
    model = checkpoint(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(model)
    essay = essays()[0]  # "The Acceleration of Addictiveness", about 1,700 tokens
    questions = [*QUESTIONS, f"{essay}\n\n{ESSAY_QUESTION}"]
    prompts = [chat_prompt(tokenizer, question) for question in questions]
    spec = {"model": str(model), "batches": [prompts], "max_tokens": MAX_TOKENS, "logprobs": 1}
    print(f"SmolLM2-135M-Instruct (float32) from {model}; prompts of {[len(p) for p in prompts]} tokens", flush=True)

    stock = run_in_subprocess({**spec, "engine": {**ENGINE, "kv_cache_memory_bytes": 256 << 20}})
    # The defaults of vLLM's CPU platform: headinfer's C++ kernel attends the host tier where it lies
    # (cpu_attention=auto). `"cpu_attention": "off"` streams head groups through a staging ring as on
    # CUDA: exact as well (tests/vllm/test_real_model.py), but several times slower on a CPU.
    settings = {"headinfer": {"cpu_kv_cache_gib": CPU_KV_CACHE_GIB}}
    ours = run_in_subprocess({**spec, "engine": {**ENGINE, "attention_backend": "headinfer",
                                                 "additional_config": settings}})
    for line in ours["log"].splitlines():
        if "headinfer: " in line:
            print("plan:", line.split("headinfer: ", 1)[1])
    tiers = ours["tiers"]
    # On vLLM's CPU platform the "device" is host memory: one tier, which the C++ kernel attends in place.
    print(f"KV cache, one tier in host memory: {(tiers['host_bytes'] + tiers['device_bytes']) / 2**20:.2f} MiB")

    worst = 0.0
    for index, (want, got) in enumerate(zip(stock["outputs"], ours["outputs"], strict=True)):
        match = want["tokens"] == got["tokens"]
        for want_step, got_step in zip(want["logprobs"], got["logprobs"], strict=True):
            worst = max(worst, *(abs(got_step.get(t, float("inf")) - v) for t, v in want_step.items()))
        essay_question = f"[the essay, {len(prompts[index])} tokens] {ESSAY_QUESTION}"
        shown = questions[index] if index < len(QUESTIONS) else essay_question
        print(f"\nQ{index}: {shown}\nA{index} (headinfer): {answer_text(tokenizer, got['tokens'])}")
        print(f"    tokens vs stock backend: {'match' if match else 'DIFFER'}")
        if not match:
            worst = float("inf")
    ok = worst <= 1e-4
    print(f"\nlargest logprob difference vs stock backend: {worst:.2e} -> {'EXACT' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def answer_text(tokenizer, tokens: list[int]) -> str:
    """The answer up to the end of the turn (the runs generate a fixed number of tokens, past it)."""
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens).strip()


if __name__ == "__main__":
    sys.exit(main())
