"""Model-level benchmark of HeadInfer in transformers (issue 4, part 3).

A Llama-3-8B-shaped model with random bf16 weights (nothing downloaded) on a
GPU capped at ``--gpu-cap-gib`` (24 GiB: a consumer GPU). Three setups:

- ``dynamic``: transformers' standard ``DynamicCache``, SDPA attention;
- ``offloaded``: ``DynamicCache(offloading=True)``, transformers' layer-wise
  offloaded cache (each layer's KV on the host, the next layer prefetched);
- ``headinfer``: :class:`headinfer_vllm.hf.HeadInferCache`, ``"headinfer"`` attention.

A trial prefills a random prompt of ``context`` tokens in chunks of
``--prefill-chunk`` and decodes ``--decode-tokens`` greedy tokens; it fails on
running out of GPU memory, of host memory (the offloaded cache) or of
HeadInfer's capacity. After one untimed warm-up trial, each setup's longest
context is searched within its time budget (``--time-budget``: seconds for
every setup, or per setup as ``dynamic=40,headinfer=300``; with
``--total-time``, at most what is left of the whole run's seconds): first the
``--report-contexts`` in order, then the setup's upper bound (HeadInfer's and
the offloaded cache's: what ``--cpu-kv-gib`` of host memory holds), then, after
a failure, bisection down to ``--resolution`` tokens. A trial's time is
predicted from the trials before it (``a * L + b * L**2``); a context that
would not finish within the budget is lowered to one that would, and a trial
still running ``GRACE`` of the budget past its end is stopped between forward
passes. The result says what stopped the search: ``host capacity`` (the upper
bound reached), ``max context``, the resource a failure ran out of (``GPU
memory``, ``host memory``, ``HeadInfer capacity``), or ``time budget``.

Prefill tokens/s, decode s/token and peak GPU memory are recorded for every
trial and reported at the report contexts and the longest context.
``bench_hf.json``, ``bench_hf.png`` and ``bench_hf.md`` (the README table) in
``--out`` are rewritten after every trial; setups already in ``bench_hf.json``
for the same model and device are kept, so one process per setup builds one
report. On a GPU machine, ``benchmarks/gpu_session.sh`` runs the standard cache
and headinfer in one process under ``--total-time``.

CPU smoke test (tiny shapes, under a minute)::

    python benchmarks/bench_hf.py --smoke --out benchmarks/out
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import pathlib
import shlex
import sys
import time
import traceback

import run_context
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from headinfer_vllm.core.host_memory import free_host_bytes
from headinfer_vllm.hf import CapacityError, HeadInferCache
from headinfer_vllm.tiny_models import model_config

GIB = 1 << 30
SETUPS = ("dynamic", "offloaded", "headinfer")
HOST_RESERVE_BYTES = 4 * GIB
"""Host memory the offloaded cache must leave free (see ``Runner._check_host_memory``)."""
SAFETY = 1.15
"""A trial starts only if ``SAFETY`` times its predicted seconds fit in the time left."""
GRACE = 0.2
"""A trial started within the budget may overrun it by this share of the budget before it is stopped."""
FINISH_RESERVE = 10.0
"""Seconds of ``--total-time`` kept for the last report written after a setup's search."""
WARM_UP_CHUNKS = 2
"""Prefill chunks of the untimed trial that precedes a search (CUDA start-up costs stay out of the fit)."""

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


@dataclasses.dataclass
class Trial:
    """One prefill of ``context`` tokens followed by the decode tokens."""

    context: int
    ok: bool
    error: str | None = None
    limit: str | None = None
    """What a failed trial ran out of: ``GPU memory``, ``host memory`` or ``HeadInfer capacity``."""
    out_of_time: bool = False
    """Stopped at the deadline: says nothing about whether ``context`` fits."""
    seconds: float | None = None
    """Prefill and decode, wall clock."""
    prefill_s: float | None = None
    prefill_tok_per_s: float | None = None
    decode_s_per_token: float | None = None
    peak_gpu_gib: float | None = None
    """Peak allocated GPU memory, model weights included."""


class OutOfTime(Exception):
    """The deadline passed during a trial."""


class HostMemoryLow(Exception):
    """The next prefill chunk could exhaust host memory (an OOM kill would end the whole run)."""


