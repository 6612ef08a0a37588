"""Re-route jobs stranded in the queue of a GPU host that died.

A job routed to ``ares.gpu.<host>`` is only consumed by that host's worker.
If the worker dies, the broker puts its unacked messages back into that
queue after the visibility timeout, where nobody would take them. Every
GPU worker therefore runs this janitor: hosts ever registered are recorded
in Redis (ares' own store, not the broker); a registered host that is no
longer in the inventory (its lease expired) has its queue drained and each
job re-routed by the router, using Celery's own
``celery.contrib.migrate.move``. The job keeps its id, so the lease and
fencing layers still make it run and commit once. Queue lengths are read
through the broker connection, so this works whatever the broker is.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.contrib.migrate import move
from kombu import Connection, Exchange, Queue

from .. import headers as wire
from ..errors import AresError
from ..services import Services
from .inventory import InventoryCache
from .priority import route_priority
from .routing import GpuRouter

logger = logging.getLogger(__name__)


def register_host_queue(services: Services, host: str, queue: str) -> None:
    """Remember ``host``'s queue, so it is drained if the host dies."""
    services.redis.hset(services.keys.host_queues(), host, queue)


def queue_length(connection: Connection, queue: str) -> int:
    """Messages waiting in ``queue`` on the broker (0 if it does not exist).

    A passive declare is how both kombu's Redis transport and AMQP report a
    queue's size; a missing queue is an error that closes the channel
    (AMQP), hence one channel per question.
    """
    try:
        with connection.channel() as channel:
            declared = Queue(queue, Exchange(queue), queue)(channel)
            return int(declared.queue_declare(passive=True).message_count)
    except Exception as exc:  # noqa: BLE001 - missing queue, broker error
        logger.debug("ares: no length for queue %s: %s", queue, exc)
        return 0


class DeadHostJanitor:
    """Runs in each GPU worker's main process, in its own thread (moving
    messages blocks for a moment; the worker's event loop must not)."""

    def __init__(self, app: Celery, services: Services, router: GpuRouter,
                 own_host: str, interval: float) -> None:
        self._app = app
        self._services = services
        self._router = router
        self._own_host = own_host
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.moved = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="ares-dead-host-janitor")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - keep sweeping
                logger.warning("ares: dead-host sweep failed: %s", exc)

    def sweep(self) -> int:
        """Move every message out of the queues of dead hosts."""
        services = self._services
        registered = {k.decode(): v.decode() for k, v in services.redis.hgetall(
            services.keys.host_queues()).items()}
        if not registered:
            return 0
        alive = InventoryCache(services.etcd, services.keys).load_once().hosts()
        dead = {host: queue for host, queue in registered.items()
                if host not in alive and host != self._own_host}
        if not dead:
            return 0
        moved = 0
        with self._app.connection_for_write() as connection:
            for host, queue in dead.items():
                if not queue_length(connection, queue):
                    continue
                logger.warning("ares: GPU host %s is gone; re-routing the "
                               "jobs left in %s", host, queue)
                state = move(self._predicate(host), connection=connection,
                             app=self._app,
                             source=[Queue(queue, Exchange(queue), queue)],
                             timeout=0.5)
                moved += getattr(state, "filtered", 0)
        self.moved += moved
        return moved

    def _predicate(self, dead_host: str):
        app = self._app

        def destination(body: Any, message: Any) -> Queue | None:
            task = app.tasks.get((message.headers or {}).get("task", ""))
            request = getattr(task, "gpu_request", None)
            if request is None:
                name = app.conf.task_default_queue
                return Queue(name, Exchange(name), name)
            route = (message.headers or {}).get(wire.ROUTE) or {}
            try:
                decision = self._router.decide(
                    request, exclude=frozenset([dead_host]),
                    priority=route_priority(route, task.gpu_priority))
            except AresError as exc:
                logger.warning("ares: cannot re-route job %s yet: %s",
                               (message.headers or {}).get("id"), exc)
                return None
            logger.info("ares: job %s moved from dead host %s to %s",
                        (message.headers or {}).get("id"), dead_host,
                        decision.queue)
            return Queue(decision.queue, Exchange(decision.queue),
                         decision.queue)
        return destination
