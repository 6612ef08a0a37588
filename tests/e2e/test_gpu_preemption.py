"""Preemption with real workers on a mock 8-GPU host.

Two preemptible priority-1 training jobs hold four GPUs each; an 8-GPU job
of priority 8 arrives. One victim checks ``ctx.check()`` every step and
yields at once; the other never checks and is killed when the grace runs
out. The urgent job then runs on all eight GPUs, and both victims resume
from their last checkpoints and commit once, their preemption not counted
as a failed attempt. Non-preemptible jobs are never stopped.

``ares_preempt_grace`` is 3 s here (``ARES_TEST_PREEMPT_GRACE``): the
grace is this test's subject, and the production default of 30 s would
only make the deaf victim's kill slower.
"""

from __future__ import annotations

import json
import threading
import uuid
from contextlib import contextmanager

import pytest

from ares_celery.gpu.allocation import HostGpuLedger, ledger_path
from ares_celery.gpu.inventory import InventoryCache
from ares_celery.gpu.mock_topologies import mock_topology
from ares_celery.gpu.policies import POLICIES
from ares_celery.job_view import read_job
from tests.processes import WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.gpu, pytest.mark.fault]

HOST = "preempt8"
GRACE = 3.0
EVERY = 5          # checkpoint interval, in steps


@pytest.fixture()
def gpu_host(jobs, store):
    # Four pool processes: two victims, the urgent job, and a spare for a
    # requeued victim while the urgent job runs.
    worker = WorkerProcess(jobs.app, name=f"w@{HOST}", concurrency=4,
                           env={"ARES_MOCK_GPUS": "dgx-a100",
                                "ARES_TEST_PREEMPT_GRACE": str(GRACE)})
    try:
        worker.start()
        cache = InventoryCache(jobs.ares.services.etcd,
                               jobs.ares.services.keys).start()
        try:
            assert cache.wait_for(lambda h: HOST in h, 20)
        finally:
            cache.stop()
        settings = jobs.ares.settings
        yield worker, HostGpuLedger(
            ledger_path(settings.namespace, HOST, settings.gpu_state_dir),
            mock_topology("dgx-a100", host=HOST), POLICIES)
    finally:
        worker.stop()


@contextmanager
def preemption_events(jobs, worker):
    """``task-ares-preempted`` events (job id, fields) while the block runs,
    from the broker's event exchange, with the worker's events switched on
    the way Flower does it."""
    app = jobs.app
    seen: list[tuple[str, dict]] = []
    leases: set[str] = set()
    ready = threading.Event()
    receivers = []

    def collect():
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={
                "task-ares-preempted":
                    lambda event: seen.append((event["uuid"], event)),
                "task-ares-lease": lambda event: leases.add(event["uuid"])})
            # Set once its queue is bound: events sent before are lost.
            receiver.on_consume_ready = lambda *a, **kw: ready.set()
            receivers.append(receiver)
            receiver.capture(limit=None, timeout=None, wakeup=False)
    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    assert ready.wait(20)
    wait_for(lambda: app.control.enable_events(destination=[worker.name],
                                               reply=True, timeout=1), 20,
             "the worker to switch its events on")

    def probe_seen():
        # Pool processes follow the switch within a second: events are on
        # once a probe job's lease event arrives.
        probe = jobs.add.apply_async((1, 1), request_id=uuid.uuid4().hex)
        probe.get(timeout=20)
        return probe.id in leases or wait_for(
            lambda: probe.id in leases, 2, "probe event")
    wait_for(_quietly(probe_seen), 30, "task events from the pool")
    try:
        yield seen
    finally:
        receivers[0].should_stop = True
        thread.join(10)


def _quietly(check):
    def quiet():
        try:
            return check()
        except TimeoutError:
            return False
    return quiet


def _records(store, key):
    return [json.loads(x) for x in store.lrange(key, 0, -1)]


def _steps(store, job_id):
    return [int(x) for x in store.lrange(f"test:steps:{job_id}", 0, -1)]


def _checkpointed(store, job_id):
    """Steps done past the first checkpoint (it is saved after step 5)."""
    return len(_steps(store, job_id)) > EVERY + 1


