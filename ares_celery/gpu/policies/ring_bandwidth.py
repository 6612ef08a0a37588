"""The ring-bandwidth policy: the GPU set whose collective runs fastest.

Why bandwidth and not points: the Ares seed added +50 per NVLink pair, -30
per PCIe pair and +10 for consecutive indices, which prefers a set with many
fast pairs even when its collective is held back by one slow hop.  An
all-reduce over a ring runs at the speed of the ring's slowest edge, so a set
is scored by the **bottleneck bandwidth of the best Hamiltonian ring** through
it (GB/s per direction; two GPUs: their link; one GPU: ``inf``, it needs no
interconnect).

Sets that score the same (to 1e-6 GB/s) are told apart, in order, by

1. the free GPUs left over: the best ring of the next power-of-two job
   (largest power of two <= GPUs left) that still fits among them, higher
   first, so a 2-GPU job does not split the only fast quad a 4-GPU job needs;
2. how many NUMA nodes the set spans, fewer first;
3. the lowest GPU indices (lexicographic), so the answer is deterministic.

The search is exact.  Per topology (keyed by :meth:`HostTopology.fingerprint`)
ring scores of GPU subsets are memoized, whole answers are memoized on
(fingerprint, free mask, k, link requirement), branch and bound stops a ring
search as soon as it reaches the upper bound, and a free set whose pairs all
have the same bandwidth (NVSwitch hosts) is answered without any search.
The caches are module-level, shared by every :class:`RingBandwidthPolicy`
instance, because the answer depends only on the topology and the request.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from ares_celery.errors import UnsatisfiableGpuRequest
from ares_celery.gpu.model import HostTopology
from ares_celery.gpu.placement import Placement, PlacementRequest, free_gpus, usable_gpus

#: Score of a set with no usable ring (only possible with ``interconnect="nvlink"``).
NO_RING = -1.0

#: Subsets enumerated outright below this count; above it a threshold search runs.
ENUMERATION_LIMIT = 5000

#: On the threshold path, ties are broken among at most this many optimal sets.
TIE_CANDIDATE_LIMIT = 64

_COMPILED_MAX = 128
_BEST_CACHE_MAX = 200_000


def _quantize(value: float) -> float:
    """Scores equal to 1e-6 GB/s are ties."""
    return value if math.isinf(value) else round(value, 6)


def _bits(mask: int) -> tuple[int, ...]:
    out = []
    pos = 0
    while mask:
        if mask & 1:
            out.append(pos)
        mask >>= 1
        pos += 1
    return tuple(out)


def _mask(positions: Iterable[int]) -> int:
    mask = 0
    for p in positions:
        mask |= 1 << p
    return mask


class _Compiled:
    """A topology reduced to a bandwidth matrix over positions 0..n-1, with caches."""

    def __init__(self, topo: HostTopology, nvlink_only: bool):
        # Read from the topology's networkx graph, the host model the rest of
        # the package (and the docs) describe: edge ``bandwidth`` and ``kind``,
        # node ``numa_node``.  A missing edge is no link at all (0 GB/s).
        graph = topo.graph
        self.key = (topo.fingerprint(), nvlink_only)
        self.indices = tuple(sorted(graph.nodes))
        position = {index: pos for pos, index in enumerate(self.indices)}
        n = len(self.indices)
        self.bw = [[0.0] * n for _ in range(n)]
        for i, j, edge in graph.edges(data=True):
            value = edge["bandwidth"]
            if nvlink_only and edge["kind"] != "nvlink":
                value = 0.0
            a, b = position[i], position[j]
            self.bw[a][b] = self.bw[b][a] = value
        self.numa = tuple(graph.nodes[index]["numa_node"] for index in self.indices)
        self._ring: dict[int, tuple[float, tuple[int, ...]]] = {}
        self._best: dict[tuple[int, int], float] = {}
        self._symmetric: dict[int, float | None] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Compiled) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    # -- one set -----------------------------------------------------------------

    def ring(self, mask: int) -> tuple[float, tuple[int, ...]]:
        """(bottleneck GB/s of the best ring through ``mask``, ring order)."""
        hit = self._ring.get(mask)
        if hit is not None:
            return hit
        vs = _bits(mask)
        if len(vs) == 1:
            result: tuple[float, tuple[int, ...]] = (math.inf, vs)
        elif len(vs) == 2:
            b = self.bw[vs[0]][vs[1]]
            result = (b, vs) if b > 0 else (NO_RING, ())
        else:
            result = self._best_ring(vs)
        self._ring[mask] = result
        return result

    def _best_ring(self, vs: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
        bw = self.bw
        # A ring uses two edges at every vertex, so no ring beats the smallest
        # "second-best edge" over the vertices: stop as soon as one reaches it.
        upper = math.inf
        for v in vs:
            edges = sorted((bw[v][u] for u in vs if u != v), reverse=True)
            upper = min(upper, edges[1])
        if upper <= 0:
            return (NO_RING, ())
        nbrs = {
            v: sorted((u for u in vs if u != v and bw[v][u] > 0), key=lambda u: -bw[v][u])
            for v in vs
        }
        start, k = vs[0], len(vs)
        best = [0.0, ()]
        path = [start]

        def extend(v: int, visited: int, low: float) -> bool:
            if low <= best[0]:
                return False
            if len(path) == k:
                closing = bw[v][start]
                value = min(low, closing)
                if closing > 0 and value > best[0]:
                    best[0], best[1] = value, tuple(path)
                return best[0] >= upper
            for u in nbrs[v]:
                edge = bw[v][u]
                if edge <= best[0]:
                    break
                if visited >> u & 1:
                    continue
                path.append(u)
                done = extend(u, visited | (1 << u), min(low, edge))
                path.pop()
                if done:
                    return True
            return False

        extend(start, 1 << start, math.inf)
        if best[0] <= 0:
            return (NO_RING, ())
        return (best[0], best[1])

    def symmetric(self, mask: int) -> float | None:
        """The common bandwidth if every pair in ``mask`` has the same one (> 0)."""
        if mask in self._symmetric:
            return self._symmetric[mask]
        vs = _bits(mask)
        values = {self.bw[a][b] for a, b in combinations(vs, 2)}
        result = values.pop() if len(values) == 1 else None
        if result is not None and result <= 0:
            result = None
        self._symmetric[mask] = result
        return result

    # -- best over subsets -----------------------------------------------------------

    def best_value(self, mask: int, k: int) -> float:
        """Best ring score of any ``k``-subset of ``mask`` (NO_RING if none)."""
        key = (mask, k)
        hit = self._best.get(key)
        if hit is not None:
            return hit
        positions = _bits(mask)
        if len(positions) < k:
            value = NO_RING
        elif k == 1:
            value = math.inf
        elif (sym := self.symmetric(mask)) is not None:
            value = sym
        elif math.comb(len(positions), k) <= ENUMERATION_LIMIT:
            ceiling = max(self.bw[a][b] for a, b in combinations(positions, 2))
            value = NO_RING
            for subset in combinations(positions, k):
                value = max(value, self.ring(_mask(subset))[0])
                if value >= ceiling:
                    break
        else:
            value = NO_RING
            for t in self._thresholds(positions):
                if next(self._sets_at(positions, k, t), None) is not None:
                    value = t
                    break
        if len(self._best) >= _BEST_CACHE_MAX:  # bounded: a long-lived worker sees many masks
            self._best.clear()
        self._best[key] = value
        return value

    def candidates(self, mask: int, k: int, value: float) -> list[int]:
        """Masks of the ``k``-subsets of ``mask`` whose ring score is ``value``."""
        positions = _bits(mask)
        if k == 1:
            return [1 << p for p in positions]
        if math.comb(len(positions), k) <= ENUMERATION_LIMIT:
            target = _quantize(value)
            return [
                m
                for m in (_mask(s) for s in combinations(positions, k))
                if _quantize(self.ring(m)[0]) == target
            ]
        found = []
        for m in self._sets_at(positions, k, value):
            found.append(m)
            if len(found) >= TIE_CANDIDATE_LIMIT:
                break
        return found

    def _thresholds(self, positions: tuple[int, ...]) -> list[float]:
        return sorted(
            {self.bw[a][b] for a, b in combinations(positions, 2) if self.bw[a][b] > 0},
            reverse=True,
        )

    def _sets_at(self, positions: tuple[int, ...], k: int, t: float) -> Iterator[int]:
        """``k``-subsets whose ring uses only edges >= t, lowest indices first.

        Vertices with fewer than two such edges cannot be on a ring and are
        peeled off first; a component that is a clique at ``t`` yields all its
        subsets with no ring search at all (PCIe switch groups, NVSwitch).
        """
        need = 2 if k >= 3 else 1
        adj = {v: {u for u in positions if u != v and self.bw[v][u] >= t} for v in positions}
        alive = set(positions)
        changed = True
        while changed:
            changed = False
            for v in list(alive):
                if len(adj[v] & alive) < need:
                    alive.discard(v)
                    changed = True
        seen: set[int] = set()
        for root in sorted(alive):
            if root in seen:
                continue
            comp, stack = set(), [root]
            while stack:
                v = stack.pop()
                if v in comp:
                    continue
                comp.add(v)
                stack.extend(adj[v] & alive - comp)
            seen |= comp
            if len(comp) < k:
                continue
            ordered = sorted(comp)
            clique = all(adj[v] >= comp - {v} for v in ordered)
            for subset in combinations(ordered, k):
                m = _mask(subset)
                if clique or self.ring(m)[0] >= t:
                    yield m


_COMPILED: OrderedDict[tuple[str, bool], _Compiled] = OrderedDict()


def _compile(topo: HostTopology, nvlink_only: bool) -> _Compiled:
    key = (topo.fingerprint(), nvlink_only)
    comp = _COMPILED.get(key)
    if comp is None:
        comp = _Compiled(topo, nvlink_only)
        _COMPILED[key] = comp
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return comp


def clear_placement_cache() -> None:
    """Forget memoized topologies and answers (benchmarks measure cold calls)."""
    _COMPILED.clear()
    _solve.cache_clear()


@dataclass(frozen=True)
class _Choice:
    positions: tuple[int, ...]
    score: float
    ring: tuple[int, ...]
    leftover: float | None
    leftover_k: int
    numa_nodes: int
    tied: int


def _leftover_job_size(remaining: int) -> int:
    """Largest power of two <= remaining GPUs, or 0 when fewer than two remain."""
    if remaining < 2:
        return 0
    return 1 << (remaining.bit_length() - 1)


def _numa_count(numa: tuple[int | None, ...], positions: Iterable[int]) -> int:
    return len({numa[p] for p in positions})


def _lexmin_fewest_numa(
    positions: tuple[int, ...], numa: tuple[int | None, ...], k: int
) -> tuple[int, ...]:
    """Lowest-index ``k``-subset among those spanning the fewest NUMA nodes."""
    sizes = sorted(
        (sum(1 for p in positions if numa[p] == n) for n in {numa[p] for p in positions}),
        reverse=True,
    )
    fewest, total = 0, 0
    while total < k:
        total += sizes[fewest]
        fewest += 1

    def completable(chosen: list[int]) -> bool:
        used = {numa[p] for p in chosen}
        if len(used) > fewest:
            return False
        after = [p for p in positions if p > chosen[-1]]
        needed = k - len(chosen) - sum(1 for p in after if numa[p] in used)
        if needed <= 0:
            return True
        others: dict[int | None, int] = {}
        for p in after:
            if numa[p] not in used:
                others[numa[p]] = others.get(numa[p], 0) + 1
        best = sorted(others.values(), reverse=True)[: fewest - len(used)]
        return sum(best) >= needed

    chosen: list[int] = []
    for p in positions:
        if len(chosen) == k:
            break
        if completable(chosen + [p]):
            chosen.append(p)
    return tuple(chosen)


@functools.lru_cache(maxsize=16384)
def _solve(comp: _Compiled, whole: _Compiled, eligible: int, free: int, k: int) -> _Choice | None:
    """Exact best set; ``comp`` scores (may be NVLink-only), ``whole`` judges leftovers."""
    value = comp.best_value(eligible, k)
    if value == NO_RING:
        return None
    positions = _bits(eligible)
    remaining = len(_bits(free)) - k
    m = _leftover_job_size(remaining)

    if k >= 2 and comp.symmetric(eligible) is not None and whole.symmetric(free) is not None:
        chosen = _lexmin_fewest_numa(positions, comp.numa, k)
        chosen_mask = _mask(chosen)
        leftover = whole.best_value(free & ~chosen_mask, m) if m else None
        return _choice(comp, chosen, value, leftover, m, math.comb(len(positions), k))

    best_key: tuple[Any, ...] | None = None
    best_mask, best_left = 0, None
    cands = comp.candidates(eligible, k, value)
    for cand in cands:
        left = whole.best_value(free & ~cand, m) if m else None
        members = _bits(cand)
        key = (
            -_quantize(left) if left is not None else 0.0,
            _numa_count(comp.numa, members),
            members,
        )
        if best_key is None or key < best_key:
            best_key, best_mask, best_left = key, cand, left
    return _choice(comp, _bits(best_mask), value, best_left, m, len(cands))


def _choice(
    comp: _Compiled,
    members: tuple[int, ...],
    value: float,
    leftover: float | None,
    leftover_k: int,
    tied: int,
) -> _Choice:
    return _Choice(
        members,
        value,
        comp.ring(_mask(members))[1],
        leftover,
        leftover_k,
        _numa_count(comp.numa, members),
        tied,
    )


class RingBandwidthPolicy:
    """Exact best ring bottleneck, then leftover ring, NUMA span, lowest indices.

    ``interconnect="nvlink"`` demands that every ring edge be NVLink (direct
    or through NVSwitch); None, "any" and "pcie" make no demand.
    """

    name = "ring-bandwidth"

    def place(
        self,
        topology: HostTopology,
        request: PlacementRequest,
        free: Iterable[int] | None = None,
    ) -> Placement:
        """See :meth:`PlacementPolicy.place`; the free set and the usable GPUs are
        checked by the helpers every policy shares, the search is this module's."""
        free_set = free_gpus(topology, free)
        eligible = usable_gpus(topology, request, free_set)
        k, nvlink_only = request.gpus, request.interconnect == "nvlink"
        position = {index: pos for pos, index in enumerate(topology.indices)}
        comp = _compile(topology, nvlink_only)
        whole = _compile(topology, False) if nvlink_only else comp
        choice = _solve(
            comp,
            whole,
            _mask(position[i] for i in eligible),
            _mask(position[i] for i in free_set),
            k,
        )
        if choice is None:
            raise UnsatisfiableGpuRequest(
                f"no {k} GPUs among the usable free GPUs {eligible} of host {topology.host} "
                f"form an NVLink ring (interconnect='nvlink' needs every ring edge to be "
                f"NVLink or NVSwitch)"
            )
        indices = topology.indices
        gpus = tuple(indices[p] for p in choice.positions)
        ring = tuple(indices[p] for p in choice.ring)
        return Placement(
            topology.host,
            gpus,
            choice.score,
            ring,
            _explain(topology, choice, gpus, ring),
            choice.leftover,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _explain(
    topo: HostTopology, choice: _Choice, gpus: tuple[int, ...], ring: tuple[int, ...]
) -> str:
    names = ",".join(map(str, gpus))
    if len(gpus) == 1:
        head = f"GPU {names} on host {topo.host}: one GPU needs no interconnect (score inf)"
    else:
        edges = (
            list(zip(ring, ring[1:] + ring[:1], strict=True)) if len(ring) > 2 else [tuple(ring)]
        )
        slow = min(edges, key=lambda e: topo.bandwidth(*e))
        path = "-".join(map(str, ring + ring[:1])) if len(ring) > 2 else f"{ring[0]}-{ring[1]}"
        head = (
            f"GPUs {names} on host {topo.host}: best ring {path} has bottleneck "
            f"{choice.score:g} GB/s per direction (slowest edge {slow[0]}-{slow[1]} "
            f"{topo.link(*slow).label()})"
        )
    if choice.tied <= 1:
        return head + "; no other set scores as high"
    parts = []
    if choice.leftover_k:
        left = (
            "no ring"
            if choice.leftover is None or choice.leftover == NO_RING
            else f"{choice.leftover:g} GB/s"
        )
        parts.append(f"leaves the free GPUs a best {choice.leftover_k}-GPU ring of {left}")
    parts.append(f"spans {choice.numa_nodes} NUMA node(s)")
    parts.append("lowest indices")
    return head + f"; {choice.tied} sets tie on score, this one " + ", then ".join(parts)
