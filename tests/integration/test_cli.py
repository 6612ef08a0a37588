"""``celery -A ... ares ...`` as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ares_celery.coordination.mutex import JobLocks
from ares_celery.coordination.session import LeaseGrant
from ares_celery.gpu import mock_topology
from ares_celery.gpu.inventory import InventoryPublisher
from ares_celery.keys import Keys
from tests.processes import ROOT
from tests.records import KEYS

pytestmark = pytest.mark.integration


def celery(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.jobs", "ares",
         *args], cwd=ROOT, env=dict(os.environ, **(env or {})),
        capture_output=True, text=True, timeout=60)


def test_topology_of_a_mock_host(services):
    out = celery("topology", env={"ARES_MOCK_GPUS": "dgx1-v100"})
    assert out.returncode == 0, out.stderr
    assert "NV2 50" in out.stdout and "SYS" in out.stdout
    assert "k=4: GPUs [0, 1, 2, 3]" in out.stdout
    data = json.loads(celery("topology", "--mock", "hgx-h100",
                             "--json").stdout)
    assert len(data["placements"]) == 8


def test_topology_without_gpus_says_why(services):
    env = {"ARES_MOCK_GPUS": ""}
    out = celery("topology", env=env)
    assert out.returncode != 0
    assert "NVML" in out.stderr


def test_inventory_lists_registered_hosts(services, etcd):
    pub = InventoryPublisher(etcd, Keys("ares"),
                             mock_topology("pcie-8x-2socket", host="box-1"),
                             lease_ttl=10, queue="ares.gpu.box-1")
    pub.publish(busy={0: "j1"})
    try:
        out = celery("inventory", "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert rows[0]["host"] == "box-1" and rows[0]["free"] == list(range(1, 8))
        assert "box-1" in celery("inventory").stdout
    finally:
        pub.withdraw()
    assert "no GPU hosts" in celery("inventory").stdout


@pytest.mark.parametrize("command, down", [("inventory", "etcd"),
                                           ("status", "redis")])
def test_unreachable_service_is_a_clear_error_naming_it(services, command,
                                                        down):
    server = services[1] if down == "etcd" else services[0]
    port = server.client_port if down == "etcd" else server.port
    server.stop()
    try:
        out = celery(command)
        assert out.returncode != 0
        assert f"127.0.0.1:{port}" in out.stderr
    finally:
        server.start()


def test_status_reports_services_hosts_and_locks(services, etcd):
    pub = InventoryPublisher(etcd, Keys("ares"), mock_topology("hgx-h100", host="h1"),
                             lease_ttl=10, queue="ares.gpu.h1")
    pub.publish(busy={0: "j"})
    try:
        out = celery("status")
        assert out.returncode == 0, out.stderr
        assert "etcd" in out.stdout and ": ok" in out.stdout
        assert "1 GPU host(s), 7/8 GPUs free" in out.stdout
        assert "0 job lock(s) held" in out.stdout
    finally:
        pub.withdraw()


def test_job_shows_committed_result_and_release_refuses_live_holder(
        jobs, worker, etcd):
    result = jobs.record.apply_async(("x",), request_id="cli-job")
    token = result.get(timeout=20)["token"]
    out = celery("job", "cli-job")
    assert out.returncode == 0, out.stderr
    assert result.id in out.stdout
    assert f"committed  yes: SUCCESS with token {token}" in out.stdout

    lease = etcd.grant_lease(30)            # a live holder of another job
    etcd.put(KEYS.lock("held-job"), json.dumps({"host": "h", "pid": 1}),
             lease=lease)
    out = celery("job", "00000000-0000-0000-0000-000000000000")
    assert "lease      not held" in out.stdout
    refused = celery("release", "held-job")
    assert refused.returncode != 0 and "refusing" in refused.stderr
    assert etcd.get(KEYS.lock("held-job")) is not None

    etcd.put(KEYS.lock("stuck-job"), "{}")  # no live lease behind it
    done = celery("release", "stuck-job")
    assert done.returncode == 0 and "released" in done.stdout
    assert etcd.get(KEYS.lock("stuck-job")) is None
    assert "no lock held" in celery("release", "stuck-job").stdout


def test_job_shows_attempts(etcd):
    locks = JobLocks(etcd, KEYS)
    job = "22222222-2222-2222-2222-222222222222"
    for _ in range(2):   # two holders whose leases ended: two attempts
        lease = etcd.grant_lease(30)
        locks.acquire(job, LeaseGrant(lease, 1), json.dumps({"task": "jobs.record"}))
        etcd.revoke_lease(lease)
    out = celery("job", job)
    assert out.returncode == 0, out.stderr
    assert "attempts   2 " in out.stdout
