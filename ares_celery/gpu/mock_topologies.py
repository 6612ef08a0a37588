"""Named stand-in hosts for machines without GPUs (CI, laptops, the benchmark).

Each mock is written the way an operator would see the real machine: its
``nvidia-smi topo -m`` matrix plus the per-GPU facts that matrix does not show
(model, memory, PCIe generation, NVLink generation).  Building mocks through
the parser keeps the parser exercised by every test that uses a mock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ares_celery.errors import AresError
from ares_celery.gpu.model import HostTopology, Link


class UnknownMockTopology(AresError, ValueError):
    """A mock topology name that does not exist; the message lists the valid ones."""


@dataclass(frozen=True)
class _MockSpec:
    matrix: str
    gpu_name: str
    memory_total_mb: int
    pcie_gen: int
    nvlink_gen: int | None
    description: str


def _nvswitch_matrix(count: int, lanes: int, numa_of: list[int]) -> str:
    cols = [f"GPU{i}" for i in range(count)]
    rows = ["\t" + "\t".join(cols) + "\tCPU Affinity\tNUMA Affinity"]
    for i in range(count):
        cells = ["X" if i == j else f"NV{lanes}" for j in range(count)]
        cpus = f"{numa_of[i] * 16}-{numa_of[i] * 16 + 15}"
        rows.append(f"GPU{i}\t" + "\t".join(cells) + f"\t{cpus}\t{numa_of[i]}")
    return "\n".join(rows) + "\n"


# DGX-1 with V100: hybrid cube-mesh.  Each GPU has 6 NVLink2 links: NV2 to two
# peers, NV1 to two, and no NVLink to the other three (SYS, across the QPI).
_DGX1_V100 = """\
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity  NUMA Affinity
GPU0     X      NV1     NV1     NV2     NV2     SYS     SYS     SYS     0-19,40-59      0
GPU1    NV1      X      NV2     NV1     SYS     NV2     SYS     SYS     0-19,40-59      0
GPU2    NV1     NV2      X      NV2     SYS     SYS     NV1     SYS     0-19,40-59      0
GPU3    NV2     NV1     NV2      X      SYS     SYS     SYS     NV1     0-19,40-59      0
GPU4    NV2     SYS     SYS     SYS      X      NV1     NV1     NV2     20-39,60-79     1
GPU5    SYS     NV2     SYS     SYS     NV1      X      NV2     NV1     20-39,60-79     1
GPU6    SYS     SYS     NV1     SYS     NV1     NV2      X      NV2     20-39,60-79     1
GPU7    SYS     SYS     SYS     NV1     NV2     NV1     NV2      X      20-39,60-79     1
"""

# Eight PCIe cards (no NVLink) in a two-socket server: two cards per PCIe
# switch, two switches per socket.
_PCIE_8X_2SOCKET = """\
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity  NUMA Affinity
GPU0     X      PIX     NODE    NODE    SYS     SYS     SYS     SYS     0-31,64-95      0
GPU1    PIX      X      NODE    NODE    SYS     SYS     SYS     SYS     0-31,64-95      0
GPU2    NODE    NODE     X      PIX     SYS     SYS     SYS     SYS     0-31,64-95      0
GPU3    NODE    NODE    PIX      X      SYS     SYS     SYS     SYS     0-31,64-95      0
GPU4    SYS     SYS     SYS     SYS      X      PIX     NODE    NODE    32-63,96-127    1
GPU5    SYS     SYS     SYS     SYS     PIX      X      NODE    NODE    32-63,96-127    1
GPU6    SYS     SYS     SYS     SYS     NODE    NODE     X      PIX     32-63,96-127    1
GPU7    SYS     SYS     SYS     SYS     NODE    NODE    PIX      X      32-63,96-127    1
"""

# A one-socket workstation with four cards behind two PCIe switches that meet
# at the CPU's host bridge.
_PCIE_4X_2SWITCH = """\
        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity
