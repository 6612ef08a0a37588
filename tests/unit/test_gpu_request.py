"""GpuRequest is the one validator of a GPU requirement, whoever makes one.

The decorator and ``best_placement`` used to validate separately and had
drifted (``min_memory_gb=0`` passed one and failed the other; only one of
them accepted ``"NVLink"``); both now go through ``GpuRequest``.
"""

from __future__ import annotations

import math

import pytest

from ares_celery.errors import AresError, GpuRequestError
from ares_celery.gpu import DEFAULT_POLICY, POLICIES, GpuRequest, best_placement, mock_topology


@pytest.mark.parametrize("gpus", [0, -1, 1.5, "2", True, None])
def test_gpus_must_be_a_positive_int(gpus):
    with pytest.raises(GpuRequestError, match="gpus must be an int >= 1"):
        GpuRequest(gpus)


@pytest.mark.parametrize("memory", [0, 0.0, -40, "40", True, math.nan, math.inf])
def test_min_memory_must_be_a_positive_finite_number(memory):
    with pytest.raises(GpuRequestError, match="min_memory_gb must be a number > 0") as info:
        GpuRequest(1, min_memory_gb=memory)
    assert isinstance(info.value, AresError)


@pytest.mark.parametrize("memory", [None, 0.5, 40, 80.0])
def test_min_memory_accepts_none_and_positive_numbers(memory):
    assert GpuRequest(1, min_memory_gb=memory).min_memory_gb == memory


@pytest.mark.parametrize("given, stored", [
    (None, None), ("any", "any"), ("pcie", "pcie"), ("PCIe", "pcie"), ("NVLink", "nvlink"),
])
def test_interconnect_is_matched_without_case_and_stored_lower(given, stored):
    request = GpuRequest(2, interconnect=given)
    assert request.interconnect == stored
    assert request.shape == GpuRequest(2, interconnect=stored).shape


@pytest.mark.parametrize("interconnect", ["infiniband", "", 3])
def test_unknown_interconnect(interconnect):
    with pytest.raises(GpuRequestError, match="interconnect must be one of"):
        GpuRequest(2, interconnect=interconnect)


def test_policy_defaults_and_must_be_known():
    request = GpuRequest(2)
    assert request.policy == DEFAULT_POLICY
    assert request.placement_policy is POLICIES[DEFAULT_POLICY]
    with pytest.raises(GpuRequestError, match="unknown placement policy 'packed'; known"):
        GpuRequest(2, policy="packed")


def test_shape_is_hashable_and_names_every_field():
    request = GpuRequest(4, 40, "nvlink")
    assert request.shape == (4, 40, "nvlink", DEFAULT_POLICY)
    assert {request.shape: 1}[GpuRequest(4, 40, "NVLINK").shape] == 1
    assert hash(request) == hash(GpuRequest(4, 40, "nvlink"))


def test_describe():
    assert GpuRequest(1).describe() == "1 GPU"
    assert GpuRequest(4, 40, "nvlink").describe() == "4 GPUs >= 40 GB each on an NVLink ring"
    assert GpuRequest(4, 40, "NVLink").interconnect == "nvlink"


@pytest.mark.parametrize("kwargs", [
    {"min_memory_gb": 0},
    {"min_memory_gb": -1},
    {"interconnect": "infiniband"},
])
def test_best_placement_rejects_what_the_request_rejects(kwargs):
    with pytest.raises(GpuRequestError) as direct:
        GpuRequest(2, **kwargs)
    with pytest.raises(GpuRequestError) as placed:
        best_placement(mock_topology("dgx1-v100"), 2, **kwargs)
    assert str(placed.value) == str(direct.value)


def test_best_placement_accepts_what_the_request_normalizes():
    topo = mock_topology("dgx1-v100")
    assert best_placement(topo, 4, interconnect="NVLink") == best_placement(
        topo, 4, interconnect="nvlink")
