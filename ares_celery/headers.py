"""The message headers ares adds, named once for both sides of the wire.

The submitting client writes them and the worker reads them; keeping the
names here means neither side imports the other's module for a constant.
"""

from __future__ import annotations

from typing import Any

#: The client's idempotency key (the job id is derived from it).
REQUEST_ID = "ares_request_id"
#: How many times the job was deferred (drives the back-off).
LEASE_WAITS = "ares_lease_waits"
#: The router's decision: host, queue, planned GPUs, score.
ROUTE = "ares_route"
#: How many times a GPU job was re-routed by workers.
REROUTES = "ares_reroutes"


def header(request: Any, name: str) -> Any:
    """A custom message header, wherever this Celery version put it (on
    the request itself, or in its ``headers``)."""
    value = request.get(name) if hasattr(request, "get") else None
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value
