"""``celery -A ... ares ...`` as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ares_celery.exactly_once.identity import Keys
from ares_celery.gpu import mock_topology
from ares_celery.gpu.inventory import InventoryPublisher
from tests.processes import ROOT

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


def test_inventory_with_etcd_down_is_a_clear_error(services):
    services[1].stop()
    try:
        out = celery("inventory")
        assert out.returncode != 0
        assert f"127.0.0.1:{services[1].client_port}" in out.stderr
    finally:
        services[1].start()
