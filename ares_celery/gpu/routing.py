"""The GPU router: send each GPU task to the host queue where its GPUs
would be best connected.

It runs in the submitting process and reads the inventory from a
watch-driven cache, so the steady state costs no etcd round trip. Per
request shape (GPU count, memory, interconnect) it remembers each host's
best placement and recomputes it only for hosts whose inventory changed,
which keeps a decision well under a millisecond at a thousand hosts.
When no host has the GPUs free, a job whose priority is given waits on the
host where preempting less urgent preemptible jobs would free a placement
(a scan of every host, made only then), else on the best host once free.
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import headers as wire
from ..errors import NoGpuHosts, UnsatisfiableGpuRequest
from ..services import Services
from .inventory import HostInventory, InventoryCache
from .placement import PlacementPolicy
from .request import GpuRequest

#: Old name of the header (now :data:`ares_celery.headers.ROUTE`).
ROUTE_HEADER = wire.ROUTE

#: How long the router assumes GPUs it just planned on a host are taken,
#: unless the host's inventory changes first (the worker took them).
PLAN_TTL_S = 5.0


@dataclass(frozen=True)
class RouteDecision:
    host: str
    queue: str
    gpus: tuple[int, ...]
    score: float
    waits: bool
    reason: str

    def to_header(self) -> dict[str, Any]:
        return {"host": self.host, "queue": self.queue,
                "gpus": list(self.gpus),
                "score": "inf" if math.isinf(self.score) else self.score,
                "waits": self.waits}


@dataclass
class _HostEval:
    version: int
    planned: frozenset[int]
    ever_ok: bool
    ever_score: float
    why_not: str
    now_gpus: tuple[int, ...] | None
    now_score: float
    load: int = 0
    queue: str = ""
    gpu_count: int = 0
    stamp: int = 0
    #: Job priority -> best placement score if preemptible jobs of lower
    #: priority yielded (None: no placement). Lives as long as this
    #: evaluation, which is replaced whenever the host's inventory or this
    #: router's plans on it change, so a full cluster costs one placement
    #: per changed host, not per host, for each urgent decision.
    preempt: dict[int, float | None] = field(default_factory=dict)


class _ShapeIndex:
    """Per request shape: each host's evaluation and two heaps (hosts that
    can run it now, by score; hosts that could later, by best score), with
    lazy invalidation, so a decision touches only changed hosts."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.epoch = -1
        self.position = 0
        self.evals: dict[str, _HostEval] = {}
        self.now_heap: list[tuple[float, int, str, int]] = []
        self.wait_heap: list[tuple[float, int, str, int]] = []
        self.pending: set[str] = set()
        self._stamp = 0

    def put(self, host: str, ev: _HostEval) -> None:
        self._stamp += 1
        ev.stamp = self._stamp
        self.evals[host] = ev
        if not ev.ever_ok:
            return
        if ev.now_gpus is not None:
            heapq.heappush(self.now_heap, (-ev.now_score, ev.load, host,
                                           ev.stamp))
        else:
            heapq.heappush(self.wait_heap, (-ev.ever_score, ev.load, host,
                                            ev.stamp))
        if len(self.now_heap) + len(self.wait_heap) > 4 * len(self.evals) + 64:
            self._compact()

    def remove(self, host: str) -> None:
        self.evals.pop(host, None)

    def best(self, heap: list[tuple[float, int, str, int]],
             exclude: frozenset[str]) -> str | None:
        """The top valid host of ``heap`` not in ``exclude``."""
        skipped = []
        found = None
        while heap:
            entry = heap[0]
            ev = self.evals.get(entry[2])
            if ev is None or ev.stamp != entry[3]:
                heapq.heappop(heap)          # stale entry
                continue
            if entry[2] in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            found = entry[2]
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _compact(self) -> None:
        def live(heap):
            kept = [e for e in heap
                    if (ev := self.evals.get(e[2])) is not None
                    and ev.stamp == e[3]]
            heapq.heapify(kept)
            return kept
        self.now_heap = live(self.now_heap)
        self.wait_heap = live(self.wait_heap)


