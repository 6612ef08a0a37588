"""The client side: turn ``apply_async(..., request_id=...)`` into at most
one published message per request id.

The stages run in this order, and each runs only if the one before says the
message must go out: validate -> reserve (dedup) -> route -> publish ->
mark published. Routing comes after the reservation on purpose: a retry of
a job that already exists must return it even when no host could take it
right now (its GPU workers stopped, say), and must not book GPUs for a
message it will never send. Any failure after the reservation (routing,
publishing) rolls the reservation back so the client's retry is not
blocked for the claim timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task
from kombu.exceptions import OperationalError

from .. import headers as wire
from ..errors import InvalidRequestId, RequestIdConflict, ServiceUnavailable
from ..observability.metrics import count_request
from .identity import job_id_for, submission_digest, validate_request_id

logger = logging.getLogger("ares_celery.submission")

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from ..services import Services

#: Adds routing to a message's options (queue, headers) just before it is
#: published; raises if the job has nowhere to go.
Route = Callable[[dict[str, Any]], dict[str, Any]]


class Submitter:
    def __init__(self, services: Services) -> None:
        self._services = services

    def submit(self, task: Task, args: Any, kwargs: Any,
               task_id: str | None, request_id: Any,
               options: dict[str, Any],
               route: Route | None = None) -> AsyncResult:
        services = self._services
        if request_id is None:
            services.require_etcd()
            if route is not None:
                options = route(options)
            return self._publish(task, args, kwargs, task_id, options)
        rid = validate_request_id(request_id)
        job_id = job_id_for(services.settings.namespace, rid)
        if task_id is not None and task_id != job_id:
            raise InvalidRequestId(
                f"task_id {task_id!r} contradicts request_id {rid!r} (whose "
                f"job id is {job_id}); pass only one of them")
        services.require_etcd()
        digest = submission_digest(task.name, args, kwargs)
        try:
            reservation = services.dedup.reserve(rid, job_id, task.name,
                                                 digest)
        except RequestIdConflict:
            count_request("conflict")
            raise
        count_request("new" if reservation.must_publish else "duplicate")
        if not reservation.must_publish:
            return task.AsyncResult(job_id)
        if reservation.outcome == "republish":
            logger.warning(
                "ares: job %s (request %r) was published %ss+ ago and is not "
                "committed; publishing it again in case the broker lost it",
                job_id, rid, services.settings.republish_after)
        try:
            if route is not None:
                options = route(options)
            headers = dict(options.get("headers") or {})
            headers[wire.REQUEST_ID] = rid
            result = self._publish(task, args, kwargs, job_id,
                                   dict(options, headers=headers))
        except BaseException:
            services.dedup.rollback(rid, reservation.owner)
            raise
        services.dedup.mark_published(rid, job_id, task.name, digest)
        return result

    @staticmethod
    def _publish(task: Task, args: Any, kwargs: Any, task_id: str | None,
                 options: dict[str, Any]) -> AsyncResult:
        try:
            return Task.apply_async(task, args, kwargs, task_id=task_id,
                                    **options)
        except OperationalError as exc:
            broker = task.app.conf.broker_url
            raise ServiceUnavailable(
                f"broker unreachable at {broker}: {exc}") from exc
