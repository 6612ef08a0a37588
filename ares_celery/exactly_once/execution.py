"""The worker side of a job: take the lease before the body, give it back
after the commit, and defer (never drop) a message that cannot run now."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from celery import Task as CeleryTask
from celery.exceptions import Ignore, Reject

from .. import headers as wire
from ..backends.store import CommitProbe, FencedStore
from ..coordination.mutex import ALONGSIDE_TRUSTED_S
from ..errors import AresError, AttemptsExhausted, ServiceUnavailable
from ..headers import header
from ..observability import events
from ..observability.metrics import (
    count_attempts_exhausted,
    count_job_lock,
    observe_attempt,
)
from . import context
from .checkpoints import JobCheckpoints, checkpoint_store
from .context import JobContext
from .messages import encode_message, job_message

if TYPE_CHECKING:
    from celery import Task

    from ..coordination.mutex import LockOutcome
    from ..services import Services

logger = logging.getLogger("ares_celery.execution")

#: Old names of the wire headers (now in :mod:`ares_celery.headers`).
REQUEST_ID_HEADER = wire.REQUEST_ID
WAITS_HEADER = wire.LEASE_WAITS


class ExecutionStats:
    """Per-process counters, read by tests."""

    acquired = 0
    deferred = 0
    skipped_committed = 0


class ReadAlongside:
    """A first holder's "committed?" read, sent just before the lock Txn
    and answered after it, so Redis works while etcd does.

    Read before the Txn was applied, it can miss a commit made in between by
    the job's previous holder. It is used only when the Txn found no job
    record (a first holder), and only if the Txn answered within
    ``ALONGSIDE_TRUSTED_S`` of the read being sent: a commit the read
    missed happened after it was sent, and its lock and record stay at
    least ``COMMITTED_KEYS_KEPT_S`` (five times longer) after it, so such
    a Txn would have found them. Otherwise the read is made again after
    the Txn, as if none had been sent.
    """

    def __init__(self, store: FencedStore, job_id: str) -> None:
        self._sent = time.monotonic()
        try:
            self._answer = store.send_commit_probe(job_id)
        except Exception:  # noqa: BLE001 - read again after the Txn
            self._answer = None

    def finish(self) -> CommitProbe | None:
        """Read the answer (always: it frees the connection) and return it
        if it may stand for a read made after the Txn (call right after
        the Txn answered)."""
        answered = time.monotonic()
        answer, self._answer = self._answer, None
        if answer is None:
            return None
        try:
            probe = answer()
        except Exception:  # noqa: BLE001 - read again after the Txn
            return None
        return probe if answered - self._sent < ALONGSIDE_TRUSTED_S else None


class JobRuntime:
    """Runs the lease protocol around one task execution."""

    def __init__(self, services: Services,
                 store: Callable[[], FencedStore]) -> None:
        self._services = services
        # The app's result backend, looked up per call: Celery builds one
        # per thread, lazily.
        self._store = store

    def begin(self, task: Task) -> JobContext:
        """Take the job's lock or raise :class:`Ignore` after deferring or
        skipping it; the body runs only if this returns."""
        request = task.request
        job_id = request.id
        services = self._services
        store = self._store()
        try:
            grant = services.keeper.current()
            message = encode_message(job_message(task, request))
            # Whether the job is committed is asked just before the lock
            # Txn and read after it: a first holder then needs no round
            # trip of its own.
            read = ReadAlongside(store, job_id)
            try:
                outcome = services.locks.acquire(job_id, grant, message)
            finally:
                probe = read.finish()
            acquired_at = time.time()
        except ServiceUnavailable as exc:
            count_job_lock("unavailable")
            self.defer(task, f"etcd unavailable ({exc})")
        if outcome.status == "committed":
            self._skip(task)
        if outcome.status == "held":
            count_job_lock("held_elsewhere")
            holder = outcome.holder or {}
            self.defer(task, f"lock held by {holder.get('host')}:"
                              f"{holder.get('pid')}")
        token = outcome.token
        try:
            committed = self._check_store(store, job_id, outcome, probe)
        except Exception as exc:  # noqa: BLE001 - any store error defers
            self._release_quietly(job_id, token)
            count_job_lock("unavailable")
            self.defer(task, f"result store unavailable ({exc})")
        if committed:
            self._release_quietly(job_id, token)
            self._skip(task)
        ExecutionStats.acquired += 1
        count_job_lock("acquired")
        ctx = JobContext(job_id=job_id,
                         request_id=header(request, wire.REQUEST_ID),
                         fencing_token=token, task_name=task.name,
                         grant=grant, keeper=services.keeper,
                         acquired_at=acquired_at, lock=outcome.lock,
                         attempt=outcome.attempt,
                         checkpoints=self._checkpoints(task, job_id, token,
                                                       outcome.attempt))
        context.register(ctx)
        events.lease_taken(task, ctx)
        observe_attempt(outcome.attempt)
        limit = self.max_attempts(task)
        if outcome.attempt > limit:
            # Registered first: this FAILURE is committed with our token,
            # so it is fenced like any result and ends the job for good.
            count_attempts_exhausted()
            holder = outcome.previous_holder or {}
            raise AttemptsExhausted(
                f"job {job_id} lost its holder {outcome.attempt - 1} times "
                f"(max_attempts={limit}); the last holder was "
                f"{holder.get('host')}:{holder.get('pid')}; not run again")
        return ctx

    def _checkpoints(self, task: Task, job_id: str, token: int,
                     attempt: int) -> JobCheckpoints:
        """The run's checkpoint handle; its store is opened on first use.
        A checkpoint may exist only if the job ran before (a takeover or a
        retry), which is when a commit must delete it."""
        return JobCheckpoints(
            job_id, token,
            lambda: checkpoint_store(self._store(), self._services),
            on_saved=lambda saved: events.checkpointed(task, saved),
            may_exist=attempt > 1 or bool(task.request.retries))

    def _check_store(self, store: FencedStore, job_id: str,
                     outcome: LockOutcome,
                     probe: CommitProbe | None) -> str | None:
        """Before the body: the committed token if the job is committed.

        A store whose commit marker is in etcd was read by the lock Txn
        already, and its commit compares lock ownership itself: no call. A
        first holder (the lock Txn created the job's record) raises no
        fence: no earlier holder, hence no older token, can exist while the
        record lives, and every later holder finds the record and raises
        the fence before its body runs, which is what fences this one if
        it turns zombie. It still asks whether the job is committed: the
        record of a committed job is deleted, so a late copy of its message
        is a first holder too. ``probe`` answers that when it was read
        alongside the lock Txn (see :class:`ReadAlongside`).
        """
        if store.marker_in_etcd:
            return None
        if outcome.first:
            return store.register_fence(job_id, outcome.token,
                                        first_holder=True, probe=probe)
        return store.register_fence(job_id, outcome.token)

    def max_attempts(self, task: Task) -> int:
        """The task's ``max_attempts`` option, else ``ares_max_attempts``."""
        own = getattr(task, "max_attempts", None)
        return int(own) if own else self._services.settings.max_attempts

    def finish(self, job_id: str) -> None:
        """After the result is stored (or the run deferred): release."""
        ctx = context.unregister(job_id)
        if ctx is None:
            return
        if ctx.committed:
            # The lock may be gone with the commit already (etcd store);
            # the job's record and release count go now too.
            self._services.locks.discard_after_commit(job_id)
            if ctx.checkpoints is not None:
                ctx.checkpoints.discard()
        elif not ctx.released:
            self._release_quietly(job_id, ctx.fencing_token)

    # -- internals -------------------------------------------------------

    def _release_quietly(self, job_id: str, token: int) -> None:
        try:
            self._services.locks.release(job_id, token)
        except ServiceUnavailable as exc:
            logger.warning("ares: could not release job %s (%s); retrying "
                           "in the background", job_id, exc)
            self._services.locks.release_later(job_id, token)

    def _skip(self, task: Task) -> NoReturn:
        ExecutionStats.skipped_committed += 1
        count_job_lock("committed")
        events.skipped(task)
        logger.info("ares: job %s already committed; message acked, "
                    "not run again", task.request.id)
        raise Ignore()

    def defer(self, task: Task, why: str, queue: str | None = None,
              headers: dict[str, Any] | None = None,
              delay: float | None = None) -> NoReturn:
        """Re-publish the same job with a back-off and ack this delivery.

        If the lock holder dies, its lease expires within the TTL and one of
        these deferred copies takes over; if it commits, they are skipped.
        ``queue`` re-routes the job (a GPU job whose host cannot run it).
        """
        request = task.request
        if request.is_eager:
            raise AresError(f"job {request.id} cannot run now: {why}")
        waits = int(header(request, wire.LEASE_WAITS) or 0)
        if delay is None:
            max_delay = self._services.settings.lease_retry_max_delay
            delay = min(max_delay, 0.2 * (2 ** min(waits, 16)))
            delay *= random.uniform(0.8, 1.2)
        all_headers = dict(request.headers or {})
        all_headers[wire.LEASE_WAITS] = waits + 1
        rid = header(request, wire.REQUEST_ID)
        if rid is not None:
            all_headers[wire.REQUEST_ID] = rid
        all_headers.update(headers or {})
        ExecutionStats.deferred += 1
        events.deferred(task, why, delay, waits + 1, queue)
        logger.info("ares: job %s deferred %.2fs (wait #%d)%s: %s",
                    request.id, delay, waits + 1,
                    f" to {queue}" if queue else "", why)
        extra: dict[str, Any] = {"countdown": delay, "headers": all_headers}
        if queue:
            extra["queue"] = queue
        sig = task.signature_from_request(request, **extra)
        # Straight to Celery: the submit path's etcd check must not block
        # deferring a job exactly when etcd is down.
        try:
            CeleryTask.apply_async(task, sig.args, sig.kwargs, **sig.options)
        except Exception as exc:  # noqa: BLE001 - broker trouble of any kind
            # Could not re-publish: hand this very delivery back instead.
            logger.warning("ares: job %s: re-publish failed (%s); "
                           "requeueing the delivery", request.id, exc)
            raise Reject(reason=why, requeue=True) from exc
        raise Ignore()
