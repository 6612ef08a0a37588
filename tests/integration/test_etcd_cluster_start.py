"""The test harness's etcd cluster survives a port taken between choosing
it and etcd binding it (an outgoing connection can get any free port: CI
once lost a chaos run to it)."""

from __future__ import annotations

import socket

import pytest

from ares_celery.testing.servers import EtcdCluster

pytestmark = pytest.mark.integration


def test_a_first_start_on_a_taken_port_retries_on_fresh_ports():
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    cluster = EtcdCluster(size=3)
    cluster.members[1].client_port = taken       # taken before etcd binds it
    try:
        cluster.start(timeout=30)
        assert taken not in [m.client_port for m in cluster.members]
        assert cluster.leader() in cluster.members
        cluster.restart(timeout=30)               # same ports, same data
        assert cluster.leader() in cluster.members
    finally:
        cluster.stop()
        squatter.close()
