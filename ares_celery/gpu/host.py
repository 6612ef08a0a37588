"""A GPU worker's host, as every one of its processes sees it.

The bootstep finds the GPUs before the pool forks and puts a
:class:`GpuHost` in the :class:`HostSlot` that GPU tasks were built with,
so pool processes inherit it. The host allocates GPUs from the shared
ledger, gives them back when a job ends, and publishes the free set after
each change, so allocation, release and what the router reads stay in one
place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ServiceUnavailable
from ..services import Services
from .allocation import Allocation, HostGpuLedger, pid_alive
from .inventory import write_state
from .model import HostTopology
from .preemption import Victim
from .priority import DEFAULT_PRIORITY
from .request import GpuRequest

logger = logging.getLogger(__name__)

#: How often a running job's ``ctx.check()`` reads the ledger at most.
PROBE_INTERVAL_S = 0.2
#: A preemptor waits its victims' grace plus this long for their GPUs.
KILL_MARGIN_S = 15.0

#: ``report(victims, outcome)``: "requested" when they are asked to yield,
#: "killed" when the grace ran out.
PreemptionReport = Callable[[Sequence[Victim], str], None]

#: ``ares_cuda_visible_devices`` values.
VISIBLE_BY_INDEX = "index"
VISIBLE_BY_UUID = "uuid"


class GpuHost:
    """The host's topology, queue and ledger, and what jobs do with them."""

    def __init__(self, topology: HostTopology, queue: str,
                 ledger: HostGpuLedger, services: Services,
                 wait_timeout: float, visible_devices: str = VISIBLE_BY_INDEX,
                 preempt_grace: float = 30.0) -> None:
        self.topology = topology
        self.queue = queue
        self.ledger = ledger
        # Per-process clients: the host is built before the pool forks.
        self._services = services
        self._wait_timeout = wait_timeout
        self._visible = visible_devices
        self._grace = preempt_grace

    @property
    def host(self) -> str:
        return self.topology.host

    @property
    def preempt_grace(self) -> float:
        """``ares_preempt_grace``: how long a victim has to yield."""
        return self._grace

    def allocate(self, job_id: str, request: GpuRequest,
                 priority: int = DEFAULT_PRIORITY,
                 submitted: float | None = None, preemptible: bool = False,
                 token: int = 0,
                 report: PreemptionReport | None = None) -> Allocation:
        """GPUs for the job (waiting up to ``ares_gpu_wait_timeout``); while
        it waits, freed GPUs go to the host's most urgent waiting job first
        (``priority`` aged since ``submitted``, a wall-clock time), and the
        most urgent job that cannot start preempts less urgent preemptible
        ones (see :mod:`~ares_celery.gpu.preemption`), waiting out their
        grace if that is longer than the wait bound."""
        return self.ledger.allocate(job_id, request,
                                    timeout=self._wait_timeout,
                                    on_change=self.publish,
                                    priority=priority, submitted=submitted,
                                    preemptible=preemptible, token=token,
                                    on_poll=self._preemptor(job_id, report))

    def _preemptor(self, job_id: str, report: PreemptionReport | None
                   ) -> Callable[[], float | None]:
        """What a waiting job does between looks at the ledger: ask victims
        to yield once, kill those past the grace, and say how long to wait."""
        until: list[float] = []

        def poll() -> float | None:
            victims = self.ledger.preempt_for(job_id)
            if victims:
                until[:] = [time.monotonic() + self._grace + KILL_MARGIN_S]
                logger.warning(
                    "ares: job %s preempts %s on %s (grace %gs)", job_id,
                    ", ".join(f"{v.job_id} (GPUs {list(v.gpus)})"
                              for v in victims), self.host, self._grace)
                self.publish()         # the victims are no longer offered
                if report is not None:
                    report(victims, "requested")
            overdue = self.ledger.kill_overdue(job_id, self._grace)
            for victim in overdue:
                self._hand_back(victim)
            if overdue:
                self.ledger.reap_dead()
                self.publish()
                if report is not None:
                    report(overdue, "killed")
            return until[0] if until else None
        return poll

    def _hand_back(self, victim: Victim) -> None:
        """After the SIGKILL of a victim that ignored its request to yield
        (Celery requeues its message: ``reject_on_worker_lost``): once its
        process is gone, give its job lock back as a deliberate release, so
        the requeued run starts at once and is not counted as a failed
        attempt. No zombie can commit: the process is dead first."""
        logger.warning("ares: job %s did not yield within %gs; killed its "
                       "pool process %d", victim.job_id, self._grace,
                       victim.pid)
        deadline = time.monotonic() + 10.0
        while pid_alive(victim.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(victim.pid):
            logger.warning("ares: pool process %d of job %s still alive; its "
                           "lock expires with its lease", victim.pid,
                           victim.job_id)
            return
        locks = self._services.locks
        try:
            locks.release(victim.job_id, victim.token)
        except ServiceUnavailable:
            locks.release_later(victim.job_id, victim.token)

    def preempt_probe(self, job_id: str
                      ) -> Callable[[], dict[str, Any] | None]:
        """For ``ctx.check()`` of a preemptible running job: the request to
        yield, read from the ledger at most every ``PROBE_INTERVAL_S`` (a
        body may call ``check()`` every step) and kept once seen."""
        seen: dict[str, Any] = {}
        last = [float("-inf")]

        def probe() -> dict[str, Any] | None:
            if not seen and time.monotonic() - last[0] >= PROBE_INTERVAL_S:
                last[0] = time.monotonic()
                seen.update(self.ledger.preempt_request(job_id) or {})
            return dict(seen) if seen else None
        return probe

    def release(self, job_id: str) -> None:
        """Give the job's GPUs back (after its commit, failure or retry)."""
        if self.ledger.release(job_id):
            self.publish()

    def publish(self) -> None:
        """Write the ledger's free set under the worker's inventory lease."""
        self.ledger.publish_with(
            lambda busy, info: write_state(
                self._services.etcd, self._services.keys, self.topology,
                busy, info, int(info.get("lease", 0))))

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
