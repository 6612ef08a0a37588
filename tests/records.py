"""What test jobs leave behind, read back in one place.

Test bodies (tests/apps/jobs.py) record every execution in Redis; ares'
own records are found through :class:`~ares_celery.keys.Keys`, never a
hand-written key, so a layout change breaks no test silently.
"""

from __future__ import annotations

import json

from ares_celery.keys import Keys

#: The namespace every test app uses (the default).
KEYS = Keys("ares")


def executions_key(job_id: str) -> str:
    return f"test:exec:{job_id}"


def executions(store, job_id: str) -> list[dict]:
    """Every run of the job's body, in order: pid, fencing token, time."""
    return [json.loads(x) for x in store.lrange(executions_key(job_id), 0, -1)]


def job_record(store, job_id: str) -> dict[str, str]:
    """The job's fence/commit hash in Redis, decoded."""
    raw = store.hgetall(KEYS.job(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()}