def _limit_hit(error: Exception) -> str | None:
    """The resource whose exhaustion ``error`` reports, or None for any other error."""
    if isinstance(error, CapacityError):
        return "HeadInfer capacity"
    if isinstance(error, HostMemoryLow):
        return "host memory"
    # CUDA reports some out-of-memory failures (cuBLAS workspaces, host-pinned allocations)
    # as plain RuntimeErrors rather than torch.OutOfMemoryError.
    message = str(error)
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "ALLOC_FAILED" in message:
        return "GPU memory"
    return None


def _sync(device: torch.device) -> None:
    """Wait for the device, so that a clock read after it counts all queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on CPU, small contexts")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {SETUPS}")
    parser.add_argument("--max-context", type=int, help="largest context tried (default 2**21; smoke 1024)")
    parser.add_argument("--resolution", type=int, help="bisection stops at this gap (default 4096; smoke 64)")
    parser.add_argument("--prefill-chunk", type=int, help="tokens per prefill forward pass (default 8192; smoke 128)")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--report-contexts", help="contexts tried first and reported (default 32768,131072)")
    parser.add_argument("--gpu-cap-gib", type=float, default=24.0, help="per-process GPU memory cap")
    parser.add_argument(
        "--cpu-kv-gib",
        type=float,
        help="host memory for the KV of headinfer and offloaded (default 70%% of free host memory; smoke 1/512)",
    )
    parser.add_argument(
        "--time-budget",
        default="540",
        help="seconds of trials per setup: one number for every setup, and/or SETUP=SECONDS items (comma-separated)",
    )
    parser.add_argument(
        "--total-time",
        type=float,
        help="seconds for the whole run (model build, warm-ups and searches); caps each setup's time budget",
    )
    args = parser.parse_args(argv)
    try:
        args.time_budget, args.time_budgets = parse_time_budget(args.time_budget)
    except ValueError as error:
        parser.error(f"--time-budget: {error}")
    smoke = args.smoke
    defaults = dict(
        max_context=1024 if smoke else 1 << 21,
        resolution=64 if smoke else 4096,
        prefill_chunk=128 if smoke else 8192,
        report_contexts="128,512" if smoke else "32768,131072",
        cpu_kv_gib=1 / 512 if smoke else 0.7 * (free_host_bytes() or 0) / GIB,  # smoke: 1024 tokens
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; choose from {SETUPS}")
    args.report_contexts = sorted(int(n) for n in args.report_contexts.split(","))
    for name in ("max_context", "resolution", "prefill_chunk", "decode_tokens", "time_budget", "cpu_kv_gib"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.total_time is not None and args.total_time <= 0:
        parser.error("--total-time must be positive")
    return args


def parse_time_budget(text: str) -> tuple[float, dict[str, float]]:
    """``"540"`` or ``"300,dynamic=40"``: the default budget (540 s unless given) and per-setup ones."""
    default, per_setup = 540.0, {}
    for item in filter(None, (item.strip() for item in text.split(","))):
        name, _, seconds = item.rpartition("=")
        if name and name not in SETUPS:
            raise ValueError(f"unknown setup {name!r}; choose from {SETUPS}")
        value = float(seconds)
        if value <= 0:
            raise ValueError(f"{item}: seconds must be positive")
        if name:
            per_setup[name] = value
        else:
            default = value
    return default, per_setup


def setup_budget(args: argparse.Namespace, setup: str, run_end: float | None, now: float) -> float:
    """Seconds of trials for ``setup``'s search starting at ``now``: its ``--time-budget``, capped by the
    run's end (``run_end``, from ``--total-time``) less ``FINISH_RESERVE`` and the grace a trial may overrun."""
    budget = args.time_budgets.get(setup, args.time_budget)
    if run_end is not None:
        budget = min(budget, (run_end - now - FINISH_RESERVE) / (1 + GRACE))
    return budget


