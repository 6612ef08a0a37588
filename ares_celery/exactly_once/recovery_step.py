"""The worker bootstep behind lease-driven recovery: every worker records
the messages it holds (:mod:`.reservations`) and campaigns to be the one
recoverer (:mod:`.recovery`).

It starts after the pool (its threads and etcd connections belong to the
main process only) and needs nothing from etcd to start: a worker that
comes up while etcd is down serves as soon as etcd is back.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import bootsteps, signals

from ..services import Services
from ..settings import AresSettings
from .recovery import Recoverer
from .reservations import SYNC_INTERVAL_S, ReservationTracker
from .task import ExactlyOnceTask

logger = logging.getLogger(__name__)


def exactly_once(request: Any) -> bool:
    """Only exactly-once jobs are recorded: ares must never publish a plain
    Celery task again (it has no lock to stop a second run)."""
    return isinstance(getattr(request, "task", None), ExactlyOnceTask)


class RecoveryStep(bootsteps.StartStopStep):
    """Record held messages; recover the jobs of dead holders while elected."""

    label = "ares recovery"
    requires = {"celery.worker.components:Timer",
                "celery.worker.components:Pool"}

    settings: ClassVar[AresSettings | None] = None
    services: ClassVar[Services]

    @classmethod
    def bound(cls, settings: AresSettings,
              services: Services) -> type[RecoveryStep]:
        """This step for one app's ares (see GpuHostStep.bound)."""
        return type(cls.__name__, (cls,), {
            "settings": settings, "services": services,
            "__module__": cls.__module__})

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.recoverer: Recoverer | None = None
        self.tracker: ReservationTracker | None = None
        self._trefs: list[Any] = []

    def start(self, worker: Any) -> None:
        settings = self.settings
        if settings is None or not settings.recovery:
            return
        self.tracker = ReservationTracker(worker.app, self.services,
                                          exactly_once)
        self.tracker.start()
        signals.task_received.connect(self._received, weak=False)
        self.recoverer = Recoverer(worker.app, self.services,
                                   sweep_every=max(settings.lease_ttl * 2, 10))
        self.recoverer.start()
        self._trefs = [
            worker.timer.call_repeatedly(SYNC_INTERVAL_S, self._snapshot),
            worker.timer.call_repeatedly(max(settings.lease_ttl / 3.0, 0.5),
                                         self._tick),
        ]

    def _received(self, sender: Any = None, request: Any = None,
                  **_: Any) -> None:
        if self.tracker is not None and request is not None:
            self.tracker.received(request)

    def _snapshot(self) -> None:
        try:
            self.tracker.snapshot()
        except RuntimeError:
            pass  # Celery changed its sets meanwhile (threads): next time

    def _tick(self) -> None:
        try:
            self.recoverer.tick()
        except Exception as exc:  # noqa: BLE001 - never kill the timer
            logger.warning("ares: recoverer tick failed: %s", exc)

    def stop(self, worker: Any) -> None:
        signals.task_received.disconnect(self._received)
        for tref in self._trefs:
            tref.cancel()
        self._trefs = []
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker = None
        if self.recoverer is not None:
            self.recoverer.stop()
            self.recoverer = None

    # A cold shutdown (``Blueprint.stop(terminate=True)``: SIGQUIT, a
    # second SIGTERM, an embedded worker such as Celery's test worker)
    # calls ``terminate``, which StartStopStep maps to ``self.obj`` only.
    shutdown = terminate = stop
