"""GPU inventory and topology-aware placement for ares-celery.

``HostTopology`` is the model of one host (from NVML, ``nvidia-smi topo -m``
text, JSON, or a named mock); ``best_placement`` picks the GPUs a job gets.
See ``docs/gpu-topology.md`` for the bandwidth model and the scoring.
"""

from ares_celery.gpu.bandwidth import link_gbps, nvlink_gbps, pcie_gbps
from ares_celery.gpu.mock_topologies import (
    MOCK_TOPOLOGY_NAMES,
    UnknownMockTopology,
    load_topology,
    mock_topology,
    mock_topology_description,
)
from ares_celery.gpu.model import PCIE_LEVELS, Gpu, HostTopology, Link
from ares_celery.gpu.nvml_probe import probe_nvml
from ares_celery.gpu.placement import Placement, best_placement, clear_placement_cache
from ares_celery.gpu.smi_parser import parse_topo_matrix

__all__ = [
    "MOCK_TOPOLOGY_NAMES",
    "PCIE_LEVELS",
    "Gpu",
    "HostTopology",
    "Link",
    "Placement",
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
    "probe_nvml",
]
