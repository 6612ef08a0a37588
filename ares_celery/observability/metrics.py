"""Prometheus metrics of the exactly-once and GPU layers.

The names are a contract (dashboards and alerts are built on them); see
docs/metrics.md. Metric objects are built on first use in the process that
uses them, so that a worker can switch prometheus_client to multiprocess
mode (every prefork child writes its own mmap file, the main process serves
the sum) before any of them exists. In any other process they live in
prometheus_client's default registry, where the application's own
``/metrics`` endpoint already picks them up.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUEST_OUTCOMES = ("new", "duplicate", "conflict")
LOCK_OUTCOMES = ("acquired", "held_elsewhere", "committed", "unavailable")
COMMIT_OUTCOMES = ("accepted", "fenced")
#: A checkpoint write by the holder (saved) or by a zombie (fenced: refused).
CHECKPOINT_OUTCOMES = ("saved", "fenced")
#: Where a recovered job's message came from: its lock (it was running) or
#: a worker's reservation (prefetched or waiting for its ETA).
RECOVERY_SOURCES = ("lock", "reserved")
#: requested: a running job was asked to yield its GPUs; yielded: it
#: stopped by itself (``Preempted``); killed: its grace ran out.
PREEMPTION_OUTCOMES = ("requested", "yielded", "killed")
#: GPU waits range from "free at once" to "queued behind a training run".
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                60, 120, 300, 600)


class AresMetrics:
    """The metric objects, all registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "ares_requests_total",
            "Submissions with a request id, by dedup outcome (client side)",
            ["outcome"], registry=registry)
        self.leases_granted = Counter(
            "ares_leases_granted_total",
            "Worker process leases granted by etcd", registry=registry)
        self.leases_lost = Counter(
            "ares_leases_lost_total",
            "Worker process leases lost (expired or not refreshed in a TTL)",
            registry=registry)
        self.job_locks = Counter(
            "ares_job_locks_total",
            "Attempts to take a job's lock before running it, by outcome",
            ["outcome"], registry=registry)
        self.commits = Counter(
            "ares_commits_total",
            "Final results written by lease holders: accepted, or fenced "
            "(a zombie's commit rejected)", ["outcome"], registry=registry)
        self.checkpoints = Counter(
            "ares_checkpoints_total",
            "Checkpoints written by jobs: saved, or fenced (a zombie's "
            "checkpoint refused)", ["outcome"], registry=registry)
        self.gpu_wait = Histogram(
            "ares_gpu_allocation_wait_seconds",
            "How long a GPU job waited on its host for its GPUs",
            buckets=WAIT_BUCKETS, registry=registry)
        self.gpu_wait_by_priority = Histogram(
            "ares_gpu_wait_by_priority_seconds",
            "How long a GPU job waited on its host for its GPUs, by the "
            "job's priority (0-9, higher is more urgent)", ["priority"],
            buckets=WAIT_BUCKETS, registry=registry)
        self.gpu_allocations = Counter(
            "ares_gpu_allocations_total",
            "GPU allocations made by workers", registry=registry)
        # The busy count is host-wide (every pool process shares the ledger),
        # so the value written last is the truth: "mostrecent".
        self.attempts = Histogram(
            "ares_job_attempt",
            "Attempt number of each holder that took a job's lock (1: the "
            "first; more: earlier holders died, hung or were cut off)",
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20), registry=registry)
        self.attempts_exhausted = Counter(
            "ares_attempts_exhausted_total",
            "Jobs committed as FAILURE (AttemptsExhausted): too many holders "
            "lost", registry=registry)
        self.recoveries = Counter(
            "ares_recoveries_total",
            "Jobs re-dispatched by the recoverer after their holder's or "
            "their reserving worker's lease expired", ["source"],
            registry=registry)
        self.preemptions = Counter(
            "ares_preemptions_total",
            "Running preemptible GPU jobs asked to yield to a more urgent "
            "job, and how each ended (yielded, or killed after the grace)",
            ["outcome"], registry=registry)
        self.preempted_gpu_seconds = Counter(
            "ares_preempted_gpu_seconds_total",
            "GPU-seconds of work preempted jobs had done since their last "
            "checkpoint when asked to yield (what their resume redoes)",
            registry=registry)
        self.gpus_busy = Gauge(
            "ares_gpus_busy", "GPUs allocated to running jobs, per host",
            ["host"], multiprocess_mode="mostrecent", registry=registry)
        # Every outcome exists from the start, so rate() works from zero.
        for counter, outcomes in ((self.requests, REQUEST_OUTCOMES),
                                  (self.job_locks, LOCK_OUTCOMES),
                                  (self.commits, COMMIT_OUTCOMES),
                                  (self.checkpoints, CHECKPOINT_OUTCOMES),
                                  (self.recoveries, RECOVERY_SOURCES),
                                  (self.preemptions, PREEMPTION_OUTCOMES)):
            for outcome in outcomes:
                counter.labels(outcome)

    def unregister(self) -> None:
        for metric in (self.requests, self.leases_granted, self.leases_lost,
                       self.job_locks, self.commits, self.checkpoints,
                       self.gpu_wait, self.gpu_wait_by_priority,
                       self.gpu_allocations, self.gpus_busy, self.attempts,
                       self.attempts_exhausted, self.recoveries,
                       self.preemptions, self.preempted_gpu_seconds):
            try:
                self.registry.unregister(metric)
            except KeyError:
                pass


