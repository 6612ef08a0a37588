"""A worker's shutdown flush must not return while the background thread
still has a batch of committed jobs' keys taken but not yet deleted: CI
once saw a committed job's lock left behind after ``flush()`` because both
woke at the same moment and the flush found the queue already empty."""

from __future__ import annotations

import threading

from ares_celery.coordination.mutex import JobLocks
from ares_celery.keys import Keys

KEYS = Keys("ares")


class SlowDeletes:
    """Holds the background thread's delete until told to answer."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.answer = threading.Event()
        self.deleted: list[str] = []

    def txn(self, compare, success, failure=()):
        if threading.current_thread().name == "ares-lock-release":
            self.entered.set()
            assert self.answer.wait(10)
        self.deleted += [op["request_delete_range"]["key"] for op in success]


def test_flush_waits_for_the_batch_the_background_thread_took():
    etcd = SlowDeletes()
    locks = JobLocks(etcd, KEYS)
    locks.discard_after_commit("job-1")
    assert etcd.entered.wait(10), "the background delete never started"

    flushing = threading.Thread(target=locks.flush)
    flushing.start()
    flushing.join(0.3)
    returned_early = not flushing.is_alive()
    etcd.answer.set()
    flushing.join(10)

    assert not returned_early, "flush returned with a delete still in flight"
    assert not flushing.is_alive()
    assert len(etcd.deleted) == 3
