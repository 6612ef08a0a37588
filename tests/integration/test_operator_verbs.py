"""revoke, purge and forget: what the operator verbs mean for a request id.

- a revoke is final for its request id (like a committed result) until
  ``celery ares forget`` retires it; then the same job id runs again, on
  the very worker that remembered the revoke;
- ``AsyncResult.forget()`` retires the whole job (refused while it runs),
  so a retry runs it again instead of waiting for a result that is gone;
- ``celery purge`` empties the GPU host queues too, and a retry of a purged
  job publishes it again at once.

Real Redis, etcd, brokers and workers, both brokers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker
from celery.exceptions import TaskRevokedError

from ares_celery import AresError
from ares_celery.errors import JobStillHeld
from ares_celery.exactly_once.identity import job_id_for
from ares_celery.gpu import mock_topology
from ares_celery.gpu.inventory import InventoryPublisher, host_queue
from ares_celery.gpu.janitor import register_host_queue
from ares_celery.keys import Keys
from tests.processes import ROOT, WorkerProcess, wait_for
from tests.records import KEYS, executions, job_record

pytestmark = pytest.mark.integration


def celery(broker, *args, stdin=None):
    """``celery -A tests.apps.jobs <args>`` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.jobs", *args],
        cwd=ROOT, env=dict(os.environ, ARES_TEST_BROKER=broker.url),
        input=stdin, capture_output=True, text=True, timeout=90)


def parent_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("PPid:")))


def test_revoke_is_final_until_forget_then_the_same_worker_runs_it(
        jobs, store, broker):
    rid = "verbs-revoked"
    job_id = job_id_for("ares", rid)
    with WorkerProcess(jobs.app) as worker:
        replies = jobs.app.control.revoke(job_id, reply=True, timeout=5,
                                          destination=[worker.name])
        assert replies, "the worker did not confirm the revoke"
        first = jobs.record.apply_async(("v",), request_id=rid)
        with pytest.raises(TaskRevokedError):
            first.get(timeout=20)
        # The revoke committed REVOKED (worker main process, no lease
        # held); the discarded message then named its request id.
        wait_for(lambda: job_record(store, job_id).get("request") == rid, 10,
                 "the request id noted with the REVOKED commit")
        assert job_record(store, job_id)["state"] == "REVOKED"
        # Final for the request id: a retry returns the revoked job.
        retry = jobs.record.apply_async(("v",), request_id=rid)
        assert retry.id == job_id and retry.state == "REVOKED"
        assert broker.queue_length("celery") == 0
        assert executions(store, job_id) == []

        out = celery(broker, "ares", "forget", rid)
        assert out.returncode == 0, out.stderr
        assert f"revoke   forgotten by {worker.name}" in out.stdout
        assert "REVOKED result and commit marker" in out.stdout
        assert not store.exists(KEYS.dedup(rid))

        rerun = jobs.record.apply_async(("v",), request_id=rid)
        assert rerun.id == job_id
        result = rerun.get(timeout=20)
        assert result["value"] == "v" and result["request_id"] == rid
        # Run by a pool process of the worker that saw the revoke.
        assert parent_pid(result["pid"]) == worker.proc.pid
    assert len(executions(store, job_id)) == 1
    assert job_record(store, job_id)["state"] == "SUCCESS"

    again = celery(broker, "ares", "forget", "verbs-never-submitted")
    assert again.returncode != 0 and "nothing to forget" in again.stderr


def test_forget_refuses_while_the_job_runs_then_retires_it(
        jobs, store, broker, worker):
    rid = "verbs-running"
    running = jobs.blocking.apply_async(("b",), request_id=rid)
    wait_for(lambda: store.llen(f"test:started:{running.id}"), 20,
             "the job to start")

    out = celery(broker, "ares", "forget", rid)
    assert out.returncode != 0
    assert "refusing" in out.stderr
    assert f"{socket.gethostname()}:{os.getpid()}" in out.stderr  # the holder
    with pytest.raises(JobStillHeld, match="refusing") as info:
        running.forget()
    assert isinstance(info.value, AresError)
    assert store.exists(KEYS.dedup(rid))     # nothing was retired

    jobs.release(store, f"test:release:{running.id}")
    first = running.get(timeout=20)
    running.forget()   # retires the job (waits for the lazy lock release)
    record = job_record(store, running.id)
    # The commit goes; "retired" stays, so the next holder raises the
    # fence even though it is the first since the record was deleted.
    assert "committed" not in record and record.get("retired") == "1"
    assert not store.exists(KEYS.dedup(rid))
    assert running.state == "PENDING"

    retry = jobs.blocking.apply_async(("b",), request_id=rid)
    assert retry.id == running.id
    second = retry.get(timeout=20)           # ran again, newer holder
    assert second["token"] > first["token"]
    assert len(executions(store, running.id)) == 2


