"""Every call an exactly-once job adds to plain Celery, timed one at a time.

Where ``exactly_once_throughput.py`` shows what a job costs in all, this
shows where that cost goes, call by call, without the worker, the broker
and the client competing for the CPU (issue 14 asks for it where a target
is out of reach). Against a private Redis and etcd (no fsync, as the
throughput benchmark), in one process marked fork-free as a pool child is
(so etcd is reached over gRPC), with the real objects the worker and the
client use, ``--calls`` fresh jobs per row:

* client: the dedup reserve script (the one round trip the submitter
  waits for) and the published mark (written by a thread after
  ``apply_async`` returned, so not on the caller's path);
* worker, before the body: the lock Txn alone, the first holder's
  "committed?" read alone, and the two as the worker sends them now (the
  read written to Redis just before the Txn, its answer read after),
  against the two one after the other as before;
* worker, after the body: the fenced commit script, and plain Celery's
  Redis backend storing the same result (SET + PUBLISH), which it replaces.

    python benchmarks/hot_path_calls.py [--calls 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from ares_celery import Ares  # noqa: E402
from ares_celery.clients import etcd_grpc  # noqa: E402
from ares_celery.exactly_once import context  # noqa: E402
from ares_celery.exactly_once.context import JobContext  # noqa: E402
from ares_celery.exactly_once.execution import ReadAlongside  # noqa: E402
from ares_celery.exactly_once.published_marks import Mark  # noqa: E402
from ares_celery.testing import EtcdServer, RedisServer  # noqa: E402


def timed(calls: int, step: Callable[[str], object]) -> list[float]:
    """Milliseconds per call, each on a fresh job id."""
    out = []
    for _ in range(calls):
        job = uuid.uuid4().hex
        start = time.perf_counter()
        step(job)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    with ExitStack() as stack:
        redis_url = f"{stack.enter_context(RedisServer()).url}/0"
        etcd = stack.enter_context(EtcdServer(fsync=False)).endpoint
        etcd_grpc.mark_fork_free()       # as a prefork pool child is
        app = Celery("calls", broker=redis_url)
        app.conf.update(result_backend=redis_url, ares_redis_url=redis_url,
                        ares_etcd_endpoints=[etcd])
        services = Ares(app).services
        plain = Celery("plain", broker=redis_url)
        plain.conf.result_backend = redis_url
        store, dedup, locks = app.backend, services.dedup, services.locks
        grant = services.keeper.current()
        record = '{"task": "calls.noop", "args": [1]}'

        def commit(job: str) -> None:
            locks_outcome = locks.acquire(job, grant, record)
            context.register(JobContext(
                job_id=job, request_id=None, task_name="calls.noop",
                fencing_token=locks_outcome.token))
            start = time.perf_counter()
            store.store_result(job, 1, "SUCCESS")
            commits.append((time.perf_counter() - start) * 1000)
            context.unregister(job)

        def sequential(job: str) -> None:
            locks.acquire(job, grant, record)
            store.commit_probe(job)

        def alongside(job: str) -> None:
            read = ReadAlongside(store, job)
            locks.acquire(job, grant, record)
            assert read.finish() is not None

        rows = [
            ("client", "dedup reserve script (waited for)",
             lambda job: dedup.reserve(job, job, "calls.noop", "d")),
            ("client", "published mark, HSET (writer thread)",
             lambda job: dedup.write_published(
                 [Mark(job, job, "calls.noop", "d")])),
            ("worker", "lock Txn over gRPC, alone",
             lambda job: locks.acquire(job, grant, record)),
            ("worker", "committed? read (HMGET), alone", store.commit_probe),
            ("worker", "lock Txn, then the read (before)", sequential),
            ("worker", "read sent, lock Txn, answer read (now)", alongside),
        ]
        print(f"{args.calls} calls per row, one at a time, fresh job ids; "
              f"etcd over {services.etcd.transport}, no fsync")
        print(f"{'side':6} {'call':42} {'p50 ms':>7} {'p90 ms':>7}")
        for side, name, step in rows:
            timed(50, step)                                     # warm up
            got = timed(args.calls, step)
            print(f"{side:6} {name:42} {statistics.median(got):7.3f} "
                  f"{statistics.quantiles(got, n=10)[-1]:7.3f}")
        commits: list[float] = []
        timed(args.calls, commit)
        plain_store = timed(args.calls, lambda job: plain.backend.store_result(
            job, 1, "SUCCESS"))
        for name, got in (("fenced commit script", commits),
                          ("plain Celery store_result (SET+PUBLISH)",
                           plain_store)):
            print(f"{'worker':6} {name:42} {statistics.median(got):7.3f} "
                  f"{statistics.quantiles(got, n=10)[-1]:7.3f}")


if __name__ == "__main__":
    main()
