"""What every benchmark result records about its run, and the time its step has left.

- The commit: ``HEADINFER_COMMIT`` (``gpu_session.sh`` exports it), else the
  file ``benchmarks/COMMIT`` (ignored by git; written before a device call
  with ``git rev-parse HEAD > benchmarks/COMMIT`` and carried there, since the
  GPU machine gets the working tree without ``.git``), else ``git rev-parse``.
- The deadline: ``GPU_SESSION_DEADLINE`` (seconds since the epoch), which
  ``gpu_session.sh`` sets for each step to the end of its allotment less a
  margin. Steps check it between their pieces of work, most important first,
  and write their results after each, so a slow step returns partial results
  instead of being killed.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

COMMIT_FILE = Path(__file__).with_name("COMMIT")
DEADLINE_VARIABLE = "GPU_SESSION_DEADLINE"


def commit() -> str:
    """The commit the run measures (``unknown`` where nothing says)."""
    named = os.environ.get("HEADINFER_COMMIT", "").strip()
    if named:
        return named
    if COMMIT_FILE.is_file():
        return COMMIT_FILE.read_text().strip() or "unknown"
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=COMMIT_FILE.parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def deadline() -> float:
    """When this step must have written its results (``time.time()`` scale); ``inf`` without a plan."""
    raw = os.environ.get(DEADLINE_VARIABLE, "").strip()
    return float(raw) if raw else math.inf


def seconds_left() -> float:
    """Seconds until :func:`deadline` (``inf`` without a plan)."""
    return deadline() - time.time()


def out_of_time(seconds_needed: float = 0.0) -> bool:
    """Whether a piece of work of about ``seconds_needed`` would end past the deadline."""
    return seconds_left() < seconds_needed
