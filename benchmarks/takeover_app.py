"""Worker app for the takeover benchmark: one task that records when it
starts and holds until released, as plain Celery (acks_late,
reject_on_worker_lost: Celery's own "reliable" setup) or as ``@ares.task``.
Broker settings are kombu's and Celery's defaults (an hour of visibility
timeout on Redis); RabbitMQ with publisher confirms."""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

from ares_celery import Ares

MODE = os.environ.get("BENCH_MODE", "plain")
BROKER = os.environ["BENCH_BROKER"]
store = redis.Redis.from_url(os.environ["BENCH_REDIS"])

app = Celery("takeover", broker=BROKER)
app.conf.update(result_backend=os.environ["BENCH_REDIS"],
                task_acks_late=True, task_reject_on_worker_lost=True,
                worker_hijack_root_logger=False)
if BROKER.startswith("amqp"):
    app.conf.broker_transport_options = {"confirm_publish": True}

if MODE == "ares":
    app.conf.update(ares_etcd_endpoints=[os.environ["BENCH_ETCD"]],
                    ares_lease_ttl=int(os.environ["BENCH_TTL"]),
                    ares_redis_url=os.environ["BENCH_REDIS"])
    decorate = Ares(app).task
else:
    def decorate(**options):
        return app.task(**options)


@decorate(name="takeover.hold")
def hold(trial):
    store.rpush(f"takeover:started:{trial}",
                json.dumps({"pid": os.getpid(), "at": time.time()}))
    while not store.exists(f"takeover:release:{trial}"):
        time.sleep(0.05)
    return trial
