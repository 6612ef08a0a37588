"""Publishing each GPU host's inventory to etcd, and reading it back.

A worker publishes two keys per host, both attached to its own session's
lease so that a dead host disappears by itself when the lease expires: the
topology (written once) and the free/busy state (rewritten when GPUs are
taken or released). Both keys are written here and nowhere else
(:func:`write_state` is what pool processes call after an allocation).
Readers keep a cache driven by an etcd watch
(:class:`~ares_celery.coordination.watch.PrefixWatch`), so a routing
decision costs no etcd round trip in the steady state.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..clients.etcd import EtcdGateway, KeyValue, WatchEvent, op_put
from ..coordination.session import Session
from ..coordination.watch import PrefixWatch
from ..errors import ServiceUnavailable
from ..keys import Keys
from ..observability.metrics import set_gpus_busy
from .model import HostTopology

logger = logging.getLogger(__name__)


def host_queue(host: str, prefix: str = "ares.gpu") -> str:
    """The per-host queue name GPU tasks for ``host`` are routed to."""
    return f"{prefix}.{host}"


@dataclass(frozen=True)
class HostInventory:
    """What the router knows about one GPU host."""

    host: str
    topology: HostTopology
    free: frozenset[int]
    busy: Mapping[int, str] = field(default_factory=dict)
    queue: str = ""
    worker: str = ""
    running: int = 0
    updated: float = 0.0
    #: Grows with every change the cache applies to this host.
    version: int = 0
    #: Running jobs a more urgent job may preempt: job id -> its priority
    #: (their GPUs are in ``busy``); jobs already asked to yield are left
    #: out, and GPUs freed for a preempting job stay in ``busy``.
    preemptible: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "queue": self.queue, "worker": self.worker,
                "gpus": len(self.topology), "free": sorted(self.free),
                "busy": {str(k): v for k, v in sorted(self.busy.items())},
                "running": self.running, "updated": self.updated,
                "preemptible": dict(sorted(self.preemptible.items()))}


class InventoryPublisher:
    """Worker side: keeps this host's inventory in etcd while it lives."""

    def __init__(self, etcd: EtcdGateway, keys: Keys, topology: HostTopology,
                 lease_ttl: int, queue: str, worker: str = "",
                 busy_source: Callable[[], Mapping[int, str]] | None = None,
                 preemptible_source: Callable[[], Mapping[str, int]]
                 | None = None) -> None:
        self._etcd = etcd
        self._keys = keys
        self.topology = topology
        self.queue = queue
        self.worker = worker
        self._keeper = Session(etcd, lease_ttl)
        self._lock = threading.Lock()
        self._busy: dict[int, str] = {}
        self._busy_source = busy_source
        self._preemptible_source = preemptible_source
        self._generation = 0
        self.lease_id = 0

    @property
    def host(self) -> str:
        return self.topology.host

    def publish(self, busy: Mapping[int, str] | None = None) -> None:
        """Write topology (on a new lease) and state in one transaction."""
        with self._lock:
            if busy is not None:
                self._busy = dict(busy)
            elif self._busy_source is not None:
                self._busy = dict(self._busy_source())
            grant = self._keeper.current()
            ops = [op_put(self._keys.inventory_state(self.host),
                          json.dumps(self._state()), grant.lease_id)]
            if grant.generation != self._generation:
                ops.append(op_put(self._keys.inventory_topology(self.host),
                                  self.topology.to_json(), grant.lease_id))
            self._etcd.txn(compare=[], success=ops)
            self._generation = grant.generation
            self.lease_id = grant.lease_id

    def ensure_published(self) -> bool:
        """Called periodically: re-publish everything on a new lease after
        a lost one, and the state whenever it differs from what we last
        wrote (a pool process's own write may have failed). Returns True
        if the lease changed."""
        try:
            regranted = self._keeper.current().generation != self._generation
            busy = dict(self._busy_source()) if self._busy_source else None
            if regranted or (busy is not None and busy != self._busy):
                self.publish(busy)
            return regranted
        except ServiceUnavailable as exc:
            logger.warning("ares: cannot publish GPU inventory: %s", exc)
        return False

    def withdraw(self) -> None:
        """Remove the host at once (clean shutdown)."""
        self._keeper.close()

    def _state(self) -> dict[str, Any]:
        preemptible = self._preemptible_source() \
            if self._preemptible_source is not None else {}
        return state_payload(self.topology, self._busy,
                             {"queue": self.queue, "worker": self.worker,
                              "preemptible": preemptible})


def state_payload(topology: HostTopology, busy: Mapping[int, str],
                  info: Mapping[str, Any]) -> dict[str, Any]:
    """The inventory state value (what the router reads)."""
    free = [i for i in topology.indices if i not in busy]
    return {"free": free, "busy": {str(k): v for k, v in sorted(busy.items())},
            "queue": info.get("queue", ""), "worker": info.get("worker", ""),
            "running": len(set(busy.values())), "updated": time.time(),
            "preemptible": dict(info.get("preemptible") or {})}


