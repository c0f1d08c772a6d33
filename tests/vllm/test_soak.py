"""The soak's short mode (benchmarks/soak.py --short): about 100 mixed requests to the headinfer server,
then the greedy and seeded ones to a stock-backend server; no violation may be recorded.

A few minutes on 2 CPU cores, most of it the two servers' start-up.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("aiohttp")

pytestmark = pytest.mark.vllm

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
TIME_LIMIT = 540  # the script's own limit; it stops its servers when it is reached


def test_soak_short_mode(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--short", "--out", str(out), "--time-limit", str(TIME_LIMIT)],
        capture_output=True, text=True, timeout=TIME_LIMIT + 120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=SCRIPT.parents[1],
    )
    output = completed.stdout[-6000:] + completed.stderr[-4000:]
    report_path = out / "soak.json"
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    assert report["violations"] == [], "\n".join(report["violations"][:30]) + "\n" + output
    assert completed.returncode == 0, output
    head = report["headinfer"]
    assert head["requests"]["total"] >= 100
    assert head["peak_in_flight"] >= 32
    assert head["preemptions"] > 0
    assert head["requests"]["aborted"] >= 50
    assert report["comparison"]["greedy_vs_stock"]["compared"] > 0
    assert (out / "soak.png").exists()
