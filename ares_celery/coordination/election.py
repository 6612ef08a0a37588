"""One actor at a time among many processes: an etcd election.

Like etcd's ``client/v3/concurrency/election.go``, a candidate campaigns by
creating the election key attached to its session's lease; whoever created
it leads until it resigns or its lease ends (the process died, hung or was
cut off: etcd deletes the key with the lease). The others follow the key
with a watch and campaign again the moment it is deleted, so a dead
leader is replaced within its lease TTL. Only one key is used rather than
``election.go``'s queue of keys: followers need no fair order, only that
exactly one leads.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from ..clients.etcd import (
    EtcdGateway,
    KeyValue,
    WatchEvent,
    cmp_create_revision,
    op_delete,
    op_put,
    op_range,
)
from ..errors import ServiceUnavailable
from .mutex import ownership_compare
from .session import LeaseGrant, Session
from .watch import PrefixWatch

logger = logging.getLogger(__name__)


class Election:
    """Campaign for ``key`` with ``session``'s lease; know who leads.

    ``on_change(leading)`` is called (from the watch thread) whenever this
    process starts or stops leading.
    """

    def __init__(self, etcd: EtcdGateway, session: Session, key: str,
                 on_change: Callable[[bool], None]) -> None:
        self._etcd = etcd
        self._session = session
        self.key = key
        self._on_change = on_change
        self._guard = threading.Lock()
        self._grant: LeaseGrant | None = None
        self._token = 0
        self._leading = False
        # The nonce tells apart two candidates on one lease (two workers of
        # one app embedded in one process): the lease alone is not an
        # identity, or both would believe they lead.
        self._identity = json.dumps({"host": socket.gethostname(),
                                     "pid": os.getpid(),
                                     "nonce": uuid.uuid4().hex})
        self._watch = PrefixWatch(etcd, key, self._snapshot, self._events,
                                  name="ares-election")

    @property
    def leading(self) -> bool:
        """Whether this process leads now (its lease is believed alive)."""
        with self._guard:
            return self._leading and self._grant is not None and \
                self._session.is_valid(self._grant)

    def start(self) -> None:
        self._watch.start(wait=None)

    def campaign(self) -> bool:
        """Try to lead now (the key must be free); True if we lead."""
        try:
            grant = self._session.current()
            result = self._etcd.txn(
                compare=[cmp_create_revision(self.key, 0)],
                success=[op_put(self.key, self._identity, grant.lease_id)],
                failure=[op_range(self.key)])
        except ServiceUnavailable as exc:
            logger.debug("ares: campaign for %s failed: %s", self.key, exc)
            return False
        if result.succeeded:
            self._set(True, grant, result.revision)
        else:
            ranges = result.ranges()
            kv = ranges[0][0] if ranges and ranges[0] else None
            # Our own key (a campaign whose reply we lost) counts as ours.
            ours = kv is not None and kv.lease == grant.lease_id \
                and kv.value == self._identity.encode()
            self._set(ours, grant if ours else None,
                      kv.create_revision if ours else 0)
        return self.leading

    def tick(self) -> bool:
        """Called periodically: notice a lost lease, re-campaign if the key
        is free. Returns whether we lead."""
        if not self.leading:
            if self._leading:
                self._set(False, None, 0)
            return self.campaign()
        return True

    def resign(self) -> None:
        """Give the leadership up now (clean shutdown)."""
        self._watch.stop()
        with self._guard:
            token, self._token = self._token, 0
        if token:
            try:
                self._etcd.txn(compare=[ownership_compare(self.key, token)],
                               success=[op_delete(self.key)])
            except ServiceUnavailable:
                pass  # the key goes with the lease
        self._set(False, None, 0)

    def _set(self, leading: bool, grant: LeaseGrant | None,
             token: int) -> None:
        with self._guard:
            changed = leading != self._leading
            self._leading, self._grant, self._token = leading, grant, token
        if changed:
            logger.info("ares: %s %s", "now leading" if leading
                        else "no longer leading", self.key)
            self._on_change(leading)

    # -- what the watch of the key delivers ---------------------------------

    def _snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        if not kvs:
            self.campaign()

    def _events(self, events: list[WatchEvent]) -> None:
        if any(e.type == "DELETE" for e in events):
            if self._leading:
                self._set(False, None, 0)
            self.campaign()
