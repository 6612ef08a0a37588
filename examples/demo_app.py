"""The demo's Celery app: one exactly-once payment task.

The charge is recorded in a ledger that only accepts a write carrying a
fencing token at least as new as the last one it saw, which is how a side
effect outside ares-celery becomes exactly-once.
"""

from __future__ import annotations

import os

import redis

from examples.example_app import make_app

app, ares = make_app("demo")
ledger = redis.Redis.from_url(app.conf.broker_url)

_FENCED_CHARGE = """
local seen = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if tonumber(ARGV[1]) < seen then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'cents', ARGV[2])
redis.call('INCR', KEYS[2])
return 1
"""


@ares.task(name="demo.charge")
def charge(account: str, cents: int) -> dict:
    ctx = ares.current()
    ledger.incr(f"demo:executions:{ctx.job_id}")
    ctx.check()  # stop here if our lease is already gone
    applied = ledger.eval(_FENCED_CHARGE, 2, f"demo:ledger:{account}",
                          f"demo:charges:{account}", ctx.fencing_token, cents)
    return {"account": account, "cents": cents, "job_id": ctx.job_id,
            "fencing_token": ctx.fencing_token, "applied": bool(applied),
            "worker_pid": os.getpid()}
