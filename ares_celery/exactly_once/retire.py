"""Retiring a job on purpose: ``celery ares forget`` and
``AsyncResult.forget()``.

Within its dedup window a request id names one job, and once that job is
final (committed SUCCESS or FAILURE, or REVOKED) every retry returns it. An
operator who wants the work done again retires the job: its dedup record,
its result and commit marker, its etcd job record and attempt count go, so
the next submission with the same request id publishes the same job id
again and it runs from attempt 1.

Retiring is refused while a live holder has the job's lock (the job is
running: retiring it would let a second copy run beside it). The lock check
and the etcd deletions are one Txn, so a holder that takes the lock
meanwhile makes the retire fail instead of racing it. The fence (the
highest token a holder registered) stays: a zombie of an earlier tenure is
still rejected when the job runs again.

Workers remember revoked ids in memory (``celery.worker.state.revoked``)
for hours; a retired job would be marked REVOKED again by any worker that
saw the revoke. Retiring therefore broadcasts the ``ares_unrevoke``
remote-control command (:mod:`.control`) and waits briefly for the replies.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from .. import headers as wire
from ..backends.store import FencedStore
from ..clients.etcd import KeyValue, cmp_create_revision, cmp_version, op_delete
from ..errors import JobStillHeld
from ..services import Services
from ..settings import AresSettings
from .control import UNREVOKE

logger = logging.getLogger(__name__)

#: How long a retire waits for the holder of a job that is already
#: committed to drop its lock and record (they go lazily, within a second).
CLEANUP_WAIT_S = 5.0

#: How long a retire waits for workers to confirm they forgot a revoke.
BROADCAST_TIMEOUT_S = 1.0


@dataclass
class Retirement:
    """What a retire found and removed."""

    job_id: str
    request_id: str | None
    #: The committed state that was retired (SUCCESS, FAILURE, REVOKED...).
    state: str | None = None
    #: What was there and is gone now, in words.
    removed: list[str] = field(default_factory=list)
    #: Workers that had the job id in their revoked set and dropped it.
    unrevoked_on: list[str] = field(default_factory=list)
    #: Workers that answered the broadcast at all.
    answered: int = 0
    #: Why the broadcast failed, if it did (the stores were retired anyway).
    broadcast_error: str | None = None

    @property
    def found(self) -> bool:
        return bool(self.removed or self.unrevoked_on)


def _holder_of(kv: KeyValue | None) -> dict[str, Any]:
    if kv is None:
        return {}
    try:
        value = json.loads(kv.value or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('host', '?')}:{holder.get('pid', '?')}"


class JobRetirer:
    """Retires jobs of one app: its stores, its etcd, its workers."""

    def __init__(self, services: Services, store: FencedStore,
                 control: Any, cleanup_wait: float = CLEANUP_WAIT_S,
                 broadcast_timeout: float = BROADCAST_TIMEOUT_S) -> None:
        self._services = services
        self._store = store
        self._control = control
        self._cleanup_wait = cleanup_wait
        self._broadcast_timeout = broadcast_timeout

    def retire(self, job_id: str, request_id: str | None = None) -> Retirement:
        """Retire ``job_id`` (and its request id, given or found in the
        commit marker or the job record); raise :class:`JobStillHeld` while
        a live holder has its lock."""
        services = self._services
        keys, etcd = services.keys, services.etcd
        marker = self._store.commit_record(job_id)
        record = etcd.get(keys.job_record(job_id))
        rid = request_id or marker.get("request") or \
            self._recorded_request_id(record)
        out = Retirement(job_id, rid or None, marker.get("state") or None)
        for _ in range(3):
            lock, record = self._wait_for_holder(job_id, bool(marker), record)
            ops = [op_delete(keys.job_record(job_id)),
                   op_delete(keys.released(job_id)),
                   op_delete(keys.checkpoint_record(job_id)),
                   *self._store.retire_ops(job_id)]
            compare = [cmp_create_revision(
                keys.lock(job_id), lock.create_revision if lock else 0)]
            if lock is not None:
                ops.append(op_delete(keys.lock(job_id)))
            if record is not None:
                compare.append(cmp_version(keys.job_record(job_id),
                                           record.version))
            if etcd.txn(compare=compare, success=ops).succeeded:
                break
            record = etcd.get(keys.job_record(job_id))  # changed: look again
        else:
            raise JobStillHeld(
                f"job {job_id} kept changing hands while being retired; a "
                "worker is running it: try again once it is done")
        if lock is not None:
            out.removed.append(f"stale lock (token {lock.create_revision})")
        if record is not None:
            out.removed.append(f"job record ({record.version} holder(s))")
        # A rerun must start fresh, not from a checkpoint of the old run
        # (left behind when its holder died between commit and cleanup).
        if services.redis.delete(keys.checkpoint(job_id)):
            out.removed.append("checkpoint")
        if marker:
            self._store.retire_commit(job_id)
            out.removed.append(f"{marker.get('state') or 'committed'} result "
                               "and commit marker")
        if rid and services.dedup.forget(rid):
            out.removed.append(f"dedup record of request {rid!r}")
        self._unrevoke(out)
        logger.warning("ares: job %s (request %r) retired: %s", job_id, rid,
                       ", ".join(out.removed) or "nothing stored")
        return out

    # -- internals -------------------------------------------------------

    @staticmethod
    def _recorded_request_id(record: KeyValue | None) -> str | None:
        """The request id in the job's etcd record (the message it takes to
        publish the job again carries it as a header)."""
        try:
            message = json.loads(record.value) if record is not None else {}
            headers = (message.get("options") or {}).get("headers") or {}
        except (ValueError, AttributeError):
            return None
        return headers.get(wire.REQUEST_ID)

    def _alive(self, lease: int) -> bool:
        return bool(lease) and self._services.etcd.lease_ttl(lease) > 0

    def _wait_for_holder(self, job_id: str, committed: bool,
                         record: KeyValue | None
                         ) -> tuple[KeyValue | None, KeyValue | None]:
        """The job's lock (None if free) and record, once no live holder is
        left. A holder of an uncommitted job is running it: refuse. A
        holder of a committed job only has its lock and record still to
        drop (lazily, within a second): wait for that, with a deadline."""
        keys, etcd = self._services.keys, self._services.etcd
        deadline = time.monotonic() + self._cleanup_wait
        pause = 0.02
        while True:
            lock = etcd.get(keys.lock(job_id))
            holder = _holder_of(lock)
            live_lock = lock is not None and self._alive(lock.lease)
            if live_lock and not committed:
                raise JobStillHeld(
                    f"refusing: job {job_id} is running: its lock is held by "
                    f"{_describe(holder)} (lease {lock.lease:x}, token "
                    f"{lock.create_revision}); retire it once it is done, "
                    "or revoke it with terminate=True first")
            cleaning = live_lock
            if not cleaning and committed and record is not None:
                last = _holder_of(record).get("holder") or {}
                cleaning = self._alive(int(last.get("lease") or 0))
                holder = last
            if not cleaning:
                return lock, record
            if time.monotonic() > deadline:
                raise JobStillHeld(
                    f"refusing: job {job_id} is committed but its holder "
                    f"{_describe(holder)} has not let go of it after "
                    f"{self._cleanup_wait:.0f}s; try again")
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
            record = etcd.get(keys.job_record(job_id))

    def _unrevoke(self, out: Retirement) -> None:
        try:
            replies = self._control.broadcast(
                UNREVOKE, arguments={"job_ids": [out.job_id]}, reply=True,
                timeout=self._broadcast_timeout) or []
        except Exception as exc:  # noqa: BLE001 - broker trouble of any kind
            out.broadcast_error = str(exc)
            logger.warning("ares: could not tell workers to forget a revoke "
                           "of job %s: %s", out.job_id, exc)
            return
        for reply in replies:
            for worker, answer in reply.items():
                out.answered += 1
                if (answer or {}).get("forgotten"):
                    out.unrevoked_on.append(worker)


_RETIRERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def retire_forgotten(app: Celery, store: FencedStore, job_id: str) -> None:
    """What a fenced store's ``forget`` does: retire the whole job.

    The store gets only the app (Celery builds it from a URL), so it gets
    its own lazily built connections, like the etcd store's gateway.
    """
    retirer = _RETIRERS.get(store)
    if retirer is None:
        services = Services(AresSettings.from_conf(app.conf),
                            marker_in_etcd=store.marker_in_etcd)
        retirer = _RETIRERS[store] = JobRetirer(services, store, app.control)
    retirer.retire(job_id)
