"""A client that retries until it has its result, and a job that runs once.

Starts a private Redis (dedup and results), a second Redis as the broker,
etcd and a real ``celery worker``. Then:

1. submits a report that takes 3 s while waiting only 0.5 s for it: every
   ``get()`` times out, so the client submits again, with the same request
   id and exponential back-off, until the result is there;
2. stops the broker, submits another report (publishing fails with
   ``ServiceUnavailable``; nothing is recorded), starts the broker again a
   second later, and keeps retrying the same way.

Each job prints its attempts, the one job id they all got, and how often its
body ran: once.

    python -m examples.retrying_client
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from celery.exceptions import TimeoutError as ResultTimeout

from ares_celery import ServiceUnavailable
from ares_celery.testing import RedisServer
from examples.local_cluster import LocalCluster


def submit_until_done(task: Any, args: tuple, request_id: str, wait_s: float = 0.5,
                      attempts: int = 12, first_backoff_s: float = 0.2,
                      max_backoff_s: float = 2.0) -> tuple[dict, list[str]]:
    """Submit and wait; on a timeout or an unreachable service, back off and
    submit again with the same request id. Returns the result and the job
    id each attempt got (an attempt whose submission failed gets none)."""
    job_ids: list[str] = []
    backoff = first_backoff_s
    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        try:
            result = task.apply_async(args, request_id=request_id)
            job_ids.append(result.id)
            return result.get(timeout=wait_s), job_ids
        except ResultTimeout:
            why = (f"job {result.id}: no result yet (get(timeout={wait_s}) "
                   f"gave up after {time.monotonic() - started:.1f} s)")
        except ServiceUnavailable as exc:
            why = f"submission failed: {str(exc).split(': ')[0]}"
        sleep = backoff * random.uniform(1.0, 1.5)  # jitter: clients do not retry in step
        print(f"  attempt {attempt}: {why}; retrying in {sleep:.2f} s")
        time.sleep(sleep)
        backoff = min(backoff * 2, max_backoff_s)
    raise SystemExit(f"{request_id}: no result after {attempts} attempts")


def report(app: Any, request_id: str, value: dict, job_ids: list[str]) -> bool:
    runs = int(app.counts.get(f"reports:executions:{value['job_id']}") or 0)
    print(f"  result: {value}")
    print(f"  {request_id}: {len(job_ids)} accepted submissions, "
          f"job ids {sorted(set(job_ids))}, body runs {runs}\n")
    return len(set(job_ids)) == 1 and runs == 1


def main() -> int:
    with LocalCluster("examples.reports_app", broker=RedisServer()) as cluster:
        app = cluster.app
        print("1. the client waits 0.5 s for a 3 s job, then retries")
        value, ids = submit_until_done(app.render, ("q3-sales", 3.0), "report-q3-sales")
        ok = report(app, "report-q3-sales", value, ids)

        print("2. the broker goes away and comes back 1 s later")
        cluster.broker.stop()
        outcome: dict[str, Any] = {}

        def retry_in_background() -> None:
            outcome["value"], outcome["ids"] = submit_until_done(
                app.render, ("q4-sales", 0.2), "report-q4-sales", wait_s=2.0)

        client = threading.Thread(target=retry_in_background)
        client.start()
        time.sleep(1.0)         # the outage; servers are started from this
        cluster.broker.start()  # thread, since they die with their parent thread
        client.join()
        ok &= "value" in outcome and report(app, "report-q4-sales", outcome["value"],
                                            outcome["ids"])
        print("each report ran exactly once:", "YES" if ok else "NO")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
