"""The Celery app that test workers (in-process and subprocess) run.

Configuration comes from the environment so that a ``celery worker``
subprocess started by a fault test talks to the test session's private
Redis and etcd. Every task records each execution in Redis so that tests
can count executions across processes, and writes its side effect fenced
by ``ares.current().fencing_token`` (the pattern we show users).
"""

from __future__ import annotations

import json
import os
import time

import redis

from ares_celery.errors import LeaseLost, Preempted
from tests.apps.config import make_app
from tests.records import executions_key

app, ares = make_app()
_store = redis.Redis.from_url(os.environ["ARES_TEST_REDIS"])


RELEASE_CHANNEL = "test:release"


def release(store: redis.Redis, key: str = "test:release-all") -> None:
    """Let held test jobs go: set ``key`` and wake the bodies waiting on it."""
    store.set(key, 1)
    store.publish(RELEASE_CHANNEL, key)


def wait_released(keys: list[str], timeout: float) -> bool:
    """Block until one of ``keys`` is set (woken by :func:`release`), or
    ``timeout`` passes. Subscribing before the first check means a release
    between the two cannot be missed."""
    pubsub = _store.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(RELEASE_CHANNEL)
    try:
        deadline = time.monotonic() + timeout
        while not _store.exists(*keys):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pubsub.get_message(timeout=remaining)
        return True
    finally:
        pubsub.close()


def record_execution(job_id: str, token: int) -> None:
    _store.rpush(executions_key(job_id), json.dumps(
        {"pid": os.getpid(), "token": token, "at": time.time()}))


def fenced_side_effect(job_id: str, token: int, value: str) -> bool:
    """Write ``value`` only if no holder with a newer token wrote first: the
    user-side half of fencing (a compare on the token in our own store)."""
    script = """
    local cur = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
    if tonumber(ARGV[1]) < cur then return 0 end
    redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
    return 1
    """
    return bool(_store.eval(script, 1, f"test:effect:{job_id}", token, value))


@ares.task(name="jobs.record")
def record(value):
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    fenced_side_effect(ctx.job_id, ctx.fencing_token, str(value))
    return {"value": value, "token": ctx.fencing_token, "pid": os.getpid(),
            "request_id": ctx.request_id}


@ares.task(name="jobs.blocking")
def blocking(value, timeout=120):
    """Signals that it started, then blocks until the test releases this
    execution (by token) or the job (any token)."""
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    _store.rpush(f"test:started:{ctx.job_id}", json.dumps(
        {"pid": os.getpid(), "token": ctx.fencing_token,
         "attempt": ctx.attempt, "at": time.time()}))
    wait_released([f"test:release:{ctx.job_id}:{ctx.fencing_token}",
                   f"test:release:{ctx.job_id}"], timeout)
    fenced_side_effect(ctx.job_id, ctx.fencing_token, str(value))
    return {"value": value, "token": ctx.fencing_token, "pid": os.getpid(),
            "lease_lost": ctx.lease_lost}


@ares.task(name="jobs.slow")
def slow(value, seconds):
    """A body that just takes time, touching no store while it does, so a
    broker restart underneath it cannot fail it."""
    ctx = ares.current()
    time.sleep(seconds)
    record_execution(ctx.job_id, ctx.fencing_token)
    fenced_side_effect(ctx.job_id, ctx.fencing_token, str(value))
    return {"value": value, "token": ctx.fencing_token, "pid": os.getpid()}


@ares.task(name="jobs.overtime", time_limit=1)
def overtime(value):
    """Runs past its hard time limit: the pool kills the process."""
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    time.sleep(60)


@ares.task(name="jobs.poison", max_attempts=3)
def poison(value):
    """Takes its worker process down with it, every time (a segfault, an
    OOM kill): a poison job."""
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    os._exit(1)


@ares.task(name="jobs.fail")
def fail(message):
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    raise ValueError(message)


@ares.task(name="jobs.flaky", bind=True, max_retries=3)
def flaky(self, value):
    """Fails on its first execution, succeeds on the retry."""
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return {"value": value, "retries": self.request.retries,
            "job_id": ctx.job_id, "token": ctx.fencing_token,
            "attempt": ctx.attempt}


@ares.task(name="jobs.add")
def add(x, y=0):
    """A workflow step: records its execution, returns the sum."""
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    return x + y


@ares.task(name="jobs.total")
def total(values):
    """A chord body: the sum of its header's results."""
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    return sum(values)


@app.task(name="jobs.plain_add", shared=False)
def plain_add(x, y=0):
    """A plain Celery task (no lease), for mixed workflows."""
    _store.rpush(f"test:plain:{x}:{y}", os.getpid())
    return x + y


