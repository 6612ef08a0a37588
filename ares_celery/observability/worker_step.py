"""The worker bootstep behind the task events and the ``/metrics`` endpoint.

Like the GPU host step, it prepares in ``__init__``, before the pool
forks: the shared event switch and prometheus_client's multiprocess mode
must exist before the children do, or they would not share them.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import bootsteps

from ..settings import AresSettings, metrics_listen
from .events import SWITCH
from .metrics import MetricsServer

logger = logging.getLogger(__name__)

#: How quickly pool processes notice events switched on or off remotely
#: (Flower sends ``enable_events`` every few seconds).
EVENT_SYNC_INTERVAL = 1.0


def task_events_on(worker: Any) -> bool:
    """Whether the worker's own dispatcher sends ``task-*`` events now
    (``-E`` at start, or ``enable_events``/``disable_events`` since)."""
    dispatcher = getattr(getattr(worker, "consumer", None),
                         "event_dispatcher", None)
    if dispatcher is None:
        return bool(getattr(worker, "task_events", False))
    groups = dispatcher.groups
    return bool(dispatcher.enabled) and (not groups or "task" in groups)


class ObservabilityStep(bootsteps.StartStopStep):
    """Keep the event switch current; serve the worker's metrics."""

    label = "ares observability"
    requires = {"celery.worker.components:Timer"}

    settings: ClassVar[AresSettings | None] = None

    @classmethod
    def bound(cls, settings: AresSettings) -> type[ObservabilityStep]:
        """This step for one app's ares settings (see GpuHostStep.bound)."""
        return type(cls.__name__, (cls,), {"settings": settings,
                                           "__module__": cls.__module__})

    def __init__(self, worker: Any, ares_metrics_port: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: MetricsServer | None = None
        self._tref = None
        if self.settings is None:
            return
        SWITCH.install(bool(getattr(worker, "task_events", False)))
        listen = self.settings.metrics_listen
        if ares_metrics_port:
            listen = metrics_listen("--ares-metrics-port", ares_metrics_port)
        if listen is not None:
            self.server = MetricsServer(*listen)
            self.server.prepare()

    def start(self, worker: Any) -> None:
        if self.settings is None:
            return
        SWITCH.set(task_events_on(worker))
        self._tref = worker.timer.call_repeatedly(
            EVENT_SYNC_INTERVAL, self.sync_events, (worker,))
        if self.server is not None:
            self.server.start()

    @staticmethod
    def sync_events(worker: Any) -> None:
        SWITCH.set(task_events_on(worker))

    def stop(self, worker: Any) -> None:
        tref, self._tref = self._tref, None
        if tref is not None:
            tref.cancel()
        if self.server is not None:
            self.server.stop()  # idempotent: shutdown may follow stop

    # A cold shutdown (``Blueprint.stop(terminate=True)``: SIGQUIT, a
    # second SIGTERM, an embedded worker such as Celery's test worker)
    # calls ``terminate``, which StartStopStep maps to ``self.obj`` only.
    shutdown = terminate = stop
