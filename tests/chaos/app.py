"""The app the chaos workers run: a payment-like job with a fenced side effect.

The side effect goes to an *external* store (a second Redis, never faulted:
it stands for the user's database), written only if no holder with a newer
fencing token wrote first. This is the pattern users copy: pass
``ares.current().fencing_token`` to the store and let the store refuse
stale tokens. Every execution also writes an audit trail there (when its
tenure began and the last moment it knew its lease was valid) so the driver
can prove that no two holders of one job overlapped.
"""

from __future__ import annotations

import os
import time

import redis

from tests.apps.config import make_app

app, ares = make_app("chaos")
effects = redis.Redis.from_url(os.environ.get("ARES_CHAOS_EFFECTS",
                                              os.environ["ARES_TEST_BROKER"]))

#: Write the side effect unless a newer token already did; count applications.
_FENCED_APPLY = effects.register_script("""
local cur = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if tonumber(ARGV[1]) < cur then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
  return 0
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'applied', 1)
return 1
""")

STEP = 0.02


def _audit_key(job_id: str, token: int) -> str:
    return f"chaos:run:{job_id}:{token}"


def _confirm_valid(ctx, key: str, careful: bool) -> None:
    """Record ``now`` as a moment this holder's lease was valid, but only if
    the keeper still believes it; a careful body stops there (``check()``
    raises :class:`LeaseLost`), a careless one carries on as a zombie."""
    now = time.time()
    if ctx.lease_lost:
        if careful:
            ctx.check()
        return
    effects.hset(key, "valid", repr(now))


def _work(ctx, request_no: int, duration: float, careful: bool) -> dict:
    key = _audit_key(ctx.job_id, ctx.fencing_token)
    effects.hset(key, mapping={
        "job": ctx.job_id, "token": ctx.fencing_token, "pid": os.getpid(),
        "worker": os.getppid(), "acquired": repr(ctx.acquired_at),
        "started": repr(time.time()), "request": request_no})
    effects.sadd(f"chaos:runs:{ctx.job_id}", ctx.fencing_token)
    busy = f"{os.getppid()}:{ctx.fencing_token}"
    effects.hset("chaos:busy", busy, ctx.job_id)
    try:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            _confirm_valid(ctx, key, careful)
            time.sleep(STEP)
        value = f"paid-{request_no}"
        _confirm_valid(ctx, key, careful)
        applied = bool(_FENCED_APPLY(keys=[f"chaos:effect:{ctx.job_id}"],
                                     args=[ctx.fencing_token, value]))
        effects.hset(key, "applied", int(applied))
        effects.sadd("chaos:done", ctx.job_id)
        return {"request": request_no, "value": value,
                "token": ctx.fencing_token}
    finally:
        effects.hdel("chaos:busy", busy)


@ares.task(name="chaos.pay")
def pay(request_no: int, duration: float, careful: int = 1) -> dict:
    return _work(ares.current(), request_no, duration, bool(careful))


@ares.gpu_task(name="chaos.train", gpus=2)
def train(request_no: int, duration: float, careful: int = 1) -> dict:
    ctx = ares.current()
    result = _work(ctx, request_no, duration, bool(careful))
    result.update(host=ctx.host, gpus=ctx.gpus)
    return result


def audit(job_id: str) -> list[dict]:
    """Every execution of ``job_id``: token, tenure start, last valid."""
    runs = []
    for token in effects.smembers(f"chaos:runs:{job_id}"):
        raw = effects.hgetall(_audit_key(job_id, int(token)))
        runs.append({k.decode(): v.decode() for k, v in raw.items()})
    return sorted(runs, key=lambda r: int(r["token"]))
