"""Job locks against a real etcd: a release that fails while etcd is away
must not leave the job locked for as long as the worker process lives."""

from __future__ import annotations

import json
import time

import pytest

from ares_celery.coordination.mutex import COMMITTED_KEYS_KEPT_S, JobLocks
from ares_celery.coordination.session import LeaseGrant, Session
from ares_celery.errors import ServiceUnavailable
from ares_celery.keys import Keys
from tests.processes import wait_for
from tests.records import KEYS

pytestmark = pytest.mark.integration


def test_release_that_failed_while_etcd_was_down_is_retried(
        etcd, etcd_server):
    keeper = Session(etcd, 30)
    locks = JobLocks(etcd, Keys("ares"), check_done_marker=False)
    try:
        grant = keeper.current()
        taken = locks.acquire("stuck-job", grant)
        assert taken.status == "acquired"
        etcd_server.stop()
        try:
            with pytest.raises(ServiceUnavailable):
                locks.release("stuck-job", taken.token)
            locks.release_later("stuck-job", taken.token)
        finally:
            etcd_server.start()
        # The process lease is alive (30 s TTL, refreshed): only the retry
        # can free the lock.
        wait_for(lambda: etcd.get(KEYS.lock("stuck-job")) is None, 15,
                 "the retried release")
        assert keeper.is_valid(grant)
        again = locks.acquire("stuck-job", keeper.current())
        assert again.status == "acquired" and again.token > taken.token
    finally:
        keeper.close()


def test_lock_txn_applied_but_reply_lost_is_cleaned_up(etcd, monkeypatch):
    keeper = Session(etcd, 30)
    locks = JobLocks(etcd, Keys("ares"), check_done_marker=False)
    try:
        grant = keeper.current()
        other = locks.acquire("someone-elses", grant)
        real_txn = etcd.txn

        def applied_then_lost(*args, **kwargs):
            real_txn(*args, **kwargs)
            raise ServiceUnavailable("connection reset after sending")

        monkeypatch.setattr(etcd, "txn", applied_then_lost)
        with pytest.raises(ServiceUnavailable):
            locks.acquire("ghost-job", grant)
        monkeypatch.undo()
        assert etcd.get(KEYS.lock("ghost-job")) is not None  # it applied
        # Our own live lease holds it; only the cleanup can free it.
        wait_for(lambda: etcd.get(KEYS.lock("ghost-job")) is None, 15,
                 "the lock of the lost reply to be deleted")
        assert etcd.get(KEYS.lock("someone-elses")).create_revision == \
            other.token                       # nothing else was touched
        assert locks.acquire("ghost-job", grant).status == "acquired"
    finally:
        keeper.close()


def test_two_lost_replies_in_a_row_both_get_cleaned_up(etcd, monkeypatch):
    """The first Txn applies and its reply is lost, the retry fails too
    (etcd still restarting): the second guarded delete (compare: the
    retry's value, which never landed) must not replace the first one's
    (compare: the value that did land). CI's RabbitMQ chaos run lost a job
    to exactly this, its lock held for good by a live pool process."""
    keeper = Session(etcd, 30)
    locks = JobLocks(etcd, Keys("ares"), check_done_marker=False)
    try:
        grant = keeper.current()
        real_txn = etcd.txn

        def applied_then_lost(*args, **kwargs):
            real_txn(*args, **kwargs)
            raise ServiceUnavailable("connection reset after sending")

        monkeypatch.setattr(etcd, "txn", applied_then_lost)
        for _ in range(2):
            with pytest.raises(ServiceUnavailable):
                locks.acquire("twice-lost-job", grant)
        monkeypatch.undo()
        assert etcd.get(KEYS.lock("twice-lost-job")) is not None
        wait_for(lambda: etcd.get(KEYS.lock("twice-lost-job")) is None, 15,
                 "the lock of the first lost reply to be deleted")
        assert locks.acquire("twice-lost-job", grant).status == "acquired"
    finally:
        keeper.close()


