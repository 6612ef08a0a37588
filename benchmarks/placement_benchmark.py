"""Trace-driven comparison of GPU placement policies on a mixed mock cluster.

Run: ``python benchmarks/placement_benchmark.py [--jobs N] [--seeds N]`` (~10 s).

A seeded stream of 1/2/4/8-GPU jobs arrives (Poisson) at a cluster of mock
hosts and runs for a seeded time; every policy sees the same trace.  A job
that does not fit waits in a FIFO queue (later jobs may backfill past it).
Each policy picks both the host (its own best score, then either the host
with the fewest free GPUs that fit, "pack", or the most, "spread", then host
order) and the GPUs on it:

* ``ares-celery``: :func:`ares_celery.gpu.best_placement` (ring bottleneck,
  leftover, NUMA, indices);
* ``seed-points``: the Ares seed's rule: +50 per NVLink pair, -30 per PCIe
  pair, +10 per pair of consecutive indices (best subset by that sum);
* ``gpuallocator``: go-gpuallocator-like: per pair 100 x direct NVLink lanes
  plus a PCIe level score (same board 60, single switch 50, multiple switches
  40, host bridge 30, same CPU 20, cross CPU 10; our model folds NVML's
  INTERNAL "same board" into PIX), summed; NVSwitch pairs look
  PCIe-only to it, as they do to go-gpuallocator;
* ``first-fit``: lowest free indices (it scores every set 0, so the host
  rule alone picks the host);
* ``exhaustive``: the best ring bottleneck by brute force over every subset
  and every ring (lowest indices among optima; on the 16-GPU NVSwitch host all
  sets score the same, so lowest indices are an optimum there too).

Reported per policy: mean and 10th percentile of the collective bandwidth
(GB/s, bottleneck of the best ring through the job's GPUs, per our bandwidth
model) over multi-GPU jobs, how many jobs had to wait while the cluster had
enough free GPUs in total (fragmentation), and the mean queueing delay.  Then
the time per ``best_placement`` call at 8 and 16 GPUs.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations, permutations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ares_celery.errors import UnsatisfiableGpuRequest  # noqa: E402
from ares_celery.gpu import HostTopology, best_placement, clear_placement_cache, mock_topology  # noqa: E402

CLUSTER = [
    "dgx1-v100",
    "dgx1-v100",
    "dgx-a100",
    "hgx-h100",
    "pcie-8x-2socket",
    "pcie-8x-2socket",
    "pcie-4x-2switch",
    "pcie-4x-2switch",
    "nvswitch-16x",
]
JOB_SIZES = (1, 2, 4, 8)
JOB_WEIGHTS = (0.35, 0.3, 0.2, 0.15)
BRUTE_FORCE_LIMIT = 3000  # subsets; above it the point rules grow greedily

Choice = tuple[float, tuple[int, ...]]  # (policy's own score, GPUs)


# -- the yardstick: exact ring bottleneck --------------------------------------------


@functools.cache
def ring_bandwidth(topo: HostTopology, gpus: tuple[int, ...]) -> float:
    """Best ring's slowest edge, by brute force (symmetric sets answered directly)."""
    if len(gpus) == 1:
        return math.inf
    pairs = {topo.bandwidth(a, b) for a, b in combinations(gpus, 2)}
    if len(pairs) == 1 or len(gpus) == 2:
        return min(pairs) if len(gpus) == 2 else pairs.pop()
    first, rest = gpus[0], gpus[1:]
    best = 0.0
    for order in permutations(rest):
        cycle = (first, *order, first)
        best = max(best, min(topo.bandwidth(a, b) for a, b in zip(cycle, cycle[1:], strict=False)))
    return best


# -- policies ------------------------------------------------------------------------


def ours(topo: HostTopology, free: tuple[int, ...], k: int) -> Choice | None:
    try:
        p = best_placement(topo, k, free=free)
    except UnsatisfiableGpuRequest:
        return None
    return (p.score, p.gpus)


def first_fit(topo: HostTopology, free: tuple[int, ...], k: int) -> Choice | None:
    return (0.0, tuple(sorted(free)[:k])) if len(free) >= k else None


def exhaustive(topo: HostTopology, free: tuple[int, ...], k: int) -> Choice | None:
    if len(free) < k:
        return None
    best: Choice | None = None
    for subset in combinations(sorted(free), k):
        value = ring_bandwidth(topo, subset)
        if best is None or value > best[0]:
            best = (value, subset)
    return best