class GpuRouter:
    """Celery router (``task_routes`` entry) and the decision behind it.

    ``policies`` (placement policy by name) score each host for a request;
    ``watch=False`` reads the inventory afresh per decision instead of
    keeping a watch open (workers, which re-route rarely).
    """

    def __init__(self, services: Services,
                 policies: Mapping[str, PlacementPolicy],
                 watch: bool = True) -> None:
        self._services = services
        self._policies = policies
        self._watch = watch
        self._pid = -1
        self._cache: InventoryCache | None = None
        self._guard = threading.Lock()
        self._indexes: dict[tuple, _ShapeIndex] = {}
        self._planned: dict[str, list[tuple[float, int, frozenset[int]]]] = {}
        self._expiries: list[tuple[float, str]] = []

    # -- Celery's router protocol ----------------------------------------

    def __call__(self, name: str, args: Any, kwargs: Any,
                 options: dict[str, Any], task: Any = None,
                 **kw: Any) -> dict[str, Any] | None:
        request = getattr(task, "gpu_request", None)
        if request is None:
            return None
        if (options.get("headers") or {}).get(wire.ROUTE) \
                or options.get("queue"):
            return None  # already routed by GpuTask.apply_async
        decision = self.decide(request)
        return {"queue": decision.queue, "routing_key": decision.queue}

    # -- the decision --------------------------------------------------------

    def cache(self) -> InventoryCache:
        if self._pid != os.getpid() or self._cache is None:
            with self._guard:
                if self._pid != os.getpid() or self._cache is None:
                    services = self._services
                    cache = InventoryCache(services.etcd, services.keys)
                    if self._watch:
                        cache.start(wait=services.settings.etcd_timeout * 3)
                    self._cache = cache
                    self._indexes.clear()
                    self._planned.clear()
                    self._expiries.clear()
                    self._pid = os.getpid()
        if not self._watch:
            self._cache.load_once()
        return self._cache

    def decide(self, request: GpuRequest,
               exclude: frozenset[str] = frozenset(),
               priority: int | None = None) -> RouteDecision:
        """Where ``request`` should go: the best host with the GPUs free
        now; else, when ``priority`` (the job's, 0-9) is given, the best
        host where preempting lower-priority preemptible jobs would free a
        placement; else the best host once free (the job waits there).
        Hosts in ``exclude`` are never chosen."""
        cache = self.cache()
        with self._guard:
            return self._decide(request, cache, exclude, priority)

    def _decide(self, request: GpuRequest, cache: InventoryCache,
                exclude: frozenset[str],
                priority: int | None = None) -> RouteDecision:
        now = time.monotonic()
        index = self._indexes.get(request.shape)
        if index is None:
            index = self._indexes[request.shape] = _ShapeIndex()
        self._refresh(request, index, cache, now)
        if not index.evals:
            raise NoGpuHosts(
                "no GPU hosts are registered (etcd at "
                f"{self._services.etcd.address}, prefix "
                f"{self._services.keys.inventory_prefix()}); start a "
                "worker on a GPU host, or a worker with a mock topology: "
                "celery worker --ares-mock-gpus <mock name> (or "
                "ARES_MOCK_GPUS=<mock name>)")
        found = index.best(index.now_heap, exclude)
        if found is not None:
            ev = index.evals[found]
            self._plan(found, ev.version, ev.now_gpus, now)
            decision = RouteDecision(found, ev.queue, ev.now_gpus,
                                     ev.now_score, False,
                                     f"best free placement on {found}")
            self._reevaluate(request, index, cache, found, now)
            return decision
        if priority is not None:
            preempting = self._preemption_route(request, index, cache,
                                                exclude, priority)
            if preempting is not None:
                return preempting
        found = index.best(index.wait_heap, exclude)
        if found is not None:
            ev = index.evals[found]
            return RouteDecision(found, ev.queue, (), ev.ever_score, True,
                                 f"no host has {request.describe()} free "
                                 f"now; queued on {found}, the best when "
                                 "free")
        closest = max(((ev.gpu_count, host, ev.why_not)
                       for host, ev in index.evals.items()
                       if not ev.ever_ok and host not in exclude),
                      default=None)
        considered = len(set(index.evals) - exclude)
        detail = f"; closest is {closest[1]}: {closest[2]}" if closest else ""
        raise UnsatisfiableGpuRequest(
            f"no registered GPU host can ever run {request.describe()} "
            f"({considered} host(s) considered){detail}")

    def _preemption_route(self, request: GpuRequest, index: _ShapeIndex,
                          cache: InventoryCache, exclude: frozenset[str],
                          priority: int) -> RouteDecision | None:
        """The host where preempting jobs less urgent than ``priority``
        frees the best placement for ``request`` (then the lowest load), or
        None if there is none.

        Only called when no host has the GPUs free now, so it scans every
        host (O(hosts)) instead of keeping a per-priority heap: a waiting
        urgent job should queue where its wait ends soonest, and a host
        whose preemptible low-priority jobs can yield ends it sooner than
        the best-scored host full of jobs that run to completion.
        """
        best: tuple[float, int, str] | None = None
        for host, ev in index.evals.items():
            if not ev.ever_ok or host in exclude:
                continue
            if priority not in ev.preempt:
                self._preemption_score(request, cache.get(host), ev, priority)
            score = ev.preempt.get(priority)
            if score is None:
                continue
            key = (-score, ev.load, host)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        host = best[2]
        return RouteDecision(
            host, index.evals[host].queue, (), -best[0], True,
            f"no host has {request.describe()} free now; queued on {host}, "
            "where preempting lower-priority preemptible jobs frees a "
            "placement")

    def _preemption_score(self, request: GpuRequest,
                          inv: HostInventory | None, ev: _HostEval,
                          priority: int) -> None:
        """Record in ``ev.preempt[priority]`` the best placement score on
        ``inv`` counting as free the free GPUs (less this router's plans)
        and those of preemptible jobs of strictly lower priority.

        GPUs already freed for another preempting job are busy under that
        job's id and absent from ``inv.preemptible``, so they never count.
        An inventory newer than ``ev`` (it changed after this decision's
        refresh) is skipped and nothing is recorded: the next decision
        re-evaluates the host.
        """
        if inv is None or inv.version != ev.version:
            return
        victims = {job for job, job_priority in inv.preemptible.items()
                   if job_priority < priority}
        score = None
        if victims:
            freed = {gpu for gpu, job in inv.busy.items() if job in victims}
            policy = self._policies[request.policy]
            try:
                score = policy.place(inv.topology, request,
                                     free=(inv.free - ev.planned) | freed
                                     ).score
            except UnsatisfiableGpuRequest:
                pass
        ev.preempt[priority] = score

    def _refresh(self, request: GpuRequest, index: _ShapeIndex,
                 cache: InventoryCache, now: float) -> None:
        """Re-evaluate only the hosts that changed since the last decision
        of this shape (inventory updates, expired plans)."""
        epoch, position, changed = cache.changes_since(index.epoch,
                                                       index.position)
        if changed is None:
            index.reset()
            changed = list(cache.hosts())
        index.epoch, index.position = epoch, position
        while self._expiries and self._expiries[0][0] <= now:
            expired = heapq.heappop(self._expiries)[1]
            for other in self._indexes.values():
                other.pending.add(expired)
        changed_set = set(changed) | index.pending
        index.pending.clear()
        for host in changed_set:
            self._reevaluate(request, index, cache, host, now)

    def _reevaluate(self, request: GpuRequest, index: _ShapeIndex,
                    cache: InventoryCache, host: str, now: float) -> None:
        inv = cache.get(host)
        if inv is None:
            index.remove(host)
            return
        planned = self._planned_gpus(host, inv.version, now)
        load = inv.running + len(self._planned.get(host, ()))
        ev = self._evaluate(request, inv, planned)
        ev.load, ev.queue = load, inv.queue
        ev.gpu_count = len(inv.topology)
        index.put(host, ev)

    def _evaluate(self, request: GpuRequest, inv: HostInventory,
                  planned: frozenset[int]) -> _HostEval:
        policy = self._policies[request.policy]
        try:
            ever = policy.place(inv.topology, request)
        except UnsatisfiableGpuRequest as exc:
            return _HostEval(inv.version, planned, False, 0.0, str(exc), None,
                             0.0)
        free = inv.free - planned
        try:
            current = policy.place(inv.topology, request, free=free)
        except UnsatisfiableGpuRequest:
            return _HostEval(inv.version, planned, True, ever.score, "", None,
                             0.0)
        return _HostEval(inv.version, planned, True, ever.score, "",
                         current.gpus, current.score)

    # -- optimistic plans: spread a burst before the inventory catches up ---

    def _planned_gpus(self, host: str, version: int,
                      now: float) -> frozenset[int]:
        plans = self._planned.get(host)
        if not plans:
            return frozenset()
        live = [p for p in plans if p[0] > now and p[1] == version]
        if len(live) != len(plans):
            if live:
                self._planned[host] = live
            else:
                del self._planned[host]
        return frozenset().union(*(p[2] for p in live)) if live else frozenset()

    def _plan(self, host: str, version: int, gpus: tuple[int, ...],
              now: float) -> None:
        self._planned.setdefault(host, []).append(
            (now + PLAN_TTL_S, version, frozenset(gpus)))
        heapq.heappush(self._expiries, (now + PLAN_TTL_S, host))
        # Other shapes must see the plan too.
        for index in self._indexes.values():
            index.pending.add(host)