GPU0     X      PIX     PHB     PHB     0-31            0
GPU1    PIX      X      PHB     PHB     0-31            0
GPU2    PHB     PHB      X      PIX     0-31            0
GPU3    PHB     PHB     PIX      X      0-31            0
"""

_SPECS: dict[str, _MockSpec] = {
    "dgx1-v100": _MockSpec(
        _DGX1_V100,
        "Tesla V100-SXM2-16GB",
        16160,
        3,
        2,
        "DGX-1 (V100): 8 GPUs, NVLink2 hybrid cube-mesh, 2 sockets",
    ),
    "dgx-a100": _MockSpec(
        _nvswitch_matrix(8, 12, [3, 3, 1, 1, 7, 7, 5, 5]),
        "NVIDIA A100-SXM4-80GB",
        81920,
        4,
        3,
        "DGX A100: 8 GPUs, 12 NVLink3 each into 6 NVSwitches, 4 NUMA nodes with GPUs",
    ),
    "hgx-h100": _MockSpec(
        _nvswitch_matrix(8, 18, [0, 0, 0, 0, 1, 1, 1, 1]),
        "NVIDIA H100 80GB HBM3",
        81559,
        5,
        4,
        "HGX H100: 8 GPUs, 18 NVLink4 each into 4 NVSwitches, 2 sockets",
    ),
    "pcie-8x-2socket": _MockSpec(
        _PCIE_8X_2SOCKET,
        "NVIDIA L40S",
        46068,
        4,
        None,
        "8 PCIe gen4 GPUs, 2 per switch, 2 switches per socket, 2 sockets",
    ),
    "pcie-4x-2switch": _MockSpec(
        _PCIE_4X_2SWITCH,
        "NVIDIA RTX A6000",
        49140,
        4,
        None,
        "4 PCIe gen4 GPUs behind 2 switches under one host bridge",
    ),
    "nvswitch-16x": _MockSpec(
        _nvswitch_matrix(16, 6, [0] * 8 + [1] * 8),
        "Tesla V100-SXM3-32GB",
        32510,
        3,
        2,
        "DGX-2 style: 16 V100 GPUs, 6 NVLink2 each into 12 NVSwitches, 2 sockets",
    ),
}

#: Valid names for :func:`mock_topology`.
MOCK_TOPOLOGY_NAMES: tuple[str, ...] = tuple(_SPECS)


def mock_topology_description(name: str) -> str:
    """One line saying what hardware the mock ``name`` stands for."""
    return _spec(name).description


def _spec(name: str) -> _MockSpec:
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise UnknownMockTopology(
            f"unknown mock topology {name!r}; valid names: {', '.join(MOCK_TOPOLOGY_NAMES)}"
        ) from None


def mock_topology(name: str, host: str | None = None) -> HostTopology:
    """The named mock host (``host`` defaults to ``mock-<name>``)."""
    spec = _spec(name)
    parsed = HostTopology.from_nvidia_smi(spec.matrix, host=host or f"mock-{name}")
    gpus = [
        dataclasses.replace(
            g,
            uuid=f"GPU-mock-{name}-{g.index:02d}",
            name=spec.gpu_name,
            memory_total_mb=spec.memory_total_mb,
            memory_free_mb=spec.memory_total_mb,
            utilization=0,
            mig_mode=False,
            pcie_gen=spec.pcie_gen,
            pcie_width=16,
        )
        for g in parsed.gpus
    ]
    links: dict[tuple[int, int], Link] = {
        pair: dataclasses.replace(link, nvlink_gen=spec.nvlink_gen) if link.is_nvlink else link
        for pair, link in parsed.links.items()
    }
    return HostTopology(parsed.host, gpus, links)


def load_topology(path_or_name: str | Path, host: str | None = None) -> HostTopology:
    """A mock name, a saved ``to_json`` file, or a ``nvidia-smi topo -m`` text file.

    ``host`` overrides the host name (a text file defaults to its file stem).
    """
    if isinstance(path_or_name, str) and path_or_name in _SPECS:
        return mock_topology(path_or_name, host=host)
    path = Path(path_or_name)
    if not path.is_file():
        raise UnknownMockTopology(
            f"{str(path_or_name)!r} is neither a file nor a mock topology; "
            f"valid names: {', '.join(MOCK_TOPOLOGY_NAMES)}"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        topo = HostTopology.from_json(text)
        return topo.with_host(host) if host else topo
    return HostTopology.from_nvidia_smi(text, host=host or path.stem)
