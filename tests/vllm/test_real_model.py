"""The real model: SmolLM2-135M-Instruct answers a needle question exactly as vLLM's stock backend does.

The needle benchmark's smoke (``benchmarks/bench_niah.py --smoke``): one 1K-token
chat prompt of essay text with a fact in the middle, greedy, float32, through
vLLM's stock backend and headinfer's two paths on the CPU platform: in place
(the default, ``cpu_attention=auto``) and streamed (``cpu_attention=off``).
The checkpoint and the essays come from the package registry on first use
(:mod:`headinfer_vllm.real_models`). About two minutes on 2 cores.
"""

import importlib.util
import json
import pathlib
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("gguf")

pytestmark = pytest.mark.vllm

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_niah.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_niah", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_niah"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("niah")
    exit_code = bench.main(["--smoke", "--out", str(out)])
    return exit_code, json.loads((out / "niah_smoke.json").read_text())


def test_haystack_prompt_holds_the_needle_at_its_depth(bench):
    from transformers import AutoTokenizer

    from headinfer_vllm.real_models import SMOLLM2, checkpoint, essays

    tokenizer = AutoTokenizer.from_pretrained(checkpoint(SMOLLM2))
    haystack = tokenizer("\n\n".join(essays()), add_special_tokens=False)["input_ids"]
    for depth in (0, 50, 100):
        prompt = tokenizer.decode(bench.haystack_prompt(tokenizer, haystack, 1024, depth, max_tokens=20))
        document = prompt[prompt.index("<|im_start|>user\n") :]
        position = document.index(bench.NEEDLE) / len(document)
        assert abs(position - depth / 100) < 0.1, depth
        assert 1024 - 20 - 16 <= len(bench.haystack_prompt(tokenizer, haystack, 1024, depth, 20)) <= 1024 - 20


def test_both_headinfer_paths_give_the_stock_tokens(smoke):
    exit_code, report = smoke
    assert exit_code == 0
    (cell,) = report["cells"]
    for path in ("vllm_in_place", "vllm_streamed"):
        assert cell[path]["verdict"] == "equal", path
        assert cell[path]["tokens_equal"] and cell[path]["max_logprob_diff"] <= 1e-4, path
        assert cell[path]["answer"] == cell["vllm_stock"]["answer"], path


def test_compare_tells_equal_tie_and_failure(bench):
    reference = {"tokens": [5, 7], "logprobs": [{"5": -0.1, "6": -2.0}, {"7": -0.69310, "8": -0.69315}]}
    close = {"tokens": [5, 7], "logprobs": [{"5": -0.10002, "6": -2.0}, {"7": -0.69311, "8": -0.69316}]}
    assert compare_verdict(bench, reference, close) == ("equal", None)
    tie = {"tokens": [5, 8], "logprobs": [{"5": -0.1, "6": -2.0}, {"8": -0.69310, "7": -0.69312}]}
    assert compare_verdict(bench, reference, tie) == ("tie", 1)
    assert bench.compare(reference, tie)["tie_gap"] == pytest.approx(5e-5, abs=1e-9)
    wrong = {"tokens": [6, 7], "logprobs": [{"6": -0.1, "5": -2.0}, {"7": -0.6931, "8": -0.6932}]}
    assert compare_verdict(bench, reference, wrong) == ("fail", 0)
    drifted = {"tokens": [5, 7], "logprobs": [{"5": -0.1003, "6": -2.0}, {"7": -0.69310, "8": -0.69315}]}
    assert compare_verdict(bench, reference, drifted) == ("fail", None)


def compare_verdict(bench, reference: dict, result: dict) -> tuple[str, int | None]:
    verdict = bench.compare(reference, result)
    return verdict["verdict"], verdict.get("first_difference")
