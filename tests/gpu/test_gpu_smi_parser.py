"""``nvidia-smi topo -m`` parsing on outputs shaped like real bug reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from ares_celery.errors import TopologyParseError
from ares_celery.gpu import HostTopology, best_placement, mock_topology

DATA = Path(__file__).parent / "data"


def parse(name: str, host: str = "node-1") -> HostTopology:
    return HostTopology.from_nvidia_smi((DATA / name).read_text(), host=host)


def test_dgx1v_with_mlx5_columns_and_cpu_affinity_only():
    topo = parse("dgx1v_mlx5.txt")
    assert topo.host == "node-1"
    assert topo.indices == tuple(range(8))
    mock = mock_topology("dgx1-v100")
    for pair, link in topo.links.items():
        assert link.nvlink_lanes == mock.link(*pair).nvlink_lanes
        assert link.pcie_level == mock.link(*pair).pcie_level
    # Old driver: no NUMA Affinity column, nodes inferred from the CPU sets.
    assert [g.numa_node for g in topo] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert best_placement(topo, 2, free=[0, 1, 3, 4, 6]).gpus == (0, 3)


def test_dgx_a100_with_nics_numa_and_gpu_numa_id():
    topo = parse("dgx_a100_nics.txt")
    assert len(topo) == 8
    assert [g.numa_node for g in topo] == [3, 3, 1, 1, 7, 7, 5, 5]
    assert all(link.nvlink_lanes == 12 and link.nvswitch for link in topo.links.values())
    assert topo.bandwidth(0, 7) == 300.0


def test_h100_pcie_with_nv12_bridge_pairs():
    topo = parse("h100_pcie_nv12_pairs.txt")
    assert topo.link(0, 1).nvlink_lanes == 12 and not topo.link(0, 1).nvswitch
    assert topo.link(0, 2).pcie_level == "NODE"
    assert topo.link(0, 4).pcie_level == "SYS"
    assert best_placement(topo, 2, free=[1, 2, 3, 5]).gpus == (2, 3)
    assert best_placement(topo, 4).gpus == (0, 1, 2, 3)
    pair = parse("h100_pcie_pair.txt")
    assert pair.link(0, 1).nvlink_lanes == 12 and not pair.link(0, 1).nvswitch


def test_two_socket_pcie_with_tabs_and_empty_fields():
    topo = parse("pcie_2socket_tabs.txt")
    assert [g.numa_node for g in topo] == [0] * 4 + [1] * 4
    assert topo.link(0, 1).pcie_level == "NODE" and topo.link(3, 4).pcie_level == "SYS"
    assert best_placement(topo, 4, free=[0, 1, 4, 5, 6, 7]).gpus == (4, 5, 6, 7)


def test_legacy_soc_reads_as_sys():
    topo = parse("k80_soc_legacy.txt")
    assert topo.link(0, 2).pcie_level == "SYS"
    assert topo.link(0, 1).pcie_level == "PIX"
    assert [g.numa_node for g in topo] == [0, 0, 1, 1]


def test_nvb_cells_are_nvlink_through_a_gpu():
    text = "\tGPU0\tGPU1\tGPU2\nGPU0\t X \tNV2\tNVB\nGPU1\tNV2\t X \tNV2\nGPU2\tNVB\tNV2\t X \n"
    topo = HostTopology.from_nvidia_smi(text)
    assert topo.link(0, 2).via_gpu and topo.link(0, 2).is_nvlink
    assert topo.link(0, 2).label() == "NVB"
    assert topo.bandwidth(0, 2) == 25.0


def test_mock_matrices_round_trip_through_the_parser():
    # A regenerated matrix from a model parses back to the same links.
    topo = mock_topology("pcie-8x-2socket")
    rows = ["\t" + "\t".join(f"GPU{i}" for i in topo.indices)]
    for i in topo.indices:
        cells = ["X" if i == j else topo.link(i, j).label() for j in topo.indices]
        rows.append(f"GPU{i}\t" + "\t".join(cells))
    again = HostTopology.from_nvidia_smi("\n".join(rows))
    assert all(again.link(*p).pcie_level == link.pcie_level for p, link in topo.links.items())


GOOD = """\
        GPU0    GPU1    CPU Affinity
GPU0     X      PIX     0-7
GPU1    PIX      X      0-7
"""


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "no nvidia-smi topo -m header"),
        ("hello world\n", r"line 1: 'hello world'"),
        (
            GOOD.replace("GPU1    PIX      X", "GPU1    QPI      X"),
            r"line 3: unknown cell 'QPI'.*GPU1    QPI",
        ),
        (
            GOOD.replace("GPU1    PIX      X      0-7", "GPU1    PIX"),
            r"line 3: expected 2 cells, found 1",
        ),
        (GOOD.replace("GPU0     X      PIX", "GPU0     PIX    X"), r"line 2: .*diagonal"),
        (
            GOOD.replace("GPU1    PIX", "GPU1    PXB"),
            r"GPU0->GPU1 is PIX but line 3: GPU1->GPU0 is PXB",
        ),
        (GOOD.replace("GPU1    PIX      X      0-7\n", ""), "no matrix row for GPU1"),
        (
            GOOD.replace("GPU1    PIX      X      0-7", "GPU7    PIX      X      0-7"),
            r"line 3: row label 'GPU7'",
        ),
        (GOOD.replace("0-7\nGPU1", "0-7 extra junk\nGPU1"), r"line 2: 2 unexpected trailing"),
    ],
)
def test_malformed_text_names_the_line(text, pattern):
    with pytest.raises(TopologyParseError, match=pattern):
        HostTopology.from_nvidia_smi(text)


def test_good_minimal_text_parses():
    topo = HostTopology.from_nvidia_smi(GOOD, host="h")
    assert topo.link(0, 1).pcie_level == "PIX" and topo.gpu(0).numa_node == 0
