"""GPU inventory in a real etcd: published with a lease, read by a watch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ares_celery.gpu import mock_topology
from ares_celery.gpu.inventory import InventoryCache, InventoryPublisher, host_queue
from ares_celery.keys import Keys
from tests.processes import ROOT

pytestmark = pytest.mark.integration


def test_published_inventory_reaches_the_watching_cache(etcd):
    keys = Keys("ares")
    cache = InventoryCache(etcd, keys).start()
    try:
        assert cache.hosts() == {}
        topo = mock_topology("dgx-a100", host="node-a")
        pub = InventoryPublisher(etcd, keys, topo, lease_ttl=5,
                                 queue=host_queue("node-a"), worker="w@node-a")
        pub.publish()
        assert cache.wait_for(lambda h: "node-a" in h, 5)
        inv = cache.get("node-a")
        assert inv.topology == topo and inv.free == frozenset(range(8))
        assert inv.queue == "ares.gpu.node-a"
        pub.publish(busy={0: "job-1", 1: "job-1"})
        assert cache.wait_for(
            lambda h: h["node-a"].free == frozenset(range(2, 8)), 5)
        assert cache.get("node-a").busy == {0: "job-1", 1: "job-1"}
        assert cache.get("node-a").running == 1
        pub.withdraw()                         # clean shutdown: gone at once
        assert cache.wait_for(lambda h: "node-a" not in h, 5)
    finally:
        cache.stop()


def test_dead_host_disappears_when_its_lease_expires(etcd, services):
    """A real process publishes, is SIGKILLed, and its host vanishes."""
    script = textwrap.dedent(f"""
        import sys
        from ares_celery.clients.etcd import EtcdGateway
        from ares_celery.keys import Keys
        from ares_celery.gpu import mock_topology
        from ares_celery.gpu.inventory import InventoryPublisher
        pub = InventoryPublisher(EtcdGateway([{services[1].endpoint!r}]),
                                 Keys("ares"), mock_topology("pcie-4x-2switch",
                                 host="doomed"), lease_ttl=2, queue="q")
        pub.publish()
        print("published", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    cache = InventoryCache(etcd, Keys("ares")).start()
    try:
        assert proc.stdout.readline().strip() == b"published"
        assert cache.wait_for(lambda h: "doomed" in h, 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert cache.wait_for(lambda h: "doomed" not in h, 10)
    finally:
        proc.kill()
        cache.stop()


def test_cache_survives_an_etcd_restart(etcd, services):
    etcd_server = services[1]
    keys = Keys("ares")
    cache = InventoryCache(etcd, keys).start()
    pub = InventoryPublisher(etcd, keys, mock_topology("hgx-h100", host="h"),
                             lease_ttl=10, queue="q")
    try:
        pub.publish()
        assert cache.wait_for(lambda h: "h" in h, 5)
        etcd_server.restart()
        pub.publish(busy={3: "j"})
        assert cache.wait_for(
            lambda h: "h" in h and 3 not in h["h"].free, 15)
    finally:
        cache.stop()
        pub.withdraw()
