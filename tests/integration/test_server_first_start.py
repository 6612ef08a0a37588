"""The test harness's servers survive a port taken between choosing it and
the server binding it (an outgoing connection can get any free port: CI
once lost a chaos run to it); restarts keep their ports."""

from __future__ import annotations

import socket

import pytest

from ares_celery.testing.rabbitmq import RabbitMQServer
from ares_celery.testing.servers import EtcdCluster, EtcdServer, RedisServer

pytestmark = pytest.mark.integration


def squat() -> socket.socket:
    """A listening socket on a port the OS picked: what a server that
    chose the same port will find taken."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    return squatter


def test_a_cluster_first_start_on_a_taken_port_retries_on_fresh_ports():
    squatter = squat()
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


SERVERS = {
    "redis": (RedisServer, "port"),
    "etcd": (EtcdServer, "client_port"),
    "rabbitmq": (RabbitMQServer, "port"),
}


@pytest.mark.parametrize("kind", SERVERS)
def test_a_first_start_on_a_taken_port_retries_on_fresh_ports(kind):
    make, attribute = SERVERS[kind]
    squatter = squat()
    taken = squatter.getsockname()[1]
    server = make()
    setattr(server, attribute, taken)         # as if free_port() had picked it
    try:
        server.start()
        assert getattr(server, attribute) != taken
        assert server.healthy()
        port = getattr(server, attribute)
        server.restart()
        assert getattr(server, attribute) == port and server.healthy()
    finally:
        server.cleanup()
        squatter.close()


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_a_port_the_caller_chose_is_never_changed(kind):
    make, attribute = SERVERS[kind]
    squatter = squat()
    taken = squatter.getsockname()[1]
    server = make(**{attribute: taken})
    try:
        with pytest.raises(RuntimeError, match="(?i)address already in use"):
            server.start()
        assert getattr(server, attribute) == taken
    finally:
        server.cleanup()
        squatter.close()
