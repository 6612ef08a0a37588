"""Everything ares has recorded about one job, read for ``celery ares job``.

Celery reports any id it has never seen as PENDING, so a mistyped id
looked like a job waiting to run. Reading every record ares keeps (the
dedup record, the lock, the fence and commit hash, the etcd job record,
a worker's reservation, the checkpoint, the stored result) lets the command tell "known,
not started yet" from "ares knows nothing about this".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from . import headers as wire
from .clients.etcd import KeyValue
from .exactly_once.checkpoints import Checkpoint, checkpoint_store
from .services import Services


def _text(mapping: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in mapping.items()}


@dataclass(frozen=True)
class JobView:
    """One job as ares sees it (all reads are taken once, not live)."""

    job_id: str
    request_id: str | None
    dedup: dict[str, str] = field(default_factory=dict)
    lock: KeyValue | None = None
    holder: dict[str, Any] = field(default_factory=dict)
    ttl: int = -1
    attempts: int = 0
    record: dict[str, str] = field(default_factory=dict)
    job_record: bool = False
    reserved: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    #: The job's latest checkpoint (kept until its result is committed).
    checkpoint: Checkpoint | None = None
    #: GPU jobs: the priority the job's message carries (kept in its etcd
    #: record until the commit), None if unknown.
    priority: int | None = None

    @property
    def stored_result(self) -> bool:
        """A result backend entry exists (Celery says PENDING for none)."""
        return self.meta.get("status", "PENDING") != "PENDING" \
            or self.meta.get("date_done") is not None

    @property
    def known(self) -> bool:
        """Whether any ares record names this job."""
        return bool(self.dedup or self.lock is not None or self.record
                    or self.job_record or self.reserved
                    or self.stored_result or self.checkpoint is not None)


def read_job(services: Services, backend: Any, job_id: str,
             request_id: str | None) -> JobView:
    """Read every record of ``job_id`` (and of ``request_id``'s dedup
    entry); raises :class:`~ares_celery.errors.ServiceUnavailable` if a
    store cannot be reached. Worker reservations are scanned only when
    nothing else names the job, and so is, for a job id with no request
    id, the scan of dedup records that finds its request id."""
    etcd, keys, redis = services.etcd, services.keys, services.redis
    lock = etcd.get(keys.lock(job_id))
    record = etcd.get(keys.job_record(job_id))
    holder: dict[str, Any] = {}
    ttl = -1
    if lock is not None:
        holder = json.loads(lock.value or b"{}")
        ttl = etcd.lease_ttl(lock.lease) if lock.lease else -1
    view = JobView(
        job_id=job_id, request_id=request_id,
        dedup=_text(redis.hgetall(keys.dedup(request_id)))
        if request_id else {},
        lock=lock, holder=holder, ttl=ttl,
        attempts=services.locks.attempts(job_id),
        record=_text(redis.hgetall(keys.job(job_id))),
        job_record=record is not None,
        priority=_priority(record),
        meta=backend.get_task_meta(job_id),
        checkpoint=checkpoint_store(backend, services).load(job_id))
    if view.known:
        return view
    if request_id is None:
        found = _request_id_of(redis, keys.dedup(""), job_id)
        if found is not None:
            rid, record = found
            return replace(view, request_id=rid, dedup=record)
    reserved, _ = etcd.range_prefix_with_revision(keys.reserved_prefix(),
                                                  keys_only=True)
    mine = any(kv.key.endswith(f"/{job_id}") for kv in reserved)
    return replace(view, reserved=True) if mine else view


def _priority(record: KeyValue | None) -> int | None:
    """The priority in a job record's message (its GPU route header)."""
    try:
        message = json.loads(record.value) if record is not None else {}
        route = message["options"]["headers"][wire.ROUTE]
        priority = route["priority"]
    except (ValueError, KeyError, TypeError):
        return None
    return priority if isinstance(priority, int) else None


def _request_id_of(redis: Any, prefix: str, job_id: str,
                   batch: int = 500) -> tuple[str, dict[str, str]] | None:
    """The request id (and dedup record) whose job is ``job_id``.

    A job submitted with a request id and still queued has no record under
    its job id yet, only the dedup record under the request id; asked by
    job id, scan those records (``SCAN``, never ``KEYS``: it does not
    block Redis). Costs one pass over the namespace's dedup records, so it
    runs only when nothing else names the job.
    """
    keys: list[bytes] = []

    def check() -> tuple[str, dict[str, str]] | None:
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "job")
        for key, job in zip(keys, pipe.execute(), strict=True):
            if job is not None and job.decode() == job_id:
                return key.decode()[len(prefix):], _text(redis.hgetall(key))
        keys.clear()
        return None

    for key in redis.scan_iter(match=f"{prefix}*", count=batch):
        keys.append(key)
        if len(keys) >= batch and (found := check()) is not None:
            return found
    return check() if keys else None
