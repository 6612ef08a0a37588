"""A real ``celery worker`` on a mock 8-GPU host: an 8-GPU job holds the
host, a low-priority and then a high-priority 8-GPU job queue for it, and
when the holder finishes the high-priority job gets the GPUs first, though
it was submitted last."""

from __future__ import annotations

import uuid

import pytest

from ares_celery.gpu.allocation import HostGpuLedger, ledger_path
from ares_celery.gpu.inventory import InventoryCache
from ares_celery.gpu.mock_topologies import mock_topology
from ares_celery.gpu.policies import POLICIES
from tests.processes import WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

HOST = "prio8"


@pytest.fixture()
def gpu_host(jobs, store):
    # Three pool processes: the holder and both waiters are in the ledger
    # at once, so the grant order is the ledger's, not the broker's.
    worker = WorkerProcess(jobs.app, name=f"w@{HOST}", concurrency=3,
                           env={"ARES_MOCK_GPUS": "dgx-a100"})
    try:
        worker.start()
        cache = InventoryCache(jobs.ares.services.etcd,
                               jobs.ares.services.keys).start()
        assert cache.wait_for(lambda h: HOST in h, 20)
        settings = jobs.ares.settings
        ledger = HostGpuLedger(
            ledger_path(settings.namespace, HOST, settings.gpu_state_dir),
            mock_topology("dgx-a100", host=HOST), POLICIES)
        yield ledger
    finally:
        jobs.release(store, "test:release-all")
        worker.stop()


def started(store, job_id):
    return store.llen(f"test:gpu-started:{job_id}") > 0


def test_high_priority_waiter_gets_the_host_first(jobs, gpu_host, store):
    ledger = gpu_host
    run = uuid.uuid4().hex[:8]
    holder = jobs.gpu8.apply_async(request_id=f"prio-hold-{run}")
    wait_for(lambda: started(store, holder.id), 30, "the holder to start")

    low = jobs.gpu8.apply_async(request_id=f"prio-low-{run}", priority=1)
    wait_for(lambda: low.id in ledger.waiting(), 30,
             "the low-priority job to wait for GPUs")
    high = jobs.gpu8.apply_async(request_id=f"prio-high-{run}", priority=8)
    wait_for(lambda: high.id in ledger.waiting(), 30,
             "the high-priority job to wait for GPUs")
    waiting = ledger.waiting()
    assert (waiting[low.id]["priority"], waiting[high.id]["priority"]) \
        == (1, 8)
    assert waiting[low.id]["submitted"] < waiting[high.id]["submitted"]

    jobs.release(store, f"test:release:{holder.id}")
    wait_for(lambda: started(store, high.id), 30, "the high-priority job")
    assert set(ledger.busy().values()) == {high.id}
    assert not started(store, low.id)
    assert low.id in ledger.waiting()

    jobs.release(store, f"test:release:{high.id}")
    wait_for(lambda: started(store, low.id), 30, "the low-priority job")
    jobs.release(store, f"test:release:{low.id}")
    records = [r.get(timeout=30) for r in (holder, high, low)]
    assert [r["job"] for r in records] == [holder.id, high.id, low.id]
    # Each ran on all 8 GPUs, one after the other.
    assert all(sorted(r["gpus"]) == list(range(8)) for r in records)
    assert records[0]["end"] <= records[1]["start"]
    assert records[1]["end"] <= records[2]["start"]
    wait_for(lambda: not ledger.busy() and not ledger.waiting(), 10,
             "every GPU free and nobody waiting")
