"""The writer thread that marks reservations published (issue 14): every
queued mark is written, piled-up marks go in one write, a failing write
loses nothing but the marks themselves, a forked child never waits for
its parent's marks, and a pool child writes its own before it ends."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import billiard
import pytest

from ares_celery.exactly_once import published_marks
from ares_celery.exactly_once.published_marks import Mark, PublishedMarks


def mark(i: int) -> Mark:
    return Mark(f"rid-{i}", f"job-{i}", "t", "d")


def test_queued_marks_are_all_written_and_flush_waits_for_them():
    written = []
    marks = PublishedMarks(written.extend)
    for i in range(50):
        marks.add(mark(i))
    assert marks.flush(5)
    assert written == [mark(i) for i in range(50)]


def test_marks_that_pile_up_during_a_write_go_together():
    release = threading.Event()
    batches = []

    def slow(batch):
        batches.append(list(batch))
        release.wait(5)

    marks = PublishedMarks(slow)
    marks.add(mark(0))
    while not batches:
        threading.Event().wait(0.001)
    for i in range(1, 6):
        marks.add(mark(i))
    assert not marks.flush(0.05)          # the first write still blocks
    release.set()
    assert marks.flush(5)
    assert batches == [[mark(0)], [mark(i) for i in range(1, 6)]]


def test_a_failed_write_is_logged_and_the_writer_goes_on(monkeypatch):
    # The module's logger itself: a worker test earlier in the session may
    # have reconfigured logging (Celery hijacks the root logger).
    warned = []
    monkeypatch.setattr(published_marks.logger, "warning",
                        lambda msg, *args: warned.append(msg % args))
    calls = []

    def flaky(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise ConnectionError("redis away")

    marks = PublishedMarks(flaky)
    marks.add(mark(1))
    assert marks.flush(5)
    marks.add(mark(2))
    assert marks.flush(5)
    assert calls == [[mark(1)], [mark(2)]]
    assert len(warned) == 1
    assert "could not mark 1 submission(s) published" in warned[0]


def test_a_forked_child_does_not_wait_for_its_parents_marks():
    blocked = threading.Event()
    marks = PublishedMarks(lambda batch: blocked.wait(5))
    marks.add(mark(1))
    pid = os.fork()
    if pid == 0:  # the child: the parent's write never finishes here
        os._exit(0 if marks.flush(2) else 1)
    _, status = os.waitpid(pid, 0)
    blocked.set()
    assert os.waitstatus_to_exitcode(status) == 0
    assert marks.flush(5)


def submit_and_return(path: str) -> None:
    """A child that queues a mark and ends at once: its writer thread is
    still in the (slow) write when the child exits."""
    def slow_write(batch):
        time.sleep(0.3)
        with open(path, "a") as out:
            out.writelines(f"{m.request_id}\n" for m in batch)

    PublishedMarks(slow_write).add(mark(7))


@pytest.mark.parametrize("context", [
    multiprocessing.get_context("fork"), billiard.get_context("fork")],
    ids=["multiprocessing", "billiard"])
def test_a_pool_child_that_ends_at_once_still_writes_its_marks(
        context, tmp_path):
    """multiprocessing and billiard children end with os._exit, which skips
    atexit: without the exit finalizer the mark would be lost."""
    written = tmp_path / "marks"
    child = context.Process(target=submit_and_return, args=(str(written),))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    assert written.read_text() == "rid-7\n"