def write_state(etcd: EtcdGateway, keys: Keys, topology: HostTopology,
                busy: Mapping[int, str], info: Mapping[str, Any],
                lease: int) -> None:
    """Write a host's free/busy state under the worker's inventory lease.

    Pool processes call this after taking or giving back GPUs (any process
    may attach a key to a lease whose id it knows); a failure is only
    logged, because the worker's periodic refresh re-publishes the state
    from the ledger.
    """
    set_gpus_busy(topology.host, len(busy))
    if not lease:
        return
    payload = state_payload(topology, busy, info)
    try:
        etcd.txn(compare=[], success=[op_put(
            keys.inventory_state(topology.host), json.dumps(payload), lease)])
    except Exception as exc:  # noqa: BLE001 - lease gone or etcd down
        logger.warning("ares: could not publish GPU state of %s under "
                       "lease %x: %s (the worker's periodic refresh "
                       "re-publishes it)", topology.host, lease, exc)


def _parse_host(key: str, prefix: str) -> tuple[str, str] | None:
    rest = key[len(prefix):]
    host, _, leaf = rest.rpartition("/")
    return (host, leaf) if host and leaf in ("topology", "state") else None


class InventoryCache:
    """Reader side: every host's inventory, kept current by an etcd watch.

    The :class:`~ares_celery.coordination.watch.PrefixWatch` lists the
    prefix, watches from the listed revision and relists when the stream
    breaks; this class turns its keys into :class:`HostInventory` entries.
    """

    def __init__(self, etcd: EtcdGateway, keys: Keys) -> None:
        self._etcd = etcd
        self._prefix = keys.inventory_prefix()
        self._topologies: dict[str, HostTopology] = {}
        self._topology_raw: dict[str, bytes] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._built: dict[str, HostInventory] = {}
        self._version = 0
        # Change log for incremental readers (the router): hosts touched, in
        # order; the epoch moves on a relist or when the log is trimmed.
        self._log: list[str] = []
        self._epoch = 0
        self._guard = threading.Lock()
        self._changed = threading.Condition(self._guard)
        self._watch = PrefixWatch(etcd, self._prefix, self._snapshot,
                                  self._events, name="ares-inventory-watch")

    @property
    def revision(self) -> int:
        return self._watch.revision

    # -- lifecycle -----------------------------------------------------------

    def start(self, wait: float | None = 5.0) -> InventoryCache:
        try:
            self._watch.start(wait)
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(
                f"GPU inventory not readable from etcd at "
                f"{self._etcd.address} within {wait}s") from exc
        return self

    def load_once(self) -> InventoryCache:
        """Read the inventory once, without a watch (CLI, scripts)."""
        self._watch.list_once()
        return self

    def stop(self) -> None:
        self._watch.stop()

    # -- reads -----------------------------------------------------------------

    def hosts(self) -> dict[str, HostInventory]:
        """A snapshot of every host that has both topology and state (the
        entries are immutable and rebuilt only when that host changes)."""
        with self._guard:
            return dict(self._built)

    def get(self, host: str) -> HostInventory | None:
        with self._guard:
            return self._built.get(host)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(hosts)`` holds (tests, CLI, router)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.hosts()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 0.5))

    def changes_since(self, epoch: int, index: int
                      ) -> tuple[int, int, list[str] | None]:
        """Hosts changed since ``(epoch, index)`` and the new position; the
        list is None when the reader must start over (relist, trimmed
        log)."""
        with self._guard:
            if epoch != self._epoch:
                return self._epoch, len(self._log), None
            return epoch, len(self._log), self._log[index:]

    # -- what the watch delivers -----------------------------------------------

    def _snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        with self._changed:
            self._topologies.clear()
            self._topology_raw.clear()
            self._states.clear()
            self._built.clear()
            self._log.clear()
            self._epoch += 1
            for kv in kvs:
                self._apply(kv.key, kv.value)
            self._changed.notify_all()

    def _events(self, events: list[WatchEvent]) -> None:
        with self._changed:
            for event in events:
                self._apply(event.kv.key,
                            None if event.type == "DELETE" else event.kv.value)
            self._changed.notify_all()

    def _apply(self, key: str, value: bytes | None) -> None:
        parsed = _parse_host(key, self._prefix)
        if parsed is None:
            return
        host, leaf = parsed
        self._apply_leaf(host, leaf, value)
        self._rebuild(host)

    def _apply_leaf(self, host: str, leaf: str, value: bytes | None) -> None:
        if leaf == "topology":
            if value is None:
                self._topologies.pop(host, None)
                self._topology_raw.pop(host, None)
            elif self._topology_raw.get(host) != value:
                try:
                    self._topologies[host] = HostTopology.from_json(
                        value.decode())
                    self._topology_raw[host] = value
                except Exception as exc:  # noqa: BLE001 - bad data from etcd
                    logger.warning("ares: bad topology for %s: %s", host, exc)
        elif value is None:
            self._states.pop(host, None)
        else:
            try:
                self._states[host] = json.loads(value)
            except ValueError:
                logger.warning("ares: bad inventory state for %s", host)

    def _rebuild(self, host: str) -> None:
        self._log.append(host)
        if len(self._log) > 100_000:
            self._log.clear()
            self._epoch += 1
        topo, state = self._topologies.get(host), self._states.get(host)
        if topo is None or state is None:
            self._built.pop(host, None)
            return
        self._version += 1
        self._built[host] = HostInventory(
            host=host, topology=topo, free=frozenset(state.get("free", ())),
            busy={int(k): v for k, v in state.get("busy", {}).items()},
            queue=state.get("queue", ""), worker=state.get("worker", ""),
            running=int(state.get("running", 0)),
            updated=float(state.get("updated", 0.0)), version=self._version,
            preemptible={str(k): int(v) for k, v in
                         (state.get("preemptible") or {}).items()})
