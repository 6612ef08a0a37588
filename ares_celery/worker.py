"""Worker bootsteps: make a plain ``celery worker`` a GPU host.

Following Celery's bootstep conventions (``celery.worker.components``), the
step does its setup in ``__init__`` (before the pool forks, so pool
processes inherit the topology and the ledger location) and talks to etcd
in ``start``/``stop``. A worker without GPUs (no NVML, no mock topology)
simply is not a GPU host; exactly-once tasks run there as usual.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from .errors import NvmlUnavailable
from .gpu.allocation import (
    Allocation,
    HostGpuLedger,
    ledger_path,
    publish_ledger,
)
from .gpu.discovery import discover_topology
from .gpu.inventory import InventoryPublisher, host_queue
from .gpu.janitor import DeadHostJanitor, register_host_queue
from .gpu.model import HostTopology
from .gpu.request import GpuRequest
from .observability.metrics import set_gpus_busy

if TYPE_CHECKING:
    from .app import Ares

logger = logging.getLogger(__name__)

HOST_ENV = "ARES_HOST"


class GpuWorkerState:
    """What every process of a GPU worker knows about its host."""

    def __init__(self, ares: Ares, topology: HostTopology, queue: str,
                 ledger: HostGpuLedger) -> None:
        self.ares = ares
        self.topology = topology
        self.queue = queue
        self.ledger = ledger

    @property
    def host(self) -> str:
        return self.topology.host

    def allocate(self, job_id: str, request: GpuRequest) -> Allocation:
        services = self.ares.services
        return self.ledger.allocate(
            job_id, request, timeout=self.ares.settings.gpu_wait_timeout,
            on_change=lambda: publish_ledger(services.etcd, services.keys,
                                             self.ledger))

    def release(self, job_id: str) -> None:
        if self.ledger.release(job_id):
            services = self.ares.services
            publish_ledger(services.etcd, services.keys, self.ledger)

    def visible_devices(self, allocation: Allocation) -> str:
        """``CUDA_VISIBLE_DEVICES`` for the body: indices by default, or
        UUIDs (``ares_cuda_visible_devices = "uuid"``), which stay right
        even if the driver enumerates devices in another order."""
        if self.ares.settings.cuda_visible_devices == "uuid" and \
                all(allocation.uuids):
            return ",".join(allocation.uuids)
        return ",".join(str(i) for i in allocation.gpus)


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

    def __init__(self, worker: Any, ares_mock_gpus: str | None = None,
                 ares_host: str | None = None, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.state: GpuWorkerState | None = None
        self.publisher: InventoryPublisher | None = None
        self.janitor: DeadHostJanitor | None = None
        self._tref = None
        ares = getattr(worker.app, "ares", None)
        if ares is None:
            return
        host = worker_host(worker.hostname, ares_host)
        try:
            topology = discover_topology(ares_mock_gpus, host)
        except NvmlUnavailable as exc:
            logger.info("ares: not a GPU host (%s)", exc)
            return
        queue = host_queue(host)
        worker.app.amqp.queues.select_add(queue)
        ledger = HostGpuLedger(
            ledger_path(ares.settings.namespace, host,
                        ares.settings.gpu_state_dir), topology)
        self.state = GpuWorkerState(ares, topology, queue, ledger)
        ares.gpu_worker = self.state
        logger.info("ares: GPU host %s with %d GPUs, queue %s", host,
                    len(topology), queue)

    def start(self, worker: Any) -> None:
        if self.state is None:
            return
        ares, state = self.state.ares, self.state
        state.ledger.reset(host=state.host, queue=state.queue,
                           worker=worker.hostname, lease=0)
        set_gpus_busy(state.host, 0)
        self.publisher = InventoryPublisher(
            ares.services.etcd, ares.services.keys, state.topology,
            ares.settings.lease_ttl, state.queue, worker=worker.hostname,
            busy_source=state.ledger.busy)
        self.publisher.publish()
        state.ledger.update_info(lease=self.publisher.lease_id)
        register_host_queue(ares, state.host, state.queue)
        interval = max(ares.settings.lease_ttl / 3.0, 0.5)
        self._tref = worker.timer.call_repeatedly(interval, self.tick)
        self.janitor = DeadHostJanitor(ares, state.host, interval)
        self.janitor.start()

    def tick(self) -> None:
        """Re-publish after a lost lease; give back GPUs of dead processes."""
        if self.state is None or self.publisher is None:
            return
        services = self.state.ares.services
        try:
            if self.publisher.ensure_published():
                self.state.ledger.update_info(lease=self.publisher.lease_id)
            if self.state.ledger.reap_dead():
                publish_ledger(services.etcd, services.keys, self.state.ledger)
        except Exception as exc:  # noqa: BLE001 - never kill the timer
            logger.warning("ares: GPU inventory refresh failed: %s", exc)

    def info(self, worker: Any) -> dict[str, Any]:
        """Shown by ``celery inspect stats`` and on Flower's worker page
        (its "Other" tab lists every stats key it does not know, one row
        each: ``ares_gpu`` for programs, ``ares_gpu_summary`` for people)."""
        if self.state is None:
            return {}
        state = self.state
        busy = state.ledger.busy()
        links = sorted({state.topology.link(i, j).label()
                        for i in state.topology.indices
                        for j in state.topology.indices if i < j})
        free = [i for i in state.topology.indices if i not in busy]
        return {"ares_gpu": {
            "host": state.host, "queue": state.queue,
            "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid,
                      "memory_mb": g.memory_total_mb,
                      "busy": busy.get(g.index)} for g in state.topology.gpus],
            "free": free,
            "links": links,
        }, "ares_gpu_summary": inventory_summary(state.topology, busy, links)}

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
