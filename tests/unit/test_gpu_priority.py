"""Priorities of GPU jobs: validation at decoration and call, aging, what
the broker is told, and the order in which a host's ledger grants freed
GPUs to waiting jobs (priority, then submission; aging lets an old
low-priority job through)."""

from __future__ import annotations

import os
import time

import pytest
from celery import Celery

from ares_celery import Ares, AresError, ConfigurationError
from ares_celery.gpu import priority as prio
from ares_celery.gpu.request import GpuRequest
from ares_celery.gpu.routing import RouteDecision

pytestmark = pytest.mark.timeout(60)

#: Nothing listens there: a test that contacted a service would fail.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture()
def ares():
    app = Celery("prio", broker=NOWHERE, set_as_current=False)
    app.conf.ares_redis_url = NOWHERE
    return Ares(app)


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 10, 5.0, "7", True, False, None])
def test_decorator_refuses_a_bad_priority(ares, bad):
    with pytest.raises(ConfigurationError, match="priority must be an int"):
        ares.gpu_task(gpus=1, priority=bad)(lambda: None)


@pytest.mark.parametrize("bad", [1, "yes", None, "no"])
def test_decorator_refuses_a_non_bool_preemptible(ares, bad):
    with pytest.raises(ConfigurationError, match="preemptible must be"):
        ares.gpu_task(gpus=1, preemptible=bad)(lambda: None)


def test_preemptible_on_a_plain_task_is_refused(ares):
    with pytest.raises(ConfigurationError, match="GPU tasks only"):
        ares.task(preemptible=True)(lambda: None)
    with pytest.raises(AresError):
        ares.task(name="t.flag", preemptible=False)(lambda: None)


def body():
    """A task body (Celery builds tasks from named functions only)."""


def test_decorator_sets_priority_and_preemptible(ares):
    train = ares.gpu_task(gpus=4, priority=1, preemptible=True,
                          name="t.train")(body)
    plain = ares.gpu_task(gpus=1, name="t.plain")(body)
    assert (train.gpu_priority, train.preemptible) == (1, True)
    assert (plain.gpu_priority, plain.preemptible) == (prio.DEFAULT_PRIORITY,
                                                   False)


@pytest.mark.parametrize("bad", [10, -3, True, "9", 2.5])
def test_call_refuses_a_bad_priority_before_contacting_anything(ares, bad):
    train = ares.gpu_task(gpus=1, name="t.call")(body)
    with pytest.raises(ConfigurationError, match="t.call: priority"):
        train.apply_async(request_id="r-1", priority=bad)


# -- aging, classes, broker direction --------------------------------------------


def test_aging_adds_one_level_per_step_capped_at_nine():
    step = prio.AGING_STEP_S
    assert prio.effective_priority(2, 0) == 2
    assert prio.effective_priority(2, step - 0.001) == 2
    assert prio.effective_priority(2, step) == 3
    assert prio.effective_priority(2, 4.5 * step) == 6
    assert prio.effective_priority(0, 9 * step) == 9
    assert prio.effective_priority(8, 100 * step) == 9
    assert prio.effective_priority(5, -10) == 5   # a skewed client clock


def test_priority_classes():
    assert [prio.priority_class(p) for p in range(10)] == (
        ["low"] * 4 + ["normal"] * 3 + ["high"] * 3)


@pytest.mark.parametrize(("url", "sent"), [
    ("redis://localhost:6379/0", 2), ("rediss://h/0", 2),
    ("sentinel://h:26379", 2), ("amqp://guest@localhost//", 7),
    ("pyamqp://h//", 7), (None, 7)])
def test_broker_priority_direction(url, sent):
    """kombu's Redis transport pops its lowest-numbered list first;
    RabbitMQ delivers the highest priority first."""
    assert prio.broker_priority(7, url) == sent


class _Router:
    def __init__(self):
        self.priorities = []

    def decide(self, request, exclude=frozenset(), priority=None):
        self.priorities.append(priority)
        return RouteDecision("h1", "ares.gpu.h1", (0,), 1.0, False, "test")


def test_route_carries_priority_and_translates_for_redis(ares, monkeypatch):
    train = ares.gpu_task(gpus=1, priority=2, name="t.route")(body)
    router = _Router()
    monkeypatch.setattr(train, "_router", router)
    before = time.time()
    options = train._route_for({})({})
    route = options["headers"]["ares_route"]
    assert (route["priority"], route["host"]) == (2, "h1")
    assert before <= route["submitted"] <= time.time()
    assert options["queue"] == "ares.gpu.h1"
    assert options["priority"] == 9 - 2          # Redis: reversed
    per_call = train._route_for({"priority": 8})({"priority": 8})
    assert per_call["headers"]["ares_route"]["priority"] == 8
    assert per_call["priority"] == 1
    chosen = train._route_for({"queue": "mine", "priority": 6})(
        {"queue": "mine", "priority": 6})
    assert chosen["queue"] == "mine"
    assert chosen["headers"]["ares_route"]["priority"] == 6
    # The router judged preemption with the job's priority, not the
    # broker's number.
    assert router.priorities == [2, 8]


