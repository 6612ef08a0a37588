"""What a placement is, and the seam every placement policy plugs into.

go-gpuallocator's shape: one ``Policy`` interface, one file per policy under
:mod:`ares_celery.gpu.policies`.  This module holds only what every policy
shares (the answer type, the two protocols, and the checks of the free set
and of which GPUs may be used at all) so that a policy depends on it and it
depends on no policy, and so that a new policy cannot drift from the others
on what "free" or "usable" means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ares_celery.errors import GpuRequestError, UnsatisfiableGpuRequest
from ares_celery.gpu.model import HostTopology


class PlacementRequest(Protocol):
    """What a policy reads of a request; :class:`~ares_celery.gpu.request.GpuRequest`
    is the one implementation, and it has already validated every field.

    Declared here (not imported from ``request.py``) so policies need not know
    the request module, which itself looks policies up by name.
    """

    @property
    def gpus(self) -> int:
        """How many GPUs, >= 1."""
        ...

    @property
    def min_memory_gb(self) -> float | None:
        """Floor on each GPU's total memory in decimal GB, or None."""
        ...

    @property
    def interconnect(self) -> str | None:
        """None, ``"any"``, ``"pcie"`` or ``"nvlink"`` (lower case)."""
        ...


class PlacementPolicy(Protocol):
    """Chooses which free GPUs of one host a request gets (go-gpuallocator's ``Policy``)."""

    #: The name a request selects the policy by (``GpuRequest(policy=...)``).
    name: str

    def place(
        self,
        topology: HostTopology,
        request: PlacementRequest,
        free: Iterable[int] | None = None,
    ) -> Placement:
        """The best GPUs of ``topology`` among ``free`` (None = all GPUs).

        Raises GpuRequestError for a malformed topology or free set and
        UnsatisfiableGpuRequest, saying why, when no set qualifies.
        """
        ...


@dataclass(frozen=True)
class Placement:
    """The chosen GPUs and why.

    ``gpus`` are GPU indices, sorted; ``score`` is the bottleneck GB/s (per
    direction) of the best ring through them (``inf`` for one GPU); ``ring``
    is that ring's order; ``reason`` says all of it in words.
    """

    host: str
    gpus: tuple[int, ...]
    score: float
    ring: tuple[int, ...]
    reason: str
    leftover_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``inf`` becomes the string ``"inf"``)."""
        return {
            "host": self.host,
            "gpus": list(self.gpus),
            "score": "inf" if math.isinf(self.score) else self.score,
            "ring": list(self.ring),
            "reason": self.reason,
            "leftover_score": self.leftover_score,
        }


def free_gpus(topology: HostTopology, free: Iterable[int] | None) -> set[int]:
    """The free set as GPU indices of ``topology``; GpuRequestError if it names others.

    Shared by every policy so that a stale or mistyped free list fails the
    same way whichever policy a request chose.
    """
    if not isinstance(topology, HostTopology):
        raise GpuRequestError(f"expected a HostTopology, got {type(topology).__name__}")
    if free is None:
        return set(topology.indices)
    if isinstance(free, (str, bytes)):
        raise GpuRequestError(f"free must be an iterable of GPU indices, got {free!r}")
    free_set = set(free)
    unknown = sorted(map(repr, free_set - set(topology.indices)))
    if unknown:
        raise GpuRequestError(
            f"free lists GPUs {', '.join(unknown)} that host {topology.host} does not have "
            f"(GPUs: {list(topology.indices)})"
        )
    return free_set


def memory_ok(memory_total_mb: int | None, min_memory_gb: float | None) -> bool:
    """Memory in MiB against a decimal-GB floor, as GPU model names count it
    (an "80GB" H100 reports 81559 MiB = 85.5 GB, so 80 passes)."""
    if min_memory_gb is None:
        return True
    if memory_total_mb is None:
        return False
    return memory_total_mb * 1024 * 1024 >= min_memory_gb * 1e9


def usable_gpus(topology: HostTopology, request: PlacementRequest, free_set: set[int]) -> list[int]:
    """Free GPUs any policy may hand out, sorted; UnsatisfiableGpuRequest if too few.

    ``min_memory_gb`` compares each GPU's *total* memory (whole GPUs are
    handed out; free memory is a transient reading), and a GPU of unknown
    memory does not qualify; GPUs with MIG enabled are never usable.  The
    error names every reason a GPU was left out, since "not enough GPUs" alone
    sends an operator to the wrong machine.
    """
    k, host, total = request.gpus, topology.host, len(topology)
    if k > total:
        raise UnsatisfiableGpuRequest(f"host {host} has {total} GPUs; need {k}")
    if len(free_set) < k:
        raise UnsatisfiableGpuRequest(
            f"host {host} has {total} GPUs, {len(free_set)} free; need {k}"
        )
    mig = [i for i in sorted(free_set) if topology.gpu(i).mig_mode is True]
    small = [
        i
        for i in sorted(free_set)
        if i not in mig and not memory_ok(topology.gpu(i).memory_total_mb, request.min_memory_gb)
    ]
    eligible = sorted(free_set - set(mig) - set(small))
    if len(eligible) < k:
        excluded = []
        if small:
            excluded.append(
                f"GPUs {small} have less than {request.min_memory_gb:g} GB total memory "
                f"(or unknown)"
            )
        if mig:
            excluded.append(f"GPUs {mig} are in MIG mode")
        raise UnsatisfiableGpuRequest(
            f"host {host} has {total} GPUs, {len(free_set)} free, {len(eligible)} usable; need {k} "
            f"({'; '.join(excluded)})"
        )
    return eligible
