"""Benchmark worker app: the same no-op / sleep tasks as plain Celery tasks
(acks_late, a Redis or RabbitMQ broker, a Redis result backend) and as
``@ares.task``.

``BENCH_BROKER`` is the broker URL; ``BENCH_REDIS`` the Redis that keeps
results (and, for ares, dedup records and commit markers), the broker's
own URL when unset.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from ares_celery import Ares

MODE = os.environ.get("BENCH_MODE", "plain")
BROKER = os.environ["BENCH_BROKER"]
REDIS = os.environ.get("BENCH_REDIS") or BROKER
app = Celery("bench", broker=BROKER)
app.conf.update(
    result_backend=REDIS,
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    broker_transport_options={"visibility_timeout": 3600},
)

if os.environ.get("BENCH_EXPIRES"):
    # Short retention for the storage benchmark: results, commit markers
    # and dedup records all expire after this many seconds.
    app.conf.result_expires = int(os.environ["BENCH_EXPIRES"])
    app.conf.ares_dedup_ttl = int(os.environ["BENCH_EXPIRES"])

if MODE == "ares":
    app.conf.ares_etcd_endpoints = [os.environ["BENCH_ETCD"]]
    app.conf.ares_redis_url = REDIS
    ares = Ares(app)
    decorate = ares.task
else:
    def decorate(**options):
        return app.task(acks_late=True, **options)


@decorate(name="bench.noop")
def noop(i):
    return i


@decorate(name="bench.sleep")
def sleep(i, seconds=0.01):
    time.sleep(seconds)
    return i
