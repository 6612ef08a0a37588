"""The configuration every test app shares, read from the environment so
that ``celery worker`` subprocesses talk to the test session's private Redis
and etcd (``ARES_TEST_BROKER``, ``ARES_TEST_ETCD``: comma-separated)."""

from __future__ import annotations

import os

from celery import Celery

from ares_celery import Ares


def make_app(name: str = "jobs", **overrides) -> tuple[Celery, Ares]:
    broker = overrides.pop("broker", None) or os.environ["ARES_TEST_BROKER"]
    app = Celery(name, broker=broker)
    app.conf.update(
        # Dedup records and results: the test session's Redis, whatever
        # the broker is.
        ares_redis_url=os.environ.get("ARES_TEST_REDIS") or broker,
        ares_etcd_endpoints=os.environ.get("ARES_TEST_ETCD", "127.0.0.1:2379")
        .split(","),
        # The lease timer is what takeover tests are about; they set it.
        ares_lease_ttl=int(os.environ.get("ARES_TEST_LEASE_TTL", "3")),
        # The broker as users run it: kombu's defaults (an hour of
        # visibility timeout, its restore sweeps) and Celery's prefetch.
        ares_republish_after=float(
            os.environ.get("ARES_TEST_REPUBLISH_AFTER", "600")),
        # One GPU ledger dir per test session: two sessions on one machine
        # must not share the files of their same-named mock hosts.
        ares_gpu_state_dir=os.environ.get("ARES_TEST_STATE_DIR"),
        # The preemption tests are about this timer; they set it.
        ares_preempt_grace=float(
            os.environ.get("ARES_TEST_PREEMPT_GRACE", "30")),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if broker.startswith("amqp"):
        # Publisher confirms: the durable RabbitMQ setup we document (a
        # publish returns once the broker has the message).
        app.conf.broker_transport_options = {"confirm_publish": True}
        if os.environ.get("ARES_TEST_QUEUE_TYPE"):
            # Quorum queues (the other half of that setup) on a queue of
            # their own: RabbitMQ keeps a queue's type for its life.
            app.conf.task_default_queue_type = os.environ[
                "ARES_TEST_QUEUE_TYPE"]
            app.conf.task_default_queue = os.environ["ARES_TEST_QUEUE"]
    app.conf.update(overrides)
    return app, Ares(app)
