"""Faults and bad input at the OpenAI server (``python -m vllm.entrypoints.openai.api_server``).

Bad settings are refused at start-up: the server process exits non-zero,
and the last lines of its output say what is wrong and what to change
(a traceback above them is vLLM's way of reporting it; a traceback without
such a line fails the test). Checked: a host budget larger than the free
memory, a device budget below the staging minimum or larger than the device
(on CPU, the host), an unknown setting, a value of the wrong type, and a
malformed ``--additional-config`` (not JSON, not an object, headinfer's
entry not an object). A start-up that should be refused but is not is
stopped after ``REFUSAL_TIMEOUT`` seconds, or once its processes hold more
than ``MEMORY_WATCHDOG`` bytes.

A request whose context exceeds ``max_model_len`` gets a clean 4xx (an
error object naming the limit), in each form: completion and chat,
streaming or not, a prompt over the limit, a prompt that fills it, a token-id
prompt over it, ``max_tokens`` over it. The server keeps serving, and its
log has no ERROR line or traceback.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

from headinfer_vllm.tiny_models import save_tiny_model

pytestmark = pytest.mark.vllm

HOST = "127.0.0.1"
MAX_MODEL_LEN = 512
START_TIMEOUT = 300
REFUSAL_TIMEOUT = 180
"""Seconds a refused start-up may take (a refusal in the worker comes after the engine has started)."""
MEMORY_WATCHDOG = 6 << 30
"""Resident bytes of the server's process tree past which a start-up that should be refused is stopped
(a healthy tiny-model server holds about 2.2 GiB)."""
TAIL_LINES = 15
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_command(model, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", HOST, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--dtype", "float32", "--attention-backend", "headinfer", *extra,
    ]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=20)


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as stat:
                children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
            total += next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")), 0)
    return total


def get(port: int, path: str) -> int:
    with DIRECT.open(f"http://{HOST}:{port}{path}", timeout=5) as response:
        return response.status


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("faults") / "model", "llama", with_tokenizer=True)


def start_refused(model, tmp_path, additional_config: str) -> tuple[int, str]:
    """Start the server with ``additional_config``; it must exit on its own. Returns (exit status, output)."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            server_command(model, port, "--additional-config", additional_config),
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + REFUSAL_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if get(port, "/health") == 200:
                    pytest.fail(f"the server started with --additional-config {additional_config}:\n"
                                f"{log_path.read_text(errors='replace')[-4000:]}")
            if (rss := tree_rss(process.pid)) > MEMORY_WATCHDOG:
                pytest.fail(f"not refused: the server's processes grew to {rss / 2**30:.1f} GiB during start-up:\n"
                            f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        if process.poll() is None:
            pytest.fail(f"the server neither started nor exited in {REFUSAL_TIMEOUT} s:\n"
                        f"{log_path.read_text(errors='replace')[-4000:]}")
        return process.returncode, log_path.read_text(errors="replace")
    finally:
        stop(process)


def assert_refused_clearly(status: int, output: str, *patterns: str) -> None:
    """Non-zero exit; every pattern in the last lines of the output (where a user looks)."""
    tail = "\n".join(line for line in output.splitlines() if line.strip())
    tail = "\n".join(tail.splitlines()[-TAIL_LINES:])
    assert status != 0, output[-4000:]
    for pattern in patterns:
        assert re.search(pattern, tail), f"{pattern!r} not in the last {TAIL_LINES} lines:\n{tail}"


def settings(**values) -> str:
    return json.dumps({"headinfer": values})


def test_host_budget_larger_than_free_memory(model, tmp_path):
    status, output = start_refused(model, tmp_path, settings(cpu_kv_cache_gib=1 << 20))
    assert_refused_clearly(status, output, r"cpu_kv_cache_gib asks for 1048576\.00 GiB",
                           r"only [\d.]+ GiB is available", r"lower cpu_kv_cache_gib")


def test_device_budget_below_the_staging_minimum(model, tmp_path):
    status, output = start_refused(model, tmp_path, settings(cpu_kv_cache_gib=0.05, gpu_kv_cache_gib=1e-6))
    assert_refused_clearly(status, output, r"gpu_kv_cache_gib=.* cannot hold the staging buffers",
                           r"the minimum is [\d.]+ GiB", r"[Rr]aise gpu_kv_cache_gib")


def test_device_budget_larger_than_the_device(model, tmp_path):
    status, output = start_refused(model, tmp_path, settings(cpu_kv_cache_gib=0.05, gpu_kv_cache_gib=100000))
    assert_refused_clearly(status, output, r"gpu_kv_cache_gib", r"[Ll]ower gpu_kv_cache_gib")


def test_unknown_setting(model, tmp_path):
    status, output = start_refused(model, tmp_path, settings(cpu_kv_cache=0.05))
    assert_refused_clearly(status, output, r"unknown setting 'cpu_kv_cache'", r"known settings: cpu_kv_cache_gib")


def test_setting_of_the_wrong_type(model, tmp_path):
    status, output = start_refused(model, tmp_path, settings(cpu_kv_cache_gib="lots"))
    assert_refused_clearly(status, output, r"cpu_kv_cache_gib.* must be a number, got 'lots'")


def test_additional_config_not_json(model, tmp_path):
    """vLLM's own argument parser refuses it (exit 2) before any plugin runs; its message names the option
    and repeats the value."""
    bad = '{"headinfer": {"cpu_kv_cache_gib": 0.05}'
    status, output = start_refused(model, tmp_path, bad)
    assert_refused_clearly(status, output, r"argument --additional-config", re.escape(bad))
    assert "Traceback" not in output, output[-4000:]


def test_headinfer_entry_not_an_object(model, tmp_path):
    status, output = start_refused(model, tmp_path, json.dumps({"headinfer": 0.05}))
    assert_refused_clearly(status, output, r'"headinfer" must be an object.*got 0\.05')


def test_additional_config_not_an_object(model, tmp_path):
    """A JSON list: vLLM's config validation refuses it (additional_config must be a dictionary)."""
    status, output = start_refused(model, tmp_path, "[0.05]")
    assert_refused_clearly(status, output, r"additional_config", r"valid dictionary")


# ----------------------------------------------------------------------------- requests over max_model_len


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("faults-server") / "server.log"
    command = server_command(model, port, "--no-log-error-stack",
                             "--additional-config", settings(cpu_kv_cache_gib=0.01))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(OSError):
                if get(port, "/health") == 200:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"server not healthy in {START_TIMEOUT} s:\n{log_path.read_text(errors='replace')[-4000:]}")
        yield port, str(model), process, log_path
    finally:
        stop(process)