def _best_by_pair_sum(
    free: tuple[int, ...],
    k: int,
    pair_score: Callable[[int, int], float],
    bonus: Callable[[tuple[int, ...]], float],
) -> Choice | None:
    if len(free) < k:
        return None
    ordered = sorted(free)

    def total(subset: tuple[int, ...]) -> float:
        return sum(pair_score(a, b) for a, b in combinations(subset, 2)) + bonus(subset)

    if math.comb(len(ordered), k) <= BRUTE_FORCE_LIMIT:
        return max(
            ((total(s), s) for s in combinations(ordered, k)),
            key=lambda c: (c[0], [-g for g in c[1]]),
        )
    best: Choice | None = None
    for seed in ordered:  # greedy growth from every start, as simple schedulers do
        chosen = [seed]
        while len(chosen) < k:
            rest = [g for g in ordered if g not in chosen]
            chosen.append(max(rest, key=lambda g: (sum(pair_score(g, c) for c in chosen), -g)))
        subset = tuple(sorted(chosen))
        value = total(subset)
        if best is None or value > best[0]:
            best = (value, subset)
    return best


def seed_points(topo: HostTopology, free: tuple[int, ...], k: int) -> Choice | None:
    def pair(a: int, b: int) -> float:
        return 50.0 if topo.link(a, b).is_nvlink else -30.0

    def consecutive(subset: tuple[int, ...]) -> float:
        return 10.0 * sum(1 for a, b in zip(subset, subset[1:], strict=False) if b == a + 1)

    return _best_by_pair_sum(free, k, pair, consecutive)


_GPUALLOC_LEVEL = {"PIX": 50, "PXB": 40, "PHB": 30, "NODE": 20, "SYS": 10}


def gpuallocator(topo: HostTopology, free: tuple[int, ...], k: int) -> Choice | None:
    def pair(a: int, b: int) -> float:
        link = topo.link(a, b)
        if link.is_nvlink and not link.nvswitch:
            return 100.0 * (link.nvlink_lanes or 1)
        if link.pcie_level:
            return float(_GPUALLOC_LEVEL[link.pcie_level])
        # NVSwitch pairs: the remote bus ids match no GPU, so only PCIe is seen.
        same_node = topo.gpu(a).numa_node == topo.gpu(b).numa_node
        return 20.0 if same_node else 10.0

    return _best_by_pair_sum(free, k, pair, lambda subset: 0.0)


POLICIES: dict[str, Callable[[HostTopology, tuple[int, ...], int], Choice | None]] = {
    "ares-celery": ours,
    "seed-points": seed_points,
    "gpuallocator": gpuallocator,
    "first-fit": first_fit,
    "exhaustive": exhaustive,
}


# -- simulation ----------------------------------------------------------------------


@dataclass(order=True)
class Job:
    arrival: float
    ident: int
    gpus: int = field(compare=False)
    duration: float = field(compare=False)


def make_trace(jobs: int, seed: int, total_gpus: int) -> list[Job]:
    rng = random.Random(seed)
    mean_size = sum(s * w for s, w in zip(JOB_SIZES, JOB_WEIGHTS, strict=True))
    mean_duration = 10.0
    load = 0.9
    rate = load * total_gpus / (mean_size * mean_duration)
    t, out = 0.0, []
    for ident in range(jobs):
        t += rng.expovariate(rate)
        size = rng.choices(JOB_SIZES, JOB_WEIGHTS)[0]
        out.append(Job(t, ident, size, rng.expovariate(1 / mean_duration)))
    return out


@dataclass
class Result:
    bandwidths: list[float] = field(default_factory=list)
    fragmented: set[int] = field(default_factory=set)
    waits: list[float] = field(default_factory=list)


