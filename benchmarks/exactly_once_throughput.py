"""Plain Celery vs ``@ares.task`` on the same machine, in one run.

Both use a Redis broker, a Redis result backend, ``acks_late`` and one
``celery worker -P prefork -c N``; ares additionally runs each job under an
etcd lease and commits through the fenced backend, and submits every job
with a request id (dedup). Latency is measured with one job in flight at a
time (submit to ``get()``), so it is the per-job cost without queueing.
Throughput is measured at the worker: the queue is filled while the
worker's consumer is cancelled, then consumption resumes and the span of
the jobs' ``date_done`` stamps is timed.

    python benchmarks/exactly_once_throughput.py [--tasks 2000] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ares_celery.testing import EtcdServer, RedisServer  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def round_trips(app, env) -> tuple[int, int]:
    """(etcd revision, Redis commands processed so far): their growth over
    N jobs is the etcd writes and Redis commands each job costs."""
    import urllib.request

    request = urllib.request.Request(
        f"http://{env['BENCH_ETCD']}/v3/kv/range", method="POST",
        data=json.dumps({"key": "L2FyZXMv", "limit": 1}).encode())
    with urllib.request.urlopen(request, timeout=5) as resp:
        revision = int(json.loads(resp.read())["header"]["revision"])
    with app.connection_for_write() as conn:
        stats = conn.default_channel.client.info("stats")
    # Minus the INFO call itself and the broker's idle polling is noise
    # we accept: it is the same for both modes.
    return revision, int(stats["total_commands_processed"])


def run_mode(mode, task, n, latency_n, concurrency, env):
    env = dict(env, BENCH_MODE=mode)
    os.environ.update(env)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "--quiet", "-A", "bench_app",
         "worker", "-P", "prefork", "-c", str(concurrency), "-n",
         f"{mode}@bench", "-l", "error", "--without-mingle",
         "--without-gossip"], cwd=ROOT / "benchmarks", env=env,
        start_new_session=True)
    for name in list(sys.modules):
        if name == "bench_app":
            del sys.modules[name]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_app

    try:
        deadline = time.monotonic() + 60
        while not bench_app.app.control.ping([f"{mode}@bench"], timeout=0.5):
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode} worker did not start")
        fn = getattr(bench_app, task)
        stamp = time.time_ns()

        def submit(i):
            if mode == "ares":
                return fn.apply_async((i,), request_id=f"b-{stamp}-{i}")
            return fn.apply_async((i,))

        for i in range(20):  # warm up connections and pools
            submit(-i - 1).get(timeout=30)
        latencies = []
        for i in range(latency_n):
            t = time.perf_counter()
            submit(100000 + i).get(timeout=30)
            latencies.append((time.perf_counter() - t) * 1000)
        # Throughput is the worker's: stop consuming, queue N jobs, resume,
        # and time the span of the jobs' own completion stamps (date_done),
        # so the single client process cannot be the bottleneck.
        node = f"{mode}@bench"
        bench_app.app.control.cancel_consumer("celery", destination=[node],
                                              reply=True)
        before = round_trips(bench_app.app, env)
        t0 = time.perf_counter()
        results = [submit(i) for i in range(n)]
        submit_s = time.perf_counter() - t0
        bench_app.app.control.add_consumer("celery", destination=[node],
                                           reply=True)
        backend = bench_app.app.backend
        keys = [backend.get_key_for_task(r.id) for r in results]
        deadline = time.monotonic() + 300
        while True:
            metas = backend.client.mget(keys)
            if all(metas):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: results missing after 300 s")
            time.sleep(0.05)
        done = sorted(datetime.fromisoformat(json.loads(m)["date_done"])
                      .timestamp() for m in metas)
        span = done[-1] - done[0]
        after = round_trips(bench_app.app, env)
        return {"throughput": (n - 1) / span, "submit_rate": n / submit_s,
                "etcd_writes": (after[0] - before[0]) / n,
                "redis_cmds": (after[1] - before[1]) / n,
                "p50": statistics.median(latencies),
                "p99": percentile(latencies, 99)}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        bench_app.app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2])
    parser.add_argument("--task", choices=["noop", "sleep"], nargs="+",
                        default=["noop"])
    parser.add_argument("--etcd-fsync", action="store_true",
                        help="run etcd with fsync (default: --unsafe-no-fsync)")
    args = parser.parse_args()
    with RedisServer() as redis_server, \
            EtcdServer(fsync=args.etcd_fsync) as etcd_server:
        env = dict(os.environ, BENCH_BROKER=f"{redis_server.url}/0",
                   BENCH_ETCD=etcd_server.endpoint)
        rows = []
        for task in args.task:
            for conc in args.concurrency:
                plain = run_mode("plain", task, args.tasks,
                                 args.latency_samples, conc, env)
                ares = run_mode("ares", task, args.tasks,
                                args.latency_samples, conc, env)
                rows.append((task, conc, plain, ares))
    print(f"\n{args.tasks} tasks per run, prefork worker, Redis broker+backend,"
          f" etcd fsync={'on' if args.etcd_fsync else 'off'}")
    header = (f"{'task':6} {'procs':>5} | {'plain/s':>8} {'ares/s':>8} "
              f"{'ratio':>6} | {'plain p50':>9} {'ares p50':>9} {'added':>7}"
              f" | {'plain p99':>9} {'ares p99':>9} {'added':>7}"
              f" | {'etcd w/job':>10} {'redis cmd/job':>13}")
    print(header)
    print("-" * len(header))
    for task, conc, p, a in rows:
        print(f"{task:6} {conc:>5} | {p['throughput']:8.0f} "
              f"{a['throughput']:8.0f} {a['throughput'] / p['throughput']:6.2f}"
              f" | {p['p50']:8.2f}ms {a['p50']:8.2f}ms "
              f"{a['p50'] - p['p50']:6.2f}ms | {p['p99']:8.2f}ms "
              f"{a['p99']:8.2f}ms {a['p99'] - p['p99']:6.2f}ms"
              f" | {a['etcd_writes']:10.2f} {p['redis_cmds']:6.1f}->"
              f"{a['redis_cmds']:<6.1f}")


if __name__ == "__main__":
    main()
