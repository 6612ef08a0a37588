"""The placement-policy seam: the registry, the default policy, and the layering.

The policy must give exactly what ``best_placement`` gives (it is the same
search, reached through ``GpuRequest``), and the modules under it must stay in
layers so that the topology model can be read without the placement code.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import pytest

from ares_celery.errors import AresError, GpuRequestError, UnsatisfiableGpuRequest
from ares_celery.gpu import (
    DEFAULT_POLICY,
    MOCK_TOPOLOGY_NAMES,
    POLICIES,
    GpuRequest,
    RingBandwidthPolicy,
    best_placement,
    mock_topology,
    policy_named,
)

from .test_import_graph import import_graph

GPU = "ares_celery.gpu"


def test_the_default_policy_is_registered_under_its_name():
    assert DEFAULT_POLICY == "ring-bandwidth"
    assert isinstance(POLICIES[DEFAULT_POLICY], RingBandwidthPolicy)
    for name, policy in POLICIES.items():
        assert policy.name == name
        assert policy_named(name) is policy


@pytest.mark.parametrize("name", ["packed", "", "Ring-Bandwidth", None, 3, ["ring-bandwidth"]])
def test_an_unknown_policy_names_the_known_ones(name):
    with pytest.raises(GpuRequestError, match="known policies: ring-bandwidth") as info:
        policy_named(name)
    assert isinstance(info.value, AresError)


def test_the_registry_is_read_only():
    with pytest.raises(TypeError):
        POLICIES["mine"] = RingBandwidthPolicy()  # type: ignore[index]


@pytest.mark.parametrize("name", MOCK_TOPOLOGY_NAMES)
def test_ring_policy_places_exactly_as_best_placement(name):
    topo = mock_topology(name)
    policy = RingBandwidthPolicy()
    n = len(topo)
    for k in (1, 2, 3, 4, n):
        for free in (None, list(range(1, n)), list(range(0, n, 2)) + [1]):
            for interconnect in (None, "nvlink"):
                request = GpuRequest(k, interconnect=interconnect)
                try:
                    expected = best_placement(topo, k, free=free, interconnect=interconnect)
                except UnsatisfiableGpuRequest as exc:
                    with pytest.raises(UnsatisfiableGpuRequest) as info:
                        policy.place(topo, request, free=free)
                    assert str(info.value) == str(exc)
                    continue
                assert policy.place(topo, request, free=free) == expected
                assert request.placement_policy.place(topo, request, free=free) == expected


def test_a_policy_reads_any_object_with_the_request_fields():
    """Policies depend on the PlacementRequest protocol, not on request.py."""

    @dataclass(frozen=True)
    class Plain:
        gpus: int
        min_memory_gb: float | None = None
        interconnect: str | None = None

    topo = mock_topology("dgx1-v100")
    assert RingBandwidthPolicy().place(topo, Plain(2)) == best_placement(topo, 2)
    assert RingBandwidthPolicy().place(topo, Plain(4, 10.0, "nvlink"), free=[0, 1, 2, 3]) == (
        best_placement(topo, 4, free=[0, 1, 2, 3], min_memory_gb=10, interconnect="nvlink")
    )


@pytest.mark.parametrize("free, fragment", [
    ([0, 9], "does not have"),
    ("0123", "iterable of GPU indices"),
    ([0, "1"], "does not have"),
])
def test_the_policy_checks_the_free_set(free, fragment):
    with pytest.raises(GpuRequestError, match=fragment):
        RingBandwidthPolicy().place(mock_topology("dgx1-v100"), GpuRequest(1), free=free)


def test_the_policy_wants_a_topology():
    with pytest.raises(GpuRequestError, match="HostTopology"):
        RingBandwidthPolicy().place("dgx1-v100", GpuRequest(1))  # type: ignore[arg-type]


def test_gpu_modules_import_in_layers():
    graph = import_graph()
    sub = graph.subgraph(n for n in graph if n.startswith(GPU))

    def imports(module: str) -> set[str]:
        return set(sub.successors(f"{GPU}.{module}"))

    assert imports("devices") == set()
    assert imports("smi_parser") == {f"{GPU}.devices"}
    assert imports("bandwidth") == {f"{GPU}.devices"}
    assert imports("placement") == {f"{GPU}.model"}
    placement_core = {
        f"{GPU}.{m}"
        for m in ("devices", "bandwidth", "smi_parser", "model", "mock_topologies", "placement",
                  "request", "policies", "policies.ring_bandwidth", "nvml_probe")
    }
    assert list(nx.simple_cycles(sub.subgraph(placement_core))) == []