_metrics: AresMetrics | None = None
_guard = threading.Lock()


def metrics() -> AresMetrics:
    """This process's metrics, built on first use."""
    global _metrics
    current = _metrics
    if current is None:
        with _guard:
            if _metrics is None:
                _metrics = AresMetrics(REGISTRY)
            current = _metrics
    return current


F = TypeVar("F", bound=Callable[..., None])


def _never_raises(record: F) -> F:
    """A metric that cannot be written (its multiprocess directory removed
    at shutdown, a full disk) must not fail the job that records it."""
    @functools.wraps(record)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - metrics are best effort
            logger.debug("ares: metric %s not recorded: %s",
                         record.__name__, exc)
    return wrapper  # type: ignore[return-value]


@_never_raises
def count_request(outcome: str) -> None:
    metrics().requests.labels(outcome).inc()


@_never_raises
def count_lease_granted() -> None:
    metrics().leases_granted.inc()


@_never_raises
def count_lease_lost() -> None:
    metrics().leases_lost.inc()


@_never_raises
def count_job_lock(outcome: str) -> None:
    metrics().job_locks.labels(outcome).inc()


@_never_raises
def count_commit(outcome: str) -> None:
    metrics().commits.labels(outcome).inc()


@_never_raises
def count_checkpoint(outcome: str) -> None:
    metrics().checkpoints.labels(outcome).inc()


@_never_raises
def observe_attempt(attempt: int) -> None:
    metrics().attempts.observe(attempt)


@_never_raises
def count_attempts_exhausted() -> None:
    metrics().attempts_exhausted.inc()


@_never_raises
def count_recovery(source: str) -> None:
    metrics().recoveries.labels(source).inc()


@_never_raises
def observe_gpu_allocation(wait_seconds: float,
                           priority: int | None = None) -> None:
    m = metrics()
    m.gpu_wait.observe(wait_seconds)
    if priority is not None:
        m.gpu_wait_by_priority.labels(str(priority)).observe(wait_seconds)
    m.gpu_allocations.inc()


@_never_raises
def count_preemption(outcome: str, lost_gpu_seconds: float = 0.0) -> None:
    m = metrics()
    m.preemptions.labels(outcome).inc()
    if lost_gpu_seconds > 0:
        m.preempted_gpu_seconds.inc(lost_gpu_seconds)


@_never_raises
def set_gpus_busy(host: str, busy: int) -> None:
    metrics().gpus_busy.labels(host).set(busy)


# -- worker side: multiprocess mode and the HTTP endpoint ----------------------


def enable_multiprocess(directory: str | None = None) -> tuple[str, bool]:
    """Switch this process (and the pool processes it forks later) to
    prometheus_client's multiprocess mode.

    Call it in the worker's main process before the pool forks. Uses
    ``$PROMETHEUS_MULTIPROC_DIR`` if set (the operator then owns wiping it
    between runs), else a fresh temporary directory. Returns the directory
    and whether it was created here (and so should be removed at shutdown).
    """
    global _metrics
    directory = directory or os.environ.get(MULTIPROC_ENV)
    created = not directory
    if created:
        directory = tempfile.mkdtemp(prefix="ares-metrics-")
    os.makedirs(directory, exist_ok=True)
    os.environ[MULTIPROC_ENV] = directory
    from prometheus_client import values

    # The value class is chosen when prometheus_client is imported, which
    # happened long before the worker read its settings: choose again.
    values.ValueClass = values.get_value_class()
    with _guard:
        if _metrics is not None:
            _metrics.unregister()
            _metrics = None
    return directory, created


class MetricsServer:
    """``/metrics`` for the whole worker, served by its main process."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._server = None
        self._directory: str | None = None
        self._remove_directory = False

    def prepare(self) -> None:
        """Before the pool forks."""
        self._directory, self._remove_directory = enable_multiprocess()
        metrics()  # every series exists (at zero) before the first scrape

    def start(self) -> None:
        from prometheus_client import multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._directory)
        self._server, _ = start_http_server(self.port, self.address,
                                            registry=registry)
        logger.info("ares: Prometheus metrics on http://%s:%d/metrics",
                    self.address, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._remove_directory and self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._remove_directory = False
