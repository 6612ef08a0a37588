"""Request ids and the job ids derived from them.

The job id is a pure function of the namespace and the request id (uuid5),
so a client retry names the same job even if Redis lost every dedup key:
layers 2 and 3 then still recognise it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from ..errors import InvalidRequestId
from ..keys import Keys

__all__ = ["Keys", "job_id_for", "name_job", "submission_digest",
           "validate_request_id"]

MAX_REQUEST_ID_LENGTH = 256

#: Fixed namespace for uuid5; changing it would re-key every job.
JOB_ID_NAMESPACE = uuid.UUID("6f3c7a52-6c1e-5c5b-9a53-a7e5c0d1e2f4")


def validate_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str):
        raise InvalidRequestId(
            f"request_id must be a str, got {type(request_id).__name__}")
    if not request_id.strip():
        raise InvalidRequestId("request_id must not be empty or blank")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequestId(
            f"request_id is {len(request_id)} characters long; "
            f"the limit is {MAX_REQUEST_ID_LENGTH}")
    if any(ord(ch) < 32 for ch in request_id):
        raise InvalidRequestId("request_id must not contain control characters")
    return request_id


def job_id_for(namespace: str, request_id: str) -> str:
    """The job (Celery task) id every submission of ``request_id`` gets."""
    return str(uuid.uuid5(JOB_ID_NAMESPACE, f"{namespace}\x00{request_id}"))


def name_job(namespace: str, request_id: Any,
             task_id: str | None) -> tuple[str, str]:
    """``(request id, job id)`` of a submission with a request id; a
    ``task_id`` given too must be that job id (one name per job)."""
    rid = validate_request_id(request_id)
    job_id = job_id_for(namespace, rid)
    if task_id is not None and task_id != job_id:
        raise InvalidRequestId(
            f"task_id {task_id!r} contradicts request_id {rid!r} (whose "
            f"job id is {job_id}); pass only one of them")
    return rid, job_id


def submission_digest(task_name: str, args: Any, kwargs: Any) -> str:
    """Fingerprint of what was asked, to catch a request id reused for
    different work (like an HTTP idempotency key sent with another body)."""
    payload = json.dumps([task_name, list(args or ()), kwargs or {}],
                         sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
