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


@pytest.fixture(scope="session", autouse=True)
def gpu_state_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-ledgers")
    os.environ["ARES_TEST_STATE_DIR"] = str(path)
    return path


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


# The classic in-process worker fixture from Celery's own pytest plugin,
# imported explicitly: pytest-celery 1.x replaces ``celery_worker`` with a
# Docker-based one, which cannot run here and would not be a real service
# of this test session anyway.
from celery.contrib.pytest import celery_worker  # noqa: E402,F401


@pytest.fixture(scope="session")
def celery_includes():
    return ("celery.contrib.testing.tasks",)  # the ping task


@pytest.fixture()
def celery_app(jobs):
    """The app the classic ``celery_worker`` fixture runs: our test app."""
    return jobs.app


@pytest.fixture(scope="session")
def celery_worker_pool():
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters():
    return {"concurrency": 2, "shutdown_timeout": 20,
            "perform_ping_check": True}


@pytest.fixture()
def worker(celery_worker):  # noqa: F811
    """A real in-process worker consuming the test app's queue."""
    return celery_worker
