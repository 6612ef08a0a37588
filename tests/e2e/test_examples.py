"""The examples run end to end as a user would run them (``python -m
examples.<name>``), each starting its own Redis, etcd and real ``celery
worker`` processes; the assertions read what the example prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.processes import ROOT

pytestmark = [pytest.mark.integration]

TIMEOUT_S = 120


def run_example(module: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ARES_MOCK_GPUS", "ARES_HOST")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        output = exc.output or ""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        pytest.fail(f"{module} did not finish in {TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc.stdout


def test_demo_runs_the_payment_exactly_once():
    out = run_example("examples.demo")
    assert "6 submissions of request_id='order-77'" in out
    assert "executions       : 1" in out
    assert "ledger charges   : 1" in out
    assert "exactly once: YES" in out


@pytest.mark.gpu
def test_gpu_training_routes_jobs_to_both_hosts():
    out = run_example("examples.gpu_training")
    assert "worker : train@dgx1" in out and "worker : train@a100" in out
    assert "hosts used: a100, dgx1" in out
    assert "first job on the NVSwitch host (a100): YES" in out
    assert "(same job, same result)" in out
    assert "no GPU shared by overlapping jobs: YES" in out
    assert "all GPUs free again: YES" in out
    assert "exactly once: YES" in out
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] in (["resnet-a"], ["resnet-b"], ["bert-a"], ["bert-b"])]
    assert len(rows) == 4
    assert all(row[-1] == "1" for row in rows)  # one execution each


def test_payments_debit_each_payment_once_and_refuse_a_stale_token():
    out = run_example("examples.payments")
    rows = [line.split() for line in out.splitlines() if line.startswith("pay-")]
    assert len(rows) == 3
    for row in rows:
        # payment account cents submits job-ids body-runs store token
        assert row[3:7] == ["4", "1", "1", "applied"], row
    assert "alice   10000 ->   6501  (expected 6501)" in out
    assert "bob      5000 ->   3750  (expected 3750)" in out
    assert "): stale token" in out
    assert "balances unchanged: YES" in out
    assert "each payment applied exactly once: YES" in out


def test_retrying_client_retries_timeouts_and_a_broker_outage_with_one_run():
    out = run_example("examples.retrying_client")
    assert "no result yet (get(timeout=0.5)" in out       # it did time out and retry
    assert "submission failed: broker unreachable" in out  # the outage was seen
    summaries = [line for line in out.splitlines() if "accepted submissions" in line]
    assert len(summaries) == 2
    for line in summaries:
        assert line.endswith("body runs 1"), line
        assert line.count("job ids ['") == 1 and "', '" not in line  # one job id
    first = int(summaries[0].split(": ")[1].split()[0])
    assert first >= 2  # several submissions, still one job
    assert "each report ran exactly once: YES" in out
