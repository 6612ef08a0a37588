"""The retrying client example's Celery app: one slow exactly-once task.

``render`` takes longer than the client is willing to wait for it, so the
client times out and submits again; the request id makes every retry name
the same job. Each body run is counted in Redis to show it ran once.
"""

from __future__ import annotations

import time

import redis

from examples.example_app import make_app

app, ares = make_app("reports")
counts = redis.Redis.from_url(app.conf.ares_redis_url)


@ares.task(name="reports.render")
def render(report_id: str, seconds: float) -> dict:
    ctx = ares.current()
    counts.incr(f"reports:executions:{ctx.job_id}")
    time.sleep(seconds)  # stands in for the slow work
    ctx.check()
    return {"report_id": report_id, "pages": 12, "job_id": ctx.job_id,
            "fencing_token": ctx.fencing_token}
