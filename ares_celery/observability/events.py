"""Custom task events that make leases, placements and commits visible in
Flower (and any other Celery event consumer).

Celery's event state merges an event's fields into the task's record, so
every field here starts with ``ares_`` to never shadow one of Celery's own
(``state``, ``result``, ``worker``...). The event names, all
``task-ares-*``: ``lease`` (the job's lock was taken; fencing token),
``placement`` (GPUs allocated), ``deferred`` (the job cannot run now and
was re-published), ``skipped`` (already committed, not run again) and
``commit`` (the result was accepted or fenced), ``checkpoint`` (the
job saved a checkpoint: its time, size and token) and ``preempted`` (a
more urgent job asked this one to yield its GPUs; then whether it yielded
or was killed after the grace). See docs/metrics.md.

Sending costs one broker publish, so it happens only while the worker
sends task events (``-E``, ``worker_send_task_events``, or Flower's
``enable_events``). Pool processes learn that from one shared byte the
worker's main process keeps current: reading it is the whole cost of an
event while events are off.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Task

    from ..exactly_once.checkpoints import Checkpoint
    from ..exactly_once.context import JobContext
    from ..gpu.allocation import Allocation

logger = logging.getLogger(__name__)

PREFIX = "task-ares-"
EVENT_TYPES = tuple(PREFIX + kind for kind in (
    "lease", "placement", "deferred", "skipped", "commit", "checkpoint",
    "preempted"))


class EventSwitch:
    """Whether task events are on, shared by the worker's processes.

    An anonymous shared mapping made before the pool forks is the same
    memory in every child: the main process flips it when events are
    enabled or disabled, the children read it before sending.
    """

    def __init__(self) -> None:
        self._cell: mmap.mmap | None = None

    def install(self, on: bool) -> None:
        """In the worker's main process, before the pool forks."""
        if self._cell is None:
            self._cell = mmap.mmap(-1, 1)
        self.set(on)

    def set(self, on: bool) -> None:
        if self._cell is not None:
            self._cell[0] = 1 if on else 0

    @property
    def on(self) -> bool:
        return self._cell is not None and self._cell[0] == 1


SWITCH = EventSwitch()


def emit(task: Task, kind: str, **fields: Any) -> None:
    """Send ``task-ares-<kind>`` for the task being executed, best effort:
    no retries (a broker hiccup must not stall the job), never raises."""
    if not SWITCH.on:
        return
    try:
        # ``name`` too, so Flower labels the event with the task even if
        # it overtakes the worker's own task-received.
        task.send_event(PREFIX + kind, retry=False, name=task.name, **fields)
    except Exception as exc:  # noqa: BLE001 - events are best effort
        logger.debug("ares: event %s%s not sent: %s", PREFIX, kind, exc)


# -- the hooks the exactly-once and GPU code call --------------------------------


def lease_taken(task: Task, ctx: JobContext) -> None:
    grant = ctx.grant
    emit(task, "lease", ares_job_id=ctx.job_id,
         ares_request_id=ctx.request_id,
         ares_fencing_token=ctx.fencing_token,
         ares_attempt=ctx.attempt,
         ares_lease_id=f"{grant.lease_id:x}" if grant else None,
         ares_holder=f"{socket.gethostname()}:{os.getpid()}")


def placed(task: Task, ctx: JobContext, allocation: Allocation,
           queue: str, waited: float, priority: int | None = None) -> None:
    placement = allocation.placement.to_dict()
    emit(task, "placement", ares_host=ctx.host, ares_gpus=ctx.gpus,
         ares_gpu_uuids=ctx.gpu_uuids, ares_placement_score=placement["score"],
         ares_placement=placement["reason"], ares_queue=queue,
         ares_gpu_wait_s=round(waited, 4), ares_priority=priority)


def deferred(task: Task, why: str, delay: float, waits: int,
             queue: str | None) -> None:
    emit(task, "deferred", ares_deferred=why, ares_retry_in_s=round(delay, 3),
         ares_waits=waits, ares_rerouted_to=queue)


def skipped(task: Task) -> None:
    emit(task, "skipped", ares_skipped="already committed; not run again")


def checkpointed(task: Task, checkpoint: Checkpoint) -> None:
    """The running job saved a checkpoint (the state itself is not sent:
    it may be up to 1 MiB)."""
    emit(task, "checkpoint", ares_checkpoint_at=round(checkpoint.at, 3),
         ares_checkpoint_size=checkpoint.size,
         ares_checkpoint_token=checkpoint.token)


def preempted(task: Task, job_id: str, outcome: str, by: str,
              grace: float | None = None,
              lost_gpu_seconds: float | None = None,
              gpus: list[int] | None = None) -> None:
    """``task-ares-preempted`` for job ``job_id``: sent by the preempting
    job for its victims (``requested``, ``killed``: the victim may be deaf)
    and by a victim that stopped (``yielded``)."""
    if not SWITCH.on:
        return
    fields: dict[str, Any] = {"ares_preempt": outcome,
                              "ares_preempted_by": by}
    if grace is not None:
        fields["ares_preempt_grace_s"] = grace
    if lost_gpu_seconds is not None:
        fields["ares_gpu_seconds_lost"] = round(lost_gpu_seconds, 3)
    if gpus is not None:
        fields["ares_gpus"] = gpus
    if job_id == getattr(task.request, "id", None):
        emit(task, "preempted", **fields)
        return
    try:
        with task.app.events.default_dispatcher(
                hostname=task.request.hostname) as dispatcher:
            dispatcher.send(PREFIX + "preempted", uuid=job_id, retry=False,
                            **fields)
    except Exception as exc:  # noqa: BLE001 - events are best effort
        logger.debug("ares: event %spreempted not sent: %s", PREFIX, exc)


def committed(task_id: str, outcome: str, token: int,
              current: str | None = None) -> None:
    """From the result backend, in the thread executing the job."""
    if not SWITCH.on:
        return
    from celery import current_task

    task = current_task._get_current_object()
    if task is None or getattr(task.request, "id", None) != task_id:
        return
    fields: dict[str, Any] = {"ares_commit": outcome,
                              "ares_commit_token": token}
    if outcome == "fenced":
        fields["ares_fenced_by"] = current
    emit(task, "commit", **fields)
