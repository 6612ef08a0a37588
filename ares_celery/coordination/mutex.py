"""Layer 2b and 3: the per-job lock in etcd and its fencing token.

Shaped like etcd's ``client/v3/concurrency/mutex.go``: the lock borrows the
session's lease, and a held lock hands out its *ownership compare* (the lock
key's create revision equals our token, as ``Mutex.IsOwner()`` does) for
callers to put in their own transactions, which is how the etcd result
store fences a commit. Taking the lock is one etcd transaction that creates
the lock key only if it does not exist, attached to the process lease. The
revision of that transaction is the fencing token: etcd revisions only
grow, so a later holder always has a larger token than any earlier one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from itertools import islice, takewhile
from typing import Literal

from ..clients.etcd import (
    MAX_TXN_OPS,
    EtcdGateway,
    KeyValue,
    cmp_create_revision,
    cmp_value,
    op_delete,
    op_put,
    op_range,
)
from ..errors import ServiceUnavailable
from ..keys import Keys
from .session import LeaseGrant

logger = logging.getLogger(__name__)

#: Locks of committed jobs are deleted with a later lock Txn, at most this
#: many at a time, or by a background thread (it looks this often). Each
#: job is 3 deletes; with the lock Txn's own 4 ops a batch stays within
#: ``MAX_TXN_OPS`` (32 jobs: 100 ops; 64 were refused with INVALID_ARGUMENT).
RELEASE_BATCH = MAX_TXN_OPS // 4
RELEASE_IDLE_S = 0.5

#: A committed job's lock and record are kept at least this long after its
#: commit, so that a "committed?" read sent just before a lock Txn (see
#: ``JobRuntime.begin``) and answered "no" can be trusted when the Txn
#: found neither: the commit it missed would have happened after the read
#: was sent, and the keys would still be there for at least this long.
#: (The background thread deleted them after this long before, too.)
COMMITTED_KEYS_KEPT_S = RELEASE_IDLE_S

#: A read sent before a lock Txn is trusted only if the Txn answered
#: within this long of the read being sent (a few milliseconds, normally):
#: well inside ``COMMITTED_KEYS_KEPT_S``, whatever the hosts' clocks do.
ALONGSIDE_TRUSTED_S = COMMITTED_KEYS_KEPT_S / 5

#: Each process puts job records on a fresh shared lease this often.
RECORDS_LEASE_EVERY_S = 3600

Status = Literal["acquired", "held", "committed"]


def ownership_compare(lock_key: str, token: int) -> dict:
    """The compare that holds only while the lock taken at ``token`` is
    still there: the one proof of ownership every fenced write uses."""
    return cmp_create_revision(lock_key, token)


@dataclass(frozen=True)
class JobLock:
    """A lock this process took: its fencing token, the compare that proves
    it is still ours, and the way to give it back."""

    job_id: str
    key: str
    token: int
    locks: JobLocks = field(repr=False, compare=False)

    def is_owner(self) -> dict:
        """The ownership compare, for a caller's own transaction."""
        return ownership_compare(self.key, self.token)

    def release(self) -> bool:
        """Delete the lock only if it is still ours."""
        return self.locks.release(self.job_id, self.token)


@dataclass(frozen=True)
class LockOutcome:
    status: Status
    token: int = 0
    holder: dict | None = None
    holder_lease: int = 0
    #: The held lock, when ``status == "acquired"``.
    lock: JobLock | None = None
    #: This holder's attempt at the job: 1 + the earlier holders whose
    #: tenure ended without a commit or a deliberate release (they died,
    #: hung or were cut off).
    attempt: int = 1
    #: Who held the job before (host, pid, worker), if anyone did.
    previous_holder: dict | None = None
    #: The lock Txn created the job's record: nobody held this job before
    #: (within the record's lifetime), so no older fencing token exists
    #: and the store need not raise a fence (see ``JobRuntime.begin``).
    first: bool = False


