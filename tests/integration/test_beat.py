"""Periodic exactly-once with two real ``celery beat`` processes.

Two beats running at once (by accident during a deploy, typically) each
send every due task. With ares' scheduler both derive the request id from
the schedule slot, so each slot runs once; with Celery's own scheduler the
same setup runs the task twice per slot (measured here too, so this test
can tell the difference).

Beat is not broker-specific: Redis is the broker here. The schedule is one
exactly-once task every 2 s (tests/apps/beat_jobs.py): a short period is
fine, the test is about what runs in each slot, not about the timer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

import pytest

from ares_celery.exactly_once.beat import SCHEDULER_PATH
from ares_celery.exactly_once.identity import job_id_for
from ares_celery.testing.servers import die_with_parent
from tests.processes import ROOT, WorkerProcess, wait_for
from tests.records import executions

pytestmark = pytest.mark.integration

CELERY_SCHEDULER = "celery.beat:PersistentScheduler"
#: A beat's (debug) log line for one tick sent, with the job id the send
#: returned; Celery logs it once the message is out (or, for a duplicate,
#: once the existing job is returned), never for a send cut short.
SENT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): DEBUG/\w+\] "
                  r"beat\.tick sent\. id->(\S+)$", re.M)
SLOT_ID = re.compile(r"^beat:tick:(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")


class BeatProcess:
    """``celery -A tests.apps.beat_jobs beat -S <scheduler>`` with its own
    schedule file, as two hosts (or a deploy's old and new pod) would."""

    def __init__(self, scheduler: str, workdir: Path) -> None:
        workdir.mkdir()
        self.log = workdir / "beat.log"
        self.cmd = [sys.executable, "-m", "celery", "-A",
                    "tests.apps.beat_jobs", "beat", "-S", scheduler,
                    "-s", str(workdir / "schedule"), "-l", "debug"]
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def start(self) -> BeatProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=dict(os.environ), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
        return self

    def sent(self) -> list[tuple[float, str]]:
        """``(when, job id)`` of each ``tick`` this beat has sent so far."""
        if not self.stopped and self.proc.poll() is not None:
            raise AssertionError(f"beat exited:\n{self.tail()}")
        return [(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(),
                 job_id) for stamp, job_id in
                SENT.findall(self.log.read_text(errors="replace"))]

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        self.stopped = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture()
def beat_jobs(services):
    """The beat test app (imported once the servers' addresses are set)."""
    from tests.apps import beat_jobs

    return beat_jobs


def run_two_beats(beat_jobs, store, tmp_path, scheduler: str,
                  sends_each: int = 6
                  ) -> tuple[list[dict], list[list[tuple[float, str]]]]:
    """A worker and two beats with ``scheduler``, until each beat has sent
    ``sends_each`` ticks and those have run; then the beats stop and the
    worker drains. Returns every run of the task and what each beat sent
    (``(when, job id)``)."""
    worker = WorkerProcess(beat_jobs.app, concurrency=2,
                           module="tests.apps.beat_jobs").start()
    beats = [BeatProcess(scheduler, tmp_path / f"beat-{i}") for i in (1, 2)]

    def sent_and_ran() -> bool:
        sent = [beat.sent() for beat in beats]
        ran = {run["job_id"] for run in beat_jobs.runs(store)}
        return (all(len(times) >= sends_each for times in sent)
                and {job for times in sent for _, job in times} <= ran)

    try:
        for beat in beats:
            beat.start()
        wait_for(sent_and_ran, 30 + 3 * sends_each * beat_jobs.PERIOD,
                 f"both beats to send {sends_each} ticks, and those to run")
        for beat in beats:
            beat.stop()
        sent = [beat.sent() for beat in beats]
        # A tick sent between the check and the stop: let it run.
        wait_for(lambda: store.llen("celery") == 0
                 and store.hlen("unacked") == 0, 30,
                 "the worker to drain the queue")
    finally:
        for beat in beats:
            beat.stop()
        worker.stop()
    return beat_jobs.runs(store), sent


def sends_per_period(sent: list[list[tuple[float, str]]],
                     period: float) -> float:
    """Ticks sent by either beat per period, over the time both were up
    (from the later first send to the earlier last send): about 2 for two
    beats, at most 1.25 for one (over the 4+ periods a run covers)."""
    start = max(times[0][0] for times in sent)
    end = min(times[-1][0] for times in sent)
    both_up = [t for times in sent for t, _ in times if start <= t <= end]
    return len(both_up) / ((end - start) / period)


def slot_of(moment: float, period: float) -> float:
    return moment - moment % period


def run_slot(run: dict) -> float | None:
    """The slot (epoch seconds) a run's request id names, if it names one."""
    match = SLOT_ID.match(run["request_id"] or "")
    if match is None:
        return None
    return datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp()


def test_two_beats_run_each_slot_once(beat_jobs, store, tmp_path):
    period = beat_jobs.PERIOD
    runs, sent = run_two_beats(beat_jobs, store, tmp_path, SCHEDULER_PATH)
    runs_per_slot = Counter()
    for run in runs:
        slot = run_slot(run)
        assert slot is not None, f"not a slot request id: {run['request_id']!r}"
        assert run["job_id"] == job_id_for("ares", run["request_id"])
        assert len(executions(store, run["job_id"])) == 1
        assert slot % period == 0, "slots are aligned to the epoch"
        assert run["at"] >= slot, "a slot ran before it began"
        runs_per_slot[slot] += 1
    # Each slot ran once, consecutive slots, none skipped, at least 5.
    assert set(runs_per_slot.values()) == {1}, runs_per_slot
    slots = sorted(runs_per_slot)
    assert len(slots) >= 5, slots
    assert all(b - a == period for a, b in pairwise(slots)), slots
    # Both beats sent (at least) 4 of those slots, and each time both got
    # the same job back: the slot's request id, deduped, kept it to one run.
    jobs_by_slot = [{slot_of(t, period): job for t, job in times}
                    for times in sent]
    both_sent = jobs_by_slot[0].keys() & jobs_by_slot[1].keys()
    assert len(both_sent) >= 4, sent
    assert all(jobs_by_slot[0][s] == jobs_by_slot[1][s] for s in both_sent)
    ran = {run["job_id"] for run in runs}
    assert {job for times in sent for _, job in times} == ran


def test_two_celery_beats_run_each_slot_twice(beat_jobs, store, tmp_path):
    """The contrast: Celery's own scheduler sends no request id, so every
    tick of either beat is a job of its own: two runs per slot."""
    runs, sent = run_two_beats(beat_jobs, store, tmp_path, CELERY_SCHEDULER)
    sent_jobs = [job for times in sent for _, job in times]
    assert all(run["request_id"] is None for run in runs)
    # Every tick sent ran, as a job of its own: nothing deduped.
    assert sorted(run["job_id"] for run in runs) == sorted(sent_jobs)
    assert len(set(sent_jobs)) == len(sent_jobs)
    assert sends_per_period(sent, beat_jobs.PERIOD) >= 1.5, sent
