"""Real ``celery worker`` processes, really killed and paused.

Lease TTL 3 s and broker visibility timeout 6 s (tests/apps/jobs.py) keep
these quick; the mechanics are the same at production values.
"""

from __future__ import annotations

import json

import pytest

from tests.processes import WorkerProcess, wait_for
from tests.records import KEYS, executions

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def started(store, job_id):
    return [json.loads(x) for x in store.lrange(f"test:started:{job_id}", 0, -1)]



@pytest.fixture()
def takeover(jobs, store):
    """Worker A starts a blocking job; ``fault(A)`` kills or pauses it; worker
    B takes the job over. Yields ``run(request_id, fault)`` returning
    ``(a, result, first, second)``: A and both executions' start records."""
    workers = []

    def run(request_id, fault):
        a = WorkerProcess(jobs.app).start()
        workers.append(a)
        result = jobs.blocking.apply_async((request_id,),
                                           request_id=request_id)
        first = wait_for(lambda: started(store, result.id), 30,
                         "worker A to start the job")[0]
        fault(a)
        workers.append(WorkerProcess(jobs.app).start())
        second = wait_for(lambda: started(store, result.id)[1:], 60,
                          "worker B to take the job over")[0]
        assert second["token"] > first["token"]   # fencing token grew
        return a, result, first, second

    yield run
    if workers:
        workers[0].kill()
    for worker in workers[1:]:
        worker.stop()


def test_sigkill_mid_task_another_worker_takes_over_and_commits_once(
        jobs, store, takeover):
    _, result, first, second = takeover("kill-me", WorkerProcess.kill)
    assert second["pid"] != first["pid"]
    jobs.release(store, f"test:release:{result.id}")
    value = result.get(timeout=30)
    assert value["token"] == second["token"]
    assert len(executions(store, result.id)) == 2  # killed run + takeover
    assert store.hget(KEYS.job(result.id), "committed") == \
        str(second["token"]).encode()
    assert store.hget(f"test:effect:{result.id}", "token") == \
        str(second["token"]).encode()


def test_sigstop_zombie_commit_is_rejected(jobs, store, takeover):
    a, result, first, second = takeover("pause-me", WorkerProcess.pause)
    jobs.release(store, f"test:release:{result.id}:{second['token']}")
    committed = result.get(timeout=30)
    assert committed["token"] == second["token"]

    a.resume()                                # the zombie wakes up
    jobs.release(store, f"test:release:{result.id}:{first['token']}")
    fenced = wait_for(lambda: store.xrange(KEYS.fenced_log()), 30,
                      "the zombie's commit to be fenced")
    entry = fenced[0][1]
    assert entry[b"job"] == result.id.encode()
    assert entry[b"token"] == str(first["token"]).encode()
    assert store.hget(KEYS.job(result.id), "fenced") == b"1"
    assert result.get(timeout=5) == committed  # unchanged
    assert store.hget(f"test:effect:{result.id}", "token") == \
        str(second["token"]).encode()          # side effect fenced too
    # The log line follows the fenced-log entry: wait for it to be written.
    wait_for(lambda: "REJECTED" in a.tail(20000), 10,
             "the zombie to log its rejected commit")