def post(port: int, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=120) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


OVER = MAX_MODEL_LEN + 50


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    "path, request_body",
    [
        ("/v1/completions", {"prompt": "x" * OVER, "max_tokens": 4}),
        ("/v1/completions", {"prompt": "x" * MAX_MODEL_LEN, "max_tokens": 4}),  # no room for one output token
        ("/v1/completions", {"prompt": [5] * OVER, "max_tokens": 4}),  # token ids
        ("/v1/completions", {"prompt": "hello", "max_tokens": MAX_MODEL_LEN + 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * OVER}], "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_MODEL_LEN + 1}),
    ],
    ids=["prompt-over", "prompt-fills", "token-ids-over", "max-tokens-over", "chat-over", "chat-max-tokens-over"],
)
def test_context_over_max_model_len_gets_a_clean_4xx(server, path, request_body, stream):
    port, model, process, _ = server
    status, raw = post(port, path, {"model": model, "stream": stream, **request_body})
    assert 400 <= status < 500, (status, raw[:2000])
    error = json.loads(raw)["error"]
    assert error["code"] == status and error["message"], error
    assert re.search(r"max_model_len|maximum context length|max_tokens", error["message"]), error
    assert process.poll() is None


def test_server_keeps_serving_after_refusals(server):
    port, model, process, log_path = server
    for _ in range(2):  # after the refusals above (pytest runs them first), and once more after one more
        post(port, "/v1/completions", {"model": model, "prompt": "x" * OVER, "max_tokens": 4})
        status, raw = post(port, "/v1/completions",
                           {"model": model, "prompt": "still there?", "max_tokens": 8, "temperature": 0})
        assert status == 200, raw[:2000]
        assert json.loads(raw)["choices"][0]["text"]
    assert get(port, "/health") == 200
    assert process.poll() is None
    log = log_path.read_text(errors="replace")
    bad = [line for line in log.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
    assert not bad, "\n".join(bad[:20])
