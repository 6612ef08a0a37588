"""Eager mode: ares tasks run in the calling process, with no Redis or etcd.

Celery's eager mode (``task_always_eager``, ``task.apply()``) runs a task
in-process so unit tests need no broker. An exactly-once task would still
reserve its request id in Redis and lock its job in etcd; this runtime
keeps those promises in memory instead, per :class:`~ares_celery.Ares`, so
an eager test needs no service and writes nothing to real stores:

* dedup: a job is remembered by its job id (the same
  ``job_id_for(namespace, request_id)`` production derives), so the same
  request id returns the same result without running the body again, and a
  request id (or ``task_id``) reused for other work raises
  :class:`~ares_celery.errors.RequestIdConflict`;
* a job whose body raised is remembered as failed, as production commits
  its FAILURE once: a retry with the same request id gets that failure
  back (raised again under ``task_eager_propagates``), it does not run the
  body again. A submission that fails before the body starts is forgotten,
  as production rolls its reservation back;
* ``ares.current()`` works in the body: the job and request ids, a fencing
  token from an in-process counter that only grows, ``attempt`` 1, and a
  lease that is never lost.

:meth:`EagerRuntime.reset` forgets every job (the ``ares_eager`` pytest
fixture calls it around each test).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any

from celery import states
from celery.result import EagerResult
from kombu.utils.uuid import uuid

from .. import headers as wire
from ..errors import AresError, ConfigurationError, RequestIdConflict
from ..headers import header
from .context import JobContext
from .identity import name_job, submission_digest

if TYPE_CHECKING:
    from celery import Task

    from ..gpu.eager import EagerGpus

#: Runs the admitted job through Celery's eager machinery: gets the job id
#: and the message headers (with the request id), returns Celery's result.
EagerRun = Callable[[str, dict[str, Any]], EagerResult]


@dataclass
class _Job:
    """What eager mode remembers of one job."""

    task_name: str
    digest: str
    #: Set when the body is about to run: a failure after it is the job's.
    started: bool = False
    #: None while the job runs.
    result: EagerResult | None = None


class EagerRuntime:
    """In-memory dedup, fencing tokens and (through ``gpus``) GPU placement
    for the eager runs of one app's ares tasks."""

    def __init__(self, namespace: str, gpus: EagerGpus) -> None:
        self._namespace = namespace
        self.gpus = gpus
        self._guard = threading.Lock()
        #: Signalled when a job finishes or is forgotten.
        self._changed = threading.Condition(self._guard)
        self._jobs: dict[str, _Job] = {}
        self._tokens = count(1)
        self._local = threading.local()

    def reset(self) -> None:
        """Forget every eager job (fencing tokens keep growing, as they do
        in production)."""
        with self._changed:
            self._jobs.clear()
            self._changed.notify_all()

    def submit(self, task: Task, args: Any, kwargs: Any,
               task_id: str | None, request_id: Any,
               headers: dict[str, Any] | None, run: EagerRun, *,
               throw: bool, admit: Callable[[], None] | None = None,
               ) -> EagerResult:
        """Run the job once, or return what its first run gave.

        ``throw`` (``task_eager_propagates``, ``apply(throw=...)``) raises a
        remembered failure again, as the first run raised it. ``admit``
        refuses, before the job is remembered, a submission production
        would refuse before publishing (a GPU request no host can run).
        """
        if task.store_eager_result:
            raise ConfigurationError(
                f"{task.name}: task_store_eager_result=True would write eager "
                "results to the real result store; ares eager mode keeps them "
                "in memory (ares.eager), so leave it off")
        rid, job_id = self._identify(task_id, request_id)
        digest = submission_digest(task.name, args, kwargs)
        with self._changed:
            while True:
                job = self._jobs.get(job_id)
                if job is None:
                    if admit is not None:
                        admit()
                    job = self._jobs[job_id] = _Job(task.name, digest)
                    break
                self._check_same_work(job, job_id, task.name, digest, rid)
                if job.result is not None:
                    return self._replay(job_id, job.result, throw)
                if job_id in self._admitted():
                    raise AresError(
                        f"job {job_id} ({self._label(rid, job_id)}) is still "
                        "running in this thread: an eager task submitted its "
                        "own job again, and eager mode cannot wait for it")
                # Another thread runs it: wait, as production's get() would.
                self._changed.wait()
        headers = dict(headers or {})
        if rid is not None:
            headers[wire.REQUEST_ID] = rid
        self._admitted().add(job_id)
        try:
            result = run(job_id, headers)
        except BaseException as exc:
            self._settle_raised(job_id, task.name, exc)
            raise
        finally:
            self._admitted().discard(job_id)
        with self._changed:
            job.result = result
            self._changed.notify_all()
        return result

    def admitted(self, job_id: str | None) -> bool:
        """True while this thread runs ``job_id`` through :meth:`submit`
        (Celery's eager ``apply_async`` and eager retries call ``apply``
        again for a job already admitted)."""
        return job_id is not None and job_id in self._admitted()

    def begin(self, task: Task) -> JobContext:
        """The context of the eager run that is about to start its body."""
        request = task.request
        with self._guard:
            token = next(self._tokens)
            job = self._jobs.get(request.id)
            if job is not None:
                job.started = True
        return JobContext(job_id=request.id,
                          request_id=header(request, wire.REQUEST_ID),
                          fencing_token=token, task_name=task.name,
                          acquired_at=time.time(), attempt=1)

    # -- internals -------------------------------------------------------

    def _identify(self, task_id: str | None,
                  request_id: Any) -> tuple[str | None, str]:
        """The request id (validated) and job id, as production derives
        them."""
        if request_id is None:
            return None, task_id or uuid()
        return name_job(self._namespace, request_id, task_id)

    def _check_same_work(self, job: _Job, job_id: str, task_name: str,
                         digest: str, rid: str | None) -> None:
        label = self._label(rid, job_id)
        if job.task_name != task_name:
            raise RequestIdConflict(
                f"{label} already names job {job_id} of task "
                f"{job.task_name!r}, not {task_name!r}; use a new "
                f"{'request id' if rid else 'task id'} for different work")
        if job.digest != digest:
            raise RequestIdConflict(
                f"{label} already names job {job_id} of task {task_name!r} "
                "with different arguments; use a new "
                f"{'request id' if rid else 'task id'} for different work")

    def _settle_raised(self, job_id: str, task_name: str,
                       exc: BaseException) -> None:
        """A run that raised: remembered as failed if its body started (as
        production commits FAILURE), forgotten if it never did."""
        with self._changed:
            self._changed.notify_all()
            job = self._jobs.get(job_id)
            if job is None or job.result is not None:
                return
            if not job.started:
                del self._jobs[job_id]
                return
            job.result = EagerResult(
                job_id, exc, states.FAILURE, name=task_name,
                traceback="".join(traceback.format_exception(exc)))

    @staticmethod
    def _replay(job_id: str, first: EagerResult, throw: bool) -> EagerResult:
        if throw and first.state in states.PROPAGATE_STATES \
                and isinstance(first.result, BaseException):
            raise first.result
        return EagerResult(job_id, first.result, first.state,
                           traceback=first.traceback, name=first.name)

    @staticmethod
    def _label(rid: str | None, job_id: str) -> str:
        return f"request_id {rid!r}" if rid is not None \
            else f"task_id {job_id!r}"

    def _admitted(self) -> set[str]:
        ids = getattr(self._local, "ids", None)
        if ids is None:
            ids = self._local.ids = set()
        return ids
