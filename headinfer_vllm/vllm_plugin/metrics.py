"""headinfer's counters on vLLM's Prometheus endpoint (``/metrics`` of ``vllm serve``).

The worker records them; vLLM's API server serves them. ``vllm serve`` runs
the API server, the engine core and the workers in separate processes, but
vLLM 0.32 and 0.33 merge metrics across processes (through
``PROMETHEUS_MULTIPROC_DIR``) only with several API servers; otherwise
``/metrics`` shows the API server's own registry. So when headinfer is
selected, :func:`collect_from_all_processes` sets that directory up as vLLM
does for several API servers, and every process writes its metrics there.
Counters add up over workers (tensor and pipeline ranks, data-parallel
engines); so do the gauges (``livesum``: live processes only).

========================================  =======  =============================================
metric                                    type     meaning
========================================  =======  =============================================
``headinfer:loaded_bytes_total``          counter  KV bytes streamed from the host tier to the
                                                   device's staging buffers
``headinfer:written_bytes_total``         counter  new tokens' KV bytes written to the host tier
``headinfer:transfer_seconds_total``      counter  time spent transferring (see below)
``headinfer:steps_total``                 counter  model steps that ran attention
``headinfer:split_steps_total``           counter  decode steps split between PCIe and CPU
                                                   attention (CUDA, ``cpu_attention``; only the
                                                   steps where the split pays)
``headinfer:units``                       gauge    (layer, head group) units by ``placement``:
                                                   ``resident`` on the device, ``streamed``,
                                                   and ``cpu_decode``: the streamed units that
                                                   the CPU attends in decode-only steps (CUDA,
                                                   ``cpu_attention``)
``headinfer:host_tier_bytes``             gauge    host memory allocated for the KV (pinned on
                                                   CUDA)
``headinfer:host_tier_used_bytes``        gauge    host-tier bytes of the pages the last step's
                                                   requests hold (a page shared by two requests
                                                   counts twice; at most the tier)
``headinfer:cache_pages_read_total``      counter  distinct pages that steps read (device page
                                                   cache, ``device_tier=pages``)
``headinfer:cache_pages_hit_total``       counter  of those, the pages the cache held: the hit
                                                   rate is their ratio (of rates, in PromQL)
``headinfer:cache_hit_rate``              gauge    hits / reads since start (the highest of the
                                                   ranks: each rank reads the same pages)
``headinfer:cached_bytes``                gauge    device bytes of the pages the cache holds now
========================================  =======  =============================================

Transfer time: on CUDA, the span of each step's copies on the copy stream
(from its first load to the end of its last transfer, waits for free staging
buffers included), read from CUDA events once they completed (never waiting
for them); off CUDA, where transfers are synchronous, their wall time.

An offline ``LLM`` records them too, in its worker process's default
registry (``prometheus_client.REGISTRY``), file-backed in the same temporary
directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

from headinfer_vllm.core.transfer import Traffic

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
OWNER_ENV = "HEADINFER_PROMETHEUS_OWNER"
"""The process that set ``PROMETHEUS_MULTIPROC_DIR`` up for headinfer (its pid)."""

logger = logging.getLogger("headinfer_vllm")

_directory: tempfile.TemporaryDirectory | None = None
"""The metrics directory this process made (removed when it exits), as vLLM keeps its own."""


def collect_from_all_processes() -> None:
    """Have ``/metrics`` merge the metrics of every process of this engine (call in the API server,
    before it starts the engine).

    Does what vLLM does for several API servers
    (``vllm.v1.metrics.prometheus.setup_multiprocess_prometheus``), for one: a
    temporary ``PROMETHEUS_MULTIPROC_DIR``, inherited by the engine's
    processes, and file-backed values for the metrics this process creates
    from now on (vLLM creates its own when the engine client starts, after
    this). Nothing changes where the directory is already set (by the user,
    or by vLLM for several API servers), unless headinfer set it in another
    process: then this engine gets a directory of its own. Can go when vLLM merges the metrics of
    its engine processes with one API server too.
    """
    global _directory
    owner = os.environ.get(OWNER_ENV)
    if os.environ.get(MULTIPROCESS_ENV) and owner in (None, str(os.getpid())):
        return
    # Unset, or inherited from another process that ran headinfer (a script that built an offline LLM,
    # then started a server): a directory of its own, so no other process's files mix in.
    from prometheus_client import values

    _directory = tempfile.TemporaryDirectory(prefix="headinfer-prometheus-")
    os.environ[MULTIPROCESS_ENV] = _directory.name
    os.environ[OWNER_ENV] = str(os.getpid())
    values.ValueClass = values.MultiProcessValue()
    logger.debug("headinfer: Prometheus metrics of all processes go to %s", _directory.name)


@contextlib.contextmanager
def _file_backed_values():
    """Make metrics created inside write to ``PROMETHEUS_MULTIPROC_DIR`` when vLLM serves from it.

    prometheus_client chooses file-backed values when it is first imported,
    from the environment. The API server imports it before
    :func:`collect_from_all_processes` (or vLLM) sets
    ``PROMETHEUS_MULTIPROC_DIR``, and a forked engine core inherits that
    choice, so headinfer's metrics would stay in the worker's memory where
    ``/metrics`` never sees them.
    """
    from prometheus_client import values

    if os.environ.get(MULTIPROCESS_ENV) is None or getattr(values.ValueClass, "_multiprocess", False):
        yield
        return
    chosen = values.ValueClass
    values.ValueClass = values.MultiProcessValue()
    try:
        yield
    finally:
        values.ValueClass = chosen


class HeadInferMetrics:
    """The process's headinfer metrics; one instance per process (Prometheus names are global)."""

    _instance: HeadInferMetrics | None = None

    @classmethod
    def get(cls) -> HeadInferMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        with _file_backed_values():
            self.loaded_bytes = Counter(
                "headinfer:loaded_bytes", "KV bytes streamed from the host tier to the device's staging buffers.")
            self.written_bytes = Counter(
                "headinfer:written_bytes", "New tokens' KV bytes written to the host tier.")
            self.transfer_seconds = Counter(
                "headinfer:transfer_seconds",
                "Time spent transferring KV: on CUDA the span of each step's copies on the copy stream, "
                "otherwise their wall time.")
            self.steps = Counter("headinfer:steps", "Model steps that ran attention.")
            self.split_steps = Counter(
                "headinfer:split_steps", "Decode steps split between PCIe and CPU attention in the host tier.")
            units = Gauge("headinfer:units", "(layer, head group) units of the KV by placement.",
                          ["placement"], multiprocess_mode="livesum")
            self.resident_units, self.streamed_units = units.labels("resident"), units.labels("streamed")
            self.cpu_decode_units = units.labels("cpu_decode")
            self.host_tier_bytes = Gauge(
                "headinfer:host_tier_bytes", "Host memory allocated for the KV cache.", multiprocess_mode="livesum")
            self.host_tier_used_bytes = Gauge(
                "headinfer:host_tier_used_bytes",
                "Host-tier bytes of the pages the last step's requests hold (shared pages counted per request).",
                multiprocess_mode="livesum")
            self.cache_pages_read = Counter(
                "headinfer:cache_pages_read", "Distinct pages that steps read through the device page cache.")
            self.cache_pages_hit = Counter(
                "headinfer:cache_pages_hit", "Pages read that the device page cache held.")
            self.cache_hit_rate = Gauge(
                "headinfer:cache_hit_rate", "Device page cache hits per page read since start.",
                multiprocess_mode="livemax")
            self.cached_bytes = Gauge(
                "headinfer:cached_bytes", "Device bytes of the pages the device page cache holds.",
                multiprocess_mode="livesum")
        self._recorded = Traffic()

    def describe_store(self, *, resident_units: int, streamed_units: int, cpu_decode_units: int,
                       host_bytes: int) -> None:
        """Set the gauges of a new page store (``cpu_decode_units``: of the streamed ones)."""
        self.resident_units.set(resident_units)
        self.streamed_units.set(streamed_units)
        self.cpu_decode_units.set(cpu_decode_units)
        self.host_tier_bytes.set(host_bytes)
        self._recorded = Traffic()

    def record(self, traffic: Traffic) -> None:
        """Add what ``traffic`` (a store's running totals) gained since the last call."""
        recorded = self._recorded
        self.loaded_bytes.inc(traffic.loaded_bytes - recorded.loaded_bytes)
        self.written_bytes.inc(traffic.written_bytes - recorded.written_bytes)
        self.transfer_seconds.inc(traffic.transfer_seconds - recorded.transfer_seconds)
        self.steps.inc(traffic.steps - recorded.steps)
        self.split_steps.inc(traffic.split_steps - recorded.split_steps)
        self.host_tier_used_bytes.set(traffic.step_host_bytes)
        self.cache_pages_read.inc(traffic.pages_read - recorded.pages_read)
        self.cache_pages_hit.inc(traffic.pages_hit - recorded.pages_hit)
        self.cache_hit_rate.set(traffic.hit_rate)
        self.cached_bytes.set(traffic.cached_bytes)
        self._recorded = traffic.snapshot()
