"""The task base class behind ``@ares.gpu_task``: exactly-once, routed to
the best host, and run on GPUs allocated before the body starts."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar, NoReturn

from .. import headers as wire
from ..errors import AresError, LeaseLost, Preempted, UnsatisfiableGpuRequest
from ..exactly_once.context import JobContext
from ..exactly_once.submission import Route
from ..exactly_once.task import ExactlyOnceTask
from ..headers import header
from ..observability import events
from ..observability.metrics import count_preemption, observe_gpu_allocation
from .allocation import Allocation, GpusBusy
from .host import GpuHost, HostSlot
from .preemption import Victim
from .priority import (
    DEFAULT_PRIORITY,
    broker_priority,
    route_priority,
    validate_priority,
)
from .request import GpuRequest
from .routing import GpuRouter

logger = logging.getLogger(__name__)

#: Old name of the header (now :data:`ares_celery.headers.REROUTES`).
REROUTES_HEADER = wire.REROUTES
_UNSET = object()


def carry_priority(route: dict[str, Any],
                   before: dict[str, Any] | None) -> dict[str, Any]:
    """A new route header that keeps the job's priority and submission time:
    a re-routed or recovered job keeps its place in line (and its aging)."""
    for key in ("priority", "submitted"):
        if before and key in before:
            route[key] = before[key]
    return route


class GpuTask(ExactlyOnceTask):
    """``gpu_request`` is set per task by ``@ares.gpu_task``; the routers
    and the host slot by ``Ares`` when it builds the base class.

    ``gpu_priority`` (the decorator's ``priority``) is 0-9, higher is more
    urgent, default 5; it is not Celery's ``priority`` task attribute,
    which Celery deprecates and which would reach the broker untranslated.
    ``preemptible`` says whether a more urgent job may stop this one."""

    gpu_priority: ClassVar[int] = DEFAULT_PRIORITY
    preemptible: ClassVar[bool] = False
    gpu_request: ClassVar[GpuRequest]
    #: Client side: watch-driven inventory, decides at submission.
    _router: ClassVar[GpuRouter]
    #: Worker side: reads the inventory per decision (re-routing is rare).
    _worker_router: ClassVar[GpuRouter]
    _gpu_slot: ClassVar[HostSlot]

    def apply_async(self, args: Any = None, kwargs: Any = None,
                    task_id: str | None = None, **options: Any) -> Any:
        """Celery's ``apply_async``; ``priority=`` (0-9, higher is more
        urgent) overrides the decorator's for this call."""
        if options.get("priority") is not None \
                and wire.ROUTE not in (options.get("headers") or {}):
            validate_priority(options["priority"], f"{self.name}: priority")
        return super().apply_async(args, kwargs, task_id, **options)

    def _route_for(self, options: dict[str, Any]) -> Route | None:
        if wire.ROUTE in (options.get("headers") or {}):
            return None  # a retry or a worker re-routing: routed already
        priority = options.get("priority")
        if priority is None:
            priority = self.gpu_priority
        broker = self._get_app().conf.broker_url
        chosen = bool(options.get("queue"))

        def route(options: dict[str, Any]) -> dict[str, Any]:
            headers = dict(options.get("headers") or {})
            if chosen:
                # The caller chose the queue: no decision, but the worker
                # still learns the priority and the submission time.
                headers[wire.ROUTE] = {"priority": priority,
                                       "submitted": time.time()}
                queue = options["queue"]
            else:
                decision = self._router.decide(self.gpu_request,
                                               priority=priority)
                headers[wire.ROUTE] = dict(decision.to_header(),
                                           priority=priority,
                                           submitted=time.time())
                queue = decision.queue
            return dict(options, queue=queue, headers=headers,
                        priority=broker_priority(priority, broker))
        return route

    def _job_priority(self) -> tuple[int, float | None]:
        """This delivery's priority and submission time (from the route
        header; the task's own priority for a message routed by name)."""
        route = header(self.request, wire.ROUTE) or {}
        priority = route_priority(route, self.gpu_priority)
        submitted = route.get("submitted")
        if not isinstance(submitted, (int, float)):
            submitted = None
        return priority, submitted

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
        priority, submitted = self._job_priority()
        try:
            allocation = gpu.allocate(
                ctx.job_id, request, priority, submitted,
                preemptible=self.preemptible, token=ctx.fencing_token,
                report=lambda victims, outcome: self._report_victims(
                    ctx, victims, outcome))
        except UnsatisfiableGpuRequest as exc:
            self._reroute(ctx, str(exc), exclude_self=True)
        except GpusBusy as exc:
            self._reroute(ctx, str(exc), exclude_self=False)
        waited = time.monotonic() - started
        self._use_gpus(ctx, allocation, gpu.host,
                       gpu.visible_devices(allocation))
        observe_gpu_allocation(waited, priority)
        events.placed(self, ctx, allocation, gpu.queue, waited, priority)
        if self.preemptible:
            self._listen_for_preemption(ctx, gpu)

    @staticmethod
    def _listen_for_preemption(ctx: JobContext, gpu: GpuHost) -> None:
        """Let ``ctx.check()`` see a request to yield, and tell the host
        when a checkpoint makes this job cheaper to stop."""
        ctx.preempt_probe = gpu.preempt_probe(ctx.job_id)
        ctx.checkpoints.listen(
            lambda saved: gpu.ledger.note_checkpoint(ctx.job_id, saved.at))

    def _report_victims(self, ctx: JobContext, victims: list[Victim],
                        outcome: str) -> None:
        """This job preempted ``victims`` (or killed them after the grace):
        events on the victims' task pages, and metrics."""
        grace = getattr(self._gpu_slot.host, "preempt_grace", None)
        for victim in victims:
            count_preemption(outcome, victim.lost_gpu_seconds
                             if outcome == "requested" else 0.0)
            events.preempted(self, victim.job_id, outcome, ctx.job_id,
                             grace=grace,
                             lost_gpu_seconds=victim.lost_gpu_seconds,
                             gpus=list(victim.gpus))

    def _body_stopped(self, ctx: JobContext, exc: LeaseLost) -> NoReturn:
        """A preempted job yields: the requeued copy goes where the router
        says (it keeps its priority and place in line) and resumes from its
        last checkpoint; the GPUs go to the preemptor when the run ends."""
        if not isinstance(exc, Preempted):
            super()._body_stopped(ctx, exc)
        request = ctx.preempt_probe() if ctx.preempt_probe else None
        by = (request or {}).get("by", "?")
        count_preemption("yielded")
        events.preempted(self, ctx.job_id, "yielded", by)
        logger.info("ares: job %s yields its GPUs %s to job %s", ctx.job_id,
                    ctx.gpus, by)
        self._reroute(ctx, f"preempted by job {by}", exclude_self=False)

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
        route = headers.get(wire.ROUTE) or {}
        before = route.get("host")
        priority = route_priority(route, self.gpu_priority)
        exclude = frozenset([before]) if before else frozenset()
        try:
            decision = self._worker_router.decide(
                self.gpu_request, exclude=exclude, priority=priority)
        except AresError:
            if not exclude:
                raise
            decision = self._worker_router.decide(self.gpu_request,
                                                  priority=priority)
        reroutes = int(headers.get(wire.REROUTES) or 0)
        return decision.queue, {
            wire.ROUTE: carry_priority(decision.to_header(),
                                       headers.get(wire.ROUTE)),
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
            decision = self._worker_router.decide(
                self.gpu_request, exclude=exclude,
                priority=self._job_priority()[0])
        except AresError as exc:
            # Nowhere better right now: retry here later, with back-off.
            self._runtime.defer(self, f"{why}; {exc}")
        self._runtime.defer(
            self, why, queue=decision.queue,
            headers={wire.ROUTE: carry_priority(
                         decision.to_header(), header(self.request, wire.ROUTE)),
                     wire.REROUTES: reroutes + 1},
            delay=0.0 if decision.host != getattr(gpu, "host", None)
            else None)
