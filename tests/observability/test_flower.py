"""Flower, as a real process watching a real worker, shows what ares-celery
adds: the fencing token and lease of every exactly-once job, the host, GPUs
and placement score of every GPU job, commits (accepted or fenced) and the
GPU worker's inventory."""

from __future__ import annotations

import pytest
from celery import Task

from tests.observability.conftest import HOST, WORKER
from tests.processes import wait_for

pytestmark = pytest.mark.integration


def flower_events(stack, kind: str, task: str) -> float:
    """flower_events_total for one event type and task name."""
    total = 0.0
    for line in stack.flower.get("/metrics").splitlines():
        if line.startswith("flower_events_total{") and \
                f'type="{kind}"' in line and f'task="{task}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def row_when(stack, task_id: str, ready) -> dict:
    """The task's row in Flower's task table once ``ready(row)`` holds."""
    seen = {}

    def check():
        seen["row"] = row = stack.flower.task_rows().get(task_id)
        return row if row is not None and ready(row) else None
    try:
        return wait_for(check, 20, f"flower to show {task_id} as expected")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last row: {seen.get('row')}") from None


def test_exactly_once_job_shows_lease_and_commit(stack):
    jobs = stack.jobs
    result = jobs.record.apply_async(("flower",), request_id="flower-eo-1")
    value = result.get(timeout=20)
    row = row_when(stack, result.id, lambda r: r["state"] == "SUCCESS"
                   and r.get("ares_commit") == "accepted")
    assert row["ares_fencing_token"] == value["token"]
    assert row["ares_request_id"] == "flower-eo-1"
    assert row["ares_commit_token"] == value["token"]
    assert row["ares_lease_id"] and row["ares_holder"].endswith(
        f":{value['pid']}")
    assert row["worker"] == WORKER
    # The REST API knows the task (and its real final state)...
    api = stack.flower.get_json("/api/tasks", limit=500)
    assert api[result.id]["state"] == "SUCCESS"
    # ...and Flower counted our events like any other.
    assert flower_events(stack, "task-ares-lease", "jobs.record") >= 1
    assert flower_events(stack, "task-ares-commit", "jobs.record") >= 1
    page = stack.flower.get(f"/task/{result.id}")
    assert "Ares fencing token" in page and str(value["token"]) in page


def test_gpu_job_shows_host_gpus_and_score(stack):
    jobs = stack.jobs
    result = jobs.gpu2.apply_async(kwargs={"hold": 0},
                                   request_id="flower-gpu-1")
    value = result.get(timeout=30)
    row = row_when(stack, result.id, lambda r: r["state"] == "SUCCESS"
                   and "ares_host" in r and "ares_commit" in r)
    assert (row["ares_host"], row["ares_gpus"]) == (HOST, value["gpus"])
    assert row["ares_placement_score"] == value["score"]
    assert row["ares_fencing_token"] == value["token"]
    assert row["ares_queue"] == f"ares.gpu.{HOST}"
    assert f"on host {HOST}" in row["ares_placement"]
    assert flower_events(stack, "task-ares-placement", "jobs.gpu2") >= 1
    page = stack.flower.get(f"/task/{result.id}")
    assert "Ares gpus" in page and "Ares placement score" in page


def test_fenced_commit_shows_who_fenced_it(stack):
    result, token = stack.run_fenced("flower-fenced-1")
    row = row_when(stack, result.id, lambda r: r.get("ares_commit"))
    assert row["ares_commit"] == "fenced"
    assert row["ares_commit_token"] == row["ares_fencing_token"] == token
    assert row["ares_fenced_by"] == str(token + 1000)


def test_deferred_and_skipped_jobs_say_why(stack):
    lease = stack.hold_lock("flower-held-1")
    result = Task.apply_async(stack.jobs.record, ("late",),
                              task_id="flower-held-1")
    row = row_when(stack, result.id, lambda r: r.get("ares_deferred"))
    assert row["ares_deferred"] == "lock held by other:4242"
    assert row["state"] == "DEFERRED"      # not Celery's raw "ARES-DEFERRED"
    assert row["ares_waits"] >= 1
    stack.etcd.revoke_lease(lease)
    value = result.get(timeout=30)
    row = row_when(stack, result.id, lambda r: r["state"] == "SUCCESS"
                   and r.get("ares_commit") == "accepted")
    assert row["ares_fencing_token"] == value["token"]
    # A redelivered copy of the committed job is acked and skipped.
    Task.apply_async(stack.jobs.record, ("late",), task_id=result.id)
    row_when(stack, result.id, lambda r: r.get("ares_skipped"))


def test_worker_page_shows_gpu_inventory(stack):
    page = stack.flower.get(f"/worker/{WORKER}")
    assert "ares_gpu_summary" in page
    assert f"host {HOST}: 8 GPUs" in page
    assert "Tesla V100-SXM2-16GB" in page