def test_urgent_job_preempts_a_yielding_and_a_deaf_victim(jobs, gpu_host,
                                                          store):
    worker, ledger = gpu_host
    run = uuid.uuid4().hex[:8]
    total = 80                                         # 8 s undisturbed
    polite = jobs.train4.apply_async((total, EVERY),
                                     request_id=f"polite-{run}")
    deaf = jobs.train4.apply_async((total, EVERY), {"deaf": True},
                                   request_id=f"deaf-{run}")
    wait_for(lambda: _checkpointed(store, polite.id)
             and _checkpointed(store, deaf.id), 60,
             "both victims to run past a checkpoint")

    with preemption_events(jobs, worker) as seen:
        urgent = jobs.train8.apply_async((10, EVERY),
                                         request_id=f"urgent-{run}")
        wait_for(lambda: store.llen(f"test:started:{urgent.id}"),
                 GRACE + 30, "the urgent job to start")
        # Flower's task pages: asked (by the urgent job), then how each
        # victim stopped.
        expected = {(polite.id, "requested"), (polite.id, "yielded"),
                    (deaf.id, "requested"), (deaf.id, "killed")}
        try:
            wait_for(lambda: {(job, e["ares_preempt"]) for job, e in seen}
                     >= expected, 20, "the preemption events")
        except TimeoutError:
            pytest.fail(f"expected {expected}, seen "
                        f"{[(j, e['ares_preempt']) for j, e in seen]}")
    assert all(e["ares_preempted_by"] == urgent.id for _, e in seen)
    views = {job.id: read_job(jobs.ares.services, jobs.app.backend, job.id,
                              None) for job in (polite, urgent)}
    etcd, keys = jobs.ares.services.etcd, jobs.ares.services.keys
    # celery ares job: the priority each job runs with.
    assert (views[polite.id].priority, views[urgent.id].priority) == (1, 8), \
        [etcd.get(keys.job_record(j.id)) for j in (polite, urgent)]
    started = _records(store, f"test:started:{urgent.id}")[0]
    assert sorted(started["gpus"]) == list(range(8))
    # The polite victim stopped at ctx.check() with Preempted, the request
    # visible to the body; the deaf one never stopped by itself.
    (stop,) = _records(store, f"test:stopped:{polite.id}")
    assert stop == {"step": stop["step"], "error": "Preempted",
                    "requested": True}
    assert not store.llen(f"test:stopped:{deaf.id}")
    first_deaf = _records(store, f"test:started:{deaf.id}")[0]
    first_polite = _records(store, f"test:started:{polite.id}")[0]
    # The deaf victim held its GPUs until the grace ran out: its pool
    # process was killed, and the urgent job got the GPUs after that.
    assert started["at"] - first_deaf["at"] >= GRACE
    assert first_deaf["pid"] != first_polite["pid"]

    assert urgent.get(timeout=60)["gpus"] == list(range(8))
    for victim in (polite, deaf):
        result = victim.get(timeout=90)
        runs = _records(store, f"test:started:{victim.id}")
        assert len(runs) >= 2, f"{victim.id} was never preempted: {runs}"
        # Resumed from its last checkpoint: each step ran once, except at
        # most one checkpoint interval after the stop.
        steps = _steps(store, victim.id)
        assert sorted(set(steps)) == list(range(total))
        assert len(steps) - total <= EVERY
        assert runs[-1]["from"] > 0 and runs[-1]["from"] % EVERY == 0
        # Not a failed attempt: the stop was a deliberate hand-back.
        assert result["attempt"] == 1 and result["start"] == runs[-1]["from"]
        assert runs[-1]["at"] >= started["at"]
    done = store.lrange("test:train-done", 0, -1)
    for job in (polite.id, deaf.id, urgent.id):
        assert done.count(job.encode()) == 1            # committed once
    assert store.hget(f"{jobs.ares.settings.namespace}:job:{deaf.id}",
                      "committed") is not None
    wait_for(lambda: not ledger.busy() and not ledger.waiting(), 15,
             "every GPU free and nobody waiting")
    assert worker.proc.poll() is None                  # the worker lives on


@pytest.mark.redis_only
def test_non_preemptible_jobs_are_never_stopped(jobs, gpu_host, store):
    _, ledger = gpu_host
    run = uuid.uuid4().hex[:8]
    pinned = [jobs.train4_pinned.apply_async(
        (20, EVERY), request_id=f"pinned-{i}-{run}") for i in range(2)]
    wait_for(lambda: all(_checkpointed(store, p.id) for p in pinned), 60,
             "both pinned jobs to run past a checkpoint")
    urgent = jobs.train8.apply_async((5, EVERY), request_id=f"wait-{run}")
    wait_for(lambda: urgent.id in ledger.waiting(), 30,
             "the urgent job to wait for GPUs")
    assert all(ledger.preempt_request(p.id) is None for p in pinned)
    assert urgent.get(timeout=60)["start"] == 0
    for job in pinned:
        result = job.get(timeout=30)
        assert (result["start"], result["attempt"]) == (0, 1)
        assert not store.llen(f"test:stopped:{job.id}")
        assert _steps(store, job.id) == list(range(20))
    # The urgent job waited for both to finish.
    done = store.lrange("test:train-done", 0, -1)
    assert done.index(urgent.id.encode()) > max(
        done.index(p.id.encode()) for p in pinned)
