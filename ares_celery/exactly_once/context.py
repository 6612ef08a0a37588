"""What a running job knows about itself: ``ares.current()``.

The context is registered per thread (greenlet under eventlet/gevent) and
keyed by job id, because the result backend needs the fencing token at
commit time, after the task body has returned but in the same thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import AresError, LeaseLost, Preempted
from .checkpoints import JobCheckpoints

if TYPE_CHECKING:
    from ..coordination.mutex import JobLock
    from ..coordination.session import LeaseGrant, Session

_local = threading.local()


@dataclass
class JobContext:
    """The running job: its ids, fencing token and lease state.

    Pass :attr:`fencing_token` to your own stores and reject writes that
    carry a smaller token than one already seen; that is what makes a side
    effect outside the extension exactly-once.
    """

    job_id: str
    request_id: str | None
    fencing_token: int
    task_name: str
    grant: LeaseGrant | None = None
    #: Wall-clock time the lock Txn returned: when this holder's tenure began
    #: (what an audit compares with the previous holder's last valid moment).
    acquired_at: float = 0.0
    #: 1 for the job's first holder; n when n - 1 holders before this one
    #: died, hung or were cut off (a deliberate retry does not count).
    attempt: int = 1
    keeper: Session | None = field(default=None, repr=False)
    #: The job's lock in etcd (its ownership compare, its release).
    lock: JobLock | None = field(default=None, repr=False)
    released: bool = False
    committed: bool = False
    #: GPU tasks only: host GPU indices, their UUIDs, the host, the score.
    gpus: list[int] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    host: str | None = None
    placement_score: float | None = None
    #: This run's handle on the job's fenced checkpoint; the worker hands
    #: in one bound to the result store, a context made elsewhere (eager)
    #: keeps checkpoints in memory for the run.
    checkpoints: JobCheckpoints | None = field(default=None, repr=False)
    #: GPU tasks on a worker: asks the host whether a more urgent job has
    #: asked this one to yield (the request, or None).
    preempt_probe: Callable[[], dict[str, Any] | None] | None = field(
        default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.checkpoints is None:
            self.checkpoints = JobCheckpoints(self.job_id, self.fencing_token,
                                              None, may_exist=False)

    @property
    def lease_lost(self) -> bool:
        """True once this worker can no longer be sure it holds the lease."""
        if self.keeper is None or self.grant is None:
            return False
        return not self.keeper.is_valid(self.grant)

    @property
    def preempt_requested(self) -> bool:
        """True once a more urgent job has asked this one to give its GPUs
        back (preemptible GPU tasks only): save a checkpoint and return, or
        call :meth:`check`, within ``ares_preempt_grace`` seconds."""
        return self._preemption() is not None

    def _preemption(self) -> dict[str, Any] | None:
        return self.preempt_probe() if self.preempt_probe is not None \
            else None

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is gone, or
        :class:`Preempted` if a more urgent job asked for this job's GPUs:
        call it between steps, before a long step or an external side
        effect. Both end this run without a commit; the job is requeued."""
        self._check_lease()
        self._check_preemption()

    def _check_lease(self) -> None:
        if self.lease_lost:
            raise LeaseLost(
                f"job {self.job_id}: lease for fencing token "
                f"{self.fencing_token} is lost; another worker may own the "
                "job now and this execution's commit will be rejected")

    def _check_preemption(self) -> None:
        preemption = self._preemption()
        if preemption is not None:
            raise Preempted(
                f"job {self.job_id}: preempted by job {preemption['by']} "
                f"(priority {preemption.get('priority')}); it is requeued "
                "and resumes from its last checkpoint")

    @property
    def last_checkpoint(self) -> Any:
        """The state of the job's latest checkpoint, None if it has none.

        Whoever runs the job next (a takeover after a crash, a retry, a
        redelivery) sees what the previous run saved last, so a body starts
        with ``state = ctx.last_checkpoint or {"step": 0}``. Read from the
        store on first access only: a job that never asks pays nothing.
        The state is what ``json.loads`` gives back (tuples come back as
        lists, dict keys as strings).
        """
        latest = self.checkpoints.latest()
        return latest.state if latest is not None else None

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (JSON, at most 1 MiB encoded) as the job's
        checkpoint, replacing the previous one atomically.

        Fenced like the result: the write lands only while this run is the
        job's newest holder; a zombie's write raises :class:`LeaseLost` and
        never overwrites a newer holder's progress. Raises
        :class:`~ares_celery.errors.CheckpointNotSerializable` or
        :class:`~ares_celery.errors.CheckpointTooLarge` at the call for a
        state that cannot be saved: put large blobs (weights, optimizer
        state) in your own storage and checkpoint their reference. Kept
        while the job is uncommitted; deleted once its result is committed.

        If a more urgent job has asked this one to yield, the checkpoint is
        saved first and :class:`Preempted` raised after it: right after a
        checkpoint is the cheapest moment to stop.
        """
        # Validated before the lease check: a bad state is the caller's bug
        # whatever the lease does. A lease known lost locally stops a
        # zombie without a round trip; the store's fence stops the rest.
        self.checkpoints.save(state, time.time(),
                              before_write=self._check_lease)
        self._check_preemption()


def _registry() -> dict[str, JobContext]:
    reg = getattr(_local, "jobs", None)
    if reg is None:
        reg = _local.jobs = {}
    return reg


def _stack() -> list[JobContext]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def register(ctx: JobContext) -> None:
    _registry()[ctx.job_id] = ctx


def unregister(job_id: str) -> JobContext | None:
    return _registry().pop(job_id, None)


def lookup(job_id: str) -> JobContext | None:
    """The context of ``job_id`` if this thread is executing it."""
    return _registry().get(job_id)


def push(ctx: JobContext) -> None:
    _stack().append(ctx)


def pop() -> None:
    stack = _stack()
    if stack:
        stack.pop()


def current() -> JobContext:
    """The context of the exactly-once job running in this thread."""
    stack = _stack()
    if not stack:
        raise AresError("ares.current() called outside an exactly-once task")
    return stack[-1]
