"""Real servers for the whole session; every test starts from empty stores.

Redis and etcd are real processes (Debian ``redis-server`` and
``etcd-server``) on free loopback ports with temporary data dirs; nothing
points at a fixed port or a server left running by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import redis

from ares_celery.clients.etcd import EtcdGateway
from ares_celery.testing import EtcdServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    server.start()
    os.environ["ARES_TEST_BROKER"] = f"{server.url}/0"
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def etcd_server():
    server = EtcdServer()
    server.start()
    os.environ["ARES_TEST_ETCD"] = server.endpoint
    yield server
    server.cleanup()


@pytest.fixture()
def services(redis_server, etcd_server):
    """Both servers, wiped before the test (and restarted if a previous
    test left one stopped)."""
    for server in (redis_server, etcd_server):
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    client = redis.Redis.from_url(f"{redis_server.url}/0")
    client.flushall()
    EtcdGateway([etcd_server.endpoint]).delete_prefix("/")
    yield redis_server, etcd_server
    client.close()


@pytest.fixture()
def store(services):
    """A plain Redis client on the test database (broker, results, dedup)."""
    client = redis.Redis.from_url(os.environ["ARES_TEST_BROKER"])
    yield client
    client.close()


@pytest.fixture()
def etcd(services):
    return EtcdGateway([services[1].endpoint])


@pytest.fixture()
def jobs(services):
    """The test app module (imported once the servers' addresses are set)."""
    from tests.apps import jobs as module

    return module


@pytest.fixture()
def worker(jobs):
    """An in-process worker (Celery's own ``start_worker``, the engine of the
    classic ``celery_worker`` fixture) with a thread pool."""
    from celery.contrib.testing.worker import start_worker

    jobs.app.loader.import_task_module("celery.contrib.testing.tasks")
    with start_worker(jobs.app, pool="threads", concurrency=2,
                      perform_ping_check=True, shutdown_timeout=20) as w:
        yield w
