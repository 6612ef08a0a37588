"""probe_nvml against a stubbed pynvml: unknowns, NVSwitch, NVLink, MIG, no driver."""

from __future__ import annotations

import sys

import pytest

from ares_celery.errors import NvmlUnavailable
from ares_celery.gpu import best_placement, mock_topology, probe_nvml

from . import fake_pynvml as fake
from .fake_pynvml import NOT_SUPPORTED, FakeGpu, FakeLink


def install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def bus(i: int) -> tuple[int, int, int]:
    return (0, 0x07 + 0x10 * i, 0)


def dgx1_like() -> list[FakeGpu]:
    """Direct NVLink, lanes copied from the DGX-1V mock, NVLink 2.0 (enum 2)."""
    ref = mock_topology("dgx1-v100")
    gpus = []
    for i in range(8):
        links = []
        for j in range(8):
            if i != j and ref.link(i, j).is_nvlink:
                links += [FakeLink(bus(j), remote_type=0, version=2)] * ref.link(i, j).nvlink_lanes
        gpus.append(
            FakeGpu(bus(i), name="Tesla V100-SXM2-16GB", numa=i // 4, pcie=(3, 16), links=links)
        )
    return gpus


def test_direct_nvlink_matches_the_dgx1_matrix(monkeypatch):
    levels = {(a, b): (30 if a // 4 == b // 4 else 50) for a in range(8) for b in range(a + 1, 8)}
    module = install(monkeypatch, fake.build(dgx1_like(), levels))
    topo = probe_nvml(host="dgx1")
    ref = mock_topology("dgx1-v100")
    assert topo.host == "dgx1" and len(topo) == 8
    for pair, link in topo.links.items():
        assert link.nvlink_lanes == ref.link(*pair).nvlink_lanes, pair
        assert not link.nvswitch
        if link.is_nvlink:
            assert link.nvlink_gen == 2
    assert topo.link(0, 5).pcie_level == "SYS" and topo.link(0, 1).pcie_level == "PHB"
    assert [g.numa_node for g in topo] == [0] * 4 + [1] * 4
    assert best_placement(topo, 4).gpus == (0, 1, 2, 3)
    assert module.calls == {"init": 1, "shutdown": 1}


def test_nvswitch_lanes_pair_up_as_min_of_both_sides(monkeypatch):
    switch_bus = (0, 0xF0, 0)
    gpus = [
        FakeGpu(bus(i), links=[FakeLink(switch_bus, remote_type=2, version=4)] * 12)
        for i in range(8)
    ]
    # GPU 7 has half of its links down.
    gpus[7].links = [FakeLink(switch_bus, remote_type=2, version=4)] * 6 + [
        FakeLink(switch_bus, remote_type=2, state=0)
    ] * 6
    install(monkeypatch, fake.build(gpus))
    topo = probe_nvml(host="a100")
    assert topo.link(0, 1).nvlink_lanes == 12 and topo.link(0, 1).nvswitch
    assert topo.link(0, 1).nvlink_gen == 3  # NVML version 4 = NVLink 3.0
    assert topo.bandwidth(0, 1) == 300.0
    assert topo.link(3, 7).nvlink_lanes == 6 and topo.bandwidth(3, 7) == 150.0
    assert best_placement(topo, 4, interconnect="nvlink").score == 300.0


def test_unsupported_fields_become_unknown(monkeypatch):
    gpus = [
        FakeGpu(
            bus(i),
            memory=NOT_SUPPORTED,
            utilization=NOT_SUPPORTED,
            numa=NOT_SUPPORTED,
            mig=NOT_SUPPORTED,
            pcie=NOT_SUPPORTED,
            name=NOT_SUPPORTED,
            links=[FakeLink(bus(1 - i), state=NOT_SUPPORTED)] * 4,
        )
        for i in range(2)
    ]
    module = install(monkeypatch, fake.build(gpus, levels={(0, 1): NOT_SUPPORTED}))
    topo = probe_nvml(host="odd")
    g = topo.gpu(0)
    assert (g.memory_total_mb, g.memory_free_mb, g.utilization, g.numa_node) == (None,) * 4
    assert (g.mig_mode, g.pcie_gen, g.pcie_width, g.name) == (None,) * 4
    assert g.uuid == "GPU-fake-0"
    assert topo.link(0, 1).kind == "pcie" and topo.link(0, 1).pcie_level is None
    assert best_placement(topo, 2).gpus == (0, 1)
    assert module.calls["shutdown"] == 1


def test_numa_from_affinity_and_old_driver_without_remote_type(monkeypatch):
    gpus = [
        FakeGpu(bus(0), numa=-1, affinity_node=65, links=[FakeLink(bus(1))] * 2),
        FakeGpu(bus(1), numa=NOT_SUPPORTED, affinity_node=2, links=[FakeLink(bus(0))] * 2),
    ]
    install(monkeypatch, fake.build(gpus, missing=("nvmlDeviceGetNvLinkRemoteDeviceType",)))
    topo = probe_nvml()
    assert [g.numa_node for g in topo] == [65, 2]
    assert topo.link(0, 1).nvlink_lanes == 2 and not topo.link(0, 1).nvswitch


def test_mig_enabled_gpu_is_recorded_and_skipped(monkeypatch):
    gpus = [FakeGpu(bus(i), mig=(1, 1) if i == 1 else (0, 0)) for i in range(4)]
    install(monkeypatch, fake.build(gpus))
    topo = probe_nvml(host="mig")
    assert [g.mig_mode for g in topo] == [False, True, False, False]
    assert topo.gpu(0).memory_total_mb == 80 * 1024 and topo.gpu(0).memory_free_mb == 70 * 1024
    assert 1 not in best_placement(topo, 3).gpus


@pytest.mark.parametrize("error", [fake.NVMLError_LibraryNotFound, fake.NVMLError_DriverNotLoaded])
def test_no_driver_raises_nvml_unavailable(monkeypatch, error):
    module = install(monkeypatch, fake.build([], init_error=error))
    with pytest.raises(NvmlUnavailable, match="ARES_MOCK_GPUS"):
        probe_nvml()
    assert module.calls["shutdown"] == 0


def test_no_pynvml_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py"):
        probe_nvml()


def test_shutdown_even_when_probe_breaks(monkeypatch):
    module = install(monkeypatch, fake.build([FakeGpu(bus(0))]))

    def explode():
        raise RuntimeError("unexpected")

    module.nvmlDeviceGetCount = explode
    with pytest.raises(RuntimeError):
        probe_nvml()
    assert module.calls == {"init": 1, "shutdown": 1}


def test_probed_topology_round_trips(monkeypatch):
    install(monkeypatch, fake.build(dgx1_like()))
    topo = probe_nvml(host="x")
    assert type(topo).from_json(topo.to_json()) == topo
