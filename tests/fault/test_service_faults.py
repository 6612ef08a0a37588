"""Operational faults: etcd away for a while, the broker restarting under
in-flight jobs, and hard time limits, with real ``celery worker`` processes.
"""

from __future__ import annotations

import pytest
import redis
from celery.exceptions import TimeLimitExceeded

from ares_celery.testing import RedisServer
from tests.apps.config import make_app
from tests.processes import WorkerProcess, wait_for
from tests.records import KEYS, executions, job_record

pytestmark = [pytest.mark.fault, pytest.mark.integration]

LOCKS = KEYS.lock_prefix()




def hold(seconds: float, invariant, what: str) -> None:
    """The fault lasts ``seconds`` by definition: poll for a violation of
    ``invariant`` until then, and fail on the first one."""
    with pytest.raises(TimeoutError):
        wait_for(lambda: not invariant(), seconds, what)
    assert invariant(), what


def test_etcd_down_ten_seconds_nothing_runs_nothing_is_lost(
        jobs, store, etcd_server):
    results = [jobs.record.apply_async((i,), request_id=f"queued-{i}")
               for i in range(20)]
    etcd_server.stop()
    worker = WorkerProcess(jobs.app, concurrency=2)
    try:
        worker.start()
        wait_for(lambda: "etcd unavailable" in worker.tail(100_000), 20,
                 "the worker to defer a job for want of etcd")
        hold(10, lambda: not any(executions(store, r.id) for r in results),
             "a job ran without a lease")
        etcd_server.start()
        values = [r.get(timeout=60) for r in results]
        assert [v["value"] for v in values] == list(range(20))
        for r in results:
            assert len(executions(store, r.id)) == 1
            assert job_record(store, r.id)["commits"] == "1"
    finally:
        if etcd_server.proc.poll() is not None:
            etcd_server.start()
        worker.stop()


def test_gpu_worker_starting_while_etcd_is_down_serves_once_it_is_back(
        jobs, store, etcd_server):
    """It used to exit with "Unrecoverable error"; now it logs, waits and
    registers its GPUs when etcd returns, then runs GPU jobs."""
    etcd_server.stop()
    worker = WorkerProcess(jobs.app, name="w@etcdlate",
                           env={"ARES_MOCK_GPUS": "pcie-4x-2switch"})
    try:
        worker.start()
        assert "not registered yet, etcd is unavailable" in \
            worker.tail(100_000)
        etcd_server.start()
        wait_for(lambda: "GPU host etcdlate registered" in
                 worker.tail(100_000), 30,
                 "the host to register once etcd is back")
        cache = jobs.ares.router.cache()
        assert cache.wait_for(lambda h: "etcdlate" in h, 20)
        result = jobs.gpu2.apply_async(kwargs={"hold": 0},
                                       request_id="etcd-late-gpu")
        assert result.get(timeout=30)["host"] == "etcdlate"
    finally:
        if etcd_server.proc.poll() is not None:
            etcd_server.start()
        worker.stop()


@pytest.fixture()
def persistent_broker(services):
    """A Redis of this test's own (broker, dedup records, results) with AOF
    and fsync on every write, so a SIGKILL loses nothing it acknowledged;
    restarting it leaves the session's Redis and its clients alone."""
    server = RedisServer(persist=True)
    server.start()
    app, ares = make_app("broker-restart", broker=f"{server.url}/0",
                         ares_redis_url=f"{server.url}/0")

    @ares.task(name="jobs.slow", shared=False)
    def slow(value, seconds):
        """Only published from here; the worker runs tests.apps.jobs.slow."""

    client = redis.Redis.from_url(f"{server.url}/0")
    yield server, app, slow, client
    client.close()
    app.close()
    server.cleanup()


def test_broker_restart_with_in_flight_jobs_commits_each_once(
        etcd, persistent_broker):
    """Two jobs running, four prefetched, then the broker is SIGKILLed and
    restarted. The worker (supervised, as production must be: kombu can end
    it when its connection drops while it holds unacked messages) or the
    recoverer publishes the prefetched ones again: with the default one-hour
    visibility timeout, waiting for Redis to give them back is no option."""
    server, app, slow, store = persistent_broker
    worker = WorkerProcess(app, concurrency=2, env={
        "ARES_TEST_BROKER": f"{server.url}/0",
        "ARES_TEST_REDIS": f"{server.url}/0"}).start()
    try:
        with worker.supervise() as supervisor:
            results = [slow.apply_async((i, 1.5), request_id=f"inflight-{i}")
                       for i in range(6)]
            wait_for(lambda: etcd.count_prefix(LOCKS) >= 2, 20,
                     "two jobs in flight")
            # Recorded as held (a worker that dies within milliseconds of
            # receiving a message leaves it to the broker's redelivery).
            wait_for(lambda: etcd.count_prefix(KEYS.reserved_prefix()) >= 6,
                     10, "the six messages recorded as held")
            server.kill()
            server.start()
            values = [r.get(timeout=90) for r in results]
        print(f"\nworker restarts: {supervisor.restarts}")
        assert [v["value"] for v in values] == list(range(6))
        for r, value in zip(results, values, strict=True):
            runs = executions(store, r.id)
            assert runs and runs[-1]["token"] == value["token"]
            state = job_record(store, r.id)
            assert state["commits"] == "1"
            assert state["committed"] == str(value["token"])
            assert store.hget(f"test:effect:{r.id}", "token") == \
                str(value["token"]).encode()
    finally:
        worker.stop()


def test_hard_time_limit_fails_the_job_once_and_frees_its_lock(
        jobs, store, etcd):
    worker = WorkerProcess(jobs.app).start()
    try:
        result = jobs.overtime.apply_async(("x",), request_id="overtime")
        with pytest.raises(TimeLimitExceeded):
            result.get(timeout=30)
        assert result.state == "FAILURE"
        state = job_record(store, result.id)
        assert state["state"] == "FAILURE" and state["commits"] == "1"
        # The killed process's lease expires: the lock goes with it.
        wait_for(lambda: etcd.count_prefix(LOCKS) == 0,
                 jobs.ares.settings.lease_ttl + 10, "the lock to go")
        again = jobs.overtime.apply_async(("x",), request_id="overtime")
        assert again.id == result.id and again.state == "FAILURE"
        assert len(executions(store, result.id)) == 1
    finally:
        worker.stop()
