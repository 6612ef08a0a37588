"""A GPU worker's host, as every one of its processes sees it.

The bootstep finds the GPUs before the pool forks and puts a
:class:`GpuHost` in the :class:`HostSlot` that GPU tasks were built with,
so pool processes inherit it. The host allocates GPUs from the shared
ledger, gives them back when a job ends, and publishes the free set after
each change, so allocation, release and what the router reads stay in one
place.
"""

from __future__ import annotations

from ..services import Services
from .allocation import Allocation, HostGpuLedger
from .inventory import write_state
from .model import HostTopology
from .priority import DEFAULT_PRIORITY
from .request import GpuRequest

#: ``ares_cuda_visible_devices`` values.
VISIBLE_BY_INDEX = "index"
VISIBLE_BY_UUID = "uuid"


class GpuHost:
    """The host's topology, queue and ledger, and what jobs do with them."""

    def __init__(self, topology: HostTopology, queue: str,
                 ledger: HostGpuLedger, services: Services,
                 wait_timeout: float, visible_devices: str = VISIBLE_BY_INDEX,
                 ) -> None:
        self.topology = topology
        self.queue = queue
        self.ledger = ledger
        # Per-process clients: the host is built before the pool forks.
        self._services = services
        self._wait_timeout = wait_timeout
        self._visible = visible_devices

    @property
    def host(self) -> str:
        return self.topology.host

    def allocate(self, job_id: str, request: GpuRequest,
                 priority: int = DEFAULT_PRIORITY,
                 submitted: float | None = None) -> Allocation:
        """GPUs for the job (waiting up to ``ares_gpu_wait_timeout``); while
        it waits, freed GPUs go to the host's most urgent waiting job first
        (``priority`` aged since ``submitted``, a wall-clock time)."""
        return self.ledger.allocate(job_id, request,
                                    timeout=self._wait_timeout,
                                    on_change=self.publish,
                                    priority=priority, submitted=submitted)

    def release(self, job_id: str) -> None:
        """Give the job's GPUs back (after its commit, failure or retry)."""
        if self.ledger.release(job_id):
            self.publish()

    def publish(self) -> None:
        """Write the ledger's free set under the worker's inventory lease."""
        busy, info = self.ledger.snapshot()
        write_state(self._services.etcd, self._services.keys, self.topology,
                    busy, info, int(info.get("lease", 0)))

    def visible_devices(self, allocation: Allocation) -> str:
        """``CUDA_VISIBLE_DEVICES`` for the body: indices by default, or
        UUIDs (``ares_cuda_visible_devices = "uuid"``), which stay right
        even if the driver enumerates devices in another order."""
        if self._visible == VISIBLE_BY_UUID and all(allocation.uuids):
            return ",".join(allocation.uuids)
        return ",".join(str(i) for i in allocation.gpus)


class HostSlot:
    """Where GPU tasks find their worker's host: empty until the worker
    bootstep finds GPUs (and forever on a worker without them)."""

    def __init__(self) -> None:
        self.host: GpuHost | None = None
