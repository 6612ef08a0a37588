"""Placement: known answers, the brute-force oracle, errors, and speed."""

from __future__ import annotations

import math
import random
from itertools import combinations

import pytest

from ares_celery.errors import AresError, GpuRequestError, UnsatisfiableGpuRequest
from ares_celery.gpu import (
    MOCK_TOPOLOGY_NAMES,
    HostTopology,
    Placement,
    best_placement,
    clear_placement_cache,
    mock_topology,
)
from ares_celery.gpu.model import Gpu, Link
from ares_celery.gpu.policies import ring_bandwidth

from .oracle import best_key_placement, best_score, ring_bottleneck

# -- known answers -----------------------------------------------------------------


def test_dgx1_pair_with_gpu0_is_an_nv2_pair():
    topo = mock_topology("dgx1-v100")
    # Among these free GPUs only 0-3 and 0-4 are NV2 (50 GB/s) pairs.
    p = best_placement(topo, 2, free=[0, 1, 3, 4, 6])
    assert p.gpus in {(0, 3), (0, 4)}
    assert p.score == 50.0
    assert p.gpus == (0, 3)  # same NUMA node as GPU 0 breaks the tie
    assert "NV2" in p.reason


def test_dgx1_best_pairs_are_exactly_the_nv2_pairs():
    topo = mock_topology("dgx1-v100")
    nv2 = {pair for pair, link in topo.links.items() if link.nvlink_lanes == 2}
    assert best_placement(topo, 2).score == 50.0
    for pair in combinations(range(8), 2):
        p = best_placement(topo, 2, free=pair)
        assert (p.score == 50.0) == (pair in nv2)


def test_dgx1_four_gpus_form_a_fully_nvlinked_quad():
    topo = mock_topology("dgx1-v100")
    p = best_placement(topo, 4)
    assert p.gpus == (0, 1, 2, 3)
    assert p.score == 25.0
    assert all(topo.link(a, b).is_nvlink for a, b in combinations(p.gpus, 2))
    assert sorted(p.ring) == list(p.gpus)


def test_dgx1_eight_gpus_ride_the_nv2_cycle():
    p = best_placement(mock_topology("dgx1-v100"), 8)
    assert p.score == 50.0
    assert len(p.ring) == 8


def test_nvswitch_sets_tie_so_numa_decides():
    topo = mock_topology("hgx-h100")
    assert best_placement(topo, 4).gpus == (0, 1, 2, 3)
    # Lowest indices would be 0,2,4,5 (two NUMA nodes); 4-7 share one.
    p = best_placement(topo, 4, free=[0, 2, 4, 5, 6, 7])
    assert p.gpus == (4, 5, 6, 7)
    assert p.score == 450.0
    a100 = mock_topology("dgx-a100")
    assert best_placement(a100, 2, free=[1, 2, 3, 5]).gpus == (2, 3)


def test_pcie_two_socket_four_gpu_job_stays_on_one_socket():
    topo = mock_topology("pcie-8x-2socket")
    assert best_placement(topo, 4).gpus == (0, 1, 2, 3)
    p = best_placement(topo, 4, free=[0, 1, 4, 5, 6, 7])
    assert p.gpus == (4, 5, 6, 7)
    assert p.score > topo.bandwidth(0, 4)


def test_single_gpu_keeps_the_switch_pair_whole():
    topo = mock_topology("pcie-4x-2switch")
    # GPUs 0,1 share a switch; taking 2 leaves them as a PIX pair.
    p = best_placement(topo, 1, free=[0, 1, 2])
    assert p.gpus == (2,)
    assert math.isinf(p.score)
    assert "2-GPU ring" in p.reason


def test_nvlink_requirement():
    topo = mock_topology("dgx1-v100")
    p = best_placement(topo, 4, free=[1, 2, 3, 4, 5, 6, 7], interconnect="nvlink")
    assert all(
        topo.link(a, b).is_nvlink for a, b in zip(p.ring, p.ring[1:] + p.ring[:1], strict=True)
    )
    with pytest.raises(UnsatisfiableGpuRequest, match="NVLink ring"):
        best_placement(mock_topology("pcie-8x-2socket"), 2, interconnect="nvlink")
    with pytest.raises(UnsatisfiableGpuRequest, match="NVLink ring"):
        best_placement(topo, 3, free=[0, 1, 5], interconnect="nvlink")
    for value in (None, "any", "pcie", "PCIe"):
        assert best_placement(topo, 2, interconnect=value).score == 50.0


def test_memory_filter_uses_total_memory_in_decimal_gb():
    h100 = mock_topology("hgx-h100")  # 81559 MiB = 85.5 GB: an "80GB" card
    assert best_placement(h100, 8, min_memory_gb=80).score == 450.0
    with pytest.raises(UnsatisfiableGpuRequest, match="less than 40 GB"):
        best_placement(mock_topology("dgx1-v100"), 1, min_memory_gb=40)
    small = h100.replace_gpu(3, memory_total_mb=16000)
    assert 3 not in best_placement(small, 7, min_memory_gb=40).gpus


def test_mig_gpus_are_never_chosen():
    topo = mock_topology("dgx-a100").replace_gpu(0, mig_mode=True)
    assert 0 not in best_placement(topo, 7).gpus
    with pytest.raises(UnsatisfiableGpuRequest, match="MIG"):
        best_placement(topo, 8)


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 1.5, "2", True, None])
def test_bad_count_is_a_request_error(k):
    with pytest.raises(GpuRequestError, match="int >= 1"):
        best_placement(mock_topology("dgx1-v100"), k)