def test_attempts_count_holders_that_did_not_give_the_job_back(etcd):
    """The lock Txn counts holders (job record version) and deliberate
    releases (released key version): a holder whose lease just ended is an
    attempt, a retry's release is not."""
    locks = JobLocks(etcd, KEYS)
    job = "attempts-job"

    def take():
        lease = etcd.grant_lease(30)
        return lease, locks.acquire(job, LeaseGrant(lease, 1),
                                    json.dumps({"task": "jobs.record",
                                                "args": [1]}))

    lease, first = take()
    assert first.attempt == 1 and first.previous_holder is None
    assert locks.release(job, first.token)       # a retry: given back
    lease, second = take()
    assert second.attempt == 1
    etcd.revoke_lease(lease)                      # this holder dies
    third_lease, third = take()
    assert third.attempt == 2
    assert third.previous_holder["lease"] == lease
    assert locks.attempts(job) == 2
    record = json.loads(etcd.get(KEYS.job_record(job)).value)
    assert record["task"] == "jobs.record" and record["args"] == [1]
    assert record["holder"]["lease"] == third_lease


def test_a_committed_job_leaves_no_keys_behind(etcd):
    locks = JobLocks(etcd, KEYS)
    lease = etcd.grant_lease(30)
    outcome = locks.acquire("clean-job", LeaseGrant(lease, 1), json.dumps({"task": "t"}))
    locks.release("clean-job", outcome.token)
    locks.acquire("clean-job", LeaseGrant(lease, 1), json.dumps({"task": "t"}))
    locks.discard_after_commit("clean-job")
    locks.flush()
    for key in (KEYS.lock("clean-job"), KEYS.job_record("clean-job"),
                KEYS.released("clean-job")):
        assert etcd.get(key) is None, key


def test_a_burst_of_committed_jobs_is_deleted_within_etcds_txn_limit(etcd):
    """A pool process that commits a burst (a no-op benchmark: ~100 jobs
    in the 0.5 s its committed keys are kept) queues more deletes than one
    etcd Txn may carry (``--max-txn-ops``, 128 by default; 3 keys per job).
    Every batch, in the next lock Txn and at shutdown, must fit: a Txn
    over the limit is refused with INVALID_ARGUMENT, which failed the lock
    and lost the batch."""
    locks = JobLocks(etcd, KEYS)
    lease = etcd.grant_lease(30)
    burst = [f"burst-{n}" for n in range(100)]
    for job in burst:
        locks.acquire(job, LeaseGrant(lease, 1), json.dumps({"task": "t"}))
        locks.discard_after_commit(job)
    # Until they are COMMITTED_KEYS_KEPT_S old no Txn takes them: wait
    # for that timer, then the next lock Txn takes a full batch.
    time.sleep(COMMITTED_KEYS_KEPT_S)
    after = locks.acquire("after-burst", LeaseGrant(lease, 1),
                          json.dumps({"task": "t"}))
    assert after.status == "acquired"
    locks.flush()
    left = [job for job in burst if etcd.get(KEYS.lock(job)) is not None
            or etcd.get(KEYS.job_record(job)) is not None]
    assert left == []


def test_only_the_txn_that_creates_the_job_record_is_a_first_holder(etcd):
    """The first holder skips the Redis fence; every later tenure (a
    deliberate release, a death) must not, or a zombie goes unfenced."""
    keeper = Session(etcd, 30)
    locks = JobLocks(etcd, Keys("ares"), check_done_marker=False)
    try:
        first = locks.acquire("first-job", keeper.current())
        assert first.status == "acquired" and first.first
        assert locks.acquire("first-job", keeper.current()).status == "held"
        assert first.lock.release()
        again = locks.acquire("first-job", keeper.current())
        assert again.status == "acquired" and not again.first
        # A committed job's record goes with its lock: the next copy is a
        # first holder again, which is why the store still answers
        # "committed?" for first holders.
        locks.discard_after_commit("first-job")
        locks.flush()
        late = locks.acquire("first-job", keeper.current())
        assert late.status == "acquired" and late.first
    finally:
        keeper.close()


def test_two_candidates_on_one_lease_do_not_both_lead(etcd):
    """Two recoverers of one app in one process share the app's session
    lease: only the one whose key it is leads."""
    from ares_celery.coordination.election import Election

    keeper = Session(etcd, 30)
    key = KEYS.election("one-lease")
    changes = []
    first = Election(etcd, keeper, key, lambda leading: changes.append(
        ("first", leading)))
    second = Election(etcd, keeper, key, lambda leading: changes.append(
        ("second", leading)))
    try:
        assert first.campaign() is True
        assert second.campaign() is False
        assert (first.leading, second.leading) == (True, False)
        # A lost campaign reply still counts as ours for the real owner.
        assert first.campaign() is True
        first.resign()
        assert second.campaign() is True
        assert changes == [("first", True), ("first", False),
                           ("second", True)]
    finally:
        second.resign()
        keeper.close()
