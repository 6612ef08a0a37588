"""The client side: turn ``apply_async(..., request_id=...)`` into at most
one published message per request id.

The stages run in this order, and each runs only if the one before says the
message must go out: validate -> reserve (dedup) -> route -> publish ->
mark published (queued to a writer thread: the caller does not wait).
Routing comes after the reservation on purpose: a retry of a job that
already exists must return it even when no host could take it right now
(its GPU workers stopped, say), and must not book GPUs for a message it
will never send. Any failure after the reservation (routing,
publishing) rolls the reservation back so the client's retry is not
blocked for the claim timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from kombu.exceptions import OperationalError

from .. import headers as wire
from ..clients.redis import redact_url
from ..errors import (
    ConfigurationError,
    RequestIdConflict,
    ServiceUnavailable,
)
from ..observability.metrics import count_request
from .identity import name_job, submission_digest

logger = logging.getLogger("ares_celery.submission")

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from ..services import Services

#: Adds routing to a message's options (queue, headers) just before it is
#: published; raises if the job has nowhere to go.
Route = Callable[[dict[str, Any]], dict[str, Any]]


#: Publishes a message: ``(args, kwargs, task_id, options)``.
Publish = Callable[[Any, Any, "str | None", dict[str, Any]], "AsyncResult"]

#: Request-id space of jobs named by an explicit ``task_id=``: such a job is
#: deduped by its task id (same arguments: the same job; others: conflict).
_TASK_ID_PREFIX = "task-id:"


class Submitter:
    """The one way a message of an exactly-once job gets published: by
    ``apply_async`` on an ares task, and by ``app.send_task`` with a
    ``request_id`` (clients that submit by name, without the task code)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    @property
    def namespace(self) -> str:
        return self._services.settings.namespace

    def submit(self, task: Task, args: Any, kwargs: Any,
               task_id: str | None, request_id: Any,
               options: dict[str, Any],
               route: Route | None = None) -> AsyncResult:
        check_call_serializer(task.name, options)

        def publish(args: Any, kwargs: Any, task_id: str | None,
                    options: dict[str, Any]) -> AsyncResult:
            return self._publish(task, args, kwargs, task_id, options)

        if request_id is None and task_id is not None \
                and not _is_own_retry(task, task_id):
            return self._submit_named(task.name, args, kwargs, task_id,
                                      None, options, publish, route,
                                      task.AsyncResult)
        if request_id is None:
            self._services.require_etcd()
            if route is not None:
                options = route(options)
            return publish(args, kwargs, task_id, options)
        return self._submit_named(task.name, args, kwargs, task_id,
                                  request_id, options, publish, route,
                                  task.AsyncResult)

    def send_task(self, app: Celery, name: str, args: Any, kwargs: Any,
                  task_id: str | None, request_id: Any,
                  options: dict[str, Any], publish: Publish) -> AsyncResult:
        """``app.send_task(name, ..., request_id=...)``: the same dedup as
        ``apply_async``, for a task this process may not even import (its
        worker takes the lease; a GPU job that lands on the wrong queue is
        re-routed by the worker)."""
        check_call_serializer(name, options)
        return self._submit_named(
            name, args, kwargs, task_id, request_id, options, publish, None,
            lambda job_id: app.AsyncResult(job_id, task_name=name))

    def _submit_named(self, name: str, args: Any, kwargs: Any,
                      task_id: str | None, request_id: Any,
                      options: dict[str, Any], publish: Publish,
                      route: Route | None,
                      result_for: Callable[[str], AsyncResult]
                      ) -> AsyncResult:
        services = self._services
        if request_id is None:
            # An explicit task id names the job like a request id does.
            rid, job_id = _TASK_ID_PREFIX + str(task_id), str(task_id)
            shown = f"task_id {task_id!r}"
        else:
            rid, job_id = name_job(services.settings.namespace, request_id,
                                   task_id)
            shown = f"request_id {rid!r}"
        services.require_etcd()
        digest = submission_digest(name, args, kwargs)
        try:
            reservation = services.dedup.reserve(rid, job_id, name, digest,
                                                 label=shown)
        except RequestIdConflict:
            count_request("conflict")
            raise
        count_request("new" if reservation.must_publish else "duplicate")
        if not reservation.must_publish:
            return result_for(job_id)
        if reservation.outcome == "republish" \
                and reservation.reason == "purged":
            logger.warning(
                "ares: job %s (%s) was published before the last purge and "
                "is not committed; publishing it again", job_id, shown)
        elif reservation.outcome == "republish":
            logger.warning(
                "ares: job %s (%s) was published %ss+ ago and is not "
                "committed; publishing it again in case the broker lost it",
                job_id, shown, services.settings.republish_after)
        try:
            if route is not None:
                options = route(options)
            headers = dict(options.get("headers") or {})
            if request_id is not None:
                headers[wire.REQUEST_ID] = rid
            result = publish(args, kwargs, job_id,
                             dict(options, headers=headers))
        except BaseException:
            services.dedup.rollback(rid, reservation.owner)
            raise
        # Off this thread: nothing here needs its answer (a duplicate
        # waits for it; a lost one makes a retry publish again).
        services.dedup.mark_later(rid, job_id, name, digest)
        return result

    @staticmethod
    def _publish(task: Task, args: Any, kwargs: Any, task_id: str | None,
                 options: dict[str, Any]) -> AsyncResult:
        try:
            return Task.apply_async(task, args, kwargs, task_id=task_id,
                                    **options)
        except OperationalError as exc:
            raise broker_unreachable(task.app, exc) from exc


def broker_unreachable(app: Any, exc: Exception) -> ServiceUnavailable:
    broker = redact_url(str(app.conf.broker_url))
    return ServiceUnavailable(
        f"broker unreachable at {broker}: {exc}; is it running, and is "
        "broker_url right?")


def check_call_serializer(name: str, options: dict[str, Any]) -> None:
    """A per-call ``serializer=`` other than JSON would publish a message
    the workers refuse to decode: the job would stay PENDING forever and
    every retry of its request id would return the stuck job."""
    serializer = options.get("serializer")
    if serializer not in (None, "json"):
        raise ConfigurationError(
            f"{name}: serializer={serializer!r} per call is refused: "
            "exactly-once jobs are JSON only (workers accept nothing else); "
            "drop the serializer option")


def _is_own_retry(task: Task, task_id: str) -> bool:
    """``self.retry()`` re-publishes the running job under its own id; that
    is the job continuing, not a new submission naming it."""
    request = task.request
    return not request.called_directly and request.id == task_id
