"""What a GPU task asks for, validated once, where the request is made.

:class:`GpuRequest` is the only validator of a GPU requirement: the task
decorator, the router, the worker's allocator and :func:`best_placement` all
build or receive one, so a rule (what counts as a memory floor, which link
names exist, which policy chooses the GPUs) is written here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ares_celery.errors import GpuRequestError
from ares_celery.gpu.model import HostTopology
from ares_celery.gpu.placement import Placement, PlacementPolicy
from ares_celery.gpu.policies import DEFAULT_POLICY, policy_named

#: Accepted ``interconnect`` values (matched case-insensitively); all but
#: "nvlink" put no demand on links.
INTERCONNECTS: tuple[str | None, ...] = (None, "any", "pcie", "nvlink")


@dataclass(frozen=True)
class GpuRequest:
    """``gpus`` GPUs, each with at least ``min_memory_gb`` GB of total memory,
    (for ``interconnect="nvlink"``) every link of the ring on NVLink, chosen by
    the placement policy named ``policy``.

    ``interconnect`` is stored lower-cased, so ``"NVLink"`` and ``"nvlink"``
    are one request shape and share cached routes.
    """

    gpus: int
    min_memory_gb: float | None = None
    interconnect: str | None = None
    policy: str = DEFAULT_POLICY

    def __post_init__(self) -> None:
        gpus = self.gpus
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise GpuRequestError(f"gpus must be an int >= 1, got {gpus!r}")
        mem = self.min_memory_gb
        # > 0, not >= 0: a floor of 0 GB would still exclude GPUs whose memory
        # is unknown, which is never what "0" means to a caller; None says "any".
        if mem is not None and (
            isinstance(mem, bool) or not isinstance(mem, (int, float)) or not 0 < mem < math.inf
        ):
            raise GpuRequestError(f"min_memory_gb must be a number > 0 or None, got {mem!r}")
        link = (
            self.interconnect.lower() if isinstance(self.interconnect, str) else self.interconnect
        )
        if link not in INTERCONNECTS:
            raise GpuRequestError(
                f"interconnect must be one of {INTERCONNECTS}, got {self.interconnect!r}"
            )
        object.__setattr__(self, "interconnect", link)
        policy_named(self.policy)  # GpuRequestError naming the known policies

    @property
    def shape(self) -> tuple[int, float | None, str | None, str]:
        """Hashable key; routes are cached per shape."""
        return (self.gpus, self.min_memory_gb, self.interconnect, self.policy)

    @property
    def placement_policy(self) -> PlacementPolicy:
        """The policy that chooses this request's GPUs."""
        return policy_named(self.policy)

    def describe(self) -> str:
        """The request in words, for error messages and logs."""
        parts = [f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"]
        if self.min_memory_gb:
            parts.append(f">= {self.min_memory_gb:g} GB each")
        if self.interconnect == "nvlink":
            parts.append("on an NVLink ring")
        if self.policy != DEFAULT_POLICY:
            parts.append(f"by the {self.policy} policy")
        return " ".join(parts)


def best_placement(
    topo: HostTopology,
    k: int,
    free: Iterable[int] | None = None,
    min_memory_gb: float | None = None,
    interconnect: str | None = None,
) -> Placement:
    """Best ``k`` GPUs of ``topo`` among ``free`` (None = all GPUs), by the default policy.

    The loose-argument form of ``GpuRequest(k, min_memory_gb, interconnect)
    .placement_policy.place(topo, request, free)``; it lives beside
    :class:`GpuRequest` because the request is what validates its arguments.
    ``min_memory_gb`` compares each GPU's *total* memory in decimal GB (a GPU
    of unknown memory does not qualify); GPUs with MIG enabled are never
    chosen; ``interconnect="nvlink"`` demands that every ring edge be NVLink.

    Raises GpuRequestError for malformed arguments and UnsatisfiableGpuRequest,
    saying why, when no set qualifies.
    """
    request = GpuRequest(k, min_memory_gb=min_memory_gb, interconnect=interconnect)
    return request.placement_policy.place(topo, request, free=free)
