"""The task base class behind ``@ares.task``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task

from ..errors import LeaseLost
from . import context

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .execution import JobRuntime
    from .submission import Route, Submitter


class ExactlyOnceTask(Task):
    """A Celery task whose job runs once and commits once.

    ``apply_async`` accepts ``request_id=`` (the client's idempotency key);
    the body runs only while this worker holds the job's etcd lease. The
    submitter and the job runtime are handed in when ``Ares`` builds the
    app's base class, as Celery hands ``app`` to its tasks.
    """

    _submitter: ClassVar[Submitter]
    _runtime: ClassVar[JobRuntime]
    acks_late = True
    reject_on_worker_lost = True

    def apply_async(self, args: Any = None, kwargs: Any = None,
                    task_id: str | None = None, *, request_id: Any = None,
                    **options: Any) -> AsyncResult:
        return self._submitter.submit(self, args, kwargs, task_id,
                                      request_id, options,
                                      route=self._route_for(options))

    def _route_for(self, options: dict[str, Any]) -> Route | None:
        """How to route this message once the submitter knows it must be
        published (None: Celery's own ``task_routes`` decide)."""
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        ctx = self._runtime.begin(self)
        self._before_body(ctx)
        context.push(ctx)
        try:
            return self.run(*args, **kwargs)
        except LeaseLost:
            # The body stopped itself (ctx.check()) because this worker may
            # no longer own the job: committing that as the job's FAILURE
            # would end a job nobody finished. Hand it back instead; a newer
            # holder commits, or this deferred copy runs it again.
            self._runtime.defer(self, "lease lost during the body")
        finally:
            context.pop()
            self._after_body(ctx)

    def _before_body(self, ctx: context.JobContext) -> None:
        """Hook between taking the lease and running the body."""

    def _after_body(self, ctx: context.JobContext) -> None:
        """Hook after the body, before the result is committed."""

    def recovery_route(self, message: dict[str, Any]
                       ) -> tuple[str, dict[str, Any]] | None:
        """Where a recovered copy of this job's recorded ``message`` goes:
        ``(queue, extra headers)``, or None for where it went before."""
        return None

    def _finish_job(self, job_id: str) -> None:
        """After the result is stored (or the run deferred or skipped):
        give the lock back. Called from ``task_postrun``, which, unlike
        ``after_return``, also runs for deferred (ignored) deliveries."""
        self._runtime.finish(job_id)
