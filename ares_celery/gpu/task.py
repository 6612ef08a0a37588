"""The task base class behind ``@ares.gpu_task``: exactly-once, routed to
the best host, and run on GPUs allocated before the body starts."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar

from ..errors import AresError, NoGpuHosts, UnsatisfiableGpuRequest
from ..exactly_once.context import JobContext
from ..exactly_once.execution import header
from ..exactly_once.task import ExactlyOnceTask
from ..observability import events
from ..observability.metrics import observe_gpu_allocation
from ..routing import ROUTE_HEADER
from .allocation import GpusBusy
from .request import GpuRequest

logger = logging.getLogger(__name__)

REROUTES_HEADER = "ares_reroutes"
_UNSET = object()


class GpuTask(ExactlyOnceTask):
    """``gpu_request`` is set per task by ``@ares.gpu_task``."""

    gpu_request: ClassVar[GpuRequest]

    def apply_async(self, args: Any = None, kwargs: Any = None,
                    task_id: str | None = None, *, request_id: Any = None,
                    **options: Any):
        headers = dict(options.pop("headers", None) or {})
        if not options.get("queue") and ROUTE_HEADER not in headers:
            decision = self._ares.router.decide(self.gpu_request)
            options["queue"] = decision.queue
            headers[ROUTE_HEADER] = decision.to_header()
        options["headers"] = headers
        return super().apply_async(args, kwargs, task_id,
                                   request_id=request_id, **options)

    # -- worker side ---------------------------------------------------------

    def _before_body(self, ctx: JobContext) -> None:
        gpu = self._ares.gpu_worker
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
        ctx.gpus = allocation.gpus
        ctx.gpu_uuids = allocation.uuids
        ctx.host = gpu.host
        ctx.placement_score = allocation.placement.score
        waited = time.monotonic() - started
        observe_gpu_allocation(waited)
        events.placed(self, ctx, allocation, gpu.queue, waited)
        ctx.extra["cuda_visible_devices_before"] = os.environ.get(
            "CUDA_VISIBLE_DEVICES", _UNSET)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu.visible_devices(allocation)

    def _after_body(self, ctx: JobContext) -> None:
        before = ctx.extra.pop("cuda_visible_devices_before", _UNSET)
        if before is _UNSET:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before

    def _reroute(self, ctx: JobContext, why: str, exclude_self: bool) -> None:
        """Hand the job to the router's current choice (never drop it)."""
        gpu = self._ares.gpu_worker
        exclude = frozenset([gpu.host]) if gpu is not None and exclude_self \
            else frozenset()
        reroutes = int(header(self.request, REROUTES_HEADER) or 0)
        try:
            decision = self._ares.worker_router.decide(self.gpu_request,
                                                       exclude=exclude)
        except (NoGpuHosts, UnsatisfiableGpuRequest, AresError) as exc:
            # Nowhere better right now: retry here later, with back-off.
            self._ares.runtime.defer(self, f"{why}; {exc}")
        self._ares.runtime.defer(
            self, why, queue=decision.queue,
            headers={ROUTE_HEADER: decision.to_header(),
                     REROUTES_HEADER: reroutes + 1},
            delay=0.0 if decision.host != getattr(gpu, "host", None)
            else None)
