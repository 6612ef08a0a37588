"""Worker bootsteps: make a plain ``celery worker`` a GPU host.

Following Celery's bootstep conventions (``celery.worker.components``), the
step does its setup in ``__init__`` (before the pool forks, so pool
processes inherit the topology and the ledger location) and talks to etcd
in ``start``/``stop``. A worker without GPUs (no NVML, no mock topology)
simply is not a GPU host; exactly-once tasks run there as usual.

What the step works with (settings, per-process services, the placement
policies, the worker-side router and the slot GPU tasks read their host
from) is bound to a subclass by :meth:`GpuHostStep.bound`, the way Celery
binds task classes to their app, so the step never looks anything up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from celery import bootsteps

from ..errors import NvmlUnavailable, ServiceUnavailable
from ..observability.metrics import set_gpus_busy
from ..services import Services
from ..settings import AresSettings
from .allocation import HostGpuLedger, ledger_path
from .discovery import discover_topology
from .host import GpuHost, HostSlot
from .inventory import InventoryPublisher, host_queue
from .janitor import DeadHostJanitor, register_host_queue
from .model import HostTopology
from .placement import PlacementPolicy
from .routing import GpuRouter

logger = logging.getLogger(__name__)

HOST_ENV = "ARES_HOST"


def worker_host(hostname: str | None, override: str | None = None) -> str:
    """The host identity: ``--ares-host``, ``$ARES_HOST``, or the part of
    the node name after ``@`` (``celery -n w1@gpu-node-7`` -> gpu-node-7)."""
    host = override or os.environ.get(HOST_ENV)
    if host:
        return host
    name = hostname or ""
    return name.split("@", 1)[1] if "@" in name else (name or "localhost")


def inventory_summary(topology: HostTopology, busy: dict[int, str],
                      links: list[str]) -> str:
    """One line a person can read in Flower: what the host has, what is
    free, which job holds each busy GPU, and how the GPUs are linked."""
    models: dict[str, int] = {}
    for gpu in topology.gpus:
        label = f"{gpu.name} {gpu.memory_total_mb / 1024:.0f} GB"
        models[label] = models.get(label, 0) + 1
    free = [i for i in topology.indices if i not in busy]
    held = ", ".join(f"GPU{i}: {job[:8]}" for i, job in sorted(busy.items()))
    return (f"host {topology.host}: {len(topology)} GPUs "
            f"({', '.join(f'{n}x {m}' for m, n in models.items())}); "
            f"{len(free)} free {free}; {len(busy)} busy"
            f"{f' ({held})' if held else ''}; links: {', '.join(links)}")


class GpuHostStep(bootsteps.StartStopStep):
    """Probe GPUs, consume the host queue, publish and refresh inventory."""

    label = "ares GPU host"
    requires = {"celery.worker.components:Timer"}

    settings: ClassVar[AresSettings | None] = None
    services: ClassVar[Services]
    policies: ClassVar[Mapping[str, PlacementPolicy]]
    router: ClassVar[GpuRouter]
    slot: ClassVar[HostSlot]

    @classmethod
    def bound(cls, settings: AresSettings, services: Services,
              policies: Mapping[str, PlacementPolicy], router: GpuRouter,
              slot: HostSlot) -> type[GpuHostStep]:
        """This step for one app's ares: a subclass carrying what it uses."""
        return type(cls.__name__, (cls,), {
            "settings": settings, "services": services, "policies": policies,
            "router": router, "slot": slot, "__module__": cls.__module__})

    def __init__(self, worker: Any, ares_mock_gpus: str | None = None,
                 ares_host: str | None = None, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.host: GpuHost | None = None
        self.publisher: InventoryPublisher | None = None
        self.janitor: DeadHostJanitor | None = None
        self._tref = None
        self._queue_registered = False
        settings = self.settings
        if settings is None:
            return  # the unbound class: not installed by Ares
        host = worker_host(worker.hostname, ares_host)
        try:
            topology = discover_topology(ares_mock_gpus, host)
        except NvmlUnavailable as exc:
            logger.info("ares: not a GPU host (%s)", exc)
            return
        queue = host_queue(host)
        worker.app.amqp.queues.select_add(queue)
        ledger = HostGpuLedger(
            ledger_path(settings.namespace, host, settings.gpu_state_dir),
            topology, self.policies)
        self.host = GpuHost(topology, queue, ledger, self.services,
                            wait_timeout=settings.gpu_wait_timeout,
                            preempt_grace=settings.preempt_grace,
                            visible_devices=settings.cuda_visible_devices)
        self.slot.host = self.host
        logger.info("ares: GPU host %s with %d GPUs, queue %s", host,
                    len(topology), queue)

    @property
    def state(self) -> GpuHost | None:
        """Old name of :attr:`host`."""
        return self.host

    def start(self, worker: Any) -> None:
        if self.host is None:
            return
        host, settings, services = self.host, self.settings, self.services
        host.ledger.reset(host=host.host, queue=host.queue,
                          worker=worker.hostname, lease=0)
        set_gpus_busy(host.host, 0)
        self.publisher = InventoryPublisher(
            services.etcd, services.keys, host.topology,
            settings.lease_ttl, host.queue, worker=worker.hostname,
            busy_source=host.ledger.busy,
            preemptible_source=host.ledger.preemptible)
        try:
            self.publisher.publish()
            host.ledger.update_info(lease=self.publisher.lease_id)
        except ServiceUnavailable as exc:
            # Not fatal: the refresh below publishes once etcd is back, and
            # jobs wait (deferred) until then anyway.
            logger.warning("ares: GPU host %s not registered yet, etcd is "
                           "unavailable (%s); retrying every refresh",
                           host.host, exc)
        self._register_queue()
        interval = max(settings.lease_ttl / 3.0, 0.5)
        self._tref = worker.timer.call_repeatedly(interval, self.tick)
        self.janitor = DeadHostJanitor(worker.app, services, self.router,
                                       host.host, interval)
        self.janitor.start()

    def _register_queue(self) -> bool:
        """Remember our queue for the dead-host janitor (in Redis)."""
        try:
            register_host_queue(self.services, self.host.host,
                                self.host.queue)
            self._queue_registered = True
        except ServiceUnavailable as exc:
            logger.warning("ares: GPU host %s queue not registered yet: %s",
                           self.host.host, exc)
        return self._queue_registered

    def tick(self) -> None:
        """Re-publish after a lost lease; give back GPUs of dead processes."""
        if self.host is None or self.publisher is None:
            return
        try:
            if not self._queue_registered:
                self._register_queue()
            if self.publisher.ensure_published():
                self.host.ledger.update_info(lease=self.publisher.lease_id)
                logger.info("ares: GPU host %s registered (lease %x)",
                            self.host.host, self.publisher.lease_id)
            if self.host.ledger.reap_dead():
                self.host.publish()
        except Exception as exc:  # noqa: BLE001 - never kill the timer
            logger.warning("ares: GPU inventory refresh failed: %s", exc)

    def info(self, worker: Any) -> dict[str, Any]:
        """Shown by ``celery inspect stats`` and on Flower's worker page
        (its "Other" tab lists every stats key it does not know, one row
        each: ``ares_gpu`` for programs, ``ares_gpu_summary`` for people)."""
        if self.host is None:
            return {}
        host = self.host
        busy = host.ledger.busy()
        links = sorted({host.topology.link(i, j).label()
                        for i in host.topology.indices
                        for j in host.topology.indices if i < j})
        free = [i for i in host.topology.indices if i not in busy]
        return {"ares_gpu": {
            "host": host.host, "queue": host.queue,
            "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid,
                      "memory_mb": g.memory_total_mb,
                      "busy": busy.get(g.index)} for g in host.topology.gpus],
            "free": free,
            "links": links,
        }, "ares_gpu_summary": inventory_summary(host.topology, busy, links)}

    def stop(self, worker: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        if self.janitor is not None:
            self.janitor.stop()
            self.janitor = None
        if self.publisher is not None:
            self.publisher.withdraw()
            self.publisher = None

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    # A cold shutdown (``Blueprint.stop(terminate=True)``: SIGQUIT, a
    # second SIGTERM, an embedded worker such as Celery's test worker)
    # calls ``terminate``, which StartStopStep maps to ``self.obj`` only.
    terminate = shutdown
