"""Kill -9 a GPU worker that holds GPUs: its host leaves the inventory when
its lease expires, and its job is taken over on another host, once."""

from __future__ import annotations

import json

import pytest

from ares_celery.gpu.allocation import ledger_path
from ares_celery.gpu.inventory import InventoryCache
from tests.processes import WorkerProcess, wait_for
from tests.records import KEYS

pytestmark = [pytest.mark.integration, pytest.mark.gpu, pytest.mark.fault]


def _ledgers(jobs, workers) -> str:
    """The GPU ledger file of each worker's host (what its pool processes
    hold), for failure messages."""
    settings = jobs.ares.settings
    out = []
    for worker in workers:
        host = worker.name.split("@", 1)[1]
        path = ledger_path(settings.namespace, host, settings.gpu_state_dir)
        try:
            out.append(f"ledger {path}: {path.read_text()}")
        except OSError as exc:
            out.append(f"ledger {path}: {exc}")
    return "\n".join(out)


def _log(worker, lines: int = 60) -> str:
    """The worker's log without the banner and the per-delivery lines."""
    kept = [line for line in worker.log.read_text(errors="replace")
            .splitlines() if line.startswith("[") and not
            line.endswith(("] received", "] ignored"))]
    return "\n".join(kept[-lines:])


def inventory_wait(cache, predicate, timeout: float, what: str,
                   workers=(), jobs=None) -> None:
    """``cache.wait_for`` that says, when it fails, which wait it was, what
    the inventory and the hosts' ledgers held and what the workers logged."""
    if cache.wait_for(predicate, timeout):
        return
    hosts = {h: inv.to_dict() for h, inv in cache.hosts().items()}
    ledgers = _ledgers(jobs, workers) if jobs is not None else ""
    logs = "\n".join(f"--- {w.name} ({w.log}):\n{_log(w)}" for w in workers)
    raise AssertionError(f"inventory: {what} (not within {timeout:g}s)\n"
                         f"hosts: {json.dumps(hosts, indent=1)}\n"
                         f"{ledgers}\n{logs}")


def test_killed_gpu_worker_job_taken_over_elsewhere(jobs, store):
    a100 = WorkerProcess(jobs.app, name="w@a100", concurrency=2,
                         env={"ARES_MOCK_GPUS": "dgx-a100"}).start()
    dgx1 = WorkerProcess(jobs.app, name="w@dgx1", concurrency=2,
                         env={"ARES_MOCK_GPUS": "dgx1-v100"}).start()
    cache = InventoryCache(jobs.ares.services.etcd,
                           jobs.ares.services.keys).start()
    try:
        workers = (a100, dgx1)
        inventory_wait(cache, lambda h: {"a100", "dgx1"} <= set(h), 20,
                       "both hosts registered", workers, jobs)
        result = jobs.gpu2.apply_async(request_id="gpu-kill")
        wait_for(lambda: store.llen(f"test:gpu-started:{result.id}"), 30,
                 "the job to start on a100")
        inventory_wait(cache, lambda h: len(h["a100"].free) == 6, 10,
                       "a100 shows the job's 2 GPUs busy", workers, jobs)
        a100.kill()                                   # SIGKILL, whole worker
        inventory_wait(cache, lambda h: "a100" not in h, 15,  # lease expired
                       "a100 gone from the inventory", workers, jobs)
        wait_for(lambda: store.llen(f"test:gpu-started:{result.id}") >= 2,
                 60, "another host to take the job over")
        inventory_wait(cache, lambda h: len(h["dgx1"].free) == 6, 10,
                       "dgx1 shows the taken-over job's 2 GPUs busy",
                       workers, jobs)
        # The other recovered copies of the job find its lock held and
        # defer, meanwhile: ending those deliveries must not give back the
        # GPUs of the copy that runs.
        assert not cache.wait_for(
            lambda h: len(h["dgx1"].free) != 6, 3), \
            f"dgx1 freed the running job's GPUs:\n{_ledgers(jobs, workers)}"
        jobs.release(store, f"test:release:{result.id}")
        value = result.get(timeout=30)
        assert value["host"] == "dgx1" and len(value["gpus"]) == 2
        assert value["cuda"] == ",".join(map(str, value["gpus"]))
        runs = [json.loads(x) for x in store.lrange("test:gpu-runs", 0, -1)]
        assert len(runs) == 1                         # committed once
        assert store.hget(KEYS.job(result.id), "committed") == \
            str(value["token"]).encode()
        inventory_wait(cache,
                       lambda h: h["dgx1"].free == frozenset(range(8)), 10,
                       "dgx1 all free after the job", workers, jobs)
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
        inventory_wait(cache, lambda h: "limited" in h, 20,
                       "host registered", [worker], jobs)
        result = jobs.gpu2_limited.apply_async(request_id="over-time")
        wait_for(lambda: store.llen(f"test:gpu-started:{result.id}"), 30,
                 "the job to start")
        inventory_wait(cache, lambda h: len(h["limited"].free) == 6, 10,
                       "the job's 2 GPUs busy", [worker], jobs)
        with pytest.raises(Exception, match="TimeLimitExceeded|time limit"):
            result.get(timeout=30)
        assert result.state == "FAILURE"
        inventory_wait(cache,
                       lambda h: h["limited"].free == frozenset(range(8)), 15,
                       "all free after the time limit kill", [worker], jobs)
        assert store.hget(KEYS.job(result.id), "state") == b"FAILURE"
    finally:
        cache.stop()
        worker.stop()
