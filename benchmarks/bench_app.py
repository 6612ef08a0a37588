"""Benchmark worker app: the same no-op / sleep tasks as plain Celery tasks
(acks_late, Redis broker and result backend) and as ``@ares.task``."""

from __future__ import annotations

import os
import time

from celery import Celery

from ares_celery import Ares

MODE = os.environ.get("BENCH_MODE", "plain")
app = Celery("bench", broker=os.environ["BENCH_BROKER"])
app.conf.update(
    result_backend=os.environ["BENCH_BROKER"],
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
