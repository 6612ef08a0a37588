"""Re-route jobs stranded in the queue of a GPU host that died.

A job routed to ``ares.gpu.<host>`` is only consumed by that host's worker.
If the worker dies, the broker puts its unacked messages back into that
queue after the visibility timeout, where nobody would take them. Every
GPU worker therefore runs this janitor: hosts ever registered are recorded
in Redis; a registered host that is no longer in the inventory (its lease
expired) has its queue drained and each job re-routed by the router, using
Celery's own ``celery.contrib.migrate.move``. The job keeps its id, so the
lease and fencing layers still make it run and commit once.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery.contrib.migrate import move
from kombu import Exchange, Queue

from ..errors import AresError
from .inventory import InventoryCache

if TYPE_CHECKING:
    from ..app import Ares

logger = logging.getLogger(__name__)


def registry_key(namespace: str) -> str:
    return f"{namespace}:gpu:queues"


def register_host_queue(ares: Ares, host: str, queue: str) -> None:
    ares.services.redis.hset(registry_key(ares.settings.namespace), host,
                             queue)


class DeadHostJanitor:
    """Runs in each GPU worker's main process, in its own thread (moving
    messages blocks for a moment; the worker's event loop must not)."""

    def __init__(self, ares: Ares, own_host: str, interval: float) -> None:
        self._ares = ares
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
        services = self._ares.services
        registered = {k.decode(): v.decode() for k, v in services.redis.hgetall(
            registry_key(self._ares.settings.namespace)).items()}
        if not registered:
            return 0
        alive = InventoryCache(services.etcd, services.keys).load_once().hosts()
        moved = 0
        for host, queue in registered.items():
            if host in alive or host == self._own_host:
                continue
            if not services.redis.llen(queue):
                continue
            logger.warning("ares: GPU host %s is gone; re-routing the jobs "
                           "left in %s", host, queue)
            state = move(self._predicate(host), app=self._ares.app,
                         source=[Queue(queue, Exchange(queue), queue)],
                         timeout=0.5)
            moved += getattr(state, "filtered", 0)
        self.moved += moved
        return moved

    def _predicate(self, dead_host: str):
        app = self._ares.app

        def destination(body: Any, message: Any) -> Queue | None:
            task = app.tasks.get((message.headers or {}).get("task", ""))
            request = getattr(task, "gpu_request", None)
            if request is None:
                name = app.conf.task_default_queue
                return Queue(name, Exchange(name), name)
            try:
                decision = self._ares.worker_router.decide(
                    request, exclude=frozenset([dead_host]))
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
