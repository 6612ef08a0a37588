"""A job's message as etcd keeps it, and publishing it again from there.

When a holder dies, the broker still has the job's message but will hand it
back only after its own timeout (Redis: the visibility timeout, often an
hour; RabbitMQ: when it notices the connection is gone, or never for a hung
but connected consumer). So ares keeps, in etcd, what it takes to publish
the job again: the task name, its arguments and the options Celery would
use to retry it (ids, canvas links, limits, routing, ETA), plus the ares
headers. The form is Celery's own retry signature
(:meth:`celery.app.task.Task.signature_from_request`), JSON-clean, so a
recovered job is the same job: same id, same place in its workflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery import Task as CeleryTask
from celery.app.task import Context
from celery.utils.time import maybe_iso8601
from kombu.utils.json import dumps as kombu_dumps

from .. import headers as wire

#: Headers of ours that a re-published copy must keep.
CARRIED_HEADERS = (wire.REQUEST_ID, wire.ROUTE, wire.REROUTES)

#: Options that mean nothing on a new message (they describe a delivery).
_DELIVERY_ONLY = ("redelivered", "delivery_tag", "consumer_tag",
                  "is_eager")


def job_message(task: Any, request: Any) -> dict[str, Any]:
    """What it takes to publish the job of ``request`` again (JSON-clean).

    ``request`` is the task's execution context (``task.request``) in a
    pool process, or a :class:`~celery.app.task.Context` built from a
    worker's reserved request (:func:`reserved_message`).
    """
    signature = task.signature_from_request(request)
    options = {k: v for k, v in dict(signature.options).items()
               if v is not None and k not in _DELIVERY_ONLY}
    headers = dict(options.get("headers") or {})
    for name in CARRIED_HEADERS:
        value = wire.header(request, name)
        if value is not None:
            headers[name] = value
    options["headers"] = headers
    eta = getattr(request, "eta", None)
    if eta:
        options["eta"] = eta
    return {"task": task.name, "args": list(signature.args or ()),
            "kwargs": dict(signature.kwargs or {}), "options": options}


def encode_message(message: Mapping[str, Any]) -> str:
    """JSON for etcd. A delivered message's fields are what JSON decoding
    gave Celery, so plain JSON fits; kombu's encoder covers the rest
    (datetimes, UUIDs) the way Celery reads them back."""
    try:
        return json.dumps(message, separators=(",", ":"))
    except TypeError:
        return kombu_dumps(message)


def reserved_message(request: Any) -> dict[str, Any]:
    """:func:`job_message` for a request a worker's main process holds
    (prefetched, or waiting for its ETA): its headers, payload and
    delivery info make the same context a pool process would see."""
    _, _, embed = request._payload  # noqa: SLF001 - Celery's decoded body
    context = Context({**request.request_dict, **(embed or {}),
                       "delivery_info": request.delivery_info})
    return job_message(request.task, context)


def publish_message(app: Celery, message: Mapping[str, Any],
                    queue: str | None = None,
                    headers: Mapping[str, Any] | None = None) -> None:
    """Publish a recorded message again (same task id), straight to
    Celery: no dedup (it is the same job), no routing unless ``queue``."""
    options = dict(message.get("options") or {})
    options["headers"] = {**(options.get("headers") or {}), **(headers or {})}
    for name in ("eta", "expires"):
        if isinstance(options.get(name), str):
            options[name] = maybe_iso8601(options[name])
    if queue:
        for name in ("exchange", "routing_key", "queue"):
            options.pop(name, None)
        options["queue"] = queue
    task = app.tasks.get(message["task"])
    args, kwargs = message.get("args") or (), message.get("kwargs") or {}
    if task is None:
        app.send_task(message["task"], args, kwargs, **options)
    else:
        CeleryTask.apply_async(task, args, kwargs, **options)
