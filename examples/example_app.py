"""The Celery app every example builds, wired to the example's own servers.

:class:`examples.local_cluster.LocalCluster` passes the addresses of the
Redis, broker and etcd it started through ``DEMO_*`` environment variables,
which both the client and the worker processes read here on import.
"""

from __future__ import annotations

import os

from celery import Celery

from ares_celery import Ares


def make_app(name: str) -> tuple[Celery, Ares]:
    app = Celery(name, broker=os.environ.get("DEMO_BROKER", "redis://127.0.0.1:6379/0"))
    app.conf.update(
        ares_redis_url=os.environ.get("DEMO_REDIS", app.conf.broker_url),
        ares_etcd_endpoints=os.environ.get("DEMO_ETCD", "127.0.0.1:2379").split(","),
        ares_lease_ttl=10,
        broker_transport_options={"visibility_timeout": 60},
    )
    return app, Ares(app)