def attempt_number(record: KeyValue | None, released: KeyValue | None) -> int:
    """Attempts so far, from the versions etcd keeps: every lock taken put
    the job record once, every deliberate release put the released key
    once, so the tenures that ended otherwise are the difference."""
    taken = record.version if record is not None else 0
    given_back = released.version if released is not None else 0
    return max(taken - given_back, 0) + 1


def _holder(record: KeyValue | None) -> dict | None:
    if record is None:
        return None
    try:
        return json.loads(record.value).get("holder")
    except (ValueError, AttributeError):
        return None


class JobLocks:
    """Acquire and release per-job locks; check the etcd commit marker.

    ``check_done_marker``: the result store keeps its commit marker in etcd
    (see :attr:`~ares_celery.backends.store.FencedStore.marker_in_etcd`),
    so the lock Txn reads it and a committed job is never locked again.

    Every lock taken also puts the job's *record* (what it takes to publish
    the job again, and who holds it) in the same Txn. The record is not on
    the holder's lease: it outlives a holder that dies, so a recoverer can
    re-dispatch the job, and its version counts the holders. Records hang
    on a shared lease of ``records_ttl`` seconds (granted once an hour by
    each process) so abandoned ones expire; a committed job's record goes
    with its lock.
    """

    def __init__(self, etcd: EtcdGateway, keys: Keys,
                 check_done_marker: bool = False,
                 records_ttl: int = 90000) -> None:
        self._etcd = etcd
        self._keys = keys
        self._check_done = check_done_marker
        self._records_ttl = records_ttl
        self._records_lease: tuple[int, float] | None = None
        self._host = socket.gethostname()
        # Job id -> when it committed, oldest first (dicts keep order): its
        # lock, record and released key are deleted lazily.
        self._pending: dict[str, float] = {}
        self._pending_guard = threading.Lock()
        # (lock key, the compare that proves the lock is still ours) for
        # deletes etcd did not answer (a release: our token; a lock Txn whose
        # reply was lost: our value). Retried in the background. One key can
        # have several (two lock Txns in a row whose replies were lost: only
        # the first may have landed, and its value must still be deleted).
        # Unlike _pending these jobs are NOT committed.
        self._guarded: list[tuple[str, dict]] = []
        self._releaser: threading.Thread | None = None
        self._releaser_guard = threading.Lock()
        # Held from taking a batch of committed jobs to its delete being
        # answered, so flush() cannot return while the background thread
        # still has a batch in flight (taken, not yet deleted).
        self._deleting = threading.Lock()

    def records_lease(self) -> int:
        """The lease job records and released keys are put on: one per
        process per hour, never kept alive, TTL ``records_ttl``."""
        now = time.monotonic()
        if self._records_lease is None or \
                now - self._records_lease[1] > RECORDS_LEASE_EVERY_S:
            lease_id = self._etcd.grant_lease(self._records_ttl)
            self._records_lease = (lease_id, now)
        return self._records_lease[0]

    def acquire(self, job_id: str, grant: LeaseGrant,
                record: str = "{}") -> LockOutcome:
        """Take the job's lock on ``grant``'s lease and put its ``record``
        (a JSON object; the holder is added) in the same Txn."""
        lock_key = self._keys.lock(job_id)
        if self._is_pending(job_id):
            # This process committed the job; its lock just has not been
            # deleted yet. A redelivered message is simply skipped.
            return LockOutcome("committed")
        records_lease = self.records_lease()
        nonce = uuid.uuid4().hex
        holder = {"host": self._host, "pid": os.getpid(),
                  "lease": grant.lease_id, "nonce": nonce}
        value = json.dumps(holder)
        # Spliced, not re-encoded: the record is already JSON.
        record_value = (f'{{"holder":{value},"at":{time.time()},'
                        f'{record.strip()[1:]}' if record.strip() != "{}"
                        else f'{{"holder":{value},"at":{time.time()}}}')
        record_key = self._keys.job_record(job_id)
        released_key = self._keys.released(job_id)
        reads = [op_range(self._keys.done(job_id))] if self._check_done else []
        # Locks of jobs this process committed are deleted in the same Txn.
        discard = self._take_pending(
            RELEASE_BATCH, exclude=job_id,
            older_than=time.monotonic() - COMMITTED_KEYS_KEPT_S)
        deletes = [op for job in discard for op in self._cleanup_ops(job)]
        try:
            result = self._etcd.txn(
                compare=[cmp_create_revision(lock_key, 0)],
                success=[op_put(lock_key, value, grant.lease_id),
                         op_put(record_key, record_value, records_lease,
                                prev_kv=True),
                         op_range(released_key), *reads, *deletes],
                failure=[op_range(lock_key), *reads, *deletes],
            )
        except ServiceUnavailable:
            self._restore_pending(discard)
            # The Txn may have been applied with only its reply lost. The
            # lock would then hang on a lease this process keeps alive, and
            # nobody (this process included: its next try has a new nonce)
            # would ever take the job. Delete it once etcd answers, if it
            # still carries exactly our value.
            self._delete_later(lock_key, cmp_value(lock_key, value))
            raise
        ranges = result.ranges()
        if result.succeeded:
            token = result.revision
            previous = result.previous()[1]
            released = ranges[0][0] if ranges[0] else None
            if self._check_done and ranges[1]:
                try:
                    self.release(job_id, token)
                except ServiceUnavailable:
                    self.release_later(job_id, token)
                return LockOutcome("committed", token)
            return LockOutcome(
                "acquired", token, lock=JobLock(job_id, lock_key, token, self),
                attempt=attempt_number(previous, released),
                previous_holder=_holder(previous), first=previous is None)
        lock_kvs = ranges[0] if ranges else []
        if self._check_done and len(ranges) > 1 and ranges[1]:
            return LockOutcome("committed")
        if not lock_kvs:  # released between compare and read: try again
            return self.acquire(job_id, grant, record)
        kv = lock_kvs[0]
        try:
            holder = json.loads(kv.value)
        except ValueError:
            holder = {"raw": kv.value.decode(errors="replace")}
        if holder.get("nonce") == nonce:
            # Our own put went through on a connection that then failed.
            token = kv.create_revision
            return LockOutcome("acquired", token,
                               lock=JobLock(job_id, lock_key, token, self),
                               attempt=max(self.attempts(job_id), 1))
        return LockOutcome("held", holder=holder, holder_lease=kv.lease)

    def attempts(self, job_id: str) -> int:
        """How many holders took the job and did not give it back (the
        current one included), read from etcd (``celery ares job``; a lost
        lock reply)."""
        result = self._etcd.txn(compare=[], success=[
            op_range(self._keys.job_record(job_id)),
            op_range(self._keys.released(job_id))])
        record, released = (r[0] if r else None for r in result.ranges())
        return attempt_number(record, released) - 1

    def release(self, job_id: str, token: int) -> bool:
        """Give the lock back deliberately (no commit: a retry, a re-route,
        a deferral): delete it only if it is still ours (same create
        revision: a plain DEL could remove the next holder's lock), and
        count the release so this tenure is not taken for a death."""
        lock_key = self._keys.lock(job_id)
        result = self._etcd.txn(
            compare=[ownership_compare(lock_key, token)],
            success=[op_delete(lock_key),
                     op_put(self._keys.released(job_id), str(token),
                            self.records_lease())])
        return result.succeeded

    def release_later(self, job_id: str, token: int) -> None:
        """Retry a release that failed because etcd was unreachable.

        The lock hangs on this process's lease, which stays alive as long as
        the process does: without a retry the job would stay locked (and
        every redelivery deferred) until the worker exits.
        """
        key = self._keys.lock(job_id)
        self._delete_later(key, ownership_compare(key, token))

    def _delete_later(self, key: str, compare: dict) -> None:
        with self._pending_guard:
            self._guarded.append((key, compare))
        self._ensure_releaser()

    def discard_after_commit(self, job_id: str) -> None:
        """Drop a committed job's lock without a round trip of its own.

        Once the result is committed nobody needs the lock (any later
        message for the job is skipped as committed), so an unconditional
        delete is safe, and it rides along in one of this process's lock
        Txns once ``COMMITTED_KEYS_KEPT_S`` have passed; a background thread
        deletes what waited longer (an idle worker). If the process dies
        first, the lock goes with its lease.
        """
        with self._pending_guard:
            self._pending.setdefault(job_id, time.monotonic())
        self._ensure_releaser()

    def _cleanup_ops(self, job_id: str) -> list[dict]:
        """A committed job's keys: nobody needs them any more."""
        return [op_delete(self._keys.lock(job_id)),
                op_delete(self._keys.job_record(job_id)),
                op_delete(self._keys.released(job_id))]

    def _ensure_releaser(self) -> None:
        if self._releaser is None or not self._releaser.is_alive():
            with self._releaser_guard:
                if self._releaser is None or not self._releaser.is_alive():
                    self._releaser = threading.Thread(
                        target=self._release_loop, daemon=True,
                        name="ares-lock-release")
                    self._releaser.start()

    def flush(self) -> None:
        """Delete every queued lock (worker shutdown), the youngest once
        it is ``COMMITTED_KEYS_KEPT_S`` old."""
        with self._pending_guard:
            youngest = max(self._pending.values(), default=None)
        if youngest is not None:
            time.sleep(max(0.0, youngest + COMMITTED_KEYS_KEPT_S
                           - time.monotonic()))
        while self._delete_committed():
            pass

    def _is_pending(self, job_id: str) -> bool:
        with self._pending_guard:
            return job_id in self._pending

    def _take_pending(self, limit: int, exclude: str = "",
                      older_than: float | None = None) -> list[str]:
        """Up to ``limit`` queued jobs, oldest first, committed no later
        than ``older_than`` (the queue is in commit order)."""
        with self._pending_guard:
            aged = takewhile(
                lambda item: older_than is None or item[1] <= older_than,
                self._pending.items())
            keys = list(islice((key for key, _ in aged if key != exclude),
                               limit))
            for key in keys:
                del self._pending[key]
            return keys

    def _restore_pending(self, keys: list[str]) -> None:
        now = time.monotonic()
        with self._pending_guard:
            for key in keys:
                self._pending.setdefault(key, now)

    def _delete_committed(self, older_than: float | None = None) -> bool:
        """Delete one batch of committed jobs' keys (those committed no
        later than ``older_than``); False if there were none or etcd did
        not answer. Taken and deleted under ``_deleting``."""
        with self._deleting:
            batch = self._take_pending(RELEASE_BATCH, older_than=older_than)
            return bool(batch) and self._delete_batch(batch)

    def _delete_batch(self, jobs: list[str]) -> bool:
        try:
            self._etcd.txn(compare=[], success=[
                op for job in jobs for op in self._cleanup_ops(job)])
            return True
        except ServiceUnavailable as exc:
            logger.warning("ares: could not delete %d committed locks (%s); "
                           "retrying", len(jobs), exc)
            self._restore_pending(jobs)
            return False

    def _retry_releases(self) -> None:
        """Guarded deletes etcd did not answer before: only a lock that is
        still ours (same token, or exactly our value) goes."""
        with self._pending_guard:
            todo = list(self._guarded)
        for key, compare in todo:
            try:
                result = self._etcd.txn(compare=[compare],
                                        success=[op_delete(key)])
            except ServiceUnavailable:
                return  # still away: next round
            with self._pending_guard:
                self._guarded.remove((key, compare))
            if result.succeeded:
                logger.info("ares: released %s after etcd returned", key)

    def _release_loop(self) -> None:
        while True:
            time.sleep(RELEASE_IDLE_S)
            self._delete_committed(
                older_than=time.monotonic() - COMMITTED_KEYS_KEPT_S)
            if self._guarded:
                self._retry_releases()
