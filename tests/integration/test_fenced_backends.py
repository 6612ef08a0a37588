"""The atomic commit of both fenced backends, against the real stores."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import redis as redis_lib

from ares_celery.coordination.mutex import JobLocks
from ares_celery.exactly_once import context
from ares_celery.exactly_once.context import JobContext
from ares_celery.keys import Keys
from tests.processes import wait_for
from tests.records import KEYS

pytestmark = pytest.mark.integration


def as_holder(job_id, token):
    """Make this thread look like the executor of ``job_id`` at ``token``."""
    ctx = JobContext(job_id=job_id, request_id=None, fencing_token=token,
                     task_name="t")
    context.register(ctx)
    return ctx


def test_redis_commit_is_write_once_and_fenced(jobs, store):
    app, _ = jobs.make_app("fence-redis")
    backend = app.backend
    assert backend.register_fence("job-1", 10) is None
    # A zombie with an older token is rejected and recorded.
    as_holder("job-1", 7)
    backend.store_result("job-1", "zombie", "SUCCESS")
    context.unregister("job-1")
    assert backend.get_task_meta("job-1")["status"] == "PENDING"
    entry = store.xrange(KEYS.fenced_log())[0][1]
    assert entry[b"token"] == b"7" and entry[b"fence"] == b"10"
    # The current holder commits, and PUBLISHes like Celery's backend.
    pubsub = redis_lib.Redis.from_url(os.environ["ARES_TEST_REDIS"]).pubsub()
    pubsub.subscribe(backend.get_key_for_task("job-1"))
    pubsub.get_message(timeout=1)
    ctx = as_holder("job-1", 10)
    backend.store_result("job-1", "winner", "SUCCESS")
    assert ctx.committed
    message = pubsub.get_message(timeout=5)
    assert json.loads(message["data"])["result"] == "winner"
    # Nothing overwrites it: not a second commit, not a later state.
    backend.store_result("job-1", "again", "FAILURE")
    backend.store_result("job-1", None, "STARTED")
    context.unregister("job-1")
    meta = backend.get_task_meta("job-1")
    assert (meta["status"], meta["result"]) == ("SUCCESS", "winner")
    assert backend.register_fence("job-1", 11) == "10"  # committed: skip


def test_redis_commit_counter_counts_every_accepted_commit(jobs, store):
    """``commits`` is the audit the chaos run and the fault tests read (it
    must be 1): it is read with the fence and written with the marker in
    one HSET, so it must still count a second accepted commit, here forced
    by deleting the marker behind the backend's back."""
    app, _ = jobs.make_app("fence-count")
    backend = app.backend
    as_holder("job-c", 5)
    backend.store_result("job-c", "first", "SUCCESS")
    assert store.hget(KEYS.job("job-c"), "commits") == b"1"
    store.hdel(KEYS.job("job-c"), "committed")
    backend.store_result("job-c", "second", "SUCCESS")
    context.unregister("job-c")
    assert store.hget(KEYS.job("job-c"), "commits") == b"2"


def test_redis_first_holder_needs_no_fence_and_stays_fenceable(jobs, store):
    """Lever 1 of issue 14: a first holder only asks "committed?" (no
    fence written), its commit is accepted with no fence recorded, and a
    later holder's fence still rejects it as a zombie."""
    app, _ = jobs.make_app("fence-first")
    backend = app.backend
    assert backend.register_fence("job-f", 10, first_holder=True) is None
    assert store.hget(KEYS.job("job-f"), "fence") is None
    # A later holder (takeover) raises the fence; the first is a zombie.
    assert backend.register_fence("job-f", 20) is None
    as_holder("job-f", 10)
    backend.store_result("job-f", "zombie", "SUCCESS")
    context.unregister("job-f")
    assert backend.get_task_meta("job-f")["status"] == "PENDING"
    # With no fence at all, a first holder's commit is accepted, once.
    ctx = as_holder("job-g", 30)
    backend.store_result("job-g", "first", "SUCCESS")
    context.unregister("job-g")
    assert ctx.committed
    assert store.hget(KEYS.job("job-g"), "commits") == b"1"
    assert backend.register_fence("job-g", 40, first_holder=True) == "30"
    # Retired (forget): the record is gone, so the next holder is "first",
    # but earlier tenures exist: it raises the fence after all.
    backend.retire_commit("job-g")
    assert backend.register_fence("job-g", 50, first_holder=True) is None
    assert store.hget(KEYS.job("job-g"), "fence") == b"50"
    as_holder("job-g", 45)
    backend.store_result("job-g", "zombie", "SUCCESS")
    context.unregister("job-g")
    assert backend.get_task_meta("job-g")["status"] == "PENDING"


