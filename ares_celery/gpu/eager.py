"""Where an eager GPU job's GPUs come from: a mock host, no inventory.

In eager mode (``task_always_eager``, ``task.apply()``) a GPU task runs in
the calling process, which has no GPU host slot and must not read the etcd
inventory. The placement is still the real one: the task's own policy
chooses among the GPUs of the mock topology a worker would play with
``ARES_MOCK_GPUS`` (default ``dgx-a100``), so a unit test sees the GPUs,
score and ``CUDA_VISIBLE_DEVICES`` production would give on such a host,
and a request no such host can ever satisfy fails the way production
submission does (:class:`~ares_celery.errors.UnsatisfiableGpuRequest`).

Eager jobs do not wait for one another's GPUs: each gets the placement its
request has on an idle host, so the same request always gets the same GPUs
(what a unit test wants to assert on).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from ..errors import UnsatisfiableGpuRequest
from .allocation import Allocation
from .discovery import MOCK_ENV
from .host import VISIBLE_BY_UUID
from .mock_topologies import load_topology
from .model import HostTopology
from .placement import Placement, PlacementPolicy
from .request import GpuRequest

#: The mock host eager GPU jobs run on when ``ARES_MOCK_GPUS`` names none.
DEFAULT_EAGER_MOCK = "dgx-a100"


class EagerGpus:
    """Places eager GPU jobs on the mock topology ``ARES_MOCK_GPUS`` names.

    ``policies`` and ``visible_devices`` are the app's (the placement
    policies by name, ``ares_cuda_visible_devices``), so eager and worker
    placements agree. The variable is read per placement, so a test may
    set it (``monkeypatch.setenv``) after the app was built.
    """

    def __init__(self, policies: Mapping[str, PlacementPolicy],
                 visible_devices: str = "index") -> None:
        self._policies = policies
        self._visible = visible_devices
        self._guard = threading.Lock()
        self._topologies: dict[str, HostTopology] = {}

    @staticmethod
    def mock_name() -> str:
        """The mock topology eager jobs use now (a name or a file)."""
        return os.environ.get(MOCK_ENV) or DEFAULT_EAGER_MOCK

    def topology(self) -> HostTopology:
        """The mock host (parsed once per name)."""
        name = self.mock_name()
        with self._guard:
            topology = self._topologies.get(name)
            if topology is None:
                topology = self._topologies[name] = load_topology(name)
            return topology

    def place(self, request: GpuRequest) -> Placement:
        """The GPUs the request gets on the mock host, or
        :class:`UnsatisfiableGpuRequest` saying why it never can."""
        topology = self.topology()
        try:
            return self._policies[request.policy].place(topology, request)
        except UnsatisfiableGpuRequest as exc:
            raise UnsatisfiableGpuRequest(
                f"eager mode: the mock GPU host {topology.host} "
                f"({MOCK_ENV}={self.mock_name()!r}) can never run "
                f"{request.describe()}: {exc}; set {MOCK_ENV} to a larger "
                "mock (see `celery ares topology --mock`)") from None

    def allocate(self, job_id: str, request: GpuRequest) -> Allocation:
        """The job's GPUs, as a worker's ledger would hand them out."""
        return Allocation(job_id, self.place(request), self.topology())

    def visible_devices(self, allocation: Allocation) -> str:
        """``CUDA_VISIBLE_DEVICES`` for the body, as a worker would set it."""
        if self._visible == VISIBLE_BY_UUID and all(allocation.uuids):
            return ",".join(allocation.uuids)
        return ",".join(str(i) for i in allocation.gpus)
