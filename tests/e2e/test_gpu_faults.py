"""Kill -9 a GPU worker that holds GPUs: its host leaves the inventory when
its lease expires, and its job is taken over on another host, once."""

from __future__ import annotations

import json

import pytest

from ares_celery.gpu.inventory import InventoryCache
from tests.processes import WorkerProcess, wait_for
from tests.records import KEYS

pytestmark = [pytest.mark.integration, pytest.mark.gpu, pytest.mark.fault]


def test_killed_gpu_worker_job_taken_over_elsewhere(jobs, store):
    a100 = WorkerProcess(jobs.app, name="w@a100", concurrency=2,
                         env={"ARES_MOCK_GPUS": "dgx-a100"}).start()
    dgx1 = WorkerProcess(jobs.app, name="w@dgx1", concurrency=2,
                         env={"ARES_MOCK_GPUS": "dgx1-v100"}).start()
    cache = InventoryCache(jobs.ares.services.etcd,
                           jobs.ares.services.keys).start()
    try:
        assert cache.wait_for(lambda h: {"a100", "dgx1"} <= set(h), 20)
        result = jobs.gpu2.apply_async(request_id="gpu-kill")
        wait_for(lambda: store.llen(f"test:gpu-started:{result.id}"), 30,
                 "the job to start on a100")
        assert cache.wait_for(lambda h: len(h["a100"].free) == 6, 10)
        a100.kill()                                   # SIGKILL, whole worker
        assert cache.wait_for(lambda h: "a100" not in h, 15)  # lease expired
        wait_for(lambda: store.llen(f"test:gpu-started:{result.id}") >= 2,
                 60, "another host to take the job over")
        assert cache.wait_for(lambda h: len(h["dgx1"].free) == 6, 10)
        jobs.release(store, f"test:release:{result.id}")
        value = result.get(timeout=30)
        assert value["host"] == "dgx1" and len(value["gpus"]) == 2
        assert value["cuda"] == ",".join(map(str, value["gpus"]))
        runs = [json.loads(x) for x in store.lrange("test:gpu-runs", 0, -1)]
        assert len(runs) == 1                         # committed once
        assert store.hget(KEYS.job(result.id), "committed") == \
            str(value["token"]).encode()
        assert cache.wait_for(
            lambda h: h["dgx1"].free == frozenset(range(8)), 10)
    finally:
        jobs.release(store, "test:release-all")
        cache.stop()
        a100.kill()
        dgx1.stop()


def test_hard_time_limit_kill_gives_the_gpus_back(jobs, store):
    """The pool kills the process at the hard time limit: the job ends in
    FAILURE (TimeLimitExceeded) and its GPUs are free again."""
    worker = WorkerProcess(jobs.app, name="w@limited", concurrency=2,
                           env={"ARES_MOCK_GPUS": "hgx-h100"}).start()
    cache = InventoryCache(jobs.ares.services.etcd,
                           jobs.ares.services.keys).start()
    try:
        assert cache.wait_for(lambda h: "limited" in h, 20)
        result = jobs.gpu2_limited.apply_async(request_id="over-time")
        wait_for(lambda: store.llen(f"test:gpu-started:{result.id}"), 30,
                 "the job to start")
        assert cache.wait_for(lambda h: len(h["limited"].free) == 6, 10)
        with pytest.raises(Exception, match="TimeLimitExceeded|time limit"):
            result.get(timeout=30)
        assert result.state == "FAILURE"
        assert cache.wait_for(
            lambda h: h["limited"].free == frozenset(range(8)), 15)
        assert store.hget(KEYS.job(result.id), "state") == b"FAILURE"
    finally:
        cache.stop()
        worker.stop()
