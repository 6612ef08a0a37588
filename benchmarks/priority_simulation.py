"""Discrete-event simulation of GPU job priorities, preemption and checkpoints.

Run: ``python benchmarks/priority_simulation.py [--jobs N] [--seed S]
[--checkpoint-minutes K]`` (pure Python, a few seconds).

One seeded trace (Poisson arrivals; 1/2/4/8-GPU jobs; priorities 0-9;
lognormal, heavy-tailed durations) runs on 72 GPUs, nine 8-GPU hosts as in
``placement_benchmark.py``, under each policy in the same run:

* ``fifo``: waiting jobs get GPUs in submission order (a job that fits may
  pass a bigger one that does not): the order ares had before priorities.
* ``priority``: the hosts' ledger rule (``ares_celery.gpu.allocation``):
  effective priority (aged by ``ares_celery.gpu.priority.effective_priority``,
  +1 level per 15 minutes waited, capped at 9), then submission time; a
  waiter that does not fit blocks the levels below it on the host it waits
  on, so freed GPUs accumulate for it.
* ``preempt``: ``priority``, plus preemption when a job cannot start
  anywhere: on the host where stopping preemptible jobs of lower priority
  frees a placement at the least cost, the victims (fewest GPU-seconds lost
  since their last checkpoint, then lowest priority) get a 30 s grace and
  stop; the preempting job gets their GPUs; the victims are requeued with
  their original submission time and resume from their last checkpoint.
  Run without checkpoints (lost work = the whole run so far) and with a
  checkpoint every K minutes (lost work = time since the last one).

Approximation: jobs wait in one line per cluster rather than on one host's
queue. Workers re-route a job that waits on a host longer than
``ares_gpu_wait_timeout`` (60 s), so over job durations of minutes to hours
the host lines behave like one; a job that cannot fit anywhere waits on the
host with the most free GPUs and blocks lower levels there.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ares_celery.gpu.priority import (  # noqa: E402
    AGING_STEP_S,
    CLASSES,
    effective_priority,
    priority_class,
)

HOSTS = 9
GPUS_PER_HOST = 8
JOB_SIZES = (1, 2, 4, 8)
JOB_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
#: Priority classes' shares of the trace: low 0-3, normal 4-6, high 7-9.
CLASS_WEIGHTS = (0.4, 0.4, 0.2)
#: Share of low and normal jobs that are preemptible (high never are).
PREEMPTIBLE_SHARE = 0.8
MEDIAN_DURATION_S = 600.0
DURATION_SIGMA = 1.5           # lognormal: mean ~3x the median, long tail
MAX_DURATION_S = 24 * 3600.0
LOAD = 0.95                    # offered GPU-time / capacity
GRACE_S = 30.0                 # ares_preempt_grace


@dataclass
class Job:
    ident: int
    arrival: float
    size: int
    priority: int
    duration: float
    preemptible: bool
    remaining: float = 0.0
    first_start: float | None = None
    run_start: float = 0.0
    host: int = -1
    run: int = 0               # bumps on every start: stale events skip
    stopping: bool = False
    pinned: int = -1           # host whose freed GPUs this job is owed
    preempted: int = 0
    queued_since: float = 0.0
    waited: float = 0.0        # every wait, first and after preemptions


@dataclass
class Host:
    free: int = GPUS_PER_HOST
    running: set[int] = field(default_factory=set)


@dataclass
class Policy:
    name: str
    priorities: bool
    preempt: bool
    checkpoint_s: float | None = None
    aging_s: float = AGING_STEP_S


@dataclass
class Outcome:
    waits: dict[str, list[float]]
    lost_gpu_s: float
    preemptions: int
    makespan: float


def make_trace(jobs: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    mean_size = sum(s * w for s, w in zip(JOB_SIZES, JOB_WEIGHTS, strict=True))
    mean_duration = MEDIAN_DURATION_S * math.exp(DURATION_SIGMA ** 2 / 2)
    rate = LOAD * HOSTS * GPUS_PER_HOST / (mean_size * mean_duration)
    t, out = 0.0, []
    for ident in range(jobs):
        t += rng.expovariate(rate)
        size = rng.choices(JOB_SIZES, JOB_WEIGHTS)[0]
        members = rng.choices([c[1] for c in CLASSES], CLASS_WEIGHTS)[0]
        priority = rng.choice(list(members))
        duration = min(MAX_DURATION_S, rng.lognormvariate(
            math.log(MEDIAN_DURATION_S), DURATION_SIGMA))
        preemptible = priority <= 6 and rng.random() < PREEMPTIBLE_SHARE
        out.append(Job(ident, t, size, priority, duration, preemptible))
    return out


class Cluster:
    def __init__(self, policy: Policy, trace: list[Job]) -> None:
        self.policy = policy
        self.jobs = {j.ident: Job(j.ident, j.arrival, j.size, j.priority,
                                  j.duration, j.preemptible, j.duration)
                     for j in trace}
        self.hosts = [Host() for _ in range(HOSTS)]
        self.waiting: list[int] = []
        self.events: list[tuple[float, int, str, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.lost = 0.0
        self.preemptions = 0

    # -- events ------------------------------------------------------------

    def push(self, at: float, kind: str, ident: int, run: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, ident, run))

    def simulate(self) -> Outcome:
        for job in self.jobs.values():
            self.push(job.arrival, "arrive", job.ident)
        while self.events:
            self.now, _, kind, ident, run = heapq.heappop(self.events)
            job = self.jobs[ident]
            if kind == "arrive":
                job.queued_since = self.now
                self.waiting.append(ident)
                self.grant()
                if self.policy.preempt and ident in self.waiting \
                        and job.pinned < 0:
                    self.try_preempt(job)
            elif job.run == run and job.host >= 0:
                if kind == "finish":
                    self.stop(job, finished=True)
                elif kind == "evict":
                    self.stop(job, finished=False)
                self.grant()
        waits: dict[str, list[float]] = {name: [] for name, _ in CLASSES}
        for job in self.jobs.values():
            waits[priority_class(job.priority)].append(job.waited)
        return Outcome(waits, self.lost, self.preemptions, self.now)

    # -- the ledger's rule, cluster-wide ---------------------------------------

    def level(self, job: Job) -> int:
        if not self.policy.priorities:
            return 0
        return effective_priority(job.priority, self.now - job.arrival,
                                  self.policy.aging_s)

    def grant(self) -> None:
        """Start waiting jobs in rank order; one that fits nowhere blocks
        the lower levels on the host it waits on (the roomiest one)."""
        def rank(ident: int) -> tuple[int, int, float, int]:
            job = self.jobs[ident]
            return (0 if job.pinned >= 0 else 1, -self.level(job),
                    job.arrival, ident)
        if not self.waiting or not any(h.free for h in self.hosts):
            return
        blocked: dict[int, int] = {}      # host -> lowest level it serves
        started = []
        for ident in sorted(self.waiting, key=rank):
            if not any(h.free for h in self.hosts):
                break
            job = self.jobs[ident]
            level = 10 if job.pinned >= 0 else self.level(job)
            candidates = [job.pinned] if job.pinned >= 0 else range(HOSTS)
            fits = [h for h in candidates
                    if self.hosts[h].free >= job.size
                    and level >= blocked.get(h, -1)]
            if fits:
                best = min(fits, key=lambda h: (self.hosts[h].free, h))
                self.start(job, best)
                started.append(ident)
                continue
            waits_on = job.pinned if job.pinned >= 0 else max(
                range(HOSTS), key=lambda h: (self.hosts[h].free, -h))
            if self.policy.priorities or job.pinned >= 0:
                blocked.setdefault(waits_on, level)
        if started:
            done = set(started)
            self.waiting = [i for i in self.waiting if i not in done]

    def start(self, job: Job, host: int) -> None:
        self.hosts[host].free -= job.size
        self.hosts[host].running.add(job.ident)
        job.host, job.pinned, job.stopping = host, -1, False
        job.run += 1
        job.run_start = self.now
        job.waited += self.now - job.queued_since
        if job.first_start is None:
            job.first_start = self.now
        self.push(self.now + job.remaining, "finish", job.ident, job.run)

    def stop(self, job: Job, finished: bool) -> None:
        host = self.hosts[job.host]
        host.free += job.size
        host.running.discard(job.ident)
        job.host = -1
        if finished:
            return
        ran = self.now - job.run_start
        saved = self.saved(ran)
        self.lost += job.size * (ran - saved)
        job.remaining -= saved
        job.preempted += 1
        job.queued_since = self.now
        self.waiting.append(job.ident)   # requeued: same id, same seniority

    def saved(self, ran: float) -> float:
        k = self.policy.checkpoint_s
        return math.floor(ran / k) * k if k else 0.0

    # -- preemption ------------------------------------------------------------

    def try_preempt(self, job: Job) -> None:
        """Pick the host and victims that free a placement for ``job`` at
        the least lost work; the victims stop after the grace period."""
        at = self.now + GRACE_S
        best = None
        for h, host in enumerate(self.hosts):
            candidates = sorted(
                (self.jobs[i] for i in host.running),
                key=lambda v: (v.size * (at - v.run_start
                                         - self.saved(at - v.run_start)),
                               v.priority, v.ident))
            free, victims, cost = host.free, [], 0.0
            for v in candidates:
                if free >= job.size:
                    break
                if not v.preemptible or v.stopping \
                        or v.priority >= job.priority:
                    continue
                ran = at - v.run_start
                victims.append(v)
                free += v.size
                cost += v.size * (ran - self.saved(ran))
            if free >= job.size and victims and (best is None
                                                 or cost < best[0]):
                best = (cost, h, victims)
        if best is None:
            return
        _, h, victims = best
        job.pinned = h
        for v in victims:
            v.stopping = True
            self.preemptions += 1
            self.push(at, "evict", v.ident, v.run)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0)
    parser.add_argument("--aging-minutes", type=float,
                        default=AGING_STEP_S / 60,
                        help="one priority level per this many minutes "
                             "waited (default: the ledger's rate)")
    args = parser.parse_args(argv)
    trace = make_trace(args.jobs, args.seed)
    k = args.checkpoint_minutes * 60
    aging = args.aging_minutes * 60
    policies = [
        Policy("fifo", priorities=False, preempt=False),
        Policy("priority", True, False, None, aging),
        Policy("preempt, no checkpoints", True, True, None, aging),
        Policy(f"preempt, checkpoint every {args.checkpoint_minutes:g} min",
               True, True, k, aging),
    ]
    total = HOSTS * GPUS_PER_HOST
    offered = sum(j.size * j.duration for j in trace) / 3600
    print(f"trace: {args.jobs} jobs, seed {args.seed}, {total} GPUs "
          f"({HOSTS} hosts x {GPUS_PER_HOST}); sizes {JOB_SIZES} weights "
          f"{JOB_WEIGHTS}; classes low/normal/high {CLASS_WEIGHTS}; "
          f"durations lognormal median {MEDIAN_DURATION_S / 60:g} min, "
          f"sigma {DURATION_SIGMA}; offered load {LOAD}, "
          f"{offered:,.0f} GPU-h; aging +1 per {args.aging_minutes:g} min; "
          f"grace {GRACE_S:g} s")
    print()
    print("| policy | low p50 | low p99 | normal p50 | normal p99 | "
          "high p50 | high p99 | preemptions | GPU-h lost | makespan h |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for policy in policies:
        out = Cluster(policy, trace).simulate()
        cells = []
        for name, _ in CLASSES:
            cells += [minutes(percentile(out.waits[name], 0.5)),
                      minutes(percentile(out.waits[name], 0.99))]
        print(f"| {policy.name} | " + " | ".join(cells)
              + f" | {out.preemptions} | {out.lost_gpu_s / 3600:,.1f} | "
              f"{out.makespan / 3600:,.1f} |")
    print()
    print("Wait: minutes a job spent waiting for GPUs, from submission to "
          "its commit (its first wait plus every wait after a preemption), "
          "p50/p99 per priority class. GPU-h lost: work redone after "
          "preemptions. Makespan: when the last job finished.")


if __name__ == "__main__":
    main()
