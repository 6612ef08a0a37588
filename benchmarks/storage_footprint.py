"""Bytes per job in Redis and etcd, and proof that nothing grows unbounded.

Runs N exactly-once no-op jobs (default 10,000) through a real worker with a
short retention (``result_expires`` = ``ares_dedup_ttl`` = ``--expires``),
then prints the keys and bytes each job left in Redis and etcd right after
the run and again once the retention has passed (and etcd's history has
been compacted, as ``--auto-compaction-retention`` does in production).

    python benchmarks/storage_footprint.py [--jobs 10000] [--expires 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ares_celery.testing import EtcdServer, RedisServer  # noqa: E402
from ares_celery.testing.servers import wait_until  # noqa: E402

KINDS = (("ares:dedup:", "dedup record"), ("ares:job:", "fence/commit marker"),
         ("celery-task-meta-", "result"), ("_kombu", "kombu bindings"),
         ("celery", "queue"))


def etcd_call(endpoint: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{endpoint}/v3/{path}",
                                     data=json.dumps(body).encode(),
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def redis_snapshot(client) -> dict:
    counts, sizes = Counter(), Counter()
    for key in client.scan_iter(count=1000):
        name = key.decode()
        kind = next((label for prefix, label in KINDS
                     if name.startswith(prefix)), "other")
        counts[kind] += 1
        sizes[kind] += client.memory_usage(key) or 0
    info = client.info("memory")
    return {"keys": sum(counts.values()), "counts": counts, "sizes": sizes,
            "used_memory": info["used_memory"]}


def etcd_snapshot(endpoint: str) -> dict:
    status = etcd_call(endpoint, "maintenance/status", {})
    keys = etcd_call(endpoint, "kv/range", {
        "key": "Lw==", "range_end": "MA==", "count_only": True})
    return {"keys": int(keys.get("count", 0)),
            "revision": int(status["header"]["revision"]),
            "db_size": int(status["dbSize"]),
            "db_in_use": int(status.get("dbSizeInUse", status["dbSize"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--expires", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    with RedisServer() as redis_server, EtcdServer() as etcd_server:
        env = dict(os.environ, BENCH_BROKER=f"{redis_server.url}/0",
                   BENCH_ETCD=etcd_server.endpoint, BENCH_MODE="ares",
                   BENCH_EXPIRES=str(args.expires))
        os.environ.update(env)
        import bench_app

        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "--quiet", "-A", "bench_app",
             "worker", "-P", "prefork", "-c", str(args.concurrency), "-n",
             "storage@bench", "-l", "error", "--without-mingle",
             "--without-gossip"], cwd=ROOT / "benchmarks", env=env,
            start_new_session=True)
        try:
            wait_until(lambda: bench_app.app.control.ping(
                ["storage@bench"], timeout=0.5), 60, "the worker")
            client = bench_app.app.backend.client
            before_redis = redis_snapshot(client)
            before_etcd = etcd_snapshot(etcd_server.endpoint)
            started = time.monotonic()
            stamp = time.time_ns()
            results = [bench_app.noop.apply_async(
                (i,), request_id=f"s-{stamp}-{i}") for i in range(args.jobs)]
            for result in results:
                result.get(timeout=300)
            elapsed = time.monotonic() - started
            # The batched lock deletions run after 0.5 s idle.
            wait_until(lambda: etcd_snapshot(etcd_server.endpoint)["keys"]
                       <= before_etcd["keys"], 30, "committed locks to go")
            after_redis = redis_snapshot(client)
            after_etcd = etcd_snapshot(etcd_server.endpoint)
            wait_until(lambda: redis_snapshot(client)["keys"] <=
                       before_redis["keys"] + 5, args.expires + 120,
                       "the retention to pass")
            expired_redis = redis_snapshot(client)
            etcd_call(etcd_server.endpoint, "kv/compaction",
                      {"revision": after_etcd["revision"], "physical": True})
            etcd_call(etcd_server.endpoint, "maintenance/defragment", {})
            expired_etcd = etcd_snapshot(etcd_server.endpoint)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(60)
    report(args, elapsed, before_redis, after_redis, expired_redis,
           before_etcd, after_etcd, expired_etcd)


def report(args, elapsed, r0, r1, r2, e0, e1, e2) -> None:
    n = args.jobs
    print(f"\n{n} exactly-once jobs in {elapsed:.1f}s; retention "
          f"{args.expires}s (result_expires = ares_dedup_ttl)\n")
    print(f"{'Redis':24} {'before':>8} {'after run':>10} {'expired':>8} "
          f"{'bytes/job':>10}")
    for _, label in KINDS + (("", "other"),):
        if not (r1["counts"][label] or r0["counts"][label]):
            continue
        print(f"  {label:22} {r0['counts'][label]:>8} "
              f"{r1['counts'][label]:>10} {r2['counts'][label]:>8} "
              f"{(r1['sizes'][label] - r0['sizes'][label]) / n:>10.0f}")
    print(f"  {'all keys':22} {r0['keys']:>8} {r1['keys']:>10} "
          f"{r2['keys']:>8}")
    print(f"  {'used_memory (bytes)':22} {r0['used_memory']:>8} "
          f"{r1['used_memory']:>10} {r2['used_memory']:>8} "
          f"{(r1['used_memory'] - r0['used_memory']) / n:>10.0f}")
    print(f"\n{'etcd':24} {'before':>8} {'after run':>10} {'compacted':>9}")
    print(f"  {'keys':22} {e0['keys']:>8} {e1['keys']:>10} {e2['keys']:>9}")
    print(f"  {'revision':22} {e0['revision']:>8} {e1['revision']:>10} "
          f"{e2['revision']:>9}   "
          f"({(e1['revision'] - e0['revision']) / n:.2f} writes/job)")
    print(f"  {'db size in use (bytes)':22} {e0['db_in_use']:>8} "
          f"{e1['db_in_use']:>10} {e2['db_in_use']:>9}   "
          f"({(e1['db_in_use'] - e0['db_in_use']) / n:.0f} bytes/job "
          "of history before compaction)")


if __name__ == "__main__":
    main()
