"""Per-process connections to Redis and etcd and the process lease.

Everything here is created lazily in the process that uses it and rebuilt
when the pid changes, because sockets, HTTP sessions and the lease
keep-alive thread must never be shared across ``fork`` (prefork pool).
Pool children (marked by Celery's ``worker_process_init``) may talk to etcd
over gRPC; every other process uses the HTTP gateway (see
:mod:`ares_celery.clients.etcd_grpc`).
"""

from __future__ import annotations

import os
import threading
import time

import redis
from celery import signals

from .clients import redis as redis_clients
from .clients.etcd import EtcdGateway
from .clients.etcd_grpc import mark_fork_free, process_gateway
from .coordination.mutex import JobLocks
from .coordination.session import Session
from .exactly_once.dedup import DedupStore
from .keys import Keys
from .settings import AresSettings

_ETCD_HEALTH_CACHE_S = 2.0


def _pool_process_started(**_: object) -> None:
    """A prefork pool child never forks: it may hold gRPC channels."""
    mark_fork_free()


class Services:
    """Lazily built clients for one process.

    ``marker_in_etcd`` comes from the result store: when its commit marker
    is an etcd key, every lock Txn reads it too.
    """

    def __init__(self, settings: AresSettings,
                 marker_in_etcd: bool = False) -> None:
        self.settings = settings
        self._marker_in_etcd = marker_in_etcd
        self.keys = Keys(settings.namespace)
        self._pid = -1
        self._guard = threading.Lock()
        self._etcd_ok_until = 0.0
        # Once per process, whatever the number of apps.
        signals.worker_process_init.connect(
            _pool_process_started, weak=False,
            dispatch_uid="ares-etcd-fork-free")

    def _ensure(self) -> None:
        if self._pid == os.getpid():
            return
        with self._guard:
            if self._pid == os.getpid():
                return
            s = self.settings
            self._redis = redis_clients.connect(
                s.redis_url, max_connections=s.redis_max_connections)
            # gRPC only if this process was marked fork-free (a pool
            # child): the channel is created here, after the fork.
            self._etcd = process_gateway(s.etcd_endpoints, s.etcd_timeout,
                                         s.etcd_security, s.etcd_transport)
            self._keeper = Session(self._etcd, s.lease_ttl)
            self._dedup = DedupStore(
                self._redis, self.keys, s.dedup_ttl, s.dedup_claim_timeout,
                url=s.redis_url, republish_after=s.republish_after)
            self._locks = JobLocks(
                self._etcd, self.keys, check_done_marker=self._marker_in_etcd,
                # Records outlive any job that is still wanted: as long as
                # a client retry could ask for it, and at least a day.
                records_ttl=max(s.dedup_ttl, 86400) + 3600)
            self._etcd_ok_until = 0.0
            self._pid = os.getpid()

    @property
    def redis(self) -> redis.Redis:
        self._ensure()
        return self._redis

    @property
    def etcd(self) -> EtcdGateway:
        self._ensure()
        return self._etcd

    @property
    def keeper(self) -> Session:
        """The process session (its lease carries every lock we take)."""
        self._ensure()
        return self._keeper

    @property
    def dedup(self) -> DedupStore:
        self._ensure()
        return self._dedup

    @property
    def locks(self) -> JobLocks:
        self._ensure()
        return self._locks

    def require_etcd(self) -> None:
        """Fail closed if etcd is unreachable (cached for a moment, so a
        burst of submissions costs one health check)."""
        now = time.monotonic()
        if now < self._etcd_ok_until:
            return
        self.etcd.status()
        self._etcd_ok_until = now + _ETCD_HEALTH_CACHE_S

    def close(self) -> None:
        if self._pid == os.getpid():
            self._dedup.flush_marks()
            self._locks.flush()
            self._keeper.close()
