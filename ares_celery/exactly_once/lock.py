"""Layer 2b and 3: the per-job lock in etcd and its fencing token.

Taking the lock is one etcd transaction that creates the lock key only if it
does not exist, attached to the process lease. The revision of that
transaction is the fencing token: etcd revisions only grow, so a later
holder always has a larger token than any earlier one.
"""

from __future__ import annotations

import json
import os
import socket
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
from .identity import Keys
from .lease import LeaseGrant

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
