"""Model-level benchmark of HeadInfer in transformers (issue 4, part 3).

A Llama-3-8B-shaped model with random bf16 weights (nothing downloaded) on a
GPU capped at ``--gpu-cap-gib`` (24 GiB: a consumer GPU). Three setups:

- ``dynamic``: transformers' standard ``DynamicCache``, SDPA attention;
- ``offloaded``: ``DynamicCache(offloading=True)``, transformers' layer-wise
  offloaded cache (each layer's KV on the host, the next layer prefetched);
- ``headinfer``: :class:`headinfer_vllm.hf.HeadInferCache`, ``"headinfer"`` attention.

Each setup prefills a random prompt in chunks of ``--prefill-chunk`` tokens
and decodes ``--decode-tokens`` greedy tokens. Its longest context is
searched by doubling from ``--start-context`` and then bisecting down to
``--resolution`` tokens; a trial fails on a CUDA out-of-memory error or a
full HeadInfer cache. Prefill tokens/s, decode s/token and peak GPU memory
are recorded for every trial and reported at ``--report-contexts`` and at
the longest context. Writes ``bench_hf.json`` and ``bench_hf.png`` to ``--out``.

H100 (one setup per call keeps each call under 10 minutes)::

    python benchmarks/bench_hf.py --setups dynamic --out benchmarks/results
    python benchmarks/bench_hf.py --setups headinfer --out benchmarks/results --time-budget 540

CPU smoke test (tiny shapes, under a minute)::

    python benchmarks/bench_hf.py --smoke --out benchmarks/out
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import pathlib
import shlex
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from headinfer_vllm.core.host_memory import free_host_bytes
from headinfer_vllm.hf import CapacityError, HeadInferCache

GIB = 1 << 30
SETUPS = ("dynamic", "offloaded", "headinfer")

LLAMA3_8B = dict(
    num_hidden_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=1 << 21,
)
TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=1 << 16,
)


@dataclasses.dataclass
class Trial:
    """One prefill of ``context`` tokens followed by the decode tokens."""

    context: int
    ok: bool
    error: str | None = None
    prefill_s: float | None = None
    prefill_tok_per_s: float | None = None
    decode_s_per_token: float | None = None
    peak_gpu_gib: float | None = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on CPU, small contexts")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {SETUPS}")
    parser.add_argument("--start-context", type=int, help="first context tried (default 32768; smoke 64)")
    parser.add_argument("--max-context", type=int, help="largest context tried (default 2**21; smoke 1024)")
    parser.add_argument("--resolution", type=int, help="bisection stops at this gap (default 4096; smoke 64)")
    parser.add_argument("--prefill-chunk", type=int, help="tokens per prefill forward pass (default 8192; smoke 128)")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--report-contexts", help="contexts reported besides the longest (default 32768,131072)")
    parser.add_argument("--gpu-cap-gib", type=float, default=24.0, help="per-process GPU memory cap")
    parser.add_argument(
        "--cpu-kv-gib",
        type=float,
        help="host memory for the KV of headinfer and offloaded (default 70%% of free host memory; smoke 1/2048)",
    )
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds per setup; no trial starts after")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = dict(
        start_context=64 if smoke else 32768,
        max_context=1024 if smoke else 1 << 21,
        resolution=64 if smoke else 4096,
        prefill_chunk=128 if smoke else 8192,
        report_contexts="128,512" if smoke else "32768,131072",
        cpu_kv_gib=1 / 2048 if smoke else 0.7 * (free_host_bytes() or 0) / GIB,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; choose from {SETUPS}")
    args.report_contexts = [int(n) for n in args.report_contexts.split(",")]
    return args


def build_model(smoke: bool, device: torch.device) -> torch.nn.Module:
    """Random weights from the config, created directly on ``device`` (bf16 on GPU, float32 in smoke)."""
    config = LlamaConfig(**(TINY if smoke else LLAMA3_8B))
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


class Runner:
    """Runs trials of one setup; keeps one HeadInfer cache (its pinned host tier) across trials."""

    def __init__(self, setup: str, model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
        self.setup, self.model, self.args, self.device = setup, model, args, device
        model.set_attn_implementation("headinfer" if setup == "headinfer" else "sdpa")
        self.headinfer: HeadInferCache | None = None
        if setup == "headinfer":  # allocated (and pinned) once, reset per trial
            self.headinfer = HeadInferCache(
                model.config,
                cpu_kv_cache_gib=args.cpu_kv_gib,
                prefill_chunk_size=args.prefill_chunk,
                device=device,
            )

    @property
    def upper_bound(self) -> int:
        """Largest context worth trying: HeadInfer's capacity; for the offloaded cache, what
        ``--cpu-kv-gib`` of host memory holds (beyond it the host, not the GPU, runs out);
        else ``--max-context``."""
        if self.headinfer is not None:
            return min(self.args.max_context, self.headinfer.max_tokens_per_row - self.args.decode_tokens)
        if self.setup == "offloaded":
            config = self.model.config
            token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
            token_bytes *= self.model.dtype.itemsize
            return min(self.args.max_context, int(self.args.cpu_kv_gib * GIB) // token_bytes)
        return self.args.max_context

    def _cache(self):
        if self.setup == "dynamic":
            return DynamicCache(config=self.model.config)
        if self.setup == "offloaded":
            return DynamicCache(config=self.model.config, offloading=True)
        assert self.headinfer is not None
        self.headinfer.reset()
        return self.headinfer

    def trial(self, context: int) -> Trial:
        ids = torch.randint(self.model.config.vocab_size, (1, context), device=self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                cache = self._cache()
                start = time.perf_counter()
                for chunk in ids.split(self.args.prefill_chunk, dim=1):
                    out = self.model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)  # syncs the prefill
                prefill_s = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(self.args.decode_tokens):
                    out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                token.item()
                decode_s = time.perf_counter() - start
        except (torch.cuda.OutOfMemoryError, CapacityError) as error:
            # A step cut short is recovered by the next trial's HeadInferCache.reset().
            return Trial(context, ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        finally:
            cache = out = None
            _release()
        return Trial(
            context,
            ok=True,
            prefill_s=prefill_s,
            prefill_tok_per_s=context / prefill_s,
            decode_s_per_token=decode_s / self.args.decode_tokens,
            peak_gpu_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
        )


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def search(runner: Runner, args: argparse.Namespace) -> dict:
    """Double from the start context until a trial fails, then bisect; bounded by the time budget."""
    deadline = time.monotonic() + args.time_budget
    upper = runner.upper_bound
    trials: list[Trial] = []
    best, failed, stopped = 0, None, "searched"

    def run(context: int) -> bool:
        trial = runner.trial(context)
        trials.append(trial)
        print(f"  {runner.setup:9s} {context:>9d} tokens: " + _describe(trial), flush=True)
        return trial.ok

    context = min(args.start_context, upper)
    while True:
        if time.monotonic() > deadline:
            stopped = "time budget"
            break
        if not run(context):
            failed = context
            break
        best = context
        if context >= upper:
            stopped = "host capacity" if upper < args.max_context else "max context"
            break
        context = min(2 * context, upper)
    while failed is not None and failed - best > args.resolution:
        if time.monotonic() > deadline:
            stopped = "time budget"
            break
        middle = (best + failed) // 2 // args.resolution * args.resolution
        if middle <= best:
            break
        if run(middle):
            best = middle
        else:
            failed = middle
    by_context = {trial.context: trial for trial in trials if trial.ok}
    reported = {str(n): dataclasses.asdict(by_context[n]) if n in by_context else None for n in args.report_contexts}
    reported["longest"] = dataclasses.asdict(by_context[best]) if best else None
    return {
        "longest_context": best,
        "first_failure": failed,
        "stopped_by": stopped,
        "reported": reported,
        "trials": [dataclasses.asdict(trial) for trial in trials],
    }


def _describe(trial: Trial) -> str:
    if not trial.ok:
        return f"failed ({trial.error})"
    peak = f", peak GPU {trial.peak_gpu_gib:.2f} GiB" if trial.peak_gpu_gib is not None else ""
    return f"prefill {trial.prefill_tok_per_s:.0f} tok/s, decode {trial.decode_s_per_token:.4f} s/token{peak}"


def plot(results: dict, path: pathlib.Path) -> None:
    """Longest context, prefill tok/s and decode s/token of every setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (longest, prefill, decode) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(results["setups"])
    longest.bar(names, [results["setups"][name].get("longest_context", 0) for name in names])
    longest.set_ylabel("longest context (tokens)")
    for name in names:
        trials = sorted((t for t in results["setups"][name].get("trials", []) if t["ok"]), key=lambda t: t["context"])
        contexts = [t["context"] for t in trials]
        prefill.plot(contexts, [t["prefill_tok_per_s"] for t in trials], marker="o", label=name)
        decode.plot(contexts, [t["decode_s_per_token"] for t in trials], marker="o", label=name)
    for axis, label in ((prefill, "prefill tokens/s"), (decode, "decode s/token")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.legend()
    figure.suptitle(f"{results['model']} on {results['device']}, {results['date']}\n{results['command']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(results: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_hf.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "bench_hf.png")


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_cap_gib * GIB / total), device)
    model = build_model(args.smoke, device)
    results = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "tiny Llama (smoke)" if args.smoke else "Llama-3-8B shape, random bf16 weights",
        "gpu_cap_gib": args.gpu_cap_gib if cuda else None,
        "settings": {
            key: getattr(args, key)
            for key in ("prefill_chunk", "decode_tokens", "start_context", "max_context", "resolution", "cpu_kv_gib")
        },
        "setups": {},
    }
    for setup in args.setups:
        if setup == "offloaded" and not cuda:
            results["setups"][setup] = {"skipped": "transformers' offloaded cache needs CUDA"}
            print(f"  {setup:9s} skipped: needs CUDA", flush=True)
            continue
        runner = Runner(setup, model, args, device)
        if runner.headinfer is not None:
            results["setups"][setup] = {"cache": runner.headinfer.plan.describe()}
            print(f"  {setup:9s} {runner.headinfer.plan.describe()}", flush=True)
        results["setups"].setdefault(setup, {}).update(search(runner, args))
        runner = None
        _release()
        write(results, args.out)  # after every setup, so a crash keeps the finished ones
    for setup, result in results["setups"].items():
        outcome = result.get("stopped_by", result.get("skipped"))
        print(f"{setup}: longest context {result.get('longest_context')} ({outcome})")
    print(f"wrote {args.out / 'bench_hf.json'} and {args.out / 'bench_hf.png'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
