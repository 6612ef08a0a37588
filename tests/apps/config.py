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
        ares_etcd_endpoints=os.environ.get("ARES_TEST_ETCD", "127.0.0.1:2379")
        .split(","),
        ares_lease_ttl=int(os.environ.get("ARES_TEST_LEASE_TTL", "3")),
        broker_transport_options={
            "visibility_timeout": int(os.environ.get("ARES_TEST_VISIBILITY",
                                                     "6")),
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # kombu's restore mutex outlives a SIGKILLed holder (or a Redis
            # crash mid-restore) for this long; its default of 300 s would
            # stall every redelivery for five minutes.
            "unacked_mutex_expire": 10,
        },
        worker_prefetch_multiplier=1,
        ares_republish_after=float(
            os.environ.get("ARES_TEST_REPUBLISH_AFTER", "600")),
        # One GPU ledger dir per test session: two sessions on one machine
        # must not share the files of their same-named mock hosts.
        ares_gpu_state_dir=os.environ.get("ARES_TEST_STATE_DIR"),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.conf.update(overrides)
    return app, Ares(app)
