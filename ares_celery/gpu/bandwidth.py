"""Link -> GB/s estimates, one direction, as a collective would see them.

Placement compares GPU sets by the bandwidth of their slowest ring edge, so
what matters here is the *order* of the numbers more than their last digit:
an NVLink pair must beat any PCIe pair, a PCIe switch (PIX) must beat a path
through the CPU (PHB), and a path across the socket interconnect (SYS) must
come last.  The constants below come from vendor datasheets and from NCCL's
own topology model (``src/graph/topo.h``); ``docs/gpu-topology.md`` lists the
sources next to each number.

All figures are GB/s per direction (10**9 bytes per second).
"""

from __future__ import annotations

from ares_celery.gpu.devices import Gpu, Link

#: NVLink bandwidth of one link ("lane" in ``nvidia-smi``'s NV# count) per
#: direction, by NVLink generation.  Gen1 (P100) 20 GB/s; gen2 (V100), gen3
#: (A100, 12 links) and gen4 (H100, 18 links) 25 GB/s; gen5 (B200, 18 links,
#: 1.8 TB/s total) 50 GB/s.  Gen6 is given gen5's figure until measured.
NVLINK_GBPS_PER_LANE: dict[int, float] = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0, 6: 50.0}

#: Per-lane figure used when the NVLink generation is not known (``topo -m``
#: text does not say): 25 GB/s is right for V100, A100 and H100.
DEFAULT_NVLINK_GBPS_PER_LANE = 25.0

#: ``NVB`` cells (NVLink through another GPU) count as this many direct lanes:
#: the traffic is forwarded by an intermediate GPU, so one lane is the honest
#: lower bound.
NVB_EQUIVALENT_LANES = 1

#: Usable PCIe x16 bandwidth per direction by generation (raw 8/16/32 GT/s
#: gen3/4/5 give 15.75/31.5/63 GB/s; measured peer-to-peer copies reach about
#: 12/24/50).  NCCL uses 12 GB/s for a gen3 x16 link (``PCI_BW``).
PCIE_X16_GBPS: dict[int, float] = {1: 3.0, 2: 6.0, 3: 12.0, 4: 24.0, 5: 50.0, 6: 100.0}

#: Generation assumed when neither GPU reports one (the conservative choice).
DEFAULT_PCIE_GEN = 3

#: Fraction of the x16 link bandwidth that survives each PCIe path level.
#: PIX (one switch) keeps the link rate; every extra hop through bridges, the
#: host bridge, or between host bridges of one socket costs a little more.
PCIE_PATH_FACTOR: dict[str, float] = {
    "PIX": 1.0,
    "PXB": 0.9,
    "PHB": 0.8,
    "NODE": 0.7,
    "SYS": 0.5,
}

#: Ceiling for paths that cross the CPU socket interconnect (SYS).  NCCL
#: models QPI at 6 GB/s and Skylake UPI at 10 GB/s (``QPI_BW``/``SKL_QPI_BW``).
CROSS_SOCKET_CAP_GBPS = 10.0


def nvlink_gbps(lanes: int | None, generation: int | None) -> float:
    """Bandwidth of ``lanes`` bonded NVLinks of ``generation`` (None = unknown)."""
    per_lane = NVLINK_GBPS_PER_LANE.get(generation or 0, DEFAULT_NVLINK_GBPS_PER_LANE)
    if generation is not None and generation > max(NVLINK_GBPS_PER_LANE):
        per_lane = NVLINK_GBPS_PER_LANE[max(NVLINK_GBPS_PER_LANE)]
    count = lanes if lanes else NVB_EQUIVALENT_LANES
    return count * per_lane


def pcie_gbps(level: str | None, generation: int | None, width: int | None) -> float:
    """Peer-to-peer PCIe bandwidth over a path of ``level`` (None = unknown = SYS).

    ``generation`` and ``width`` are the slower of the two GPUs' links; unknown
    values fall back to :data:`DEFAULT_PCIE_GEN` and x16.
    """
    gen = generation if generation else DEFAULT_PCIE_GEN
    gen = min(max(gen, min(PCIE_X16_GBPS)), max(PCIE_X16_GBPS))
    lanes = width if width else 16
    link = PCIE_X16_GBPS[gen] * min(lanes, 16) / 16.0
    factor = PCIE_PATH_FACTOR.get(level or "SYS", PCIE_PATH_FACTOR["SYS"])
    bandwidth = link * factor
    if (level or "SYS") == "SYS":
        bandwidth = min(bandwidth, CROSS_SOCKET_CAP_GBPS)
    return round(bandwidth, 6)


def _slower(a: int | None, b: int | None) -> int | None:
    known = [v for v in (a, b) if v]
    return min(known) if known else None


def link_gbps(link: Link, a: Gpu, b: Gpu) -> float:
    """Estimated bandwidth between GPUs ``a`` and ``b`` joined by ``link``.

    An NVLink pair uses the NVLink figure (its PCIe path is a fallback the
    driver does not take for peer traffic); everything else uses PCIe.
    """
    if link.kind == "nvlink":
        return round(nvlink_gbps(link.nvlink_lanes, link.nvlink_gen), 6)
    return pcie_gbps(
        link.pcie_level,
        _slower(a.pcie_gen, b.pcie_gen),
        _slower(a.pcie_width, b.pcie_width),
    )
