"""Preemption on one host's ledger: who is asked to yield, what they lose,
that the freed GPUs go to the preemptor and to nobody else, and that the
grace is measured. Real ledger files; every job here runs in this process
(pids are only checked for liveness)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ares_celery import LeaseLost, Preempted
from ares_celery.exactly_once.context import JobContext
from ares_celery.gpu.mock_topologies import mock_topology
from ares_celery.gpu.policies import POLICIES
from ares_celery.gpu.preemption import Victim, candidates, choose_victims
from ares_celery.gpu.request import GpuRequest

pytestmark = pytest.mark.timeout(60)


def _run(ledger, job, gpus, priority, preemptible=True, token=0):
    got = ledger.try_allocate(job, GpuRequest(gpus), priority,
                              preemptible=preemptible, token=token)
    assert got is not None, f"{job} did not start"
    return got


def test_an_urgent_job_preempts_the_two_cheapest_lower_priority_jobs(ledger):
    _run(ledger, "a", 4, 1, token=11)
    _run(ledger, "b", 4, 2, token=12)
    assert ledger.try_allocate("big", GpuRequest(8), 7) is None
    victims = ledger.preempt_for("big")
    assert sorted(v.job_id for v in victims) == ["a", "b"]
    assert {v.token for v in victims} == {11, 12}
    assert ledger.preempt_request("a")["by"] == "big"
    # Asked once: the next look changes nothing, and the inventory no
    # longer offers the victims to other preemptors.
    assert ledger.preempt_for("big") == []
    assert ledger.preemptible() == {}
    ledger.release("a")
    # a's GPUs are reserved for big: a 4-GPU job of big's level waiting
    # since before cannot take them.
    assert ledger.try_allocate("same-level", GpuRequest(4), 7,
                               time.time() - 60) is None
    assert ledger.busy().keys() == set(range(8))
    ledger.release("b")
    got = ledger.try_allocate("big", GpuRequest(8), 7)
    assert got is not None and sorted(got.gpus) == list(range(8))
    assert ledger.preempt_request("b") is None


def test_non_preemptible_and_equally_urgent_jobs_are_never_chosen(ledger):
    _run(ledger, "pinned", 4, 1, preemptible=False)
    _run(ledger, "peer", 4, 7)
    assert ledger.try_allocate("big", GpuRequest(8), 7) is None
    assert ledger.preempt_for("big") == []
    assert ledger.preempt_request("pinned") is None
    assert ledger.preempt_request("peer") is None


def test_only_what_is_needed_and_the_least_work_lost(ledger):
    now = time.time()
    for job, prio in (("old", 1), ("fresh", 1), ("saved", 2)):
        _run(ledger, job, 2, prio)
    # Backdate: "old" ran 100 s unsaved, "saved" checkpointed 5 s ago,
    # "fresh" started 20 s ago.
    with ledger.locked() as state:
        state["allocations"]["old"]["at"] = now - 100
        state["allocations"]["fresh"]["at"] = now - 20
        state["allocations"]["saved"]["at"] = now - 300
    ledger.note_checkpoint("saved", now - 5)
    assert ledger.try_allocate("two", GpuRequest(4), 8) is None
    victims = ledger.preempt_for("two", now=now)
    # 2 free + one 2-GPU victim suffice: "saved" loses 10 GPU-s.
    assert [v.job_id for v in victims] == ["saved"]
    assert victims[0].lost_gpu_seconds == pytest.approx(10, abs=0.5)


def test_only_the_most_urgent_blocked_waiter_preempts(ledger):
    _run(ledger, "victim", 8, 1)
    assert ledger.try_allocate("urgent", GpuRequest(8), 9) is None
    assert ledger.try_allocate("less", GpuRequest(8), 6) is None
    assert ledger.preempt_for("less") == []
    assert [v.job_id for v in ledger.preempt_for("urgent")] == ["victim"]


def test_only_victims_past_the_grace_are_killed(ledger, monkeypatch):
    killed = []
    # Liveness probes (signal 0) pass; the SIGKILL is recorded, not sent.
    monkeypatch.setattr("ares_celery.gpu.allocation.os.kill",
                        lambda pid, sig: sig and killed.append((pid, sig)))
    _run(ledger, "victim", 8, 1, token=5)
    assert ledger.try_allocate("urgent", GpuRequest(8), 9) is None
    now = time.time()
    ledger.preempt_for("urgent", now=now)
    assert ledger.kill_overdue("urgent", 30, now=now + 29) == []
    assert ledger.kill_overdue("other", 30, now=now + 30) == []
    assert killed == []
    (late,) = ledger.kill_overdue("urgent", 30, now=now + 30)
    assert (late.job_id, late.token) == ("victim", 5)
    assert killed == [(os.getpid(), signal.SIGKILL)]


def test_a_preemptor_that_gives_up_lets_its_victims_go_on(ledger):
    _run(ledger, "victim", 8, 1)
    assert ledger.try_allocate("urgent", GpuRequest(8), 9) is None
    ledger.preempt_for("urgent")
    assert ledger.preempt_request("victim") is not None
    ledger.withdraw("urgent")
    assert ledger.preempt_request("victim") is None
    assert ledger.preemptible() == {"victim": 1}


def test_the_inventory_lists_running_preemptible_jobs(ledger):
    _run(ledger, "p", 2, 3)
    _run(ledger, "np", 2, 1, preemptible=False)
    busy, info = ledger.snapshot()
    assert info["preemptible"] == {"p": 3}
    assert set(busy.values()) == {"p", "np"}


def test_choose_victims_greedy_above_the_exhaustive_bound():
    topo = mock_topology("hgx-h100", host="h")
    pool = [Victim(f"j{i}", 1, (i,), 1, 0, float(i)) for i in range(8)]
    chosen = choose_victims(topo, POLICIES["ring-bandwidth"], GpuRequest(2),
                            [], pool)
    assert sorted(v.job_id for v in chosen) == ["j0", "j1"]
    from ares_celery.gpu import preemption
    bound = preemption.EXHAUSTIVE_UP_TO
    try:
        preemption.EXHAUSTIVE_UP_TO = 2
        greedy = choose_victims(topo, POLICIES["ring-bandwidth"],
                                GpuRequest(2), [], pool)
    finally:
        preemption.EXHAUSTIVE_UP_TO = bound
    assert sorted(v.job_id for v in greedy) == ["j0", "j1"]
    assert choose_victims(topo, POLICIES["ring-bandwidth"], GpuRequest(8),
                          [], pool[:3]) is None


def test_candidates_skip_marked_and_more_urgent_jobs():
    allocations = {
        "ok": {"gpus": [0], "pid": 1, "priority": 2, "preemptible": True},
        "marked": {"gpus": [1], "pid": 1, "priority": 2, "preemptible": True,
                   "preempt": {"by": "x", "at": 0}},
        "urgent": {"gpus": [2], "pid": 1, "priority": 8,
                   "preemptible": True},
        "pinned": {"gpus": [3], "pid": 1, "priority": 0}}
    assert [v.job_id for v in candidates(allocations, 5, time.time())] == \
        ["ok"]


def test_check_raises_preempted_a_lease_lost():
    asked = {}
    ctx = JobContext("j", None, 3, "t", preempt_probe=lambda: asked or None)
    ctx.check()
    assert ctx.preempt_requested is False
    asked.update(by="urgent", priority=9)
    assert ctx.preempt_requested is True
    with pytest.raises(Preempted, match="preempted by job urgent") as exc:
        ctx.check()
    assert isinstance(exc.value, LeaseLost)


class _Locks:
    def __init__(self):
        self.released = []

    def release(self, job_id, token):
        self.released.append((job_id, token))
        return True


def test_a_deaf_victim_is_killed_after_the_grace_and_its_lock_handed_back(
        ledger):
    """The preempting job's own wait (bound 0: try once) lasts the grace:
    the victim, in another process, ignores the request and is SIGKILLed,
    its lock released as a deliberate hand-back (not a lost attempt), and
    its GPUs go to the preemptor."""
    from types import SimpleNamespace

    from ares_celery.gpu.host import GpuHost

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:                       # the victim's pool process: deaf
        try:
            ledger.try_allocate("victim", GpuRequest(8), 1,
                                preemptible=True, token=42)
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    locks = _Locks()
    services = SimpleNamespace(etcd=None, keys=None, locks=locks)
    host = GpuHost(ledger.topology, "q", ledger, services, wait_timeout=0,
                   preempt_grace=0.3)
    reports = []
    try:
        os.read(ready_r, 1)
        started = time.monotonic()
        got = host.allocate("urgent", GpuRequest(8), priority=9,
                            report=lambda v, o: reports.append(
                                (o, [x.job_id for x in v])))
        assert time.monotonic() - started >= 0.3
        assert sorted(got.gpus) == list(range(8))
        assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert reports == [("requested", ["victim"]), ("killed", ["victim"])]
    assert locks.released == [("victim", 42)]


def test_preemption_metrics():
    from prometheus_client import REGISTRY

    from ares_celery.observability.metrics import count_preemption

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("ares_preemptions_total", outcome="requested"),
              value("ares_preemptions_total", outcome="killed"),
              value("ares_preempted_gpu_seconds_total"))
    count_preemption("requested", 12.5)
    count_preemption("killed")
    assert (value("ares_preemptions_total", outcome="requested"),
            value("ares_preemptions_total", outcome="killed"),
            value("ares_preempted_gpu_seconds_total")) == \
        (before[0] + 1, before[1] + 1, before[2] + 12.5)
