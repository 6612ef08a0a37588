"""When a "committed?" read sent alongside the lock Txn may stand for one
made after it (issue 14): only if the Txn answered promptly, and never when
the read failed."""

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
    def __init__(self, answer):
        self.answer = answer
        self.reads = 0

    def commit_probe(self, job_id):
        self.reads += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


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
    read = ReadAlongside(Store(probe), "job")
    read()
    clock.now += ALONGSIDE_TRUSTED_S / 2
    assert read.trusted() is probe


def test_a_txn_that_answered_late_makes_the_read_untrusted(clock):
    read = ReadAlongside(Store(CommitProbe(None, False)), "job")
    read()
    clock.now += ALONGSIDE_TRUSTED_S * 1.01
    assert read.trusted() is None


def test_a_read_never_sent_or_failed_is_untrusted(clock):
    assert ReadAlongside(Store(CommitProbe("7", False)), "job").trusted() \
        is None
    store = Store(ConnectionError("redis away"))
    failed = ReadAlongside(store, "job")
    failed()                      # swallowed: read again after the Txn
    assert store.reads == 1 and failed.trusted() is None
