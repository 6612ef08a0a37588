"""A watch whose etcd member stops answering moves to one that answers.

A SIGSTOPped member (a paused VM, a hung process) keeps its TCP
connections open: the watch stream neither errors nor delivers, for ever,
while the rest of the cluster goes on. The GPU inventory, the recoverer
and the election all follow etcd through such a stream.
"""

from __future__ import annotations

import pytest

from ares_celery.clients.etcd import EtcdGateway
from ares_celery.coordination.watch import PROBE_EVERY_S, PrefixWatch
from ares_celery.testing import EtcdCluster
from tests.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def cluster():
    with EtcdCluster(3) as members:
        yield members


def test_a_watch_on_a_stopped_member_follows_from_another(cluster):
    gateway = EtcdGateway(cluster.endpoints, timeout=2.0)
    seen: set[str] = set()
    watch = PrefixWatch(
        gateway, "/probe/",
        lambda kvs, revision: seen.update(kv.key for kv in kvs),
        lambda events: seen.update(e.kv.key for e in events))
    watch.start(wait=10)
    try:
        gateway.put("/probe/before", "1")
        wait_for(lambda: "/probe/before" in seen, 10, "the first put")
        serving = cluster.members[watch._stream.endpoint]  # noqa: SLF001
        serving.pause()
        try:
            others = [m.endpoint for m in cluster.members if m is not serving]
            EtcdGateway(others, timeout=5.0).put("/probe/while-stopped", "1")
            # The probe's interval, its timeout, the relist's failover.
            wait_for(lambda: "/probe/while-stopped" in seen,
                     PROBE_EVERY_S + 3 * gateway.timeout + 10,
                     "the watch to see a put made while its member stopped")
        finally:
            serving.resume()
    finally:
        watch.stop()