def test_bad_arguments():
    topo = mock_topology("dgx1-v100")
    with pytest.raises(GpuRequestError, match="interconnect"):
        best_placement(topo, 2, interconnect="infiniband")
    with pytest.raises(GpuRequestError, match="min_memory_gb"):
        best_placement(topo, 2, min_memory_gb=-1)
    with pytest.raises(GpuRequestError, match="does not have"):
        best_placement(topo, 2, free=[0, 9])
    with pytest.raises(GpuRequestError):
        best_placement("dgx1-v100", 2)


def test_unsatisfiable_messages_say_why():
    topo = mock_topology("dgx1-v100", host="node-1")
    with pytest.raises(UnsatisfiableGpuRequest, match="host node-1 has 8 GPUs; need 16"):
        best_placement(topo, 16)
    with pytest.raises(UnsatisfiableGpuRequest, match="host node-1 has 8 GPUs, 3 free; need 4"):
        best_placement(topo, 4, free=[0, 1, 2])
    with pytest.raises(AresError):
        best_placement(topo, 4, free=[])


def test_placement_explains_itself():
    p = best_placement(mock_topology("dgx1-v100", host="n1"), 4)
    assert isinstance(p, Placement)
    for words in ("n1", "bottleneck 25 GB/s", "NV1", "tie", "NUMA"):
        assert words in p.reason
    assert p.to_dict()["gpus"] == [0, 1, 2, 3]


# -- the oracle --------------------------------------------------------------------


def _feasible(n_free: int, k: int) -> bool:
    return math.comb(n_free, k) * math.factorial(max(k - 1, 1)) <= 20_000


@pytest.mark.parametrize("name", MOCK_TOPOLOGY_NAMES)
def test_score_matches_exhaustive_optimum(name):
    topo = mock_topology(name)
    rng = random.Random(f"oracle-{name}")
    n = len(topo)
    checked = 0
    for _ in range(40 if n <= 8 else 12):
        free = tuple(sorted(rng.sample(range(n), rng.randint(1, n))))
        for k in range(1, len(free) + 1):
            if not _feasible(len(free), k):
                continue
            for nvlink in (False, True):
                want = best_score(topo, free, k, nvlink_only=nvlink)
                if want < 0:
                    with pytest.raises(UnsatisfiableGpuRequest):
                        best_placement(
                            topo, k, free=free, interconnect="nvlink" if nvlink else None
                        )
                    continue
                p = best_placement(topo, k, free=free, interconnect="nvlink" if nvlink else None)
                assert p.score == pytest.approx(want), (free, k, nvlink)
                assert ring_bottleneck(topo, p.gpus, nvlink) == pytest.approx(want)
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", ["dgx1-v100", "pcie-8x-2socket", "pcie-4x-2switch", "dgx-a100"])
def test_tie_breaks_match_brute_force(name):
    topo = mock_topology(name)
    rng = random.Random(f"ties-{name}")
    n = len(topo)
    for _ in range(25):
        free = tuple(sorted(rng.sample(range(n), rng.randint(2, n))))
        k = rng.choice([k for k in (1, 2, 3, 4) if k <= len(free)])
        assert best_placement(topo, k, free=free).gpus == best_key_placement(topo, free, k)


def _two_cube_meshes() -> HostTopology:
    """16 GPUs: two DGX-1V cube meshes joined across sockets (not symmetric)."""
    one = mock_topology("dgx1-v100")
    gpus = [
        Gpu(i, numa_node=i // 4, memory_total_mb=16160, pcie_gen=3, pcie_width=16)
        for i in range(16)
    ]
    links = {}
    for a in range(16):
        for b in range(a + 1, 16):
            if a // 8 == b // 8:
                links[(a, b)] = one.link(a % 8, b % 8)
            else:
                links[(a, b)] = Link("pcie", pcie_level="SYS")
    return HostTopology("two-meshes", gpus, links)


def test_sixteen_heterogeneous_gpus_use_the_threshold_search():
    topo = _two_cube_meshes()
    p = best_placement(topo, 8)
    assert p.gpus == tuple(range(8)) and p.score == 50.0
    p = best_placement(topo, 8, free=list(range(1, 16)))
    assert p.gpus == tuple(range(8, 16)) and p.score == 50.0
    free = tuple(range(3, 16))
    assert best_placement(topo, 3, free=free).score == best_score(topo, free, 3)


# -- memoization ------------------------------------------------------------------
# How fast a call is, cold and warm, is measured (never asserted: a busy
# machine would fail a threshold) by benchmarks/placement_benchmark.py.


def test_repeated_calls_are_answered_from_the_memo():
    topo = mock_topology("dgx1-v100")
    clear_placement_cache()
    first = best_placement(topo, 4)
    before = ring_bandwidth._solve.cache_info()
    for _ in range(10):
        assert best_placement(topo, 4) == first
    after = ring_bandwidth._solve.cache_info()
    assert after.hits - before.hits == 10
    assert after.misses == before.misses


def test_cold_sixteen_gpu_answers_equal_warm_ones():
    """Clearing the caches changes no answer (the memo is only a memo)."""
    topo = mock_topology("nvswitch-16x")
    rng = random.Random(16)
    for _ in range(10):
        free = sorted(rng.sample(range(16), rng.randint(8, 16)))
        warm = best_placement(topo, 8, free=free)
        clear_placement_cache()
        assert best_placement(topo, 8, free=free) == warm
