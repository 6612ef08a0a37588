"""The small pieces behind the observability tests, without servers: the
metrics setting, the event switch shared across fork, Flower's hook."""

from __future__ import annotations

import os

import pytest
from celery.events.state import Task as TaskState

from ares_celery.errors import ConfigurationError
from ares_celery.flower.task_format import format_task
from ares_celery.observability.events import EventSwitch
from ares_celery.settings import metrics_listen


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), (9808, ("0.0.0.0", 9808)),
    ("9808", ("0.0.0.0", 9808)), (":9808", ("0.0.0.0", 9808)),
    ("127.0.0.1:9808", ("127.0.0.1", 9808)), ("[::1]:9808", ("::1", 9808)),
])
def test_metrics_port_forms(value, expected):
    assert metrics_listen("ares_metrics_port", value) == expected


@pytest.mark.parametrize("value", [0, 70000, True, 9808.5, "http", "h:x"])
def test_bad_metrics_port_is_refused(value):
    with pytest.raises(ConfigurationError, match="ares_metrics_port"):
        metrics_listen("ares_metrics_port", value)


def test_event_switch_is_shared_with_forked_children():
    switch = EventSwitch()
    assert not switch.on            # not installed: never sends
    switch.install(False)
    pid = os.fork()
    if pid == 0:                    # the "pool process" sees the flip
        os._exit(0 if switch.on is False else 1)
    assert os.waitpid(pid, 0)[1] == 0
    pid = os.fork()
    if pid == 0:
        switch.set(True)            # shared memory, not a private copy
        os._exit(0)
    os.waitpid(pid, 0)
    assert switch.on


def task_with(*events: tuple[str, dict]) -> TaskState:
    task = TaskState(uuid="job-1")
    for clock, (kind, fields) in enumerate(events, 1):
        task.event(kind, float(clock), float(clock), dict(fields))
    return task


def test_format_task_lists_our_fields_and_the_real_state():
    task = task_with(("received", {"name": "jobs.x"}), ("started", {}),
                     ("ares-lease", {"ares_fencing_token": 41,
                                     "ares_request_id": "r-1"}),
                     ("ares-placement", {"ares_host": "h", "ares_gpus": [0]}))
    assert task.state == "ARES-PLACEMENT"   # what Celery records
    shown = format_task(task)
    assert shown.state == "STARTED"
    assert shown.as_dict()["ares_fencing_token"] == 41
    assert shown._fields[-4:] == ("ares_request_id", "ares_fencing_token",
                                  "ares_host", "ares_gpus")


def test_deferred_job_shows_as_deferred_until_done():
    task = task_with(("received", {"name": "jobs.x"}),
                     ("ares-deferred", {"ares_deferred": "lock held"}),
                     ("started", {}))
    assert format_task(task).state == "DEFERRED"
    task.event("succeeded", 9.0, 9.0, {"result": "1"})
    assert format_task(task).state == "SUCCESS"
    plain = task_with(("received", {"name": "jobs.x"}))
    assert format_task(plain)._fields == TaskState._fields