# -- the ledger's grant order -------------------------------------------------------


def _hold_all(ledger, job="holder"):
    assert ledger.try_allocate(job, GpuRequest(8)) is not None


def _grants_in_order(ledger, holder, jobs):
    """Release the holder, then each granted job in turn: the order in
    which the waiting ``jobs`` got the host's GPUs."""
    order = []
    ledger.release(holder)
    while True:
        busy = set(ledger.busy().values())
        assert len(busy) <= 1, f"two 8-GPU jobs share the host: {busy}"
        if not busy:
            return order
        (job,) = busy
        assert job in jobs and job not in order
        order.append(job)
        ledger.release(job)


def test_waiters_get_gpus_by_priority_then_submission(ledger):
    _hold_all(ledger)
    now = time.time()
    # (job, priority, submitted): registered in this (shuffled) order.
    waiters = [("low-old", 2, now - 30), ("high-late", 7, now - 5),
               ("normal", 5, now - 20), ("high-early", 7, now - 10),
               ("low-new", 2, now - 1)]
    for job, p, t in waiters:
        assert ledger.try_allocate(job, GpuRequest(8), p, t) is None
    assert set(ledger.waiting()) == {w[0] for w in waiters}
    order = _grants_in_order(ledger, "holder", {w[0] for w in waiters})
    assert order == ["high-early", "high-late", "normal", "low-old",
                     "low-new"]
    assert ledger.waiting() == {}


def test_a_granted_waiter_finds_its_gpus_on_its_next_look(ledger):
    _hold_all(ledger)
    assert ledger.try_allocate("lo", GpuRequest(8), 1) is None
    assert ledger.try_allocate("hi", GpuRequest(8), 9) is None
    ledger.release("holder")
    assert ledger.try_allocate("lo", GpuRequest(8), 1) is None
    got = ledger.try_allocate("hi", GpuRequest(8), 9)
    assert got is not None and sorted(got.gpus) == list(range(8))


def test_aging_lets_an_old_low_priority_job_through(ledger):
    _hold_all(ledger)
    now = time.time()
    step = prio.AGING_STEP_S
    # Waited long enough to age from 1 to 9: ahead of every fresh 9 and 8.
    assert ledger.try_allocate("fresh-9", GpuRequest(8), 9, now) is None
    assert ledger.try_allocate("fresh-8", GpuRequest(8), 8, now) is None
    assert ledger.try_allocate("old-1", GpuRequest(8), 1,
                               now - 8 * step - 1) is None
    # Aged to 6 only: still behind the fresh 9 and 8.
    assert ledger.try_allocate("old-0", GpuRequest(8), 0,
                               now - 6 * step - 1) is None
    order = _grants_in_order(ledger, "holder",
                             {"fresh-9", "fresh-8", "old-1", "old-0"})
    assert order == ["old-1", "fresh-9", "fresh-8", "old-0"]


def test_freed_gpus_accumulate_for_a_blocked_urgent_waiter(ledger):
    """A 1-GPU job of lower priority may not take GPUs an 8-GPU job of
    higher priority is waiting for; one of the same priority may."""
    holders = [f"h{i}" for i in range(8)]
    for job in holders:
        assert ledger.try_allocate(job, GpuRequest(1)) is not None
    assert ledger.try_allocate("big", GpuRequest(8), 7) is None
    ledger.release("h0")
    ledger.release("h1")
    assert ledger.try_allocate("small-low", GpuRequest(1), 3) is None
    got = ledger.try_allocate("small-same", GpuRequest(1), 7)
    assert got is not None     # backfill within the level
    ledger.release("small-same")
    for job in holders[2:]:
        ledger.release(job)
    busy = ledger.busy()
    assert set(busy.values()) == {"big"} and len(busy) == 8
    assert "small-low" in ledger.waiting()
    ledger.release("big")
    assert set(ledger.busy().values()) == {"small-low"}


def test_giving_up_leaves_the_line(ledger):
    _hold_all(ledger)
    from ares_celery.gpu.allocation import GpusBusy

    with pytest.raises(GpusBusy):
        ledger.allocate("impatient", GpuRequest(8), timeout=0.05,
                        priority=9)
    assert "impatient" not in ledger.waiting()
    assert ledger.try_allocate("patient", GpuRequest(8), 0) is None
    ledger.release("holder")
    assert set(ledger.busy().values()) == {"patient"}


def test_only_the_holding_process_releases_a_jobs_gpus(ledger):
    """A duplicate delivery of a running job (a recovered or deferred copy
    that found its lock held) ends in another pool process; its cleanup
    must not free the running copy's GPUs, or two jobs share them."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:                       # the pool process running the job
        try:
            ledger.allocate("job-1", GpuRequest(2), timeout=5)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        assert set(ledger.busy().values()) == {"job-1"}
        assert ledger.release("job-1") is False
        assert set(ledger.busy().values()) == {"job-1"}
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    assert ledger.busy() == {}                 # the dead holder is reaped
