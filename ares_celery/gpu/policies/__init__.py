"""Placement policies by name, one module each (go-gpuallocator's layout).

A request names its policy (``GpuRequest(policy=...)``) rather than holding
an instance so that it stays a hashable value that routes can be cached on
and that crosses process boundaries as text.  Adding a policy is one module
here plus one entry in :data:`POLICIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ares_celery.errors import GpuRequestError
from ares_celery.gpu.placement import PlacementPolicy
from ares_celery.gpu.policies.ring_bandwidth import RingBandwidthPolicy

#: The policy a request gets when it names none.
DEFAULT_POLICY = "ring-bandwidth"

#: Every known policy by name (read-only: policies are chosen, not registered at run time).
POLICIES: Mapping[str, PlacementPolicy] = MappingProxyType(
    {policy.name: policy for policy in (RingBandwidthPolicy(),)}
)


def policy_named(name: str) -> PlacementPolicy:
    """The policy called ``name``; GpuRequestError naming the known ones otherwise."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise GpuRequestError(
            f"unknown placement policy {name!r}; known policies: {', '.join(sorted(POLICIES))}"
        ) from None


__all__ = ["DEFAULT_POLICY", "POLICIES", "RingBandwidthPolicy", "policy_named"]
