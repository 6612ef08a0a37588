"""pytest fixtures for projects that use ares-celery.

Installed with the package and loaded by pytest through the ``pytest11``
entry point ``ares_celery`` (``-p no:ares_celery`` turns it off):

``ares_eager``
    Unit tests with no services: ``ares_eager(app)`` runs the app's tasks
    eagerly (``task_always_eager`` and ``task_eager_propagates`` on) for the
    test, with ares' in-memory dedup emptied before and after, and puts the
    app's settings back afterwards. Returns the app's ``Ares``.

``ares_services``
    Integration tests against real local servers, the way ares' own suite
    runs: a private ``redis-server`` and ``etcd`` on free loopback ports with
    temporary data dirs, started once per session and stopped after it.
    ``ares_services.configure(app)`` points an app at them (before
    ``Ares(app)``); ``ares_services.flush()`` empties both stores.

Fixture names start with ``ares_`` so they cannot clash with a project's
own (``redis_server``, ``celery_app``...). The module imports nothing of
ares until a fixture is used, so loading the plugin costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

    from . import EtcdServer, RedisServer

#: The Celery settings ``ares_eager`` turns on (and puts back after).
EAGER_SETTINGS = {"task_always_eager": True, "task_eager_propagates": True}


def _ares_of(app: Any) -> Any:
    """The ``Ares`` built for ``app`` (an ``Ares`` is accepted as is)."""
    from ..errors import ConfigurationError

    if hasattr(app, "eager") and hasattr(app, "app"):
        return app
    ares = getattr(app, "ares", None)
    if ares is None:
        raise ConfigurationError(
            f"app {getattr(app, 'main', app)!r} has no Ares: build "
            "Ares(app) before passing it to ares_eager")
    return ares


@pytest.fixture()
def ares_eager() -> Iterator[Callable[[Any], Any]]:
    """``enable(app)``: run ``app``'s tasks eagerly, in-process and without
    Redis or etcd, for this test only.

    Eager ares tasks dedup in memory per ``Ares``: the memory is emptied
    when enabled and again after the test, so one test's request ids never
    answer another's. Celery's own settings are restored after the test.
    """
    undo: list[Callable[[], None]] = []

    def enable(app: Any) -> Any:
        ares = _ares_of(app)
        conf = ares.app.conf
        before = {key: conf.get(key) for key in EAGER_SETTINGS}
        conf.update(EAGER_SETTINGS)
        ares.eager.reset()

        def restore() -> None:
            conf.update(before)
            ares.eager.reset()
        undo.append(restore)
        return ares

    yield enable
    for restore in reversed(undo):
        restore()


@dataclass
class AresServices:
    """The session's private Redis and etcd, and how to point an app at them."""

    redis: RedisServer
    etcd: EtcdServer

    @property
    def redis_url(self) -> str:
        """Broker, dedup and result store URL (database 0)."""
        return f"{self.redis.url}/0"

    @property
    def etcd_endpoint(self) -> str:
        """``host:port`` of the etcd member."""
        return self.etcd.endpoint

    def configure(self, app: Celery) -> None:
        """Point ``app`` at these servers: ``broker_url``,
        ``ares_redis_url`` and ``ares_etcd_endpoints``.

        Call it before ``Ares(app)``, which reads the settings once; after
        it, the app would keep using the servers it was built with.
        """
        from ..errors import ConfigurationError

        if getattr(app, "ares", None) is not None:
            raise ConfigurationError(
                f"app {app.main!r} already has an Ares, which read its "
                "settings when it was built; call "
                "ares_services.configure(app) before Ares(app)")
        app.conf.update(broker_url=self.redis_url,
                        ares_redis_url=self.redis_url,
                        ares_etcd_endpoints=[self.etcd_endpoint])

    def flush(self) -> None:
        """Empty both stores (dedup records, results, queues, locks), for a
        test that must start from nothing."""
        import redis

        from ..clients.etcd import EtcdGateway

        client = redis.Redis.from_url(self.redis_url)
        try:
            client.flushall()
        finally:
            client.close()
        EtcdGateway([self.etcd_endpoint]).delete_prefix("/")

    def stop(self) -> None:
        """Stop both servers and remove their data dirs."""
        for server in (self.redis, self.etcd):
            server.cleanup()


@pytest.fixture(scope="session")
def ares_services() -> Iterator[AresServices]:
    """A private ``redis-server`` and ``etcd`` for the test session, on free
    loopback ports in temporary dirs (the binaries must be installed: the
    Debian packages ``redis-server`` and ``etcd-server``)."""
    from . import EtcdServer, RedisServer

    redis_server, etcd_server = RedisServer(), EtcdServer()
    found = AresServices(redis_server, etcd_server)
    try:
        redis_server.start()
        etcd_server.start()
        yield found
    finally:
        found.stop()
