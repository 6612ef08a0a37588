"""What one Redis and a 3-member etcd cluster sustain, in our per-job units.

Measures, on this machine, (a) job-lock Txns per second against a 3-member
etcd cluster on loopback (fsync on, as in production) from several client
processes, each Txn exactly what a worker sends to take a job, and (b) raw
Redis commands per second (``redis-benchmark``, 50 clients). Divided by the
per-job costs that ``exactly_once_throughput.py`` prints (etcd writes and
Redis commands per job), they give the ceilings that docs/benchmarks.md
extrapolates from.

    python benchmarks/capacity.py [--seconds 5] [--processes 1 2 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ares_celery.testing import EtcdCluster, RedisServer  # noqa: E402


def _lock_loop(endpoints: list[str], seconds: float, threads: int,
               out) -> None:
    """One client process: ``threads`` threads taking job locks (one Txn
    each, under one process lease) as fast as etcd answers."""
    import threading

    from ares_celery.clients.etcd import EtcdGateway
    from ares_celery.coordination.mutex import JobLocks
    from ares_celery.coordination.session import Session
    from ares_celery.keys import Keys

    gateway = EtcdGateway(endpoints)
    keeper = Session(gateway, 30)
    locks = JobLocks(gateway, Keys("capacity"), False)
    grant = keeper.current()
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(slot: int) -> None:
        prefix = uuid.uuid4().hex
        while time.monotonic() < stop:
            locks.acquire(f"{prefix}-{counts[slot]}", grant)
            counts[slot] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(sum(counts))
    keeper.close()


def etcd_locks_per_second(endpoints: list[str], processes: int,
                          threads: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_lock_loop,
                         args=(endpoints, seconds, threads, out))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def redis_ops_per_second(port: int) -> dict[str, float]:
    output = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-n", "200000", "-c", "50",
         "-q", "-t", "set,lpush,rpop,get"], capture_output=True, text=True,
        check=True).stdout
    rates = {}
    for line in output.replace("\r", "\n").splitlines():
        match = re.match(r"(\w+): ([\d.]+) requests per second", line.strip())
        if match:
            rates[match.group(1)] = float(match.group(2))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    cluster = EtcdCluster(3)
    for member in cluster.members:
        member.fsync = True
    with cluster, RedisServer() as redis_server:
        rows = [(p, etcd_locks_per_second(cluster.endpoints, p, args.threads,
                                          args.seconds))
                for p in args.processes]
        redis_rates = redis_ops_per_second(redis_server.port)
    print("\netcd, 3 members on loopback, fsync on: job-lock Txns per second")
    print(f"{'client procs':>12} {'threads each':>12} {'Txn/s':>8}")
    for procs, rate in rows:
        print(f"{procs:>12} {args.threads:>12} {rate:>8.0f}")
    print("\nRedis (redis-benchmark, 50 clients, no pipelining): ops/s")
    for name, rate in redis_rates.items():
        print(f"  {name:8} {rate:>10.0f}")


if __name__ == "__main__":
    main()
