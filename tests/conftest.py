"""Real servers for the whole session; every test starts from empty stores.

Redis, etcd and RabbitMQ are real processes (Debian ``redis-server``,
``etcd-server`` and ``rabbitmq-server``) on free loopback ports with
temporary data dirs; nothing points at a fixed port or a server left
running by hand. Tests that use the ``jobs`` app run once per broker
(Redis, RabbitMQ) unless marked ``redis_only``; Redis always holds the
dedup records, results and the test bodies' own records.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from ares_celery.clients.etcd import EtcdGateway
from ares_celery.testing import EtcdServer, RabbitMQServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def gpu_state_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-ledgers")
    os.environ["ARES_TEST_STATE_DIR"] = str(path)
    return path


BROKERS = ("redis", "rabbitmq")


def pytest_generate_tests(metafunc):
    if "broker_kind" in metafunc.fixturenames:
        kinds = ["redis"] if metafunc.definition.get_closest_marker(
            "redis_only") else list(BROKERS)
        metafunc.parametrize("broker_kind", kinds)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    server.start()
    os.environ["ARES_TEST_BROKER"] = f"{server.url}/0"
    os.environ["ARES_TEST_REDIS"] = f"{server.url}/0"
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def rabbitmq_server():
    server = RabbitMQServer()
    server.start()
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
    """A plain Redis client on the test database (dedup, results, the test
    bodies' records; and the broker, when it is Redis)."""
    client = redis.Redis.from_url(os.environ["ARES_TEST_REDIS"])
    yield client
    client.close()


@pytest.fixture()
def etcd(services):
    return EtcdGateway([services[1].endpoint])


class Broker:
    """The broker a test runs on, seen the same way whatever it is."""

    def __init__(self, kind: str, url: str, store: redis.Redis,
                 server: RabbitMQServer | None = None) -> None:
        self.kind = kind
        self.url = url
        self._store = store
        self.server = server

    def queue_length(self, name: str) -> int:
        """Messages ready in queue ``name`` (0 if it does not exist)."""
        from kombu import Connection

        from ares_celery.gpu.janitor import queue_length

        with Connection(self.url) as connection:
            return queue_length(connection, name)

    def messages(self, queue: str = "celery") -> list[dict]:
        """The messages waiting in ``queue``, left in place (RabbitMQ: got
        without an ack, then given back by closing the channel)."""
        if self.kind == "redis":
            return [json.loads(m) for m in self._store.lrange(queue, 0, -1)]
        from kombu import Connection, Queue

        found = []
        with Connection(self.url) as connection:
            channel = connection.channel()
            try:
                bound = Queue(queue, no_declare=True)(channel)
                while (message := bound.get(no_ack=False)) is not None:
                    found.append({"headers": message.headers,
                                  "properties": message.properties})
            except connection.channel_errors:
                pass  # no such queue: nothing waiting
            finally:
                channel.close()
        return found

    def unacked(self) -> int:
        """Deliveries handed to consumers and not acknowledged yet."""
        if self.kind == "redis":
            return self._store.hlen("unacked")
        out = self.server.ctl("list_queues", "--quiet", "--no-table-headers",
                              "messages_unacknowledged")
        return sum(int(x) for x in out.split() if x.isdigit())

    def settle(self, queues: set[str], timeout: float = 15.0) -> None:
        """Before a test: wait until no consumer of an earlier test is
        attached to ``queues`` (RabbitMQ requeues what a consumer held when
        its connection closes, which may be after that test ended), then
        empty them."""
        if self.kind == "redis":
            return
        from kombu import Connection, Queue

        deadline = time.monotonic() + timeout
        with Connection(self.url) as connection:
            for name in queues:
                while time.monotonic() < deadline:
                    try:
                        with connection.channel() as channel:
                            declared = Queue(name, no_declare=True)(channel)
                            if not declared.queue_declare(
                                    passive=True).consumer_count:
                                break
                    except connection.channel_errors:
                        break  # no such queue yet
                    time.sleep(0.1)
        self._purge(queues)

    def purge(self, queue: str) -> None:
        """Lose every message waiting in ``queue`` (a broker that lost them)."""
        if self.kind == "redis":
            self._store.delete(queue)
        else:
            self._purge([queue])

    def clear(self, queues: set[str]) -> None:
        """Empty the queues a test used (RabbitMQ keeps them across tests;
        Redis is flushed with the stores). Purged, not deleted: clients
        remember which queues they declared."""
        if self.kind != "redis":
            self._purge(queues)

    def _purge(self, queues) -> None:
        from kombu import Connection

        with Connection(self.url) as connection:
            for name in queues:
                try:
                    with connection.channel() as channel:
                        channel.queue_purge(name)
                except connection.channel_errors:
                    pass  # never declared


@contextmanager
def _env(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_JOBS_MODULES: dict[str, object] = {}


def jobs_module(kind: str, broker_url: str, **env: str):
    """The test app module bound to ``broker_url`` (and ``env``): the one
    workers load with ``-A tests.apps.jobs`` and that environment."""
    if kind == "redis" and not env:
        from tests.apps import jobs as module

        return module
    module = _JOBS_MODULES.get(kind)
    if module is None:
        path = ROOT / "tests" / "apps" / "jobs.py"
        spec = importlib.util.spec_from_file_location(
            f"tests.apps.jobs_{kind}", path)
        module = importlib.util.module_from_spec(spec)
        with _env(ARES_TEST_BROKER=broker_url, **env):
            spec.loader.exec_module(module)
        _JOBS_MODULES[kind] = module
    return module


@pytest.fixture()
def broker(request, services, broker_kind):
    store = redis.Redis.from_url(os.environ["ARES_TEST_REDIS"])
    if broker_kind == "redis":
        found = Broker("redis", os.environ["ARES_TEST_BROKER"], store)
    else:
        server = request.getfixturevalue("rabbitmq_server")
        if server.proc is None or server.proc.poll() is not None:
            server.start()
        found = Broker("rabbitmq", server.url, store, server)
        found.settle({"celery"})
    yield found
    # Before the next test flushes Redis: the GPU host queues it used.
    hosts = {v.decode() for v in store.hvals("ares:gpu:queues")}
    found.clear({"celery", *hosts})
    store.close()


@pytest.fixture()
def jobs(services, broker):
    """The test app module for this test's broker (imported once the
    servers' addresses are set)."""
    return jobs_module(broker.kind, broker.url)


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