def simulate(
    policy: Callable, hosts: list[HostTopology], trace: list[Job], pack: bool = True
) -> Result:
    free = [set(h.indices) for h in hosts]
    events: list[tuple[float, int, int, tuple[int, ...]]] = []  # (time, host, seq, gpus)
    queue: list[Job] = []
    result = Result()
    seq = 0

    def try_place(job: Job, now: float) -> bool:
        best = None
        for pos, host in enumerate(hosts):
            if len(free[pos]) < job.gpus:
                continue
            choice = policy(host, tuple(sorted(free[pos])), job.gpus)
            if choice is None:
                continue
            key = (choice[0], -len(free[pos]) if pack else len(free[pos]), -pos)
            if best is None or key > best[0]:
                best = (key, pos, choice[1])
        if best is None:
            if sum(len(f) for f in free) >= job.gpus:
                result.fragmented.add(job.ident)
            return False
        _, pos, gpus = best
        free[pos] -= set(gpus)
        nonlocal seq
        seq += 1
        heapq.heappush(events, (now + job.duration, seq, pos, gpus))
        if job.gpus > 1:
            result.bandwidths.append(ring_bandwidth(hosts[pos], tuple(sorted(gpus))))
        result.waits.append(now - job.arrival)
        return True

    def drain(now: float) -> None:
        for job in list(queue[:16]):
            if sum(len(f) for f in free) == 0:
                break
            if try_place(job, now):
                queue.remove(job)

    for job in trace:
        while events and events[0][0] <= job.arrival:
            now, _, pos, gpus = heapq.heappop(events)
            free[pos] |= set(gpus)
            drain(now)
        queue.append(job)
        drain(job.arrival)
    while events or queue:
        if not events:
            break
        now, _, pos, gpus = heapq.heappop(events)
        free[pos] |= set(gpus)
        drain(now)
    return result


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def time_calls(name: str, calls: int, seed: int) -> tuple[float, float, float, float]:
    """(cold p50, cold p99, warm p50, warm p99) ms per best_placement call."""
    topo = mock_topology(name)
    rng = random.Random(seed)
    cold, warm = [], []
    n = len(topo)
    for _ in range(calls):
        k = rng.choice([k for k in JOB_SIZES if k <= n])
        free = sorted(rng.sample(range(n), rng.randint(k, n)))
        clear_placement_cache()
        start = time.perf_counter()
        best_placement(topo, k, free=free)
        mid = time.perf_counter()
        best_placement(topo, k, free=free)
        cold.append((mid - start) * 1e3)
        warm.append((time.perf_counter() - mid) * 1e3)
    return _pct(cold, 0.5), _pct(cold, 0.99), _pct(warm, 0.5), _pct(warm, 0.99)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1500, help="jobs per trace")
    parser.add_argument("--seeds", type=int, default=5, help="traces (seeds 0..N-1), averaged")
    parser.add_argument("--timing-calls", type=int, default=400)
    args = parser.parse_args(argv)

    hosts = [mock_topology(name, host=f"{name}-{i}") for i, name in enumerate(CLUSTER)]
    total = sum(len(h) for h in hosts)
    traces = [make_trace(args.jobs, seed, total) for seed in range(args.seeds)]
    print(f"cluster: {len(hosts)} hosts, {total} GPUs ({', '.join(CLUSTER)})")
    print(
        f"traces: {args.seeds} x {args.jobs} jobs of {JOB_SIZES} GPUs (weights {JOB_WEIGHTS}), "
        "~90% offered load; figures are means over the traces"
    )
    print("host rule: policy score, then pack (fewest free GPUs) | spread (most free GPUs)\n")
    header = (
        f"{'policy':<14}{'mean GB/s':>10}{'p10 GB/s':>10}{'frag waits':>12}{'mean wait':>11}"
        f"{'frag waits':>12}{'mean wait':>11}{'sim s':>7}"
    )
    print(f"{'':<14}{'':>10}{'':>10}{'(pack)':>12}{'(pack)':>11}{'(spread)':>12}{'(spread)':>11}")
    print(header)
    print("-" * len(header))
    for name, policy in POLICIES.items():
        clear_placement_cache()
        start = time.perf_counter()
        rows = {True: [], False: []}
        for pack in (True, False):
            for trace in traces:
                res = simulate(policy, hosts, trace, pack=pack)
                rows[pack].append(
                    (
                        statistics.fmean(res.bandwidths),
                        _pct(res.bandwidths, 0.10),
                        len(res.fragmented),
                        statistics.fmean(res.waits),
                    )
                )
        elapsed = time.perf_counter() - start

        def avg(pack: bool, col: int, rows: dict = rows) -> float:
            return statistics.fmean(r[col] for r in rows[pack])

        print(
            f"{name:<14}{avg(True, 0):>10.1f}{avg(True, 1):>10.1f}{avg(True, 2):>12.1f}"
            f"{avg(True, 3):>11.2f}{avg(False, 2):>12.1f}{avg(False, 3):>11.2f}{elapsed:>7.1f}"
        )
    print("\nbest_placement call time, ms (cold = placement caches cleared before the call)")
    print(
        f"{'host':<18}{'GPUs':>5}{'cold p50':>10}{'cold p99':>10}{'warm p50':>10}{'warm p99':>10}"
    )
    for name in ("dgx1-v100", "pcie-8x-2socket", "hgx-h100", "nvswitch-16x"):
        c50, c99, w50, w99 = time_calls(name, args.timing_calls, 11)
        size = len(mock_topology(name))
        print(f"{name:<18}{size:>5}{c50:>10.3f}{c99:>10.3f}{w50:>10.3f}{w99:>10.3f}")
    k8 = []
    topo = mock_topology("nvswitch-16x")
    rng = random.Random(3)
    for _ in range(args.timing_calls):
        free = sorted(rng.sample(range(16), rng.randint(8, 16)))
        clear_placement_cache()
        start = time.perf_counter()
        best_placement(topo, 8, free=free)
        k8.append((time.perf_counter() - start) * 1e3)
    print(f"nvswitch-16x, k=8 only: cold p50 {_pct(k8, 0.5):.3f} ms, p99 {_pct(k8, 0.99):.3f} ms")


if __name__ == "__main__":
    main()
