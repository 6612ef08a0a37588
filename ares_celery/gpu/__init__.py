"""GPU inventory and topology-aware placement for ares-celery.

``HostTopology`` is the model of one host (from NVML, ``nvidia-smi topo -m``
text, JSON, or a named mock); a :class:`PlacementPolicy` (by default
``RingBandwidthPolicy``, chosen by ``GpuRequest.policy``) picks the GPUs a
job gets, and ``best_placement`` is its loose-argument form.  See
``docs/gpu-topology.md`` for the bandwidth model and the scoring.
"""

from ares_celery.gpu.bandwidth import link_gbps, nvlink_gbps, pcie_gbps
from ares_celery.gpu.mock_topologies import (
    MOCK_TOPOLOGY_NAMES,
    UnknownMockTopology,
    load_topology,
    mock_topology,
    mock_topology_description,
)
from ares_celery.gpu.model import PCIE_LEVELS, Gpu, HostTopology, Link, parse_topo_matrix
from ares_celery.gpu.nvml_probe import probe_nvml
from ares_celery.gpu.placement import Placement, PlacementPolicy
from ares_celery.gpu.policies import DEFAULT_POLICY, POLICIES, policy_named
from ares_celery.gpu.policies.ring_bandwidth import RingBandwidthPolicy, clear_placement_cache
from ares_celery.gpu.request import GpuRequest, best_placement

__all__ = [
    "DEFAULT_POLICY",
    "MOCK_TOPOLOGY_NAMES",
    "PCIE_LEVELS",
    "POLICIES",
    "Gpu",
    "GpuRequest",
    "HostTopology",
    "Link",
    "Placement",
    "PlacementPolicy",
    "RingBandwidthPolicy",
    "UnknownMockTopology",
    "best_placement",
    "clear_placement_cache",
    "link_gbps",
    "load_topology",
    "mock_topology",
    "mock_topology_description",
    "nvlink_gbps",
    "parse_topo_matrix",
    "pcie_gbps",
    "policy_named",
    "probe_nvml",
]
