"""Layer 1 against a real Redis and etcd: duplicates publish nothing."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from ares_celery import InvalidRequestId, RequestIdConflict, ServiceUnavailable
from ares_celery.exactly_once.identity import job_id_for
from tests.processes import ROOT, wait_for
from tests.records import KEYS

pytestmark = pytest.mark.integration


def test_same_request_id_same_job_one_message(jobs, store, broker):
    r1 = jobs.record.apply_async(("a",), request_id="order-77")
    r2 = jobs.record.apply_async(("a",), request_id="order-77")
    assert r1.id == r2.id == job_id_for("ares", "order-77")
    messages = broker.messages()
    assert len(messages) == 1
    assert messages[0]["headers"]["id"] == r1.id
    assert messages[0]["headers"]["ares_request_id"] == "order-77"


def test_different_request_ids_are_different_jobs(jobs, store, broker):
    ids = {jobs.record.apply_async((i,), request_id=f"r-{i}").id
           for i in range(5)}
    assert len(ids) == 5 and len(broker.messages()) == 5


def test_reused_request_id_with_other_arguments_conflicts(jobs, store, broker):
    jobs.record.apply_async(("a",), request_id="order-1")
    with pytest.raises(RequestIdConflict, match="order-1"):
        jobs.record.apply_async(("b",), request_id="order-1")
    assert len(broker.messages()) == 1


def test_bad_request_id_raises_before_anything_is_sent(jobs, store, broker):
    with pytest.raises(InvalidRequestId):
        jobs.record.apply_async(("a",), request_id="")
    with pytest.raises(InvalidRequestId, match="contradicts"):
        jobs.record.apply_async(("a",), request_id="x", task_id="other-id")
    assert broker.messages() == []


def test_fifty_concurrent_threads_one_message(jobs, store, broker):
    barrier = threading.Barrier(50)
    ids, errors = [], []

    def submit():
        try:
            barrier.wait()
            ids.append(jobs.record.apply_async(("t",), request_id="burst").id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 50 and len(set(ids)) == 1
    assert len(broker.messages()) == 1


def _submit_from_process(barrier, out):
    from tests.apps import jobs

    barrier.wait()
    out.put(jobs.record.apply_async(("p",), request_id="multi-proc").id)


def test_concurrent_processes_one_message(jobs, store, broker, monkeypatch):
    monkeypatch.setenv("ARES_TEST_BROKER", broker.url)   # for the children
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_submit_from_process, args=(barrier, out))
             for _ in range(6)]
    for p in procs:
        p.start()
    ids = {out.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(30)
    assert ids == {job_id_for("ares", "multi-proc")}
    assert len(broker.messages()) == 1


def test_client_killed_between_record_and_publish_does_not_lose_job(
        jobs, store, broker):
    """A real client process records the request, then is SIGKILLed while
    publishing; a retry after the claim timeout publishes the job."""
    script = textwrap.dedent("""
        import signal
        from celery import Task
        from tests.apps import jobs
        jobs.app.conf.ares_dedup_claim_timeout = 1
        def hang(*a, **k):
            print("reserved", flush=True)
            signal.pause()  # stuck in publish until the test kills us
        Task.apply_async = hang
        jobs.record.apply_async(("k",), request_id="killed-client")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                            stdout=subprocess.PIPE,
                            env=dict(os.environ, ARES_TEST_BROKER=broker.url))
    assert proc.stdout.readline().strip() == b"reserved"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert broker.messages() == []
    record = store.hgetall(KEYS.dedup("killed-client"))
    assert record[b"state"] == b"reserved"

    dedup = jobs.ares.services.dedup
    dedup._claim_ms = 300
    try:
        result = jobs.record.apply_async(("k",), request_id="killed-client")
    finally:
        dedup._claim_ms = 5000
    assert result.id == job_id_for("ares", "killed-client")
    assert len(broker.messages()) == 1
    assert dedup.flush_marks()
    assert store.hget(KEYS.dedup("killed-client"), "state") == b"published"


def test_a_client_that_exits_at_once_still_marks_its_job_published(
        jobs, store, broker):
    """The mark is written by a thread after ``apply_async`` returned; a
    script that submits and exits at once must not leave its job looking
    unpublished (a retry would wait for the claim timeout, then publish a
    second copy)."""
    script = textwrap.dedent("""
        from tests.apps import jobs
        for i in range(20):
            jobs.record.apply_async((i,), request_id=f"exit-{i}")
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                   timeout=60,
                   env=dict(os.environ, ARES_TEST_BROKER=broker.url))
    states = {store.hget(KEYS.dedup(f"exit-{i}"), "state")
              for i in range(20)}
    assert states == {b"published"}
    assert len(broker.messages()) == 20


def test_failed_publish_rolls_back_the_reservation(jobs, store, monkeypatch, broker):
    from celery import Task

    def broken(*args, **kwargs):
        raise RuntimeError("broker exploded")

    monkeypatch.setattr(Task, "apply_async", broken)
    with pytest.raises(RuntimeError):
        jobs.record.apply_async(("x",), request_id="rollback")
    assert not store.exists(KEYS.dedup("rollback"))
    monkeypatch.undo()
    jobs.record.apply_async(("x",), request_id="rollback")
    assert len(broker.messages()) == 1


def test_unreachable_redis_fails_closed_with_address(jobs, redis_server):
    redis_server.stop()
    try:
        with pytest.raises(ServiceUnavailable,
                           match=f"127.0.0.1:{redis_server.port}"):
            jobs.record.apply_async(("x",), request_id="no-redis")
    finally:
        redis_server.start()


def test_unreachable_etcd_fails_closed_with_address(jobs, etcd_server):
    etcd_server.stop()
    jobs.ares.services._etcd_ok_until = 0
    try:
        with pytest.raises(ServiceUnavailable,
                           match=f"127.0.0.1:{etcd_server.client_port}"):
            jobs.record.apply_async(("x",), request_id="no-etcd")
        with pytest.raises(ServiceUnavailable, match="etcd"):
            jobs.record.delay("x")
    finally:
        etcd_server.start()
        wait_for(lambda: _etcd_ok(jobs), 10, "etcd back")


def _etcd_ok(jobs):
    try:
        jobs.ares.services.etcd.status()
        return True
    except ServiceUnavailable:
        return False


def test_retry_republishes_a_message_the_broker_lost(jobs, store, monkeypatch, broker):
    monkeypatch.setattr(jobs.ares.services.dedup, "_republish_ms", 300)
    first = jobs.record.apply_async(("lost",), request_id="lost-message")
    broker.purge("celery")                    # the broker lost the message
    jobs.record.apply_async(("lost",), request_id="lost-message")
    assert broker.messages() == []                # fresh: a plain duplicate
    wait_for(lambda: jobs.record.apply_async(("lost",),
                                             request_id="lost-message")
             and broker.messages(), 10, "a stale retry to publish again")
    messages = broker.messages()
    assert [m["headers"]["id"] for m in messages] == [first.id]
    jobs.record.apply_async(("lost",), request_id="lost-message")
    assert len(broker.messages()) == 1            # the republish renewed the claim

    broker.purge("celery")
    store.hset(KEYS.job(first.id), "committed", 7)
    with pytest.raises(TimeoutError):         # stale again, but committed
        wait_for(lambda: jobs.record.apply_async(("lost",),
                                                 request_id="lost-message")
                 and broker.messages(), 1.0, "a republish of a committed job")
    assert broker.messages() == []
