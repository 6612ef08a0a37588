"""Topology model: JSON round trip, fingerprint, bandwidth, graph, mocks, loading."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import pytest

from ares_celery.errors import AresError, GpuRequestError, TopologyParseError
from ares_celery.gpu import (
    MOCK_TOPOLOGY_NAMES,
    Gpu,
    HostTopology,
    Link,
    load_topology,
    mock_topology,
)
from ares_celery.gpu.bandwidth import nvlink_gbps, pcie_gbps

DATA = Path(__file__).parent / "data"


def test_mock_names_are_the_contract():
    assert set(MOCK_TOPOLOGY_NAMES) == {
        "dgx1-v100",
        "dgx-a100",
        "hgx-h100",
        "pcie-8x-2socket",
        "pcie-4x-2switch",
        "nvswitch-16x",
    }


def test_unknown_mock_lists_valid_names():
    with pytest.raises(AresError) as info:
        mock_topology("dgx-9000")
    for name in MOCK_TOPOLOGY_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", MOCK_TOPOLOGY_NAMES)
def test_json_round_trip_is_lossless(name):
    topo = mock_topology(name, host="node-7")
    again = HostTopology.from_json(topo.to_json())
    assert again == topo
    assert again.to_json() == topo.to_json()
    assert again.host == "node-7"
    assert again.fingerprint() == topo.fingerprint()
    assert again.links == topo.links and again.gpus == topo.gpus


def test_round_trip_keeps_unknowns_and_every_field():
    gpus = [
        Gpu(
            0,
            uuid="GPU-a",
            name="X",
            memory_total_mb=1000,
            memory_free_mb=10,
            utilization=3,
            numa_node=1,
            mig_mode=True,
            pcie_gen=4,
            pcie_width=8,
        ),
        Gpu(1),
    ]
    links = {(0, 1): Link("nvlink", nvlink_lanes=4, nvlink_gen=3, pcie_level="PXB", nvswitch=True)}
    topo = HostTopology("h", gpus, links)
    assert HostTopology.from_json(topo.to_json()) == topo
    assert HostTopology.from_json(topo.to_json()).gpu(1) == Gpu(1)


def test_fingerprint_is_deterministic_and_ignores_volatile_fields():
    a = mock_topology("dgx1-v100", host="a")
    b = mock_topology("dgx1-v100", host="b")
    assert a.fingerprint() == b.fingerprint()
    assert a.replace_gpu(2, memory_free_mb=1, utilization=99).fingerprint() == a.fingerprint()
    assert a.replace_gpu(2, numa_node=1).fingerprint() != a.fingerprint()
    assert mock_topology("dgx-a100").fingerprint() != mock_topology("hgx-h100").fingerprint()


def test_bandwidth_numbers_follow_the_reference():
    v100 = mock_topology("dgx1-v100")
    assert v100.bandwidth(0, 1) == 25.0  # NV1
    assert v100.bandwidth(0, 3) == 50.0  # NV2
    assert v100.bandwidth(3, 0) == 50.0
    assert v100.bandwidth(0, 5) <= 10.0  # SYS, across QPI
    assert mock_topology("dgx-a100").bandwidth(0, 7) == 300.0  # 12 x 25
    assert mock_topology("hgx-h100").bandwidth(0, 7) == 450.0  # 18 x 25
    assert nvlink_gbps(18, 5) == 900.0
    assert pcie_gbps("PIX", 3, 16) == 12.0
    assert pcie_gbps("PIX", 4, 16) == 24.0
    assert pcie_gbps("PIX", 5, 16) == 50.0
    assert pcie_gbps("PIX", 4, 8) == 12.0
    levels = [pcie_gbps(level, 4, 16) for level in ("PIX", "PXB", "PHB", "NODE", "SYS")]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == 5
    assert pcie_gbps(None, None, None) == pcie_gbps("SYS", 3, 16)  # unknown = slowest


def test_bandwidth_and_link_errors():
    topo = mock_topology("pcie-4x-2switch")
    with pytest.raises(GpuRequestError):
        topo.bandwidth(1, 1)
    with pytest.raises(GpuRequestError, match="no GPU 9"):
        topo.bandwidth(0, 9)
    with pytest.raises(TopologyParseError):
        Link("infiniband")
    with pytest.raises(TopologyParseError):
        Link("pcie", pcie_level="QPI")
    with pytest.raises(TopologyParseError):
        HostTopology("h", [Gpu(0), Gpu(0)], {})
    with pytest.raises(TopologyParseError):
        HostTopology.from_json("{not json")
    with pytest.raises(TopologyParseError):
        HostTopology.from_json('{"format": "something-else"}')


def test_missing_pairs_become_unknown_pcie():
    topo = HostTopology("h", [Gpu(0), Gpu(1)], {})
    assert topo.link(0, 1) == Link("pcie")
    assert topo.bandwidth(0, 1) == pcie_gbps("SYS", None, None)


def test_graph_has_gpus_as_nodes_and_bandwidth_edges():
    topo = mock_topology("dgx1-v100")
    g = topo.graph
    assert isinstance(g, nx.Graph)
    assert sorted(g.nodes) == list(range(8))
    assert g.number_of_edges() == 28
    assert g.edges[0, 3]["bandwidth"] == 50.0
    assert g.edges[0, 3]["kind"] == "nvlink" and g.edges[0, 3]["nvlink_lanes"] == 2
    assert g.edges[0, 5]["pcie_level"] == "SYS"
    assert g.nodes[4]["numa_node"] == 1
    g.remove_node(0)
    assert len(topo.graph) == 8  # a fresh graph every time


def test_mock_facts():
    dgx2 = mock_topology("nvswitch-16x")
    assert len(dgx2) == 16
    assert all(link.nvswitch and link.nvlink_lanes == 6 for link in dgx2.links.values())
    assert dgx2.bandwidth(0, 15) == 150.0
    a100 = mock_topology("dgx-a100")
    assert a100.gpu(0).memory_total_mb >= 40000 and a100.link(0, 1).nvlink_gen == 3
    v100 = mock_topology("dgx1-v100")
    assert [g.numa_node for g in v100] == [0] * 4 + [1] * 4
    assert all(g.memory_total_mb == 16160 for g in v100)
    assert sum(v100.link(0, j).nvlink_lanes or 0 for j in range(1, 8)) == 6
    assert not any(link.nvswitch for link in v100.links.values())
    pcie = mock_topology("pcie-8x-2socket")
    assert not any(link.is_nvlink for link in pcie.links.values())
    assert math.isclose(pcie.bandwidth(0, 1), 24.0)


def test_load_topology_from_name_json_and_text(tmp_path):
    assert load_topology("hgx-h100") == mock_topology("hgx-h100")
    saved = tmp_path / "node.json"
    saved.write_text(mock_topology("dgx-a100", host="n3").to_json())
    assert load_topology(saved) == mock_topology("dgx-a100", host="n3")
    assert load_topology(str(saved), host="other").host == "other"
    text = load_topology(DATA / "dgx1v_mlx5.txt")
    assert text.host == "dgx1v_mlx5" and len(text) == 8
    with pytest.raises(AresError, match="dgx1-v100"):
        load_topology(tmp_path / "missing.txt")
