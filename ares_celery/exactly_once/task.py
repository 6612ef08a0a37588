"""The task base class behind ``@ares.task``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from celery import Task

from ..errors import ConfigurationError, LeaseLost
from . import context

if TYPE_CHECKING:
    from celery.result import AsyncResult, EagerResult

    from .eager import EagerRuntime
    from .execution import JobRuntime
    from .submission import Route, Submitter

#: Celery's builtin tasks that call a task's body in a loop inside one
#: worker task, outside the worker's request handling: no lease per item.
MAP_TASKS = frozenset({"celery.map", "celery.starmap", "celery.chunks"})


def refuse_looped(name: str, how: str) -> ConfigurationError:
    return ConfigurationError(
        f"{how} of {name} would run its body in a loop inside one worker "
        "task, without a lease or a fenced result per item; use "
        "group(task.s(...) for item in items).apply_async(request_id=...) "
        "instead")


class ExactlyOnceTask(Task):
    """A Celery task whose job runs once and commits once.

    ``apply_async`` accepts ``request_id=`` (the client's idempotency key);
    the body runs only while this worker holds the job's etcd lease. The
    submitter and the job runtime are handed in when ``Ares`` builds the
    app's base class, as Celery hands ``app`` to its tasks.

    Eagerly (``task_always_eager``, :meth:`apply`) the job runs in the
    calling process through the eager runtime instead: dedup, fencing
    tokens and GPU placement in memory, no Redis or etcd.
    """

    _submitter: ClassVar[Submitter]
    _runtime: ClassVar[JobRuntime]
    _eager: ClassVar[EagerRuntime]
    acks_late = True
    reject_on_worker_lost = True

    def apply_async(self, args: Any = None, kwargs: Any = None,
                    task_id: str | None = None, *, request_id: Any = None,
                    **options: Any) -> AsyncResult:
        app = self._get_app()
        if app.conf.task_always_eager:
            # Celery's eager apply_async (it serializes the arguments as a
            # message would) calls apply() again, which lets it through.
            def run(job_id: str, headers: dict[str, Any]) -> EagerResult:
                return Task.apply_async(self, args, kwargs, task_id=job_id,
                                        **dict(options, headers=headers))
            return self._eager.submit(
                self, args, kwargs, task_id, request_id,
                options.pop("headers", None), run,
                throw=bool(app.conf.task_eager_propagates),
                admit=self._admit_eager)
        return self._submitter.submit(self, args, kwargs, task_id,
                                      request_id, options,
                                      route=self._route_for(options))

    def apply(self, args: Any = None, kwargs: Any = None,
              link: Any = None, link_error: Any = None,
              task_id: str | None = None, *, request_id: Any = None,
              **options: Any) -> EagerResult:
        """Run the job here and now (Celery's ``apply``), exactly once per
        ``request_id`` and without Redis or etcd: see
        :mod:`ares_celery.exactly_once.eager`."""
        options.update(link=link, link_error=link_error)
        if self._eager.admitted(task_id):
            # The eager submission itself, or Celery's eager retry of it.
            return Task.apply(self, args, kwargs, task_id=task_id, **options)
        throw = options.get("throw")
        if throw is None:
            throw = self._get_app().conf.task_eager_propagates

        def run(job_id: str, headers: dict[str, Any]) -> EagerResult:
            return Task.apply(self, args, kwargs, task_id=job_id,
                              **dict(options, headers=headers))
        return self._eager.submit(self, args, kwargs, task_id, request_id,
                                  options.pop("headers", None), run,
                                  throw=bool(throw), admit=self._admit_eager)

    def _admit_eager(self) -> None:
        """Refuse an eager submission that production would refuse before
        publishing (GPU tasks: a request no host can ever run)."""

    def _route_for(self, options: dict[str, Any]) -> Route | None:
        """How to route this message once the submitter knows it must be
        published (None: Celery's own ``task_routes`` decide)."""
        return None

    def map(self, it: Any) -> Any:
        raise refuse_looped(self.name, "map()")

    def starmap(self, it: Any) -> Any:
        raise refuse_looped(self.name, "starmap()")

    def chunks(self, it: Any, n: int) -> Any:
        raise refuse_looped(self.name, "chunks()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            outer = self._get_app().current_task
            if outer is not None and outer.name in MAP_TASKS:
                # xmap(task.s(), ...) built by hand reaches us this way.
                raise refuse_looped(self.name, outer.name)
            return super().__call__(*args, **kwargs)
        if self.request.is_eager:
            ctx = self._eager.begin(self)
        else:
            ctx = self._runtime.begin(self)
        self._before_body(ctx)
        context.push(ctx)
        try:
            return self.run(*args, **kwargs)
        except LeaseLost as exc:
            # The body stopped itself (ctx.check()) because this worker may
            # no longer own the job (or must yield its GPUs): committing
            # that as the job's FAILURE would end a job nobody finished.
            # Hand it back instead; a newer holder commits, or this deferred
            # copy runs it again.
            self._body_stopped(ctx, exc)
        finally:
            context.pop()
            self._after_body(ctx)

    def _body_stopped(self, ctx: context.JobContext,
                      exc: LeaseLost) -> NoReturn:
        """The body raised :class:`LeaseLost` (a lost lease, a preemption):
        requeue the job without a commit."""
        self._runtime.defer(self, "lease lost during the body")

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
