"""GpuRouter with preemption: where a job waits when no host has its GPUs free.

An urgent job should wait where its wait ends soonest. A host whose GPUs are
held by preemptible jobs of lower priority can free them on demand, so with a
priority given the router queues the job there rather than on the
best-scored host full of jobs that run to completion; without a priority, or
when a host has the GPUs free now, the old rule holds. The router reads a
hand-built cache of :class:`HostInventory` entries (no etcd).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ares_celery.errors import UnsatisfiableGpuRequest
from ares_celery.gpu import POLICIES, GpuRequest, mock_topology
from ares_celery.gpu.inventory import HostInventory, InventoryCache, host_queue
from ares_celery.gpu.routing import GpuRouter
from ares_celery.keys import Keys

_versions = itertools.count(1)

#: Two GPUs on one socket of pcie-8x-2socket: a poor placement (24 GB/s)
#: next to any NVLink host, so a test that picks it did so for a reason.
PCIE_PAIR = (0, 1)


def inventory(mock: str, host: str, busy: Mapping[int, str],
              preemptible: Mapping[str, int] | None = None) -> HostInventory:
    """One host of the mock topology ``mock`` with ``busy`` GPUs taken."""
    topology = mock_topology(mock, host=host)
    return HostInventory(
        host=host, topology=topology,
        free=frozenset(set(topology.indices) - set(busy)), busy=dict(busy),
        queue=host_queue(host), worker=f"w@{host}",
        running=len(set(busy.values())), version=next(_versions),
        preemptible=dict(preemptible or {}))


def full(mock: str, host: str, job: str = "steady",
         preemptible: Mapping[str, int] | None = None) -> HostInventory:
    """Every GPU of the host busy with ``job``."""
    return inventory(mock, host, {g: job for g in range(8)}, preemptible)


class FakeCache:
    """What the router reads of an :class:`InventoryCache`: the hosts and a
    change log (``changes_since``), so its per-shape index stays
    incremental as with the real cache."""

    def __init__(self, *hosts: HostInventory) -> None:
        self._hosts: dict[str, HostInventory] = {}
        self._log: list[str] = []
        for inv in hosts:
            self.put(inv)

    def put(self, inv: HostInventory) -> None:
        self._hosts[inv.host] = replace(inv, version=next(_versions))
        self._log.append(inv.host)

    def hosts(self) -> dict[str, HostInventory]:
        return dict(self._hosts)

    def get(self, host: str) -> HostInventory | None:
        return self._hosts.get(host)

    def changes_since(self, epoch: int, index: int
                      ) -> tuple[int, int, list[str] | None]:
        if epoch != 0:
            return 0, len(self._log), None
        return 0, len(self._log), self._log[index:]


class Router(GpuRouter):
    """The real router over a :class:`FakeCache`."""

    def __init__(self, cache: FakeCache) -> None:
        services = SimpleNamespace(etcd=SimpleNamespace(address="(none)"),
                                   keys=Keys("test"))
        super().__init__(services, POLICIES, watch=False)  # type: ignore[arg-type]
        self._fake = cache

    def cache(self) -> InventoryCache:
        return self._fake  # type: ignore[return-value]


def low_priority_pcie(host: str = "pcie", victim_priority: int = 2,
                      **extra: int) -> HostInventory:
    """A pcie host: the preemptible job ``low`` holds GPUs 0 and 1 (one
    socket), a non-preemptible job holds the rest."""
    busy = {g: ("low" if g in PCIE_PAIR else "steady") for g in range(8)}
    return inventory("pcie-8x-2socket", host, busy,
                     {"low": victim_priority, **extra})


def test_preemptible_low_priority_host_beats_better_scored_full_host():
    cache = FakeCache(full("hgx-h100", "h100"), low_priority_pcie())
    decision = Router(cache).decide(GpuRequest(2), priority=5)
    assert decision.host == "pcie"
    assert decision.queue == host_queue("pcie")
    assert decision.waits is True
    assert decision.gpus == ()
    assert decision.score == 24.0
    assert "preempting lower-priority preemptible jobs" in decision.reason
    assert "queued on pcie" in decision.reason


def test_without_a_priority_the_best_host_when_free_is_chosen():
    cache = FakeCache(full("hgx-h100", "h100"), low_priority_pcie())
    decision = Router(cache).decide(GpuRequest(2))
    assert (decision.host, decision.waits) == ("h100", True)
    assert "the best when free" in decision.reason


@pytest.mark.parametrize("victim_priority", [5, 6, 9])
def test_victims_of_equal_or_higher_priority_do_not_count(victim_priority):
    cache = FakeCache(full("hgx-h100", "h100"),
                      low_priority_pcie(victim_priority=victim_priority))
    decision = Router(cache).decide(GpuRequest(2), priority=5)
    assert (decision.host, decision.waits) == ("h100", True)
    assert "the best when free" in decision.reason


def test_only_strictly_lower_victims_are_added_to_the_free_gpus():
    # GPU 0 is held by a lower-priority job, GPU 1 by an equal one: one GPU
    # can be freed, the request needs two.
    busy = {g: "steady" for g in range(8)} | {0: "low", 1: "peer"}
    pcie = inventory("pcie-8x-2socket", "pcie", busy, {"low": 1, "peer": 5})
    router = Router(FakeCache(full("hgx-h100", "h100"), pcie))
    assert router.decide(GpuRequest(2), priority=5).host == "h100"
    assert router.decide(GpuRequest(1), priority=5).host == "pcie"


def test_free_gpus_plus_victim_gpus_make_the_placement():
    # One GPU free and one held by a low-priority job on the same socket.
    busy = {g: "steady" for g in range(2, 8)} | {1: "low"}
    pcie = inventory("pcie-8x-2socket", "pcie", busy, {"low": 0})
    decision = Router(FakeCache(full("hgx-h100", "h100"), pcie)).decide(
        GpuRequest(2), priority=3)
    assert (decision.host, decision.waits) == ("pcie", True)


def test_gpus_freed_for_a_preempting_job_do_not_count():
    # GPUs 0-1 were freed for an urgent job that is still starting: busy
    # under its id, not preemptible. GPU 2 alone is not enough.
    busy = {g: "steady" for g in range(3, 8)} | {0: "urgent", 1: "urgent",
                                                  2: "low"}
    pcie = inventory("pcie-8x-2socket", "pcie", busy, {"low": 0})
    decision = Router(FakeCache(full("hgx-h100", "h100"), pcie)).decide(
        GpuRequest(2), priority=9)
    assert decision.host == "h100"


def test_a_host_with_free_gpus_is_still_preferred():
    # pcie has two GPUs on different sockets free (10 GB/s); h100 could
    # give 450 GB/s by preempting, but a free placement starts now.
    busy = {g: "steady" for g in range(8) if g not in (0, 5)}
    cache = FakeCache(inventory("pcie-8x-2socket", "pcie", busy),
                      full("hgx-h100", "h100", job="low",
                           preemptible={"low": 0}))
    decision = Router(cache).decide(GpuRequest(2), priority=9)
    assert decision.host == "pcie"
    assert decision.waits is False
    assert decision.gpus == (0, 5)
    assert decision.reason == "best free placement on pcie"


def test_the_best_preemption_placement_wins_then_the_lower_load():
    cache = FakeCache(full("dgx1-v100", "v100"), low_priority_pcie(),
                      full("hgx-h100", "h100", job="low",
                           preemptible={"low": 0}))
    assert Router(cache).decide(GpuRequest(2), priority=5).host == "h100"

    busy = {g: "low" for g in PCIE_PAIR} | {g: f"j{g}" for g in range(2, 8)}
    loaded = inventory("pcie-8x-2socket", "pcie-a", busy, {"low": 2})
    cache = FakeCache(loaded, low_priority_pcie("pcie-b"))
    assert loaded.running > cache.get("pcie-b").running
    assert Router(cache).decide(GpuRequest(2), priority=5).host == "pcie-b"


def test_excluded_hosts_are_not_chosen_for_preemption():
    cache = FakeCache(full("hgx-h100", "h100"), low_priority_pcie())
    decision = Router(cache).decide(GpuRequest(2), exclude=frozenset({"pcie"}),
                                    priority=5)
    assert decision.host == "h100"


def test_gpus_this_router_planned_are_not_counted_free():
    # pcie: GPUs 0-1 free, GPU 2 held by a low-priority job. The first
    # decision plans 0-1; the second (same shape) finds nothing free, and
    # GPU 2 alone cannot make a pair, so it waits on the best host.
    busy = {g: "steady" for g in range(3, 8)} | {2: "low"}
    cache = FakeCache(full("hgx-h100", "h100"),
                      inventory("pcie-8x-2socket", "pcie", busy, {"low": 0}))
    router = Router(cache)
    first = router.decide(GpuRequest(2), priority=5)
    assert (first.host, first.waits, first.gpus) == ("pcie", False, (0, 1))
    second = router.decide(GpuRequest(2), priority=5)
    assert (second.host, second.waits) == ("h100", True)
    assert "the best when free" in second.reason


def test_the_decision_follows_inventory_changes():
    cache = FakeCache(full("hgx-h100", "h100"), low_priority_pcie())
    router = Router(cache)
    assert router.decide(GpuRequest(2), priority=5).host == "pcie"
    # The low-priority job ended and a non-preemptible one took its GPUs.
    cache.put(full("pcie-8x-2socket", "pcie"))
    assert router.decide(GpuRequest(2), priority=5).host == "h100"
    # Now the H100 host runs a preemptible job of priority 1.
    cache.put(full("hgx-h100", "h100", job="low", preemptible={"low": 1}))
    decision = router.decide(GpuRequest(2), priority=5)
    assert (decision.host, decision.score) == ("h100", 450.0)
    assert "preempting" in decision.reason


def test_a_request_no_host_can_ever_run_still_fails():
    cache = FakeCache(low_priority_pcie())
    with pytest.raises(UnsatisfiableGpuRequest, match="can ever run"):
        Router(cache).decide(GpuRequest(2, interconnect="nvlink"), priority=9)


def test_each_priority_is_judged_on_its_own():
    # The router remembers each host's answer per priority: one urgent
    # decision must not stand for another of a different priority.
    router = Router(FakeCache(full("hgx-h100", "h100"), low_priority_pcie()))
    assert router.decide(GpuRequest(2), priority=5).host == "pcie"
    assert router.decide(GpuRequest(2), priority=2).host == "h100"
    assert router.decide(GpuRequest(2), priority=3).host == "pcie"
    assert router.decide(GpuRequest(2), priority=1).host == "h100"


def test_the_plain_celery_router_path_is_unchanged():
    # Celery's router protocol passes no priority: best host when free.
    router = Router(FakeCache(full("hgx-h100", "h100"), low_priority_pcie()))
    task = SimpleNamespace(gpu_request=GpuRequest(2))
    route = router("t", (), {}, {}, task=task)
    assert route == {"queue": host_queue("h100"),
                     "routing_key": host_queue("h100")}
