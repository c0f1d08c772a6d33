"""benchmarks/gpu_session.sh: its plan fits one device call, and a dry run brings back its files.

The device tool runs one command for at most 600 s and brings back at most 8
files from $OUT, no more than 2 folders down, named in letters, digits, '.',
'_' and '-'.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

from headinfer_vllm.core import cpu_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
ORDER = ["build", "facts", "tests", "bench_core", "bench_hf"]
FILES = {
    "run.log", "facts.json", "tests.log", "bench_core.json", "bench_core.png", "bench_hf.json", "bench_hf.png",
    "bench_hf.md",
}


def session(*args: str, out: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env}
    for name in ("GPU_SESSION_FAIL", "GPU_SESSION_HANG"):
        environment.setdefault(name, "")
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=600, check=False
    )


def summary(out: pathlib.Path) -> dict[str, str]:
    """The run's outcome per step, from the summary at the end of run.log."""
    log = (out / "run.log").read_text()
    assert "== summary" in log, log
    lines = log.split("== summary", 1)[1].strip().splitlines()
    return dict(line.strip().split(": ", 1) for line in lines)


def test_the_plan_fits_one_device_call_most_important_first(tmp_path):
    result = session("--plan", out=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"^\s*\d+\. (\w+)\s+allotment\s+(\d+) s \+ (\d+) s kill", result.stdout, re.MULTILINE)
    assert [name for name, _, _ in steps] == ORDER
    total = sum(int(limit) + int(kill) for _, limit, kill in steps)
    assert total <= 540
    assert f"total: {total} s of at most 540 s" in result.stdout
    assert not any(tmp_path.iterdir())  # --plan runs nothing


def test_a_dry_run_brings_back_every_file_though_a_step_fails(tmp_path):
    result = session("--dry-run", out=tmp_path, GPU_SESSION_FAIL="tests", HEADINFER_COMMIT="0123abc")
    assert result.returncode == 1, result.stdout + result.stderr  # one step failed
    files = [path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.as_posix() for path in files} == FILES
    assert len(files) <= 8
    assert all(len(path.parts) <= 3 for path in files)  # at most 2 folders down
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for path in files for part in path.parts)
    assert summary(tmp_path) == {
        "build": "ok", "facts": "ok", "tests": "failed (exit 3)", "bench_core": "ok", "bench_hf": "ok"
    }
    log = (tmp_path / "run.log").read_text()
    starts = [log.index(f" step {step} (allotment") for step in ORDER]
    assert starts == sorted(starts)
    assert "injected failure" in (tmp_path / "tests.log").read_text()

    assert "commit 0123abc," in log  # benchmarks/COMMIT's stand-in: HEADINFER_COMMIT
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["commit"] == "0123abc"
    assert facts["host_memory_before_pinning"]["total_bytes"] > 0
    assert facts["machine"]["logical_cores"] >= 1
    assert facts["host_memory"]["read_gbps"] > 0
    assert facts["cpu_attention"]["kernels"]["torch_sdpa"]["kv_read_gbps"] > 0
    core = json.loads((tmp_path / "bench_core.json").read_text())["results"][0]
    assert core["decode_aten_ops_per_step"] > 0 and core["decode_host_ms_per_layer"] > 0
    if cpu_attention.is_available():  # the split's path, half the units on the CPU kernel
        assert 0 < core["split_cpu_units"] < core["split_units"] and core["decode_split_ms_per_layer"] > 0
    hf = json.loads((tmp_path / "bench_hf.json").read_text())
    assert hf["commit"] == "0123abc"
    assert hf["setups"]["dynamic"]["longest_context"] > 0
    assert hf["setups"]["headinfer"]["longest_context"] > 0


def test_a_step_that_outlives_its_allotment_is_killed_and_the_next_one_runs(tmp_path):
    (tmp_path / "facts.json").write_text("{}")  # an earlier run's: must not pass for this one's
    result = session("--dry-run", "--steps", "facts,tests", out=tmp_path, GPU_SESSION_HANG="facts")
    assert result.returncode == 1
    assert summary(tmp_path) == {"facts": "timed out (exit 137)", "tests": "ok"}  # SIGTERM ignored: SIGKILL
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.log", "tests.log"]


def test_steps_stop_themselves_at_their_deadline(tmp_path):
    """A step past its deadline writes what it has and exits, rather than waiting to be killed."""
    past = {"GPU_SESSION_DEADLINE": str(time.time() - 1), "PYTHONPATH": str(ROOT)}
    facts = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "machine_facts.py"), "--smoke", "--out", str(tmp_path)],
        env={**os.environ, **past}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert facts.returncode == 1, facts.stdout + facts.stderr
    written = json.loads((tmp_path / "facts.json").read_text())
    assert written["machine"] == {"skipped": "the facts step's time allotment ran out"}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_config.py"],
        cwd=ROOT, env={**os.environ, **past}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert "time allotment ran out" in tests.stdout and " passed" not in tests.stdout, tests.stdout


def test_an_unknown_step_is_refused(tmp_path):
    result = session("--steps", "facts,nope", out=tmp_path)
    assert result.returncode == 2
    assert "unknown step nope" in result.stderr
