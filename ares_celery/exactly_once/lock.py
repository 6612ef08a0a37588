"""Layer 2b and 3: the per-job lock in etcd and its fencing token.

Taking the lock is one etcd transaction that creates the lock key only if it
does not exist, attached to the process lease. The revision of that
transaction is the fencing token: etcd revisions only grow, so a later
holder always has a larger token than any earlier one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Literal

from ..clients.etcd import (
    EtcdGateway,
    cmp_create_revision,
    op_delete,
    op_put,
    op_range,
)
from ..errors import ServiceUnavailable
from .identity import Keys
from .lease import LeaseGrant

logger = logging.getLogger(__name__)

#: Locks of committed jobs are deleted in batches of at most this many keys,
#: at most this long after the commit.
RELEASE_BATCH = 128
RELEASE_DELAY_S = 0.02

Status = Literal["acquired", "held", "committed"]


@dataclass(frozen=True)
class LockOutcome:
    status: Status
    token: int = 0
    holder: dict | None = None
    holder_lease: int = 0


class JobLocks:
    """Acquire and release per-job locks; check the etcd commit marker."""

    def __init__(self, etcd: EtcdGateway, keys: Keys,
                 check_done_marker: bool) -> None:
        self._etcd = etcd
        self._keys = keys
        self._check_done = check_done_marker
        self._host = socket.gethostname()
        self._pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._releaser: threading.Thread | None = None
        self._releaser_guard = threading.Lock()

    def acquire(self, job_id: str, grant: LeaseGrant) -> LockOutcome:
        lock_key = self._keys.lock(job_id)
        nonce = uuid.uuid4().hex
        value = json.dumps({"host": self._host, "pid": os.getpid(),
                            "lease": grant.lease_id, "nonce": nonce})
        reads = [op_range(self._keys.done(job_id))] if self._check_done else []
        result = self._etcd.txn(
            compare=[cmp_create_revision(lock_key, 0)],
            success=[op_put(lock_key, value, grant.lease_id), *reads],
            failure=[op_range(lock_key), *reads],
        )
        ranges = result.ranges()
        if result.succeeded:
            token = result.revision
            if self._check_done and ranges and ranges[0]:
                self.release(job_id, token)
                return LockOutcome("committed", token)
            return LockOutcome("acquired", token)
        lock_kvs = ranges[0] if ranges else []
        if self._check_done and len(ranges) > 1 and ranges[1]:
            return LockOutcome("committed")
        if not lock_kvs:  # released between compare and read: try again
            return self.acquire(job_id, grant)
        kv = lock_kvs[0]
        try:
            holder = json.loads(kv.value)
        except ValueError:
            holder = {"raw": kv.value.decode(errors="replace")}
        if holder.get("nonce") == nonce:
            # Our own put went through on a connection that then failed.
            return LockOutcome("acquired", kv.create_revision)
        return LockOutcome("held", holder=holder, holder_lease=kv.lease)

    def release(self, job_id: str, token: int) -> bool:
        """Delete the lock only if it is still ours (same create revision):
        a plain DEL could remove the next holder's lock."""
        lock_key = self._keys.lock(job_id)
        result = self._etcd.txn(compare=[cmp_create_revision(lock_key, token)],
                                success=[op_delete(lock_key)])
        return result.succeeded

    def discard_after_commit(self, job_id: str) -> None:
        """Drop a committed job's lock off the critical path.

        Once the result is committed nobody needs the lock (any later
        message for the job is skipped as committed), so an unconditional
        delete is safe here and many can share one etcd transaction. If the
        process dies first, the lock goes with its lease.
        """
        self._pending.put(self._keys.lock(job_id))
        if self._releaser is None or not self._releaser.is_alive():
            with self._releaser_guard:
                if self._releaser is None or not self._releaser.is_alive():
                    self._releaser = threading.Thread(
                        target=self._release_loop, daemon=True,
                        name="ares-lock-release")
                    self._releaser.start()

    def flush(self) -> None:
        """Delete every queued lock now (worker shutdown)."""
        batch = self._drain(block=False)
        while batch:
            self._delete_batch(batch)
            batch = self._drain(block=False)

    def _drain(self, block: bool) -> list[str]:
        keys: list[str] = []
        try:
            keys.append(self._pending.get(block=block, timeout=1.0 if block
                                          else None))
        except queue.Empty:
            return keys
        while len(keys) < RELEASE_BATCH:
            try:
                keys.append(self._pending.get(timeout=RELEASE_DELAY_S))
            except queue.Empty:
                break
        return list(dict.fromkeys(keys))  # a txn may touch a key only once

    def _delete_batch(self, keys: list[str]) -> None:
        try:
            self._etcd.txn(compare=[], success=[op_delete(k) for k in keys])
        except ServiceUnavailable as exc:
            logger.warning("ares: could not delete %d committed locks (%s); "
                           "retrying", len(keys), exc)
            for key in keys:
                self._pending.put(key)
            threading.Event().wait(0.5)

    def _release_loop(self) -> None:
        while True:
            batch = self._drain(block=True)
            if batch:
                self._delete_batch(batch)
