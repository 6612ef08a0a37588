"""The task base class behind ``@ares.gpu_task``: exactly-once, routed to
the best host, and run on GPUs allocated before the body starts."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar, NoReturn

from .. import headers as wire
from ..errors import AresError, UnsatisfiableGpuRequest
from ..exactly_once.context import JobContext
from ..exactly_once.submission import Route
from ..exactly_once.task import ExactlyOnceTask
from ..headers import header
from ..observability import events
from ..observability.metrics import observe_gpu_allocation
from .allocation import Allocation, GpusBusy
from .host import HostSlot
from .request import GpuRequest
from .routing import GpuRouter

logger = logging.getLogger(__name__)

#: Old name of the header (now :data:`ares_celery.headers.REROUTES`).
REROUTES_HEADER = wire.REROUTES
_UNSET = object()


class GpuTask(ExactlyOnceTask):
    """``gpu_request`` is set per task by ``@ares.gpu_task``; the routers
    and the host slot by ``Ares`` when it builds the base class."""

    gpu_request: ClassVar[GpuRequest]
    #: Client side: watch-driven inventory, decides at submission.
    _router: ClassVar[GpuRouter]
    #: Worker side: reads the inventory per decision (re-routing is rare).
    _worker_router: ClassVar[GpuRouter]
    _gpu_slot: ClassVar[HostSlot]

    def _route_for(self, options: dict[str, Any]) -> Route | None:
        if options.get("queue") or wire.ROUTE in (options.get("headers")
                                                   or {}):
            return None  # the caller (or a worker re-routing) chose

        def route(options: dict[str, Any]) -> dict[str, Any]:
            decision = self._router.decide(self.gpu_request)
            headers = dict(options.get("headers") or {})
            headers[wire.ROUTE] = decision.to_header()
            return dict(options, queue=decision.queue, headers=headers)
        return route

    # -- worker side ---------------------------------------------------------

    def _admit_eager(self) -> None:
        """An eager GPU job is placed on the mock host; a request it can
        never run fails now, as production submission fails."""
        self._eager.gpus.place(self.gpu_request)

    def _before_body(self, ctx: JobContext) -> None:
        if self.request.is_eager:
            allocation = self._eager.gpus.allocate(ctx.job_id,
                                                   self.gpu_request)
            self._use_gpus(ctx, allocation, allocation.topology.host,
                           self._eager.gpus.visible_devices(allocation))
            return
        gpu = self._gpu_slot.host
        request = self.gpu_request
        if gpu is None:
            self._reroute(ctx, "this worker has no GPUs", exclude_self=False)
        started = time.monotonic()
        try:
            allocation = gpu.allocate(ctx.job_id, request)
        except UnsatisfiableGpuRequest as exc:
            self._reroute(ctx, str(exc), exclude_self=True)
        except GpusBusy as exc:
            self._reroute(ctx, str(exc), exclude_self=False)
        waited = time.monotonic() - started
        self._use_gpus(ctx, allocation, gpu.host,
                       gpu.visible_devices(allocation))
        observe_gpu_allocation(waited)
        events.placed(self, ctx, allocation, gpu.queue, waited)

    @staticmethod
    def _use_gpus(ctx: JobContext, allocation: Allocation, host: str,
                  visible: str) -> None:
        """Tell the body its GPUs: the context, and ``CUDA_VISIBLE_DEVICES``
        (put back by :meth:`_after_body`)."""
        ctx.gpus = allocation.gpus
        ctx.gpu_uuids = allocation.uuids
        ctx.host = host
        ctx.placement_score = allocation.placement.score
        ctx.extra["cuda_visible_devices_before"] = os.environ.get(
            "CUDA_VISIBLE_DEVICES", _UNSET)
        os.environ["CUDA_VISIBLE_DEVICES"] = visible

    def _after_body(self, ctx: JobContext) -> None:
        before = ctx.extra.pop("cuda_visible_devices_before", _UNSET)
        if before is _UNSET:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before

    def recovery_route(self, message: dict[str, Any]
                       ) -> tuple[str, dict[str, Any]] | None:
        """A live host's queue, never the dead one's: the host the job was
        routed to is left out unless no other host can take it (then it was
        only the pool process that hung, and its host still serves)."""
        headers = (message.get("options") or {}).get("headers") or {}
        before = (headers.get(wire.ROUTE) or {}).get("host")
        exclude = frozenset([before]) if before else frozenset()
        try:
            decision = self._worker_router.decide(self.gpu_request,
                                                  exclude=exclude)
        except AresError:
            if not exclude:
                raise
            decision = self._worker_router.decide(self.gpu_request)
        reroutes = int(headers.get(wire.REROUTES) or 0)
        return decision.queue, {wire.ROUTE: decision.to_header(),
                                wire.REROUTES: reroutes + 1}

    def _finish_job(self, job_id: str) -> None:
        """Give the lock back, then the GPUs (also on failure and retry)."""
        try:
            super()._finish_job(job_id)
        finally:
            gpu = self._gpu_slot.host
            if gpu is not None:
                gpu.release(job_id)

    def _reroute(self, ctx: JobContext, why: str,
                 exclude_self: bool) -> NoReturn:
        """Hand the job to the router's current choice (never drop it)."""
        gpu = self._gpu_slot.host
        exclude = frozenset([gpu.host]) if gpu is not None and exclude_self \
            else frozenset()
        reroutes = int(header(self.request, wire.REROUTES) or 0)
        try:
            decision = self._worker_router.decide(self.gpu_request,
                                                  exclude=exclude)
        except AresError as exc:
            # Nowhere better right now: retry here later, with back-off.
            self._runtime.defer(self, f"{why}; {exc}")
        self._runtime.defer(
            self, why, queue=decision.queue,
            headers={wire.ROUTE: decision.to_header(),
                     wire.REROUTES: reroutes + 1},
            delay=0.0 if decision.host != getattr(gpu, "host", None)
            else None)