_ETCD_APPS: dict[str, tuple] = {}


def etcd_store_app(jobs, broker):
    """An app whose results live in etcd, on this test's broker."""
    if broker.kind not in _ETCD_APPS:
        app, ares = jobs.make_app(f"verbs-etcd-{broker.kind}",
                                  broker=broker.url,
                                  ares_result_store="etcd",
                                  result_backend=None)

        @ares.task(name="verbs.echo")
        def echo(value):
            ctx = ares.current()
            jobs.record_execution(ctx.job_id, ctx.fencing_token)
            return {"value": value, "token": ctx.fencing_token}

        app.loader.import_task_module("celery.contrib.testing.tasks")
        _ETCD_APPS[broker.kind] = (app, echo)
    return _ETCD_APPS[broker.kind]


def test_etcd_store_revoke_and_async_forget(jobs, store, etcd, broker):
    app, echo = etcd_store_app(jobs, broker)
    rid = "verbs-etcd-revoked"
    job_id = job_id_for("ares", rid)
    with start_worker(app, pool="threads", concurrency=2,
                      perform_ping_check=False, shutdown_timeout=20) as worker:
        # The worker's control consumer may subscribe a moment after it is
        # ready (Redis broadcasts are not kept): revoke until it answers.
        wait_for(lambda: app.control.revoke(
            job_id, reply=True, timeout=1, destination=[worker.hostname]),
            20, "the worker to confirm the revoke")
        first = echo.apply_async((1,), request_id=rid)
        with pytest.raises(TaskRevokedError):
            first.get(timeout=20, interval=0.05)
        def marker():
            return json.loads(etcd.get(KEYS.done(job_id)).value)
        wait_for(lambda: marker()["request"] == rid, 10,
                 "the request id noted with the REVOKED commit")
        assert marker()["state"] == "REVOKED"
        retry = echo.apply_async((1,), request_id=rid)
        assert retry.id == job_id and retry.state == "REVOKED"

        retry.forget()
        assert etcd.get(KEYS.done(job_id)) is None
        assert etcd.get(KEYS.result(job_id)) is None
        assert not store.exists(KEYS.dedup(rid))

        rerun = echo.apply_async((1,), request_id=rid)
        assert rerun.id == job_id
        assert rerun.get(timeout=20, interval=0.05)["value"] == 1
        # Forgotten after success too: the retry runs it once more.
        rerun.forget()
        third = echo.apply_async((1,), request_id=rid)
        assert third.get(timeout=20, interval=0.05)["value"] == 1
    assert len(executions(store, job_id)) == 2


def test_celery_purge_covers_gpu_queues_and_purged_jobs_come_back(
        jobs, store, etcd, broker):
    host = "purgebox"
    queue = host_queue(host)
    fake = InventoryPublisher(etcd, Keys("ares"),
                              mock_topology("dgx1-v100", host=host),
                              lease_ttl=10, queue=queue)
    fake.publish()
    register_host_queue(jobs.ares.services, host, queue)
    try:
        jobs.ares.router.cache().wait_for(lambda hosts: host in hosts, 5)
        cpu = jobs.record.apply_async(("p",), request_id="verbs-purged-cpu")
        gpu = jobs.gpu1.apply_async(request_id="verbs-purged-gpu")
        assert broker.queue_length("celery") == 1
        assert broker.queue_length(queue) == 1

        declined = celery(broker, "purge", stdin="n\n")
        assert declined.returncode != 0
        assert queue in declined.stdout          # listed in the prompt
        assert broker.queue_length(queue) == 1   # declined: nothing gone
        assert not store.exists(KEYS.purged())

        out = celery(broker, "purge", "-f")
        assert out.returncode == 0, out.stderr
        assert broker.queue_length("celery") == 0
        assert broker.queue_length(queue) == 0
        assert "ares: purge recorded" in out.stdout

        # Retries publish the purged jobs again at once, and only once.
        for _ in range(2):
            assert jobs.record.apply_async(
                ("p",), request_id="verbs-purged-cpu").id == cpu.id
            assert jobs.gpu1.apply_async(
                request_id="verbs-purged-gpu").id == gpu.id
            assert broker.queue_length("celery") == 1
            assert broker.queue_length(queue) == 1
    finally:
        fake.withdraw()

    jobs.release(store)
    with WorkerProcess(jobs.app, name=f"w@{host}",
                       env={"ARES_MOCK_GPUS": "dgx1-v100"}):
        assert cpu.get(timeout=30)["value"] == "p"
        assert gpu.get(timeout=30)["host"] == host
    assert len(executions(store, cpu.id)) == 1
    assert len(store.lrange("test:gpu-runs", 0, -1)) == 1
