"""Celery's own ways of submitting work keep the exactly-once promise:
canvas (chain, group, chord), ``send_task`` by name, explicit task ids,
per-call options. Real Redis, etcd and an in-process worker, on both
brokers (later chain steps and chord bodies are published by the worker)."""

from __future__ import annotations

import threading

import pytest
from celery import chain, chord, group
from celery.canvas import xmap

from ares_celery.errors import (
    ConfigurationError,
    InvalidRequestId,
    RequestIdConflict,
)
from ares_celery.exactly_once.identity import job_id_for
from tests.apps.config import make_app
from tests.records import executions

pytestmark = pytest.mark.integration


def runs(store, *results) -> list[int]:
    return [len(executions(store, r.id)) for r in results]


def chain_ids(result) -> list[str]:
    ids = []
    while result is not None:
        ids.append(result.id)
        result = result.parent
    return ids


def test_chain_with_request_id_runs_each_step_once(jobs, worker, store):
    def submit():
        return chain(jobs.add.s(1, 2), jobs.add.s(10),
                     jobs.add.s(100)).apply_async(request_id="wf-chain")

    first = submit()
    assert first.get(timeout=20) == 113
    again = submit()
    assert chain_ids(again) == chain_ids(first)
    assert again.get(timeout=5) == 113
    # Named by the workflow's request id and the step's place in it.
    assert first.id == job_id_for("ares", "wf-chain#2")
    assert runs(store, first, first.parent, first.parent.parent) == [1, 1, 1]


def test_group_with_request_id_names_every_member(jobs, worker, store):
    def submit():
        return group(jobs.add.s(i, i) for i in range(4)).apply_async(
            request_id="wf-group")

    first = submit()
    assert first.get(timeout=20) == [0, 2, 4, 6]
    again = submit()
    assert again.id == first.id
    assert [r.id for r in again.results] == [r.id for r in first.results]
    assert len({r.id for r in first.results}) == 4
    assert runs(store, *first.results) == [1, 1, 1, 1]


def test_chord_with_plain_member_runs_once(jobs, worker, store):
    def submit():
        return chord([jobs.add.s(1, 1), jobs.add.s(2, 2),
                      jobs.plain_add.s(3, 3)],
                     jobs.total.s()).apply_async(request_id="wf-chord")

    first = submit()
    assert first.get(timeout=30) == 12
    again = submit()
    assert again.id == first.id == job_id_for("ares", "wf-chord#b")
    assert again.get(timeout=5) == 12
    header = [job_id_for("ares", f"wf-chord#{i}") for i in (0, 1)]
    assert [len(executions(store, j)) for j in header] == [1, 1]
    assert runs(store, first) == [1]
    # The plain task is plain Celery (at least once, no dedup): a retry of
    # the workflow publishes it again, under the same derived task id.
    plain_ids = [r.id for r in again.parent.results[2:]]
    assert plain_ids == [job_id_for("ares", "wf-chord#2")]


def test_request_id_set_on_a_later_step_names_the_workflow(jobs, worker,
                                                           store):
    def submit():
        return chain(jobs.add.s(5, 5),
                     jobs.add.s(1).set(request_id="wf-step")).apply_async()

    first = submit()
    assert first.get(timeout=20) == 11
    again = submit()
    assert again.id == first.id == job_id_for("ares", "wf-step")
    assert again.parent.id == first.parent.id
    assert runs(store, first, first.parent) == [1, 1]


def test_request_id_set_on_a_chord_body_names_the_chord(jobs, worker,
                                                        store):
    def submit():
        return chord([jobs.add.s(1, 1), jobs.add.s(2, 2)],
                     jobs.total.s().set(request_id="wf-body")).apply_async()

    first = submit()
    assert first.get(timeout=30) == 6
    again = submit()
    assert again.id == first.id == job_id_for("ares", "wf-body")
    header = [job_id_for("ares", f"wf-body#{i}") for i in (0, 1)]
    assert [len(executions(store, j)) for j in header] == [1, 1]
    assert runs(store, first) == [1]


