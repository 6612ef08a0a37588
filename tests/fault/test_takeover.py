"""Takeover within the lease, whatever the broker's own redelivery does.

The broker settings here are what users run: kombu's defaults, so a Redis
broker gives an unacknowledged message back only after its one-hour
visibility timeout (and RabbitMQ never, for a hung but connected consumer).
Only the lease TTL is shortened, to 4 s, because the lease timer is what
this file is about: another worker must start the body within about
``ares_lease_ttl + 3 s`` of the failure.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ares_celery import AttemptsExhausted
from tests.processes import WorkerProcess, owner, wait_for, worker_pair
from tests.records import KEYS, executions

pytestmark = [pytest.mark.fault, pytest.mark.integration]

TTL = 4
#: The target is TTL + 3 s; the deadline leaves room for a loaded CI box,
#: and the measured latency is printed (and benchmarked elsewhere).
DEADLINE = TTL + 8
ENV = {"ARES_TEST_LEASE_TTL": str(TTL)}


def started(store, job_id):
    return [json.loads(x) for x in store.lrange(f"test:started:{job_id}", 0, -1)]


@pytest.fixture()
def pair(jobs, store):
    with worker_pair(jobs.app, ENV) as workers:
        yield workers
        jobs.release(store, "test:release-all")


def pool_sigstop(worker, pid):
    os.kill(pid, signal.SIGSTOP)


def pool_sigcont(worker, pid):
    os.kill(pid, signal.SIGCONT)


FAULTS = {
    "worker-sigkill": (lambda w, pid: w.kill(), None),
    "worker-sigstop": (lambda w, pid: w.pause(), lambda w, pid: w.resume()),
    "pool-sigstop": (pool_sigstop, pool_sigcont),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_another_worker_takes_over_within_the_lease(jobs, store, pair, fault, broker):
    inject, wake = FAULTS[fault]
    result = jobs.blocking.apply_async((fault,), request_id=f"takeover-{fault}")
    first = wait_for(lambda: started(store, result.id), 30,
                     "the job to start")[0]
    victim = owner(pair, first["pid"])
    failed_at = time.time()
    inject(victim, first["pid"])
    second = wait_for(lambda: started(store, result.id)[1:], DEADLINE,
                      "another process to take the job over")[0]
    took = second["at"] - failed_at
    print(f"\n{fault}: body restarted {took:.2f}s after the failure "
          f"(lease TTL {TTL}s)")
    assert second["pid"] != first["pid"]
    assert second["token"] > first["token"]
    assert (first["attempt"], second["attempt"]) == (1, 2)

    jobs.release(store, f"test:release:{result.id}:{second['token']}")
    committed = result.get(timeout=30)
    assert committed["token"] == second["token"]
    if wake is None:
        return
    # The hung holder wakes up: its commit and its side effect are
    # refused, it acknowledges its old delivery, and its worker serves on.
    wake(victim, first["pid"])
    jobs.release(store, f"test:release:{result.id}:{first['token']}")
    wait_for(lambda: store.xrange(KEYS.fenced_log()), 30,
             "the zombie's commit to be fenced")
    assert result.get(timeout=5) == committed
    assert store.hget(f"test:effect:{result.id}", "token") == \
        str(second["token"]).encode()
    wait_for(lambda: broker.unacked() == 0, 30,
             "every delivery to be acknowledged")
    for other in pair:
        if other is not victim:
            other.stop()
    again = jobs.record.apply_async(("after",), request_id=f"after-{fault}")
    assert owner([victim], again.get(timeout=30)["pid"]) is victim


def test_a_message_waiting_for_its_eta_is_not_stranded(jobs, store):
    """A countdown message sits in the receiving worker's timer, held but
    not acknowledged; if that worker dies, its reservation record (under
    its lease) brings the message back, not the visibility timeout."""
    a = WorkerProcess(jobs.app, env=ENV).start()
    b = None
    try:
        result = jobs.record.apply_async(("eta",), request_id="eta-stranded",
                                         countdown=TTL + 2)
        wait_for(lambda: _reserved(jobs, result.id), 10,
                 "worker A to hold and record the ETA message")
        a.kill()
        b = WorkerProcess(jobs.app, env=ENV).start()
        value = result.get(timeout=DEADLINE + TTL + 2)
        assert value["value"] == "eta"
        assert len(executions(store, result.id)) == 1
    finally:
        a.kill()
        if b is not None:
            b.stop()


def _reserved(jobs, job_id):
    etcd = jobs.ares.services.etcd
    kvs, _ = etcd.range_prefix_with_revision(KEYS.reserved_prefix())
    return [kv for kv in kvs if kv.key.endswith(job_id)]


def test_a_poison_job_fails_after_max_attempts(jobs, store):
    """A body that takes its process down every time is run max_attempts
    (3 for jobs.poison) times, then committed as FAILURE, and the worker
    goes on serving other jobs."""
    worker = WorkerProcess(jobs.app, concurrency=2, env=ENV).start()
    try:
        result = jobs.poison.apply_async(("boom",), request_id="poison-1")
        with pytest.raises(AttemptsExhausted, match="3 times"):
            result.get(timeout=6 * DEADLINE)
        assert len(executions(store, result.id)) == 3
        assert store.hget(KEYS.job(result.id), "state") == b"FAILURE"
        healthy = jobs.record.apply_async(("fine",), request_id="after-poison")
        assert healthy.get(timeout=30)["value"] == "fine"
    finally:
        worker.kill()
