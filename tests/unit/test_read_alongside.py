"""When a "committed?" read sent just before the lock Txn may stand for one
made after it (issue 14): only if the Txn answered promptly, never when the
read failed; and its answer is always read, which frees its connection."""

from __future__ import annotations

import pytest

from ares_celery.backends.store import CommitProbe
from ares_celery.coordination.mutex import (
    ALONGSIDE_TRUSTED_S,
    COMMITTED_KEYS_KEPT_S,
)
from ares_celery.exactly_once import execution
from ares_celery.exactly_once.execution import ReadAlongside


class Store:
    """Sends at once; the answer is read (and counted) later."""

    def __init__(self, answer=None, send_fails=False):
        self.answer = answer
        self.send_fails = send_fails
        self.answered = 0

    def send_commit_probe(self, job_id):
        if self.send_fails:
            return None

        def read():
            self.answered += 1
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        return read


class Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(execution.time, "monotonic", fake.monotonic)
    return fake


def test_the_trusted_window_is_well_inside_the_keys_kept_after_a_commit():
    assert 0 < ALONGSIDE_TRUSTED_S * 2 <= COMMITTED_KEYS_KEPT_S


def test_a_prompt_read_is_trusted(clock):
    probe = CommitProbe(None, False)
    store = Store(probe)
    read = ReadAlongside(store, "job")
    clock.now += ALONGSIDE_TRUSTED_S / 2
    assert read.finish() is probe and store.answered == 1


def test_a_txn_that_answered_late_makes_the_read_untrusted(clock):
    store = Store(CommitProbe(None, False))
    read = ReadAlongside(store, "job")
    clock.now += ALONGSIDE_TRUSTED_S * 1.01
    assert read.finish() is None
    assert store.answered == 1          # read anyway: frees the connection


def test_a_read_not_sent_or_failed_is_untrusted(clock):
    assert ReadAlongside(Store(send_fails=True), "job").finish() is None
    store = Store(ConnectionError("redis away"))
    assert ReadAlongside(store, "job").finish() is None  # swallowed
    assert store.answered == 1
