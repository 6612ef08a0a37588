"""RabbitMQ's durable setup: quorum queues with publisher confirms.

The jobs app is loaded once more with ``task_default_queue_type="quorum"``
on a queue of its own; duplicates publish one message, the job runs and
commits once on a real worker, and a worker killed mid-job is taken over
through the lease (a quorum queue gives an unacked message back when the
connection drops, but never for a hung consumer).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import jobs_module
from tests.processes import WorkerProcess, wait_for
from tests.records import executions

pytestmark = [pytest.mark.integration, pytest.mark.fault]

QUORUM = {"ARES_TEST_QUEUE_TYPE": "quorum", "ARES_TEST_QUEUE": "ares-quorum"}


@pytest.fixture()
def quorum_jobs(services, rabbitmq_server, store):
    jobs = jobs_module("rabbitmq-quorum", rabbitmq_server.url, **QUORUM)
    yield jobs
    jobs.release(store, "test:release-all")


def test_quorum_queue_runs_once_and_takes_over_a_killed_worker(
        quorum_jobs, rabbitmq_server, store):
    jobs = quorum_jobs
    env = {**QUORUM, "ARES_TEST_LEASE_TTL": "4"}
    first = [jobs.blocking.apply_async(("q",), request_id="quorum-1")
             for _ in range(3)]
    assert len({r.id for r in first}) == 1
    listing = rabbitmq_server.ctl("list_queues", "--quiet",
                                  "--no-table-headers", "name", "type")
    assert "ares-quorum\tquorum" in listing
    a = WorkerProcess(jobs.app, concurrency=2, env=env).start()
    b = None
    try:
        started = wait_for(lambda: store.lrange(
            f"test:started:{first[0].id}", 0, -1), 30, "the job to start")
        holder = json.loads(started[0])
        a.kill()
        killed_at = time.time()
        b = WorkerProcess(jobs.app, concurrency=2, env=env).start()
        again = wait_for(lambda: store.lrange(
            f"test:started:{first[0].id}", 1, -1), 30, "a takeover")
        took = json.loads(again[0])
        assert took["token"] > holder["token"] and took["attempt"] == 2
        print(f"\nquorum queue takeover after {took['at'] - killed_at:.2f}s")
        jobs.release(store, f"test:release:{first[0].id}")
        assert first[0].get(timeout=30)["token"] == took["token"]
        assert len(executions(store, first[0].id)) == 2
    finally:
        a.kill()
        if b is not None:
            b.stop()
