"""A long job taken over resumes from its last checkpoint, and a zombie's
checkpoint never lands.

Real worker processes are killed (SIGKILL) or paused (SIGSTOP of the pool
process holding the job) while ``jobs.steps`` runs; as in
tests/fault/test_takeover.py only the lease TTL is shortened (to 4 s,
because the lease timer decides when another worker takes over) and the
broker runs with its defaults.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from ares_celery.exactly_once.checkpoints import RedisCheckpoints
from tests.processes import owner, wait_for, worker_pair
from tests.records import KEYS, executions

pytestmark = [pytest.mark.fault, pytest.mark.integration]

TTL = 4
DEADLINE = TTL + 8
ENV = {"ARES_TEST_LEASE_TTL": str(TTL)}
TOTAL, EVERY = 12, 3


def started(store, job_id):
    return [json.loads(x)
            for x in store.lrange(f"test:started:{job_id}", 0, -1)]


def executed_steps(store, job_id):
    return [json.loads(x) for x in store.lrange(f"test:steps:{job_id}", 0, -1)]


def latest(store, job_id):
    return RedisCheckpoints(store, KEYS, ttl=1).load(job_id)


@pytest.fixture()
def pair(jobs, store):
    with worker_pair(jobs.app, ENV) as workers:
        yield workers
        jobs.release(store, "test:release-all")


def test_killed_job_resumes_from_its_last_checkpoint(jobs, store, pair):
    # The first holder checkpoints {"step": 3} and {"step": 6}, executes
    # step 7 and blocks there until its worker is killed.
    result = jobs.steps.apply_async((TOTAL, EVERY), {"hang_at": {"1": 7}},
                                    request_id="ckpt-sigkill")
    first = wait_for(lambda: started(store, result.id), 30,
                     "the job to start")[0]
    wait_for(lambda: store.lrange(f"test:hung:{result.id}", 0, -1), 30,
             "the job to reach step 7")
    assert latest(store, result.id).state == {"step": 6}
    owner(pair, first["pid"]).kill()

    value = result.get(timeout=DEADLINE + 30)
    runs = started(store, result.id)
    assert [(r["attempt"], r["from"]) for r in runs] == [(1, 0), (2, 6)]
    assert value == {"start": 6, "token": runs[1]["token"], "attempt": 2,
                     "retries": 0}
    steps = [s["step"] for s in executed_steps(store, result.id)]
    assert sorted(set(steps)) == list(range(TOTAL))
    again = len(steps) - TOTAL
    print(f"\nsteps executed again after the kill: {again} "
          f"(checkpoint every {EVERY})")
    assert again <= EVERY
    assert len(executions(store, result.id)) == 2
    assert store.hget(KEYS.job(result.id), "commits") == b"1"
    wait_for(lambda: not store.exists(KEYS.checkpoint(result.id)), 10,
             "the checkpoint to be removed after the commit")


def test_a_zombies_checkpoint_is_refused(jobs, store, pair, broker):
    # Holder 1 blocks after step 7 (checkpoint {"step": 6} saved); it is
    # paused past its lease; holder 2 resumes from 6, saves {"step": 9}
    # and blocks after step 10. Then holder 1 wakes and, at step 8, tries
    # to save {"step": 9} with its old token.
    result = jobs.steps.apply_async(
        (TOTAL, EVERY), {"hang_at": {"1": 7, "2": 10}},
        request_id="ckpt-zombie")
    wait_for(lambda: store.lrange(f"test:hung:{result.id}", 0, -1), 30,
             "the first holder to reach step 7")
    first = started(store, result.id)[0]
    os.kill(first["pid"], signal.SIGSTOP)
    try:
        second = wait_for(lambda: started(store, result.id)[1:],
                          DEADLINE + 10, "another worker to take over")[0]
        assert second["from"] == 6 and second["token"] > first["token"]
        wait_for(lambda: store.lrange(f"test:hung:{result.id}", 1, -1), 30,
                 "the second holder to reach step 10")
        newer = latest(store, result.id)
        assert (newer.state, newer.token) == ({"step": 9}, second["token"])
    finally:
        os.kill(first["pid"], signal.SIGCONT)

    jobs.release(store, f"test:release:{result.id}:{first['token']}")
    refused = json.loads(wait_for(
        lambda: store.lpop(f"test:refused:{result.id}"), 30,
        "the zombie's checkpoint to be refused"))
    assert refused["token"] == first["token"] and refused["step"] == 9
    assert "lost" in refused["error"] or "refused" in refused["error"]
    kept = latest(store, result.id)
    assert (kept.state, kept.token) == ({"step": 9}, second["token"])

    jobs.release(store, f"test:release:{result.id}:{second['token']}")
    value = result.get(timeout=30)
    assert value["token"] == second["token"] and value["start"] == 6
    assert store.hget(KEYS.job(result.id), "commits") == b"1"
    zombie_steps = [s["step"] for s in executed_steps(store, result.id)
                    if s["token"] == first["token"]]
    assert zombie_steps == list(range(9))   # it stopped at the checkpoint
    wait_for(lambda: not store.exists(KEYS.checkpoint(result.id)), 10,
             "the checkpoint to be removed after the commit")
    wait_for(lambda: broker.unacked() == 0, 30,
             "every delivery to be acknowledged")