def build_model(smoke: bool, device: torch.device) -> torch.nn.Module:
    """Random weights from the config, created directly on ``device`` (bf16 on GPU, float32 in smoke)."""
    config = model_config("llama", num_hidden_layers=2) if smoke else LlamaConfig(**LLAMA3_8B)
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

        config = model.config
        self.token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        self.token_bytes *= model.dtype.itemsize
        """KV bytes of one token, all layers."""

    @property
    def upper_bound(self) -> int:
        """Largest context worth trying: HeadInfer's capacity; for the offloaded cache, what
        ``--cpu-kv-gib`` of host memory holds (beyond it the host, not the GPU, runs out);
        else ``--max-context``."""
        if self.headinfer is not None:
            return min(self.args.max_context, self.headinfer.max_tokens_per_row - self.args.decode_tokens)
        if self.setup == "offloaded":
            return min(self.args.max_context, int(self.args.cpu_kv_gib * GIB) // self.token_bytes)
        return self.args.max_context

    def _check_host_memory(self, tokens: int) -> None:
        """Before the offloaded cache grows to ``tokens``: it moves each layer's KV to host memory with
        ``.to("cpu", non_blocking=True)``, which torch pins through its caching host allocator (sizes
        rounded up to a power of two, freed blocks kept), so the next chunk may pin up to twice the KV
        anew. Refuse the chunk unless that much and a reserve are free."""
        if self.setup != "offloaded":
            return
        needed = 2 * tokens * self.token_bytes + HOST_RESERVE_BYTES
        free = free_host_bytes()
        if free is not None and free < needed:
            raise HostMemoryLow(
                f"{free / GIB:.1f} GiB of host memory free; growing the offloaded cache to {tokens} tokens "
                f"may pin {needed / GIB:.1f} GiB"
            )

    def _cache(self):
        if self.setup == "dynamic":
            return DynamicCache(config=self.model.config)
        if self.setup == "offloaded":
            return DynamicCache(config=self.model.config, offloading=True)
        assert self.headinfer is not None
        self.headinfer.reset()
        return self.headinfer

    def warm_up(self) -> None:
        """An untimed short trial: CUDA start-up costs would otherwise skew the first timed one."""
        self.trial(min(WARM_UP_CHUNKS * self.args.prefill_chunk, self.upper_bound))

    def trial(self, context: int, deadline: float = math.inf) -> Trial:
        """Prefill ``context`` tokens and decode; stops between forward passes once ``deadline``
        (``time.monotonic()``) has passed."""
        ids = torch.randint(self.model.config.vocab_size, (1, context), device=self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        done = 0
        try:
            with torch.no_grad():
                cache = self._cache()
                _sync(self.device)
                start = time.perf_counter()
                for chunk in ids.split(self.args.prefill_chunk, dim=1):
                    if time.monotonic() > deadline:
                        raise OutOfTime
                    self._check_host_memory(done + chunk.shape[1] + self.args.decode_tokens)
                    out = self.model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    done += chunk.shape[1]
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                _sync(self.device)
                prefill_s = time.perf_counter() - start
                for _ in range(self.args.decode_tokens):
                    if time.monotonic() > deadline:
                        raise OutOfTime
                    out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                _sync(self.device)
                seconds = time.perf_counter() - start
        except OutOfTime:
            return Trial(context, ok=False, out_of_time=True, error=f"time budget: after {done} tokens of prefill")
        except (RuntimeError, CapacityError, HostMemoryLow) as error:  # torch.OutOfMemoryError is a RuntimeError
            limit = _limit_hit(error)
            if limit is None:
                raise
            # A step cut short is recovered by the next trial's HeadInferCache.reset().
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            return Trial(context, ok=False, error=message, limit=limit)
        finally:
            cache = out = None
            _release()
        return Trial(
            context,
            ok=True,
            seconds=seconds,
            prefill_s=prefill_s,
            prefill_tok_per_s=context / prefill_s,
            decode_s_per_token=(seconds - prefill_s) / self.args.decode_tokens,
            peak_gpu_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
        )


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # The offloaded cache's pinned blocks stay cached in torch's host allocator until emptied.
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)
        (empty_host_cache or getattr(torch._C, "_host_emptyCache", lambda: None))()


def time_model(trials: list[Trial]) -> tuple[float, float] | None:
    """``(a, b)`` with a trial of ``L`` tokens taking ``a * L + b * L**2`` seconds, or None.

    Fitted through the two longest successful trials (one trial: all
    quadratic, which overestimates longer ones), with ``a, b >= 0``.
    """
    points = sorted({trial.context: trial.seconds for trial in trials if trial.ok}.items())[-2:]
    if not points:
        return None
    longest, longest_s = points[-1]
    if len(points) == 2:
        shorter, shorter_s = points[0]
        b = (longest_s / longest - shorter_s / shorter) / (longest - shorter)
        a = longest_s / longest - b * longest
        if a >= 0 and b >= 0:
            return a, b
    return 0.0, longest_s / longest**2


def affordable_context(trials: list[Trial], seconds: float, resolution: int) -> int:
    """The longest context, a multiple of ``resolution``, predicted to run in ``seconds`` (0 if none)."""
    model = time_model(trials)
    if model is None or seconds <= 0:
        return 0
    a, b = model
    if b > 0:  # the positive root of b * L**2 + a * L = seconds
        return int((-a + math.sqrt(a * a + 4 * b * seconds)) / (2 * b)) // resolution * resolution
    return int(min(seconds / a if a > 0 else math.inf, 1 << 40)) // resolution * resolution


class ContextSearch:
    """The longest context of one setup within a time budget (see the module docstring)."""

    def __init__(
        self, runner: Runner, args: argparse.Namespace, on_trial=lambda search: None, budget: float | None = None
    ):
        """``budget``: seconds of trials (default ``args.time_budget``)."""
        self.runner, self.args, self.on_trial = runner, args, on_trial
        budget = args.time_budget if budget is None else budget
        self.deadline = time.monotonic() + budget
        self.stop_trials_at = self.deadline + GRACE * max(budget, 0.0)
        self.upper = runner.upper_bound
        self.trials: list[Trial] = []
        self.best = 0
        self.smallest_failure: int | None = None
        self.limit: str | None = None
        """What the smallest failed context ran out of."""
        self.stopped: str | None = None

    def run(self) -> dict:
        ladder = [n for n in self.args.report_contexts if n < self.upper] + [self.upper]
        for target in ladder:
            while self.best < target and self.smallest_failure is None and self.stopped is None:
                self._attempt(target)
        resolution = self.args.resolution
        while self.stopped is None and self.smallest_failure is not None:
            middle = (self.best + self.smallest_failure) // 2 // resolution * resolution
            if self.smallest_failure - self.best <= resolution or middle <= self.best:
                break
            self._attempt(middle)
        if self.stopped is None:
            if self.smallest_failure is not None:
                self.stopped = self.limit
            else:
                self.stopped = "max context" if self.upper >= self.args.max_context else "host capacity"
        self.on_trial(self)
        return self.summary()

    def _attempt(self, target: int) -> None:
        """One trial at ``target``, or at the longest context predicted to finish in time."""
        left = self.deadline - time.monotonic()
        context = target
        if self.trials and left < SAFETY * _predicted(self.trials, target):
            context = min(target, affordable_context(self.trials, left / SAFETY, self.args.resolution))
        if left <= 0 or context <= self.best:
            self.stopped = "time budget"
            return
        trial = self.runner.trial(context, self.stop_trials_at)
        self.trials.append(trial)
        print(f"  {self.runner.setup:9s} {context:>9d} tokens: " + _describe(trial), flush=True)
        if trial.out_of_time:
            self.stopped = "time budget"
        elif trial.ok:
            self.best = context
        else:
            self.smallest_failure, self.limit = context, trial.limit
        self.on_trial(self)

    def summary(self) -> dict:
        by_context = {trial.context: trial for trial in self.trials if trial.ok}
        reported = {
            str(n): dataclasses.asdict(by_context[n]) if n in by_context else None for n in self.args.report_contexts
        }
        reported["longest"] = dataclasses.asdict(by_context[self.best]) if self.best else None
        return {
            "longest_context": self.best,
            "upper_bound": self.upper,
            "smallest_failure": self.smallest_failure,
            "stopped_by": self.stopped,
            "reported": reported,
            "trials": [dataclasses.asdict(trial) for trial in self.trials],
        }


def _predicted(trials: list[Trial], context: int) -> float:
    model = time_model(trials)
    if model is None:
        return 0.0
    a, b = model
    return a * context + b * context * context


def _describe(trial: Trial) -> str:
    if not trial.ok:
        return f"failed ({trial.error})"
    peak = f", peak GPU {trial.peak_gpu_gib:.2f} GiB" if trial.peak_gpu_gib is not None else ""
    return (
        f"prefill {trial.prefill_tok_per_s:.0f} tok/s, decode {trial.decode_s_per_token:.4f} s/token{peak}, "
        f"{trial.seconds:.1f} s"
    )


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
    figure.suptitle(f"{results['model']} on {results['device']}, {results['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(results: dict) -> str:
    """The README's Markdown table: one row per setup."""
    contexts = [str(n) for n in results["report_contexts"]]

    def cell(trial: dict | None, key: str, spec: str) -> str:
        return format(trial[key], spec) if trial and trial.get(key) is not None else "–"

    lines = [
        f"{results['model']}, {results['device']} capped at {results['gpu_cap_gib']} GiB, {results['date'][:10]}",
        "",
        "| setup | longest context (stopped by) | prefill tok/s at "
        + " / ".join(_tokens(n) for n in contexts)
        + " / longest | decode s/token at "
        + " / ".join(_tokens(n) for n in contexts)
        + " / longest | peak GPU GiB at longest |",
        "|---|---|---|---|---|",
    ]
    for name, result in results["setups"].items():
        if "reported" not in result:  # skipped, or failed before its first trial
            lines.append(f"| {name} | {result.get('skipped') or result.get('error')} | | | |")
            continue
        reported = result["reported"]
        points = [reported.get(n) for n in contexts] + [reported["longest"]]
        stopped_by = f"error: {result['error']}" if "error" in result else result["stopped_by"]
        lines.append(
            f"| {name} | {_tokens(result['longest_context'])} ({stopped_by}) | "
            + " / ".join(cell(trial, "prefill_tok_per_s", ".0f") for trial in points)
            + " | "
            + " / ".join(cell(trial, "decode_s_per_token", ".3f") for trial in points)
            + f" | {cell(reported['longest'], 'peak_gpu_gib', '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _tokens(count: int | str) -> str:
    count = int(count)
    return f"{count // 1024}K" if count % 1024 == 0 and count else str(count)


def write(results: dict, out: pathlib.Path) -> None:
    """Writes the JSON, plot and table; keeps other setups of an earlier run of the same model and device."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_hf.json"
    merged = dict(results)
    if path.exists():
        earlier = json.loads(path.read_text())
        same = all(earlier.get(key) == results[key] for key in ("model", "device", "gpu_cap_gib", "settings"))
        if same:
            merged["setups"] = {**earlier["setups"], **results["setups"]}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    plot(merged, out / "bench_hf.png")
    (out / "bench_hf.md").write_text(table(merged))


def run_setup(
    setup: str, record: dict, model, args: argparse.Namespace, device: torch.device, save, run_end: float | None
) -> bool:
    """Searches one setup into ``record``, calling ``save()`` after every trial; False on an error.

    The search's budget is set after the warm-up, from the time left before ``run_end`` (``time.monotonic()``).
    """
    try:
        runner = Runner(setup, model, args, device)
        if runner.headinfer is not None:
            record["cache"] = runner.headinfer.plan.describe()
            record["cpu_kv_gib"] = args.cpu_kv_gib
            print(f"  {setup:9s} {record['cache']}", flush=True)
        runner.warm_up()
        budget = record["time_budget_s"] = setup_budget(args, setup, run_end, time.monotonic())
        search = ContextSearch(
            runner, args, on_trial=lambda search: (record.update(search.summary()), save()), budget=budget
        )
        record.update(search.run())
        return True
    except Exception:  # a bug in one setup must not lose the others' results
        record["error"] = traceback.format_exc().strip().splitlines()[-1]
        traceback.print_exc()
        return False
    finally:
        runner = search = None
        _release()


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    run_end = None if args.total_time is None else time.monotonic() + args.total_time
    if math.isfinite(run_context.deadline()):  # gpu_session.sh's plan: the step's allotment binds too
        step_end = time.monotonic() + run_context.seconds_left()
        run_end = step_end if run_end is None else min(run_end, step_end)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_hf: no CUDA device; use --smoke for the CPU run")
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_cap_gib * GIB / total), device)
    model = build_model(args.smoke, device)
    command = shlex.join(["python", *sys.argv])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "date": date,
        "commit": run_context.commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "tiny Llama (smoke)" if args.smoke else "Llama-3-8B shape, random bf16 weights",
        "gpu_cap_gib": args.gpu_cap_gib if cuda else None,
        "report_contexts": args.report_contexts,
        "settings": {
            key: getattr(args, key) for key in ("prefill_chunk", "decode_tokens", "max_context", "resolution")
        },
        "setups": {},
    }

    def save() -> None:
        write(results, args.out)

    failures = 0
    for setup in args.setups:
        record = results["setups"][setup] = {"command": command, "date": date}
        if setup == "offloaded" and not cuda:
            record["skipped"] = "transformers' offloaded cache needs CUDA"
        elif setup_budget(args, setup, run_end, time.monotonic()) <= 0:
            record["skipped"] = "no time left of --total-time"
        else:
            failures += not run_setup(setup, record, model, args, device, save, run_end)
        if "skipped" in record:
            print(f"  {setup:9s} skipped: {record['skipped']}", flush=True)
        save()
    for setup, result in results["setups"].items():
        outcome = result.get("stopped_by") or result.get("skipped") or result.get("error")
        print(f"{setup}: longest context {result.get('longest_context')} ({outcome})")
    print(f"wrote bench_hf.json, bench_hf.png and bench_hf.md to {args.out}")
    if failures:
        raise SystemExit(f"bench_hf: {failures} setup(s) failed; see the errors above")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