def test_a_commit_between_the_alongside_read_and_the_lock_txn_is_seen(
        jobs, etcd, monkeypatch):
    """The worst interleaving of issue 14's overlapped read: a copy's
    "committed?" read answers "no", then the holder commits and at once
    takes another job (whose lock Txn carries its committed locks' deletes),
    then the copy's lock Txn runs. The committed job's keys must still be
    there, so the copy finds the lock held and never runs the body: were
    they deleted with that next Txn, the copy would be a first holder
    whose (trusted, prompt) read says "not committed". The holder's clock
    is frozen, so a slow machine cannot stretch the interleaving past the
    window (this test is about that timer)."""
    from types import SimpleNamespace

    from ares_celery.coordination import mutex
    from ares_celery.coordination.session import LeaseGrant

    now = [1000.0]
    frozen = SimpleNamespace(monotonic=lambda: now[0], time=time.time,
                             sleep=time.sleep)
    monkeypatch.setattr(mutex, "time", frozen)
    app, _ = jobs.make_app("fence-alongside")
    backend = app.backend
    holder = JobLocks(etcd, Keys("ares"))
    copy = JobLocks(etcd, Keys("ares"))
    grant = LeaseGrant(etcd.grant_lease(30), 1)
    taken = holder.acquire("job-a", grant)
    assert taken.first
    assert backend.register_fence("job-a", taken.token,
                                  first_holder=True) is None

    probe = backend.commit_probe("job-a")         # the copy's read: "no"
    assert probe.committed is None and not probe.retired
    ctx = as_holder("job-a", taken.token)         # the holder commits
    backend.store_result("job-a", "done", "SUCCESS")
    context.unregister("job-a")
    assert ctx.committed
    holder.discard_after_commit("job-a")
    now[0] += mutex.ALONGSIDE_TRUSTED_S / 2
    assert holder.acquire("job-b", grant).status == "acquired"
    outcome = copy.acquire("job-a", LeaseGrant(etcd.grant_lease(30), 2))
    assert outcome.status == "held"               # deferred, not run
    # The keys go once they are COMMITTED_KEYS_KEPT_S old (background).
    now[0] += mutex.COMMITTED_KEYS_KEPT_S
    wait_for(lambda: etcd.get(KEYS.job_record("job-a")) is None, 10,
             "the committed job's record to go")
    late = copy.acquire("job-a", LeaseGrant(etcd.grant_lease(30), 2))
    assert late.first                             # a late copy: first ...
    answer = backend.send_commit_probe("job-a")   # as the worker reads it
    assert backend.register_fence("job-a", late.token, first_holder=True,
                                  probe=answer()) == str(taken.token)
    assert backend.register_fence("job-a", late.token,  # the connection
                                  first_holder=True) == str(taken.token)


def test_redis_commit_race_writes_once(jobs, store):
    """Eight writers race to commit the same job: exactly one write and one
    PUBLISH happen (a check-then-set would let several through)."""
    app, _ = jobs.make_app("race-redis")
    backend = app.backend
    backend.register_fence("job-r", 5)
    pubsub = redis_lib.Redis.from_url(os.environ["ARES_TEST_REDIS"]).pubsub()
    pubsub.subscribe(backend.get_key_for_task("job-r"))
    pubsub.get_message(timeout=1)
    barrier = threading.Barrier(8)

    def writer(i):
        as_holder("job-r", 5)
        barrier.wait()
        backend.store_result("job-r", f"w{i}", "SUCCESS")
        context.unregister("job-r")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    published = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        published.append(json.loads(message["data"])["result"])
    assert len(published) == 1
    assert backend.get_task_meta("job-r")["result"] == published[0]


def test_etcd_commit_checks_the_lock_revision(jobs, etcd):
    app, _ = jobs.make_app("fence-etcd", ares_result_store="etcd")
    backend = app.backend
    assert type(backend).__name__ == "FencedEtcdBackend"
    locks = JobLocks(etcd, Keys("ares"), check_done_marker=True)
    from ares_celery.coordination.session import LeaseGrant

    old = LeaseGrant(etcd.grant_lease(30), 1)
    first = locks.acquire("job-e", old)
    assert first.status == "acquired"
    etcd.revoke_lease(old.lease_id)          # the holder's lease expires
    new = LeaseGrant(etcd.grant_lease(30), 2)
    second = locks.acquire("job-e", new)
    assert second.status == "acquired" and second.token > first.token

    as_holder("job-e", first.token)           # zombie commit: rejected
    backend.store_result("job-e", "zombie", "SUCCESS")
    context.unregister("job-e")
    assert backend.get_task_meta("job-e")["status"] == "PENDING"
    assert etcd.get(KEYS.fenced("job-e", first.token)) is not None

    ctx = as_holder("job-e", second.token)    # the live holder commits
    backend.store_result("job-e", "winner", "SUCCESS")
    context.unregister("job-e")
    assert ctx.committed and ctx.released     # same Txn deleted the lock
    assert etcd.get(KEYS.lock("job-e")) is None
    assert backend.get_task_meta("job-e")["result"] == "winner"
    third = locks.acquire("job-e", new)
    assert third.status == "committed"        # later messages are skipped
    assert etcd.get(KEYS.lock("job-e")) is None


def test_etcd_store_end_to_end(jobs, store):
    from celery.contrib.testing.worker import start_worker

    app, ares = jobs.make_app("e2e-etcd", ares_result_store="etcd",
                         result_backend=None)

    @ares.task(name="etcd.echo")
    def echo(x):
        jobs.record_execution(ares.current().job_id, 0)
        return {"x": x, "token": ares.current().fencing_token}

    app.loader.import_task_module("celery.contrib.testing.tasks")
    with start_worker(app, pool="threads", concurrency=2,
                      perform_ping_check=False, shutdown_timeout=20):
        r1 = echo.apply_async((3,), request_id="etcd-1")
        r2 = echo.apply_async((3,), request_id="etcd-1")
        assert r1.id == r2.id
        assert r1.get(timeout=20, interval=0.05)["x"] == 3
    assert store.llen(f"test:exec:{r1.id}") == 1
