"""Brute-force reference answers for placement tests (slow, obviously right)."""

from __future__ import annotations

import functools
import math
from itertools import combinations, permutations

from ares_celery.gpu import HostTopology


@functools.cache
def ring_bottleneck(topo: HostTopology, gpus: tuple[int, ...], nvlink_only: bool = False) -> float:
    """Max over every Hamiltonian cycle of its slowest edge; -1 if none qualifies."""
    if len(gpus) == 1:
        return math.inf
    if len(gpus) == 2:
        if nvlink_only and not topo.link(*gpus).is_nvlink:
            return -1.0
        return topo.bandwidth(*gpus)
    best = -1.0
    first, rest = gpus[0], gpus[1:]
    for order in permutations(rest):
        cycle = (first, *order, first)
        edges = list(zip(cycle, cycle[1:], strict=False))
        if nvlink_only and not all(topo.link(a, b).is_nvlink for a, b in edges):
            continue
        best = max(best, min(topo.bandwidth(a, b) for a, b in edges))
    return best


def best_score(
    topo: HostTopology, free: tuple[int, ...], k: int, nvlink_only: bool = False
) -> float:
    return max(ring_bottleneck(topo, s, nvlink_only) for s in combinations(tuple(sorted(free)), k))


def best_key_placement(
    topo: HostTopology, free: tuple[int, ...], k: int, usable: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The full rule: score, then leftover's best power-of-two ring, NUMA count, indices."""
    usable = tuple(sorted(usable if usable is not None else free))
    remaining = len(free) - k
    m = 1 << (remaining.bit_length() - 1) if remaining >= 2 else 0
    keyed = []
    for s in combinations(usable, k):
        score = ring_bottleneck(topo, s)
        rest = tuple(g for g in free if g not in s)
        left = best_score(topo, rest, m) if m else 0.0
        numa = len({topo.gpu(g).numa_node for g in s})
        keyed.append(
            (-round(score, 6) if score != math.inf else -math.inf, -round(left, 6), numa, s)
        )
    return min(keyed)[3]
