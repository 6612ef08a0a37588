"""Fenced checkpoints (``ctx.checkpoint``, ``ctx.last_checkpoint``) with
real Redis, etcd and workers.

The store tests drive each checkpoint store against its real server with
tokens chosen by hand, so the fence itself is what refuses a write (a
running zombie is usually stopped earlier, by its own lease check: see
tests/fault/test_checkpoint_takeover.py for that end to end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from celery.events.state import Task as TaskState
from prometheus_client import REGISTRY

from ares_celery.coordination.mutex import JobLocks
from ares_celery.coordination.session import LeaseGrant
from ares_celery.errors import (
    CheckpointNotSerializable,
    CheckpointTooLarge,
    LeaseLost,
)
from ares_celery.exactly_once.checkpoints import (
    EtcdCheckpoints,
    RedisCheckpoints,
)
from ares_celery.flower.task_format import format_task
from tests.processes import ROOT, wait_for
from tests.records import KEYS, executions

pytestmark = pytest.mark.integration


def executed_steps(store, job_id):
    return [json.loads(x)["step"]
            for x in store.lrange(f"test:steps:{job_id}", 0, -1)]


def saved_count():
    return REGISTRY.get_sample_value("ares_checkpoints_total",
                                     {"outcome": "saved"}) or 0


def save(checkpoints, job_id, token, step):
    text = json.dumps({"step": step})
    checkpoints.save(job_id, token, text, time.time())


# -- the stores' fences ---------------------------------------------------


def test_redis_checkpoint_refuses_older_tokens(store):
    checkpoints = RedisCheckpoints(store, KEYS, ttl=600)
    job = "ckpt-redis"
    assert checkpoints.load(job) is None
    # A first holder records no fence: the checkpoint's own token fences.
    save(checkpoints, job, 10, 3)
    with pytest.raises(LeaseLost, match="token 10.* saved a checkpoint"):
        save(checkpoints, job, 9, 99)
    assert checkpoints.load(job).state == {"step": 3}
    # A takeover holder raised the fence before saving anything.
    store.hset(KEYS.job(job), "fence", 20)
    with pytest.raises(LeaseLost, match="fence 20"):
        save(checkpoints, job, 15, 99)
    save(checkpoints, job, 20, 6)
    saved = checkpoints.load(job)
    assert (saved.state, saved.token, saved.size) == \
        ({"step": 6}, 20, len('{"step": 6}'))
    assert 0 < store.ttl(KEYS.checkpoint(job)) <= 600
    # Once the job is committed nobody may checkpoint it any more.
    store.hset(KEYS.job(job), "committed", 20)
    with pytest.raises(LeaseLost, match="already committed"):
        save(checkpoints, job, 20, 7)
    checkpoints.discard(job)
    assert checkpoints.load(job) is None


def test_etcd_checkpoint_lands_only_while_the_lock_is_held(etcd):
    locks = JobLocks(etcd, KEYS)
    checkpoints = EtcdCheckpoints(etcd, KEYS, locks.records_lease)
    job = "ckpt-etcd"
    first = LeaseGrant(etcd.grant_lease(30), 1)
    second = LeaseGrant(etcd.grant_lease(30), 1)
    try:
        old = locks.acquire(job, first).token
        save(checkpoints, job, old, 3)
        assert checkpoints.load(job).token == old
        # The first holder's lease expires; another worker takes the job.
        etcd.revoke_lease(first.lease_id)
        new = locks.acquire(job, second).token
        assert new > old
        with pytest.raises(LeaseLost, match=f"held at token {new}"):
            save(checkpoints, job, old, 99)
        assert checkpoints.load(job).state == {"step": 3}
        save(checkpoints, job, new, 6)
        assert (checkpoints.load(job).state,
                checkpoints.load(job).token) == ({"step": 6}, new)
        # Committed (the lock goes with the commit): refused as well.
        locks.release(job, new)
        with pytest.raises(LeaseLost, match="lock is gone"):
            save(checkpoints, job, new, 7)
        # The checkpoint is not on a holder's lease: it outlives both.
        assert etcd.get(KEYS.checkpoint_record(job)).lease == \
            locks.records_lease()
    finally:
        etcd.revoke_lease(second.lease_id)


# -- with a real worker -----------------------------------------------------


def ares_job(ref):
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.jobs", "ares",
         "job", ref], cwd=ROOT, env=dict(os.environ), capture_output=True,
        text=True, timeout=60)


@pytest.mark.redis_only
def test_checkpoint_is_kept_while_running_and_removed_with_the_commit(
        jobs, worker, store):
    saved_before = saved_count()
    result = jobs.steps.apply_async((6, 2), {"hang_at": {"1": 3}},
                                    request_id="ckpt-commit")
    token = int(wait_for(lambda: store.lrange(f"test:hung:{result.id}", 0, -1),
                         20, "the job to reach step 3")[0])
    saved = RedisCheckpoints(store, KEYS, ttl=1).load(result.id)
    assert (saved.state, saved.token) == ({"step": 2}, token)
    out = ares_job("ckpt-commit")
    assert out.returncode == 0, out.stderr
    assert f"({saved.size} bytes, token {token})" in out.stdout
    assert "checkpoint 20" in out.stdout     # an ISO date: 20xx-...

    jobs.release(store, f"test:release:{result.id}")
    assert result.get(timeout=20) == {"start": 0, "token": token,
                                      "attempt": 1, "retries": 0}
    wait_for(lambda: not store.exists(KEYS.checkpoint(result.id)), 10,
             "the checkpoint to be removed after the commit")
    assert "checkpoint none" in ares_job("ckpt-commit").stdout
    # Steps 1, 3 and 5 saved one each (the worker runs in this process).
    assert saved_count() - saved_before == 3


def test_retry_resumes_from_the_last_checkpoint(jobs, worker, store):
    result = jobs.steps.apply_async((9, 3), {"retry_at": 4},
                                    request_id="ckpt-retry")
    value = result.get(timeout=30)
    assert value["retries"] == 1 and value["start"] == 3
    # Steps 0-4, then from the checkpoint {"step": 3} on: 3 and 4 twice.
    assert executed_steps(store, result.id) == [0, 1, 2, 3, 4,
                                                3, 4, 5, 6, 7, 8]
    assert len(executions(store, result.id)) == 2
    wait_for(lambda: not store.exists(KEYS.checkpoint(result.id)), 10,
             "the checkpoint to be removed after the commit")


@pytest.mark.redis_only
@pytest.mark.parametrize(("bad", "error", "says"), [
    ("not-json", CheckpointNotSerializable, "JSON-serializable"),
    ("too-large", CheckpointTooLarge, "Store the blob elsewhere"),
])
def test_a_state_that_cannot_be_saved_fails_at_the_call(
        jobs, worker, store, bad, error, says):
    result = jobs.steps.apply_async((3, 1), {"bad_state": bad},
                                    request_id=f"ckpt-{bad}")
    with pytest.raises(error, match=says):
        result.get(timeout=20)
    assert executed_steps(store, result.id) == []
    assert not store.exists(KEYS.checkpoint(result.id))


@pytest.mark.redis_only
def test_etcd_store_keeps_the_checkpoint_across_a_retry(jobs, store, etcd):
    """``ares_result_store = "etcd"``: the checkpoint lives in etcd, is
    read back by the retried run, and goes with the commit."""
    from celery.contrib.testing.worker import start_worker

    app, ares = jobs.make_app("ckpt-etcd", ares_result_store="etcd",
                              result_backend=None)

    @ares.task(name="etcd.resume", bind=True, max_retries=1)
    def resume(self):
        ctx = ares.current()
        if ctx.last_checkpoint is None:
            ctx.checkpoint({"step": 5, "weights": "file:///ckpt/5.pt"})
            raise self.retry(countdown=0.1)
        kv = etcd.get(KEYS.checkpoint_record(ctx.job_id))
        return {"state": ctx.last_checkpoint, "saved_by": json.loads(
            kv.value)["token"], "token": ctx.fencing_token}

    app.loader.import_task_module("celery.contrib.testing.tasks")
    with start_worker(app, pool="threads", concurrency=1,
                      perform_ping_check=False, shutdown_timeout=20):
        result = resume.apply_async(request_id="ckpt-etcd-1")
        value = result.get(timeout=20, interval=0.05)
        assert value["state"] == {"step": 5, "weights": "file:///ckpt/5.pt"}
        # Written by the first run, under its own (older) token.
        assert value["saved_by"] < value["token"]
        wait_for(lambda: etcd.get(KEYS.checkpoint_record(result.id)) is None,
                 10, "the checkpoint to be removed after the commit")


def test_flower_shows_the_last_checkpoint():
    task = TaskState(uuid="job-1")
    task.event("received", 1.0, 1.0, {"name": "jobs.steps"})
    task.event("ares-checkpoint", 2.0, 2.0, {
        "ares_checkpoint_at": 1750000000.5, "ares_checkpoint_size": 12,
        "ares_checkpoint_token": 41})
    shown = format_task(task)
    assert shown.state == "STARTED"
    assert {"ares_checkpoint_at", "ares_checkpoint_size",
            "ares_checkpoint_token"} <= set(shown._fields)
    assert shown.ares_checkpoint_token == 41
