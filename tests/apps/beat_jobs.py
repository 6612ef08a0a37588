"""The app the beat tests run: one exactly-once task on a 2-second schedule.

Its worker and its ``celery beat`` processes load this module (``-A
tests.apps.beat_jobs``), configured from the environment like
tests/apps/jobs.py. The period is short because the test is about the
schedule (how many runs each slot gets), not about the timer; the body
records every run with its request id so the test can tell the slots
apart.
"""

from __future__ import annotations

import json
import os
import time

import redis

from tests.apps.config import make_app
from tests.records import executions_key

#: Seconds between slots.
PERIOD = 2.0
#: Every run of ``beat.tick``, in order: job id, request id, token, time.
RUNS_KEY = "test:beat:runs"

app, ares = make_app("beat_jobs")
app.conf.beat_schedule = {
    "tick": {"task": "beat.tick", "schedule": PERIOD},
}
_store = redis.Redis.from_url(os.environ["ARES_TEST_REDIS"])


@ares.task(name="beat.tick")
def tick():
    ctx = ares.current()
    run = {"job_id": ctx.job_id, "request_id": ctx.request_id,
           "token": ctx.fencing_token, "pid": os.getpid(), "at": time.time()}
    _store.rpush(executions_key(ctx.job_id), json.dumps(run))
    _store.rpush(RUNS_KEY, json.dumps(run))
    return run


def runs(store: redis.Redis) -> list[dict]:
    """Every run of ``beat.tick`` so far, in the order they ran."""
    return [json.loads(x) for x in store.lrange(RUNS_KEY, 0, -1)]