def _gpu_body(name, hold):
    """Record where and on which GPUs we ran, then hold the GPUs until the
    test releases this job (or for ``hold`` seconds)."""
    ctx = ares.current()
    start = time.time()
    _store.rpush(f"test:gpu-started:{ctx.job_id}", 1)
    wait_released([f"test:release:{ctx.job_id}", "test:release-all"], hold)
    record = {"task": name, "job": ctx.job_id, "host": ctx.host,
              "gpus": ctx.gpus, "uuids": ctx.gpu_uuids,
              "score": ctx.placement_score, "token": ctx.fencing_token,
              "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "pid": os.getpid(), "start": start, "end": time.time()}
    _store.rpush("test:gpu-runs", json.dumps(record))
    return record


def _gpu_test_task(name, **options):
    """A GPU task ``jobs.<name>`` whose body is :func:`_gpu_body`."""
    def body(hold=60):
        return _gpu_body(name, hold)
    body.__name__ = body.__qualname__ = name
    return ares.gpu_task(name=f"jobs.{name}", **options)(body)


gpu1 = _gpu_test_task("gpu1", gpus=1)
gpu2 = _gpu_test_task("gpu2", gpus=2)
gpu4 = _gpu_test_task("gpu4", gpus=4)
gpu8 = _gpu_test_task("gpu8", gpus=8)
gpu2_nvlink = _gpu_test_task("gpu2_nvlink", gpus=2, interconnect="nvlink")
gpu4_nvlink = _gpu_test_task("gpu4_nvlink", gpus=4, interconnect="nvlink",
                             min_memory_gb=30)
gpu2_limited = _gpu_test_task("gpu2_limited", gpus=2, time_limit=2)


#: States ``jobs.steps`` is told to checkpoint to show the errors.
BAD_STATES = {"not-json": lambda: {"step": 1, "weights": {1, 2}},
              "too-large": lambda: {"step": 1, "blob": "x" * (1 << 20)}}


@ares.task(name="jobs.steps", bind=True, max_retries=3)
def steps(self, total, every, hang_at=None, retry_at=None, bad_state=None):
    """A training loop: resumes from its last checkpoint, records every
    step it executes, checkpoints ``{"step": n}`` every ``every`` steps.

    ``hang_at`` maps an attempt number ("1", "2") to a step after which
    that holder blocks until the test releases it (by token); ``retry_at``
    calls ``self.retry`` after that step on the first delivery; a refused
    checkpoint is recorded before its LeaseLost goes up.
    """
    ctx = ares.current()
    record_execution(ctx.job_id, ctx.fencing_token)
    if bad_state:
        ctx.checkpoint(BAD_STATES[bad_state]())
    state = ctx.last_checkpoint or {"step": 0}
    _store.rpush(f"test:started:{ctx.job_id}", json.dumps(
        {"pid": os.getpid(), "token": ctx.fencing_token,
         "attempt": ctx.attempt, "from": state["step"], "at": time.time()}))
    hang = (hang_at or {}).get(str(ctx.attempt))
    for step in range(state["step"], total):
        _store.rpush(f"test:steps:{ctx.job_id}", json.dumps(
            {"step": step, "token": ctx.fencing_token}))
        if step == hang:
            _store.rpush(f"test:hung:{ctx.job_id}", ctx.fencing_token)
            wait_released([f"test:release:{ctx.job_id}:{ctx.fencing_token}",
                           f"test:release:{ctx.job_id}"], 120)
        if step == retry_at and self.request.retries == 0:
            raise self.retry(countdown=0.1)
        if (step + 1) % every == 0:
            try:
                ctx.checkpoint({"step": step + 1})
            except LeaseLost as exc:
                _store.rpush(f"test:refused:{ctx.job_id}", json.dumps(
                    {"token": ctx.fencing_token, "step": step + 1,
                     "error": str(exc)}))
                raise
    return {"start": state["step"], "token": ctx.fencing_token,
            "attempt": ctx.attempt, "retries": self.request.retries}


def _train(total, every, step_s=0.1, deaf=False):
    """A GPU training loop (the long-GPU-jobs docs' pattern): resumes from
    its last checkpoint, records each step it executes, checkpoints every
    ``every`` steps and calls ``ctx.check()`` before each step, so a
    preemption stops it there. ``deaf`` never checks and ignores the
    ``Preempted`` its checkpoints raise: it has to be killed."""
    ctx = ares.current()
    state = ctx.last_checkpoint or {"step": 0}
    _store.rpush(f"test:started:{ctx.job_id}", json.dumps(
        {"pid": os.getpid(), "token": ctx.fencing_token, "gpus": ctx.gpus,
         "attempt": ctx.attempt, "from": state["step"], "at": time.time()}))
    try:
        for step in range(state["step"], total):
            if not deaf:
                ctx.check()
            _store.rpush(f"test:steps:{ctx.job_id}", step)
            time.sleep(step_s)
            if (step + 1) % every == 0:
                try:
                    ctx.checkpoint({"step": step + 1})
                except Preempted:
                    if not deaf:
                        raise
    except LeaseLost as exc:
        _store.rpush(f"test:stopped:{ctx.job_id}", json.dumps(
            {"step": step, "error": type(exc).__name__,
             "requested": ctx.preempt_requested}))
        raise
    _store.rpush("test:train-done", ctx.job_id)
    return {"start": state["step"], "attempt": ctx.attempt,
            "gpus": ctx.gpus, "token": ctx.fencing_token}


train4 = ares.gpu_task(name="jobs.train4", gpus=4, priority=1,
                       preemptible=True)(_train)
train4_pinned = ares.gpu_task(name="jobs.train4_pinned", gpus=4,
                              priority=1)(_train)
train8 = ares.gpu_task(name="jobs.train8", gpus=8, priority=8)(_train)
