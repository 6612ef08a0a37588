"""``celery -A ... ares ...`` as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from ares_celery.coordination.mutex import JobLocks
from ares_celery.coordination.session import LeaseGrant
from ares_celery.gpu import mock_topology
from ares_celery.gpu.inventory import InventoryPublisher
from ares_celery.gpu.mock_topologies import MOCK_TOPOLOGY_NAMES
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
    # The hint names what a user types, not the Python function behind it.
    for way in ("worker --ares-mock-gpus NAME", "ares topology --mock NAME",
                "ARES_MOCK_GPUS=NAME", "dgx-a100"):
        assert way in out.stderr, out.stderr
    assert "mock_topology(" not in out.stderr
    worker_help = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.jobs", "worker",
         "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--ares-mock-gpus" in worker_help.stdout
    mocked = celery("topology", env={"ARES_MOCK_GPUS": "pcie-4x-2switch"})
    assert mocked.returncode == 0 and "4 GPUs" in mocked.stdout


def _matrix(stdout: str, gpus: int) -> tuple[str, list[str]]:
    """The matrix header and its rows, as printed."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.split()[:1] == ["GPU0"] and line.startswith(" "))
    return lines[start], lines[start + 1:start + 1 + gpus]


@pytest.mark.parametrize("name", MOCK_TOPOLOGY_NAMES)
def test_topology_matrix_columns_never_run_together(services, name):
    out = celery("topology", "--mock", name)
    assert out.returncode == 0, out.stderr
    topo = mock_topology(name)
    head, rows = _matrix(out.stdout, len(topo))
    starts = [m.start() for m in re.finditer(r"GPU\d+|NUMA", head)]
    assert len(starts) == len(topo) + 1 and head.endswith("NUMA")
    for i, row in zip(topo.indices, rows, strict=True):
        assert row.startswith(f"GPU{i} ")
        expected = ["X" if i == j else
                    f"{topo.link(i, j).label()} {topo.bandwidth(i, j):.0f}"
                    for j in topo.indices] + [str(topo.gpu(i).numa_node)]
        for text, begin, end in zip(expected, starts, [*starts[1:], None],
                                    strict=True):
            cell = row[begin:end]
            # Each cell sits under its header, 2+ spaces from its
            # neighbours, whatever the widest label.
            assert cell.rstrip() == text, (row, text)
            assert row[begin - 2:begin] == "  ", (row, text)
            assert end is None or cell.endswith("  "), (row, text)


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
        if down == "etcd":   # what failed, why, and what to check or set
            assert f"etcd unreachable at 127.0.0.1:{port} (connection " \
                   "refused)." in out.stderr
            assert out.stderr.count(f"127.0.0.1:{port}") == 1, out.stderr
            assert "Is etcd running" in out.stderr
            assert "ares_etcd_endpoints" in out.stderr
            assert "ares_etcd_timeout" in out.stderr
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

    out = celery("job", result.id)          # by job id: the same job
    assert out.returncode == 0, out.stderr
    assert "lease      not held" in out.stdout

    lease = etcd.grant_lease(30)            # a live holder of another job
    etcd.put(KEYS.lock("held-job"), json.dumps({"host": "h", "pid": 1}),
             lease=lease)
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


@pytest.mark.parametrize("ref", ["cli-tpyo", str(uuid.uuid4())])
def test_job_that_ares_knows_nothing_about_is_an_error(services, ref):
    out = celery("job", ref)
    assert out.returncode == 1
    assert out.stdout == ""                 # nothing that looks like a job
    assert "ares knows nothing about" in out.stderr
    assert repr(ref) in out.stderr and "ares_dedup_ttl" in out.stderr


@pytest.mark.redis_only
def test_job_submitted_but_not_yet_run_is_known(jobs):
    """No worker: only the dedup record names the job. It is found by
    its request id, by its job id, and by a request id that is a UUID."""
    queued = jobs.record.apply_async(("x",), request_id="cli-queued")
    for ref in ("cli-queued", queued.id):
        out = celery("job", ref)
        assert out.returncode == 0, out.stderr
        assert f"job        {queued.id} (request id 'cli-queued')" \
            in out.stdout
        assert "submitted  published (task jobs.record)" in out.stdout
        assert "committed  no (state PENDING)" in out.stdout

    rid = str(uuid.uuid4())
    as_uuid = jobs.record.apply_async(("y",), request_id=rid)
    out = celery("job", rid)
    assert out.returncode == 0, out.stderr
    assert f"job        {as_uuid.id} (request id {rid!r})" in out.stdout
