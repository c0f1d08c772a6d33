"""Serving: vLLM's OpenAI-compatible server runs with the headinfer backend.

A tiny random Llama with a character-level tokenizer and chat template is
built offline, and ``python -m vllm.entrypoints.openai.api_server`` is started
on 127.0.0.1 with ``--attention-backend headinfer`` (API server, engine core
and worker each in their own process). The test checks that:

- completion and chat requests return 200 with non-empty text;
- concurrent completions and chats all return 200 with non-empty text;
- a prompt longer than ``max_model_len`` gets a 4xx, and the server keeps
  answering afterwards;
- the server log shows the plugin's plan and its worker store, so the
  headinfer backend ran (not the stock CPU backend);
- ``/metrics`` has headinfer's counters, and one request moves them by
  exactly the bytes its tokens write and its steps load.
"""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")

from headinfer_vllm.tiny_models import CHAR_SYMBOLS, save_tiny_model

pytestmark = pytest.mark.vllm

HOST = "127.0.0.1"
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT = 240
REQUEST_TIMEOUT = 120
SHUTDOWN_GRACE = 20
MAX_TOKENS = 16
BLOCK_SIZE = 16
HEAD_DIM = 32  # the tiny Llama's
FLOAT32_BYTES = 4
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def log_tail(path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log_path, model: str):
        self.process, self.port, self.log_path, self.model = process, port, log_path, model

    def request(self, path: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict]:
        """Send GET (no body) or POST JSON; returns (status, parsed JSON or {})."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{HOST}:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with DIRECT.open(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return status, {"raw": raw.decode(errors="replace")}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=SHUTDOWN_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # also any engine-core or worker process left behind
    process.wait(timeout=SHUTDOWN_GRACE)


def wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode} during start-up:\n"
                        f"{log_tail(server.log_path)}")
        try:
            if server.request("/health", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT} s:\n{log_tail(server.log_path)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model = save_tiny_model(root / "model", "llama", with_tokenizer=True)
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", HOST, "--port", str(port), "--attention-backend", "headinfer",
        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--dtype", "float32",
        "--block-size", str(BLOCK_SIZE),
        "--additional-config", json.dumps({"headinfer": {"cpu_kv_cache_gib": 0.05, "head_group_size": 1}}),
    ]
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    served = Server(process, port, log_path, model=str(model))
    try:
        wait_healthy(served)
        yield served
    finally:
        stop(process)


def completion(server: Server, prompt: str) -> tuple[int, dict]:
    return server.request("/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "ignore_eos": True,
    })


def chat(server: Server, content: str) -> tuple[int, dict]:
    return server.request("/v1/chat/completions", {
        "model": server.model, "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
    })


def completion_text(server: Server, prompt: str) -> str:
    status, body = completion(server, prompt)
    assert status == 200, body
    return body["choices"][0]["text"]


def chat_text(server: Server, content: str) -> str:
    status, body = chat(server, content)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_models_lists_the_model(server):
    status, body = server.request("/v1/models")
    assert status == 200, body
    assert [entry["id"] for entry in body["data"]] == [server.model]


def test_completion(server):
    assert completion_text(server, "hello world")


def test_chat(server):
    assert chat_text(server, "Tell me a story.")


def test_concurrent_requests(server):
    jobs = [(completion_text, f"prompt number {i} " * (i + 1)) if i % 2 == 0 else (chat_text, f"question {i}?")
            for i in range(6)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        texts = list(pool.map(lambda job: job[0](server, job[1]), jobs))
    assert all(texts), texts


def test_prompt_over_max_model_len_is_rejected_and_server_keeps_serving(server):
    status, body = completion(server, "x" * (MAX_MODEL_LEN + 100))
    assert 400 <= status < 500, (status, body)
    assert server.process.poll() is None
    assert completion_text(server, "still there?")


def test_log_shows_headinfer_backend_ran(server):
    log = server.log()
    assert any("headinfer: " in line and "pairs resident" in line for line in log.splitlines()), log[-6000:]
    assert "worker store ready" in log, log[-6000:]
    assert "Cannot use" not in log, log[-6000:]


def headinfer_metrics(server: Server) -> dict[str, float]:
    """``headinfer:*`` (and ``vllm:prompt_tokens*``) samples of ``/metrics`` by name, labels written out
    (``headinfer:units{placement=resident}``)."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"http://{HOST}:{server.port}/metrics")
    with DIRECT.open(request, timeout=REQUEST_TIMEOUT) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("headinfer:", "vllm:prompt_tokens")) and not sample.name.endswith("_created"):
                labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_count_one_requests_traffic(server):
    """One request alone: P prompt tokens, M generated, no prefix-cache hit.

    It forwards P + M - 1 tokens, each written to every streamed unit's host
    pages (a unit is one KV head here); it runs 1 prefill step and M - 1
    decode steps, each loading every page of the sequence into staging for
    every streamed unit.
    """
    prompt_len, max_tokens = 40, 8
    generator = random.Random(1234)  # random ids: no other test's prompt shares a first page with it
    prompt = [generator.randrange(3, len(CHAR_SYMBOLS)) for _ in range(prompt_len)]
    before = headinfer_metrics(server)
    status, body = server.request("/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
    })
    assert status == 200, body
    after = headinfer_metrics(server)
    gained = {name: after[name] - before.get(name, 0.0) for name in after}

    streamed = after["headinfer:units{placement=streamed}"]
    assert streamed > 0 and after["headinfer:units{placement=resident}"] >= 0
    assert streamed + after["headinfer:units{placement=resident}"] == 6 * 4  # layers x KV heads
    assert after["headinfer:units{placement=cpu_decode}"] == 0  # the split is CUDA's
    assert after["headinfer:host_tier_bytes"] > 0
    token_bytes = 2 * HEAD_DIM * FLOAT32_BYTES  # K and V of one head
    assert gained["headinfer:written_bytes_total"] == (prompt_len + max_tokens - 1) * streamed * token_bytes
    seq_lens = [prompt_len + step for step in range(max_tokens)]  # prefill, then each decode step
    pages = sum(-(-seq_len // BLOCK_SIZE) for seq_len in seq_lens)
    assert gained["headinfer:loaded_bytes_total"] == pages * streamed * BLOCK_SIZE * token_bytes
    assert gained["headinfer:steps_total"] == max_tokens
    assert gained["headinfer:transfer_seconds_total"] > 0
    assert 0 < after["headinfer:host_tier_used_bytes"] <= after["headinfer:host_tier_bytes"]
    # vLLM's own metrics still count (headinfer merges the metrics of every process)
    prompt_tokens = [name for name in gained if name.startswith("vllm:prompt_tokens_total")]
    assert prompt_tokens and sum(gained[name] for name in prompt_tokens) == prompt_len
