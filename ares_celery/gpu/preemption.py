"""Which running jobs a more urgent job stops, and what that costs.

A waiting GPU job of priority *p* that no free GPUs can place may take the
GPUs of running jobs that are ``preemptible`` and of priority below *p*
(their own priority: aging orders the queue, it never makes a job a
preemptor). Among the sets of such victims whose GPUs, with the free ones,
admit a placement, the one chosen loses the least work: fewest GPU-seconds
run since the victims' last checkpoints (what a resume re-executes), then
the least urgent victims, then the fewest. Victims are asked to yield
(their ``ctx.check()`` raises :class:`~ares_celery.errors.Preempted`); one
still running ``ares_preempt_grace`` seconds later is killed. Slurm's
``PreemptMode=REQUEUE`` with ``GraceTime`` is the model.

Only the choice lives here; the host's ledger records the marks and
reserves the freed GPUs for the preemptor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UnsatisfiableGpuRequest
from .model import HostTopology
from .placement import PlacementPolicy
from .request import GpuRequest

#: Up to this many candidates every subset is tried; above it, a greedy
#: pass (cheapest first) then pruning keeps the choice fast under the
#: ledger's lock on a host with many small jobs.
EXHAUSTIVE_UP_TO = 10


@dataclass(frozen=True)
class Victim:
    """A running job asked to yield its GPUs."""

    job_id: str
    pid: int
    gpus: tuple[int, ...]
    priority: int
    token: int
    #: GPU-seconds run since its last checkpoint (or its start) when it
    #: was asked: what resuming re-executes if it stopped at once.
    lost_gpu_seconds: float


def work_at_risk(entry: Mapping[str, Any], now: float) -> float:
    """GPU-seconds an allocation would lose if stopped at ``now``."""
    since = max(float(entry.get("at", now)),
                float(entry.get("checkpoint_at") or 0.0))
    return len(entry["gpus"]) * max(0.0, now - since)


def victim_from(job_id: str, entry: Mapping[str, Any],
                now: float) -> Victim:
    """The running job of a ledger allocation ``entry``, as a victim."""
    return Victim(job_id, int(entry["pid"]),
                  tuple(int(g) for g in entry["gpus"]),
                  int(entry.get("priority", 0)), int(entry.get("token") or 0),
                  work_at_risk(entry, now))


def candidates(allocations: Mapping[str, Mapping[str, Any]],
               priority: int, now: float) -> list[Victim]:
    """Running jobs a job of ``priority`` may preempt: preemptible, less
    urgent, and not already asked to yield."""
    return [victim_from(job_id, entry, now)
            for job_id, entry in allocations.items()
            if entry.get("preemptible") and not entry.get("preempt")
            and int(entry.get("priority", 0)) < priority]


def _cost(victims: Sequence[Victim]) -> tuple[float, int, int]:
    return (round(sum(v.lost_gpu_seconds for v in victims), 6),
            max(v.priority for v in victims), len(victims))


def choose_victims(topology: HostTopology, policy: PlacementPolicy,
                   request: GpuRequest, free: Iterable[int],
                   pool: Sequence[Victim]) -> list[Victim] | None:
    """The cheapest set of ``pool`` whose GPUs, with ``free``, place
    ``request``; None if even all of them would not."""
    free = frozenset(free)

    def fits(victims: Iterable[Victim]) -> bool:
        gpus = set(free)
        for victim in victims:
            gpus.update(victim.gpus)
        try:
            policy.place(topology, request, free=sorted(gpus))
        except UnsatisfiableGpuRequest:
            return False
        return True

    if not pool or not fits(pool):
        return None
    if len(pool) <= EXHAUSTIVE_UP_TO:
        best: tuple | None = None
        for size in range(1, len(pool) + 1):
            for subset in itertools.combinations(pool, size):
                if fits(subset) and (best is None
                                     or _cost(subset) < best[0]):
                    best = (_cost(subset), list(subset))
        return best[1] if best else None
    chosen: list[Victim] = []
    for victim in sorted(pool, key=lambda v: _cost([v])):
        chosen.append(victim)
        if fits(chosen):
            break
    for victim in sorted(chosen, key=lambda v: _cost([v]), reverse=True):
        rest = [v for v in chosen if v is not victim]
        if rest and fits(rest):
            chosen = rest
    return chosen
