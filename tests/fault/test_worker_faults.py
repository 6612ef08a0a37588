"""Real ``celery worker`` processes, really killed and paused.

Lease TTL 3 s and broker visibility timeout 6 s (tests/apps/jobs.py) keep
these quick; the mechanics are the same at production values.
"""

from __future__ import annotations

import json

import pytest

from tests.processes import WorkerProcess, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def started(store, job_id):
    return [json.loads(x) for x in store.lrange(f"test:started:{job_id}", 0, -1)]


def executions(store, job_id):
    return [json.loads(x) for x in store.lrange(f"test:exec:{job_id}", 0, -1)]


def test_sigkill_mid_task_another_worker_takes_over_and_commits_once(
        jobs, store):
    a = WorkerProcess(jobs.app).start()
    b = None
    try:
        result = jobs.blocking.apply_async(("v",), request_id="kill-me")
        first = wait_for(lambda: started(store, result.id), 30,
                         "worker A to start the job")[0]
        a.kill()                                  # SIGKILL, main + child
        b = WorkerProcess(jobs.app).start()
        second = wait_for(lambda: started(store, result.id)[1:], 60,
                          "worker B to take the job over")[0]
        assert second["pid"] != first["pid"]
        assert second["token"] > first["token"]   # fencing token grew
        store.set(f"test:release:{result.id}", 1)
        value = result.get(timeout=30)
        assert value["token"] == second["token"]
        assert len(executions(store, result.id)) == 2  # killed run + takeover
        assert store.hget(f"ares:job:{result.id}", "committed") == \
            str(second["token"]).encode()
        assert store.hget(f"test:effect:{result.id}", "token") == \
            str(second["token"]).encode()
    finally:
        a.kill()
        if b:
            b.stop()


def test_sigstop_zombie_commit_is_rejected(jobs, store):
    a = WorkerProcess(jobs.app).start()
    b = None
    try:
        result = jobs.blocking.apply_async(("zombie",), request_id="pause-me")
        first = wait_for(lambda: started(store, result.id), 30,
                         "worker A to start the job")[0]
        a.pause()                                 # SIGSTOP past the TTL
        b = WorkerProcess(jobs.app).start()
        second = wait_for(lambda: started(store, result.id)[1:], 60,
                          "worker B to take the job over")[0]
        assert second["token"] > first["token"]
        store.set(f"test:release:{result.id}:{second['token']}", 1)
        committed = result.get(timeout=30)
        assert committed["token"] == second["token"]

        a.resume()                                # the zombie wakes up
        store.set(f"test:release:{result.id}:{first['token']}", 1)
        fenced = wait_for(lambda: store.xrange("ares:fenced"), 30,
                          "the zombie's commit to be fenced")
        entry = fenced[0][1]
        assert entry[b"job"] == result.id.encode()
        assert entry[b"token"] == str(first["token"]).encode()
        assert store.hget(f"ares:job:{result.id}", "fenced") == b"1"
        assert result.get(timeout=5) == committed  # unchanged
        assert store.hget(f"test:effect:{result.id}", "token") == \
            str(second["token"]).encode()          # side effect fenced too
        assert "REJECTED" in a.tail(20000)
    finally:
        a.kill()
        if b:
            b.stop()