def test_concurrent_submissions_of_one_workflow(jobs, worker, store):
    results, errors = [], []

    def submit():
        try:
            results.append(chain(jobs.add.s(2, 2), jobs.add.s(2))
                           .apply_async(request_id="wf-concurrent"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert len({r.id for r in results}) == 1
    assert results[0].get(timeout=20) == 6
    assert runs(store, results[0], results[0].parent) == [1, 1]


def test_workflow_request_id_needs_an_exactly_once_member(jobs):
    with pytest.raises(InvalidRequestId, match="without any exactly-once"):
        group(jobs.plain_add.s(1), jobs.plain_add.s(2)).apply_async(
            request_id="wf-plain")


def test_send_task_by_name_dedups(jobs, worker, store, broker):
    """A client without the task code (an app with no tasks) submits by
    name: the request id is honoured, not dropped."""
    client, _ = make_app("client", broker=broker.url)
    first = client.send_task("jobs.add", (20, 22), request_id="by-name")
    again = client.send_task("jobs.add", (20, 22), request_id="by-name")
    assert again.id == first.id == job_id_for("ares", "by-name")
    assert first.get(timeout=20) == 42
    assert runs(store, first) == [1]
    with pytest.raises(RequestIdConflict):
        client.send_task("jobs.add", (1, 1), request_id="by-name")
    # The app that has the task: send_task goes through apply_async.
    local = jobs.app.send_task("jobs.add", (20, 22), request_id="by-name")
    assert local.id == first.id


def test_request_id_on_a_plain_task_is_refused(jobs):
    with pytest.raises(ConfigurationError, match="not an exactly-once task"):
        jobs.plain_add.apply_async((1, 1), request_id="plain-rid")
    with pytest.raises(ConfigurationError, match="not an exactly-once task"):
        jobs.app.send_task("jobs.plain_add", (1, 1), request_id="plain-rid")


def test_reused_task_id_with_other_arguments_conflicts(jobs, worker, store):
    task_id = "0b7f8d9c-5a6e-4f3b-9c2d-1e0f9a8b7c6d"
    first = jobs.add.apply_async((1, 2), task_id=task_id)
    assert first.get(timeout=20) == 3
    with pytest.raises(RequestIdConflict, match="task_id"):
        jobs.add.apply_async((5, 5), task_id=task_id)
    same = jobs.add.apply_async((1, 2), task_id=task_id)
    assert same.id == task_id and same.get(timeout=5) == 3
    assert runs(store, first) == [1]


def test_a_non_json_serializer_per_call_is_refused(jobs, worker, store):
    with pytest.raises(ConfigurationError, match="serializer='pickle'"):
        jobs.add.apply_async((1, 1), request_id="pickled",
                             serializer="pickle")
    # Nothing was reserved: the same request id works with JSON.
    assert jobs.add.apply_async((1, 1), request_id="pickled").get(
        timeout=20) == 2


@pytest.mark.parametrize("make", [
    lambda t: t.map([1, 2]),
    lambda t: t.starmap([(1, 2)]),
    lambda t: t.chunks([(1, 2)], 1),
])
def test_map_starmap_chunks_of_ares_tasks_are_refused(jobs, make):
    with pytest.raises(ConfigurationError, match="without a lease"):
        make(jobs.add)


def test_a_hand_built_map_never_runs_an_ares_body_unleased(jobs, worker,
                                                           store):
    """``xmap(task.s(), items)`` built by hand reaches the worker's
    ``celery.map``, which calls the body directly: it is refused there."""
    result = xmap(jobs.add.s(), [1, 2]).apply_async()
    with pytest.raises(Exception, match="without a lease") as failure:
        result.get(timeout=20)
    assert type(failure.value).__name__ == "ConfigurationError"
    assert store.keys("test:exec:*") == []
