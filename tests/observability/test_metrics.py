"""The Prometheus counters move when jobs run, are deduplicated, find their
lock held, are skipped as committed, get fenced, and take GPUs: read from
the worker's own ``/metrics`` (a prefork worker, so every number is the sum
over its pool processes) and, for client-side dedup, from this process."""

from __future__ import annotations

import pytest
from celery import Task
from prometheus_client import REGISTRY

from ares_celery.errors import RequestIdConflict
from tests.observability.conftest import HOST
from tests.processes import wait_for
from tests.records import KEYS

pytestmark = pytest.mark.integration


def client_requests(outcome: str) -> float:
    return REGISTRY.get_sample_value("ares_requests_total",
                                     {"outcome": outcome}) or 0.0


def worker_grows(stack, name: str, before: float, what: str, **labels):
    return wait_for(lambda: stack.worker_metric(name, **labels) > before,
                    20, what)


def test_runs_and_duplicates_are_counted(stack):
    jobs = stack.jobs
    new, dup, conflict = (client_requests(o)
                          for o in ("new", "duplicate", "conflict"))
    acquired = stack.worker_metric("ares_job_locks_total", outcome="acquired")
    accepted = stack.worker_metric("ares_commits_total", outcome="accepted")

    first = jobs.record.apply_async(("m",), request_id="metrics-run-1")
    again = jobs.record.apply_async(("m",), request_id="metrics-run-1")
    with pytest.raises(RequestIdConflict):
        jobs.record.apply_async(("other",), request_id="metrics-run-1")
    assert again.id == first.id
    assert first.get(timeout=20)["value"] == "m"
    assert client_requests("new") == new + 1
    assert client_requests("duplicate") == dup + 1
    assert client_requests("conflict") == conflict + 1

    wait_for(lambda: stack.worker_metric(
        "ares_commits_total", outcome="accepted") == accepted + 1, 20,
        "the worker to count the commit")
    assert stack.worker_metric("ares_job_locks_total",
                               outcome="acquired") == acquired + 1
    assert stack.worker_metric("ares_leases_granted_total") >= 1
    assert ("ares_leases_lost_total", frozenset()) in stack.worker_metrics()

    # The same job's message again, as a broker redelivery would publish it:
    # skipped as committed, and counted so.
    skipped = stack.worker_metric("ares_job_locks_total", outcome="committed")
    Task.apply_async(jobs.record, ("m",), task_id=first.id)
    worker_grows(stack, "ares_job_locks_total", skipped,
                 "the redelivery to be skipped", outcome="committed")


def test_lock_held_elsewhere_is_counted_then_runs(stack):
    held = stack.worker_metric("ares_job_locks_total",
                               outcome="held_elsewhere")
    lease = stack.hold_lock("metrics-held-1")
    result = Task.apply_async(stack.jobs.record, ("late",),
                              task_id="metrics-held-1")
    worker_grows(stack, "ares_job_locks_total", held,
                 "the worker to find the lock held", outcome="held_elsewhere")
    stack.etcd.revoke_lease(lease)  # the holder dies; the job runs
    assert result.get(timeout=30)["value"] == "late"


def test_fenced_commit_is_counted(stack):
    fenced = stack.worker_metric("ares_commits_total", outcome="fenced")
    result, _ = stack.run_fenced("metrics-fenced-1")
    worker_grows(stack, "ares_commits_total", fenced,
                 "the commit to be fenced", outcome="fenced")
    assert stack.store.hget(KEYS.job(result.id), "committed") is None
    entry = stack.store.xrange(KEYS.fenced_log())[-1][1]
    assert entry[b"job"] == result.id.encode()


def test_gpu_allocations_and_busy_gauge(stack):
    jobs = stack.jobs
    allocations = stack.worker_metric("ares_gpu_allocations_total")
    waits = stack.worker_metric("ares_gpu_allocation_wait_seconds_count")
    result = jobs.gpu4.apply_async(kwargs={"hold": 30},
                                   request_id="metrics-gpu-1")
    wait_for(lambda: stack.store.llen(f"test:gpu-started:{result.id}"), 20,
             "the GPU job to start")
    # The gauge is host-wide although a pool process wrote it.
    assert stack.worker_metric("ares_gpus_busy", host=HOST) == 4
    assert stack.worker_metric("ares_gpu_allocations_total") == \
        allocations + 1
    assert stack.worker_metric(
        "ares_gpu_allocation_wait_seconds_count") == waits + 1
    jobs.release(stack.store, f"test:release:{result.id}")
    assert len(result.get(timeout=20)["gpus"]) == 4
    wait_for(lambda: stack.worker_metric("ares_gpus_busy", host=HOST) == 0,
             20, "the GPUs to be free again")
