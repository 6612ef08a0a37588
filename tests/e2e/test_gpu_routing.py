"""Three real ``celery worker`` processes pretending to be three GPU hosts
(DGX-1V, DGX A100, 4x PCIe), one Redis, one etcd: jobs land where the
placement model says they should, with ``CUDA_VISIBLE_DEVICES`` set, never
sharing a GPU, and every GPU is free again at the end."""

from __future__ import annotations

import json
import math

import pytest

from ares_celery.errors import NoGpuHosts, UnsatisfiableGpuRequest
from ares_celery.gpu.inventory import InventoryCache
from tests.processes import WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

HOSTS = {"dgx1": "dgx1-v100", "a100": "dgx-a100", "pcie4": "pcie-4x-2switch"}


@pytest.fixture()
def cluster(jobs, store):
    workers = [WorkerProcess(jobs.app, name=f"w@{host}", concurrency=3,
                             env={"ARES_MOCK_GPUS": mock})
               for host, mock in HOSTS.items()]
    try:
        for w in workers:
            w.start()
        cache = InventoryCache(jobs.ares.services.etcd,
                               jobs.ares.services.keys).start()
        assert cache.wait_for(lambda h: set(h) == set(HOSTS), 20)
        yield workers, cache
    finally:
        jobs.release(store, "test:release-all")
        for w in workers:
            w.stop()


def expected(cache, task):
    """What the model says is best right now: the host with the highest
    placement score on its free GPUs (ties: fewer running jobs, then the
    alphabetically first name), and that placement's GPUs."""
    req = task.gpu_request
    best = None
    for host, inv in cache.hosts().items():
        try:
            p = req.placement_policy.place(inv.topology, req, free=inv.free)
        except UnsatisfiableGpuRequest:
            continue
        key = (-p.score, inv.running, host)
        if best is None or key < best[0]:
            best = (key, host, list(p.gpus))
    return best[1], best[2]


def runs(store):
    return [json.loads(x) for x in store.lrange("test:gpu-runs", 0, -1)]


def started(store, job_id):
    return store.llen(f"test:gpu-started:{job_id}") > 0


def test_jobs_land_on_the_best_host_and_gpus(jobs, cluster, store):
    workers, cache = cluster
    plan = [jobs.gpu4_nvlink, jobs.gpu8, jobs.gpu2, jobs.gpu1,
            jobs.gpu2_nvlink, jobs.gpu2]
    results = []
    for i, task in enumerate(plan):
        host, gpus = expected(cache, task)
        result = task.apply_async(request_id=f"place-{i}")
        wait_for(lambda r=result: started(store, r.id), 30,
                 f"{task.name} to start")
        # The worker published the GPUs it took before running the body.
        assert cache.wait_for(
            lambda h, host=host, gpus=gpus: not set(gpus) & h[host].free, 10)
        results.append((task, result, host, gpus))
    jobs.release(store, "test:release-all")
    for task, result, host, gpus in results:
        value = result.get(timeout=30)
        assert (value["host"], value["gpus"]) == (host, gpus), task.name
        assert value["cuda"] == ",".join(str(g) for g in gpus)
        assert len(value["uuids"]) == task.gpu_request.gpus
    # The worker's GPU inventory is in `celery inspect stats` (Flower shows it).
    stats = jobs.app.control.inspect(["w@a100"], timeout=5).stats()
    gpu = stats["w@a100"]["ares_gpu"]
    assert gpu["host"] == "a100" and len(gpu["gpus"]) == 8
    assert gpu["queue"] == "ares.gpu.a100" and "NV12/NVSwitch" in gpu["links"]
    # Spot-check the model's choices the test relied on.
    assert results[0][2] == "a100"              # NVLink ring, NV12 x 25 GB/s
    assert results[1][2:] == ("dgx1", list(range(8)))
    assert assert_all_free(cache)


def assert_all_free(cache):
    return cache.wait_for(lambda h: all(
        inv.free == frozenset(inv.topology.indices) for inv in h.values()), 15)


def test_concurrent_mixed_jobs_never_share_a_gpu(jobs, cluster, store):
    workers, cache = cluster
    tasks = [jobs.gpu1, jobs.gpu2, jobs.gpu4, jobs.gpu2_nvlink, jobs.gpu1,
             jobs.gpu8, jobs.gpu2, jobs.gpu4_nvlink, jobs.gpu1, jobs.gpu2,
             jobs.gpu4, jobs.gpu1]
    results = [t.apply_async(kwargs={"hold": 0.4}, request_id=f"mix-{i}")
               for i, t in enumerate(tasks)]
    values = [r.get(timeout=120) for r in results]
    for task, value in zip(tasks, values, strict=True):
        assert len(value["gpus"]) == task.gpu_request.gpus
        assert value["cuda"] == ",".join(str(g) for g in value["gpus"])
        if task.gpu_request.interconnect == "nvlink":
            assert value["host"] in ("a100", "dgx1")
        assert math.isfinite(value["score"]) or len(value["gpus"]) == 1
    for i, a in enumerate(values):
        for b in values[i + 1:]:
            if a["host"] == b["host"] and a["start"] < b["end"] \
                    and b["start"] < a["end"]:
                assert not set(a["gpus"]) & set(b["gpus"]), (a, b)
    assert len(runs(store)) == len(tasks)          # each ran exactly once
    assert assert_all_free(cache)


def test_retry_of_an_existing_gpu_job_needs_no_gpu_host(jobs, store, broker):
    """Dedup comes before routing: once a GPU job exists, a client retry
    with its request id returns it even when no GPU host is registered at
    that moment (it used to raise NoGpuHosts)."""
    cache = jobs.ares.router.cache()
    with WorkerProcess(jobs.app, name="w@retryhost",
                       env={"ARES_MOCK_GPUS": "dgx1-v100"}):
        assert cache.wait_for(lambda h: "retryhost" in h, 20)
        first = jobs.gpu2.apply_async(kwargs={"hold": 0},
                                      request_id="gpu-retry-no-host")
        committed = first.get(timeout=30)
    # A clean stop withdraws the host from the inventory at once.
    assert cache.wait_for(lambda h: "retryhost" not in h, 20)
    with pytest.raises(NoGpuHosts):   # nothing could route a new job now
        jobs.gpu2.apply_async(kwargs={"hold": 0}, request_id="gpu-new-no-host")
    # (A delivery the stopped worker had not acknowledged yet may be back
    # in the queue: what counts is that the retry adds nothing.)
    queued = broker.queue_length("ares.gpu.retryhost")
    again = jobs.gpu2.apply_async(kwargs={"hold": 0},
                                  request_id="gpu-retry-no-host")
    assert again.id == first.id
    assert again.get(timeout=5) == committed
    assert committed["host"] == "retryhost"
    assert broker.queue_length("ares.gpu.retryhost") == queued
