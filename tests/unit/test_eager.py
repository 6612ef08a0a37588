"""Eager mode: ares tasks run in-process with no Redis or etcd.

The app points at "tripwire" ports: sockets that listen but never accept or
answer. A client that contacted one would hang waiting for a reply (the
timeout mark turns that into a failure) and would leave a connection in
the listen backlog, which every test checks is empty afterwards. So these
tests prove eager mode contacts neither store, not only that it copes
without them.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from celery import Celery
from kombu.exceptions import EncodeError

from ares_celery import (
    Ares,
    AresError,
    ConfigurationError,
    InvalidRequestId,
    RequestIdConflict,
)
from ares_celery.errors import UnsatisfiableGpuRequest
from ares_celery.exactly_once.identity import job_id_for
from ares_celery.gpu.mock_topologies import mock_topology
from ares_celery.gpu.request import GpuRequest

pytestmark = pytest.mark.timeout(60)


class Tripwire:
    """A listening socket nobody should connect to."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def contacted(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        self.sock.close()


class EagerApp:
    """An app whose stores are tripwires, its tasks, and what bodies saw."""

    def __init__(self) -> None:
        self.redis, self.etcd = Tripwire(), Tripwire()
        app = Celery("eager_unit", set_as_current=False,
                     broker=f"redis://127.0.0.1:{self.redis.port}/0")
        app.conf.ares_etcd_endpoints = [f"127.0.0.1:{self.etcd.port}"]
        app.conf.ares_namespace = "eagerns"
        self.app = app
        self.ares = ares = Ares(app)
        self.seen: list = []
        self.hold = threading.Event()
        self.hold.set()
        seen = self.seen

        @ares.task(name="eager.add")
        def add(x, y):
            seen.append(ares.current())
            return x + y

        @ares.task(name="eager.mul")
        def mul(x, y):
            seen.append(ares.current())
            return x * y

        @ares.task(name="eager.fail")
        def fail(why):
            seen.append(ares.current())
            raise ValueError(why)

        @ares.task(name="eager.flaky", bind=True, max_retries=3)
        def flaky(self, until):
            seen.append(ares.current())
            if len(seen) < until:
                raise self.retry(countdown=0)
            return len(seen)

        @ares.task(name="eager.again")
        def again(request_id):
            seen.append(ares.current())
            again.apply_async((request_id,), request_id=request_id)

        @ares.task(name="eager.slow")
        def slow(x):
            seen.append(ares.current())
            self.hold.wait(30)
            return x

        @ares.gpu_task(name="eager.train", gpus=4, interconnect="nvlink")
        def train():
            ctx = ares.current()
            seen.append(ctx)
            return {"gpus": ctx.gpus, "uuids": ctx.gpu_uuids,
                    "host": ctx.host, "score": ctx.placement_score,
                    "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

        @ares.gpu_task(name="eager.huge", gpus=16)
        def huge():
            return ares.current().host

        self.add, self.mul, self.fail, self.flaky = add, mul, fail, flaky
        self.again, self.slow, self.train, self.huge = again, slow, train, huge

    def untouched(self) -> bool:
        return not self.redis.contacted() and not self.etcd.contacted()


@pytest.fixture(scope="module")
def eager_app():
    found = EagerApp()
    yield found
    found.redis.close()
    found.etcd.close()


@pytest.fixture()
def e(eager_app, ares_eager):
    """The eager app, with task_always_eager on and its memory empty."""
    ares_eager(eager_app.app)
    eager_app.seen.clear()
    yield eager_app
    assert eager_app.untouched(), "eager mode contacted Redis or etcd"


def test_runs_in_process_with_a_job_context(e):
    result = e.add.apply_async((2, 3), request_id="order-1")
    assert result.get() == 5
    (ctx,) = e.seen
    assert ctx.job_id == result.id == job_id_for("eagerns", "order-1")
    assert ctx.request_id == "order-1"
    assert ctx.attempt == 1 and ctx.task_name == "eager.add"
    assert isinstance(ctx.fencing_token, int) and ctx.fencing_token > 0
    assert not ctx.lease_lost
    ctx.check()  # never raises LeaseLost


def test_fencing_tokens_increase(e):
    e.add.delay(1, 1)
    e.add.apply_async((1, 1), request_id="t-2")
    e.mul.apply((1, 1))
    tokens = [ctx.fencing_token for ctx in e.seen]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_same_request_id_runs_once_and_returns_the_same_result(e):
    first = e.add.apply_async((2, 2), request_id="dup")
    second = e.add.apply_async((2, 2), request_id="dup")
    assert second.id == first.id and second.get() == first.get() == 4
    assert len(e.seen) == 1


def test_apply_dedups_like_apply_async(e):
    e.app.conf.task_always_eager = False
    first = e.add.apply((3, 3), request_id="via-apply")
    second = e.add.apply((3, 3), request_id="via-apply")
    assert first.get() == second.get() == 6
    assert first.id == job_id_for("eagerns", "via-apply")
    assert len(e.seen) == 1


def test_reused_request_id_with_other_arguments_conflicts(e):
    e.add.apply_async((1, 2), request_id="reused")
    with pytest.raises(RequestIdConflict, match="different arguments"):
        e.add.apply_async((1, 3), request_id="reused")
    with pytest.raises(RequestIdConflict, match="'eager.add', not 'eager.mul'"):
        e.mul.apply_async((1, 2), request_id="reused")
    assert len(e.seen) == 1


def test_reused_task_id_with_other_arguments_conflicts(e):
    first = e.add.apply_async((1, 2), task_id="my-task-id")
    assert e.add.apply_async((1, 2), task_id="my-task-id").get() == 3
    with pytest.raises(RequestIdConflict, match="task_id 'my-task-id'"):
        e.add.apply_async((5, 5), task_id="my-task-id")
    assert first.id == "my-task-id" and len(e.seen) == 1


@pytest.mark.parametrize("bad", ["", "   ", 42, "a\x00b", "x" * 257])
def test_invalid_request_id_is_refused(e, bad):
    with pytest.raises(InvalidRequestId):
        e.add.apply_async((1, 2), request_id=bad)
    assert e.seen == []


def test_task_id_contradicting_request_id_is_refused(e):
    with pytest.raises(InvalidRequestId, match="contradicts"):
        e.add.apply_async((1, 2), request_id="r", task_id="other")


def test_failure_propagates_and_is_remembered(e):
    """Production commits FAILURE once: a retry with the same request id
    gets the failure back without running the body again."""
    with pytest.raises(ValueError, match="boom"):
        e.fail.apply_async(("boom",), request_id="fails")
    with pytest.raises(ValueError, match="boom"):
        e.fail.apply_async(("boom",), request_id="fails")
    assert len(e.seen) == 1


def test_failure_without_propagation_is_a_failed_result(e):
    e.app.conf.task_eager_propagates = False
    first = e.fail.apply_async(("soft",), request_id="soft-fail")
    second = e.fail.apply_async(("soft",), request_id="soft-fail")
    for result in (first, second):
        assert result.state == "FAILURE"
        assert isinstance(result.result, ValueError)
        assert "ValueError" in result.traceback
    with pytest.raises(ValueError, match="soft"):
        second.get()
    assert len(e.seen) == 1


def test_a_submission_that_fails_before_the_body_is_forgotten(e):
    """Like production's rolled-back reservation: the request id stays
    free for the corrected submission."""
    with pytest.raises(EncodeError):
        e.add.apply_async((object(), 1), request_id="unencodable")
    assert e.seen == []
    assert e.add.apply_async((1, 1), request_id="unencodable").get() == 2


def test_celery_retry_runs_again_under_the_same_job(e):
    # As in plain Celery, an eager retry re-runs the task only without
    # task_eager_propagates (with it, Retry is raised to the caller).
    e.app.conf.task_eager_propagates = False
    result = e.flaky.apply_async((3,), request_id="flaky")
    assert result.get() == 3
    assert {ctx.job_id for ctx in e.seen} == {result.id}
    assert all(ctx.attempt == 1 for ctx in e.seen)
    tokens = [ctx.fencing_token for ctx in e.seen]
    assert tokens == sorted(set(tokens))
    assert e.flaky.apply_async((3,), request_id="flaky").get() == 3
    assert len(e.seen) == 3


def test_a_job_resubmitting_itself_is_refused(e):
    """Production would hand back the running job; eager mode cannot wait
    for a job its own thread is running, so it says so."""
    with pytest.raises(AresError, match="still running"):
        e.again.apply_async(("self-call",), request_id="self-call")
    assert len(e.seen) == 1


def test_concurrent_duplicate_waits_for_the_first_run(e):
    e.hold.clear()
    results = {}

    def submit(name):
        results[name] = e.slow.apply_async((7,), request_id="slow").get()

    first = threading.Thread(target=submit, args=("first",))
    first.start()
    deadline = time.monotonic() + 10
    while not e.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert e.seen, "the first run never started"
    second = threading.Thread(target=submit, args=("second",))
    second.start()
    second.join(0.2)
    assert second.is_alive(), "the duplicate did not wait for the first run"
    e.hold.set()
    first.join(10)
    second.join(10)
    assert results == {"first": 7, "second": 7}
    assert len(e.seen) == 1


def test_reset_forgets_jobs(e):
    e.add.apply_async((1, 1), request_id="forget-me")
    e.ares.eager.reset()
    e.add.apply_async((1, 1), request_id="forget-me")
    assert len(e.seen) == 2


def test_storing_eager_results_is_refused(e):
    e.add.store_eager_result = True
    try:
        with pytest.raises(ConfigurationError, match="task_store_eager_result"):
            e.add.apply_async((1, 1))
    finally:
        e.add.store_eager_result = False
    assert e.seen == []


def test_direct_call_is_a_plain_function_call(e):
    """``add(2, 2)`` is no job (as in production): no context, no dedup."""
    with pytest.raises(AresError, match="outside an exactly-once task"):
        e.add(2, 2)


# -- GPU tasks ---------------------------------------------------------------

def test_gpu_task_is_placed_on_the_default_mock(e, monkeypatch):
    monkeypatch.delenv("ARES_MOCK_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "before")
    expected = GpuRequest(4, interconnect="nvlink").placement_policy.place(
        mock_topology("dgx-a100"), GpuRequest(4, interconnect="nvlink"))
    got = e.train.apply_async(request_id="train-1").get()
    assert got["host"] == "mock-dgx-a100"
    assert got["gpus"] == list(expected.gpus) and len(got["gpus"]) == 4
    assert got["score"] == expected.score
    assert got["uuids"] == [f"GPU-mock-dgx-a100-{i:02d}" for i in got["gpus"]]
    assert got["visible"] == ",".join(map(str, got["gpus"]))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "before"


def test_gpu_task_restores_an_unset_cuda_visible_devices(e, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert e.train.apply().get()["visible"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_gpu_task_uses_the_mock_the_worker_would(e, monkeypatch):
    monkeypatch.setenv("ARES_MOCK_GPUS", "dgx1-v100")
    expected = GpuRequest(4, interconnect="nvlink").placement_policy.place(
        mock_topology("dgx1-v100"), GpuRequest(4, interconnect="nvlink"))
    got = e.train.apply_async().get()
    assert got["host"] == "mock-dgx1-v100"
    assert got["gpus"] == list(expected.gpus)


def test_unsatisfiable_gpu_request_fails_at_submission(e, monkeypatch):
    monkeypatch.delenv("ARES_MOCK_GPUS", raising=False)
    with pytest.raises(UnsatisfiableGpuRequest, match="ARES_MOCK_GPUS"):
        e.huge.apply_async(request_id="huge")
    # Not remembered: on a host that can run it, the same request id runs.
    monkeypatch.setenv("ARES_MOCK_GPUS", "nvswitch-16x")
    assert e.huge.apply_async(request_id="huge").get() == "mock-nvswitch-16x"


def test_ares_eager_needs_an_ares(ares_eager):
    app = Celery("no_ares", set_as_current=False)
    with pytest.raises(ConfigurationError, match="has no Ares"):
        ares_eager(app)
