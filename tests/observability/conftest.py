"""One real stack for the whole directory: Redis, etcd, a prefork GPU worker
(mock DGX-1 topology) sending task events and serving ``/metrics``, and
Flower with our config. Starting them is most of the cost, so the tests
share them and never flush the stores (each uses its own request ids).
"""

from __future__ import annotations

import json

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ares_celery.clients.etcd import EtcdGateway
from ares_celery.testing.servers import free_port
from tests.observability.flower_process import FlowerProcess, http_get
from tests.processes import WorkerProcess, wait_for
from tests.records import KEYS

WORKER = "w@flowerhost"
HOST = "flowerhost"


class Stack:
    def __init__(self, jobs, worker: WorkerProcess, flower: FlowerProcess,
                 metrics_url: str, store: redis.Redis,
                 etcd: EtcdGateway) -> None:
        self.jobs = jobs
        self.worker = worker
        self.flower = flower
        self.metrics_url = metrics_url
        self.store = store
        self.etcd = etcd

    def worker_metrics(self) -> dict[tuple[str, frozenset], float]:
        """The worker's /metrics, as {(sample name, labels): value}."""
        text = http_get(self.metrics_url)
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples}

    def worker_metric(self, name: str, **labels: str) -> float:
        return self.worker_metrics().get((name, frozenset(labels.items())),
                                         0.0)

    def run_fenced(self, request_id: str):
        """Start a blocking job, then raise its fence as a newer lease
        holder's ``register_fence`` would, then let it finish: its commit
        is rejected. Returns the result and the execution's token."""
        result = self.jobs.blocking.apply_async((request_id,),
                                                request_id=request_id)
        started = wait_for(lambda: self.store.lrange(
            f"test:started:{result.id}", 0, -1), 20, "the job to start")
        token = json.loads(started[0])["token"]
        self.store.hset(KEYS.job(result.id), "fence", token + 1000)
        self.jobs.release(self.store, f"test:release:{result.id}")
        return result, token

    def hold_lock(self, job_id: str) -> int:
        """Take the job's lock from "another worker"; returns the lease to
        revoke when that holder should die."""
        lease = self.etcd.grant_lease(30)
        self.etcd.put(KEYS.lock(job_id),
                      json.dumps({"host": "other", "pid": 4242}), lease=lease)
        return lease


@pytest.fixture(scope="package")
def stack(redis_server, etcd_server):
    client = redis.Redis.from_url(f"{redis_server.url}/0")
    client.flushall()
    etcd = EtcdGateway([etcd_server.endpoint])
    etcd.delete_prefix("/")
    from tests.apps import jobs

    metrics_port = free_port()
    # -E and --ares-metrics-port, given the way click reads worker options
    # from the environment (celery's auto_envvar_prefix is CELERY).
    worker = WorkerProcess(jobs.app, name=WORKER, concurrency=2, env={
        "ARES_MOCK_GPUS": "dgx1-v100",
        "CELERY_WORKER_TASK_EVENTS": "1",
        "CELERY_WORKER_ARES_METRICS_PORT": f"127.0.0.1:{metrics_port}",
    })
    flower = FlowerProcess()
    try:
        worker.start()
        flower.start()
        flower.wait_for_worker_events(WORKER)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: http_get(metrics_url, timeout=2), 20,
                 "the worker's /metrics endpoint")
        yield Stack(jobs, worker, flower, metrics_url, client, etcd)
    finally:
        jobs.release(client, "test:release-all")
        flower.stop()
        worker.stop()
        client.close()
