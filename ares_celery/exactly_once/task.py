"""The task base class behind ``@ares.task``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task

from ..errors import LeaseLost
from . import context

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from ..app import Ares


class ExactlyOnceTask(Task):
    """A Celery task whose job runs once and commits once.

    ``apply_async`` accepts ``request_id=`` (the client's idempotency key);
    the body runs only while this worker holds the job's etcd lease.
    """

    _ares: ClassVar[Ares]
    acks_late = True
    reject_on_worker_lost = True

    def apply_async(self, args: Any = None, kwargs: Any = None,
                    task_id: str | None = None, *, request_id: Any = None,
                    **options: Any) -> AsyncResult:
        return self._ares.submitter.submit(self, args, kwargs, task_id,
                                           request_id, options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        ctx = self._ares.runtime.begin(self)
        self._before_body(ctx)
        context.push(ctx)
        try:
            return self.run(*args, **kwargs)
        except LeaseLost:
            # The body stopped itself (ctx.check()) because this worker may
            # no longer own the job: committing that as the job's FAILURE
            # would end a job nobody finished. Hand it back instead; a newer
            # holder commits, or this deferred copy runs it again.
            self._ares.runtime.defer(self, "lease lost during the body")
            raise
        finally:
            context.pop()
            self._after_body(ctx)

    def _before_body(self, ctx: context.JobContext) -> None:
        """Hook between taking the lease and running the body."""

    def _after_body(self, ctx: context.JobContext) -> None:
        """Hook after the body, before the result is committed."""
