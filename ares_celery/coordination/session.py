"""The session: one etcd lease per process, kept alive in the background.

As in etcd's ``client/v3/concurrency/session.go``, the session owns the
lease and everything else borrows it: every job lock the process takes and
every inventory key a GPU host publishes hangs on it, so if the process
dies (SIGKILL, OOM, host loss) they all vanish after the TTL and another
worker takes over. A session is created lazily in the process that uses it
(after ``fork``), never inherited from a parent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from ..clients.etcd import EtcdGateway
from ..errors import ServiceUnavailable
from ..observability.metrics import count_lease_granted, count_lease_lost

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseGrant:
    """One granted lease; ``generation`` tells grants apart after a loss."""

    lease_id: int
    generation: int


class Session:
    """Grants the process lease on demand and refreshes it every TTL/3.

    The lease is considered lost as soon as etcd says it expired *or* no
    refresh succeeded for a full TTL (e.g. the process was paused or cut
    off): we must assume etcd already expired it and other workers took
    over. The next :meth:`current` call then grants a fresh lease.
    """

    def __init__(self, etcd: EtcdGateway, ttl: int) -> None:
        self._etcd = etcd
        self.ttl = ttl
        self._lock = threading.Lock()
        self._grant: LeaseGrant | None = None
        self._confirmed_at = 0.0
        self._generation = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.losses = 0

    def current(self) -> LeaseGrant:
        """The live lease, granting a new one if there is none."""
        with self._lock:
            if self._grant is not None and not self._expired_locally():
                return self._grant
            if self._grant is not None:
                self._mark_lost("not refreshed for a whole TTL")
            # The TTL runs from when etcd granted it, somewhere between our
            # request and its reply: count from the request, conservatively.
            sent_at = time.monotonic()
            lease_id = self._etcd.grant_lease(self.ttl)
            self._generation += 1
            self._grant = LeaseGrant(lease_id, self._generation)
            count_lease_granted()
            self._confirmed_at = sent_at
            self._ensure_thread()
            return self._grant

    def is_valid(self, grant: LeaseGrant) -> bool:
        """Whether ``grant`` is still ours and believed alive."""
        with self._lock:
            return (self._grant is not None
                    and self._grant.generation == grant.generation
                    and not self._expired_locally())

    def close(self) -> None:
        """Stop refreshing and revoke, releasing all locks at once."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            grant, self._grant = self._grant, None
        if grant is not None and os.getpid() == self._pid:
            try:
                self._etcd.revoke_lease(grant.lease_id)
            except ServiceUnavailable:
                pass

    # -- internals -------------------------------------------------------

    def _expired_locally(self) -> bool:
        return time.monotonic() - self._confirmed_at >= self.ttl

    def _mark_lost(self, why: str) -> None:
        if self._grant is not None:
            logger.warning("ares: lease %x lost (%s)", self._grant.lease_id, why)
            self.losses += 1
            count_lease_lost()
        self._grant = None

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="ares-lease-keepalive", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(max(self.ttl / 3.0, 0.2))
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                grant = self._grant
                if grant is not None and self._expired_locally():
                    self._mark_lost("not refreshed for a whole TTL")
                    grant = None
            if grant is None:
                continue
            sent_at = time.monotonic()
            try:
                ttl = self._etcd.refresh_lease(grant.lease_id)
            except ServiceUnavailable as exc:
                logger.warning("ares: lease refresh failed: %s", exc)
                continue
            with self._lock:
                if self._grant is None or \
                        self._grant.generation != grant.generation:
                    continue
                if ttl <= 0:
                    self._mark_lost("etcd reports it expired")
                else:
                    # Conservative: count the TTL from when we *sent* it.
                    self._confirmed_at = sent_at


#: The name this class had before it moved into ``coordination``.
LeaseKeeper = Session
