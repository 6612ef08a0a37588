"""Plain Celery vs ``@ares.task`` on the same machine, in one run.

Both use the same broker (Redis or a private RabbitMQ node), a Redis result
backend, ``acks_late`` and one ``celery worker -P prefork -c N``; ares
additionally runs each job under an etcd lease and commits through the
fenced backend, and submits every job with a request id (dedup). Latency is
measured with one job in flight at a time (submit to ``get()``), so it is
the per-job cost without queueing. Throughput is measured at the worker:
the queue is filled while the worker's consumer is cancelled, then
consumption resumes and the span of the jobs' ``date_done`` stamps is timed.

Round trips per job are counted by the servers over the throughput window
(submission and execution of N jobs): etcd writes (revision growth), etcd
reads (``etcd_mvcc_range_total``: every range, inside a Txn or not), etcd
calls (KV requests etcd's gRPC server handled, the JSON gateway's
included) and Redis commands (``INFO commandstats``, which counts the
commands inside Lua scripts too; with a Redis broker it includes the
broker's). ``--breakdown`` prints the Redis commands per job by name.

On a noisy machine, ``--repeat N`` runs every mode N times, round robin
(plain, ares, before, plain, ...), and prints each figure's median over
the N runs, with the throughput ratio's range: a slow spell then hits all
modes alike instead of one.

Before/after on the same machine in the same run: export the old commit
into a directory (``git archive <commit> | tar -x -C /tmp/before``) and
pass ``--before /tmp/before``; its ``ares_celery`` then runs the "before"
mode (client and worker), with this benchmark's app and harness.

    python benchmarks/exactly_once_throughput.py [--tasks 2000] \\
        [--concurrency 1 2] [--task noop sleep] [--broker both] \\
        [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

_GRPC_KV = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="'
                      r'(Range|Txn|Put|DeleteRange)"[^}]*\} (\S+)$')


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def counters(redis_client, etcd_endpoint: str) -> dict[str, float]:
    """Server-side counters whose growth over N jobs is their per-job cost:
    ``etcd_writes`` (revision), ``etcd_reads`` (ranges), ``etcd_calls``
    (KV requests), and ``redis:<command>`` for every Redis command."""
    out: dict[str, float] = {}
    request = urllib.request.Request(
        f"http://{etcd_endpoint}/v3/kv/range", method="POST",
        data=json.dumps({"key": "L2FyZXMv", "limit": 1}).encode())
    with urllib.request.urlopen(request, timeout=5) as resp:
        out["etcd_writes"] = int(json.loads(resp.read())["header"]["revision"])
    with urllib.request.urlopen(f"http://{etcd_endpoint}/metrics",
                                timeout=5) as resp:
        metrics = resp.read().decode()
    out["etcd_reads"] = out["etcd_calls"] = 0
    for line in metrics.splitlines():
        if line.startswith("etcd_mvcc_range_total "):
            out["etcd_reads"] = float(line.split()[1])
        match = _GRPC_KV.match(line)
        if match:
            out["etcd_calls"] += float(match.group(2))
    for name, stats in redis_client.info("commandstats").items():
        out["redis:" + name.removeprefix("cmdstat_")] = stats["calls"]
    return out


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used: user + system)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        table[int(entry)] = (int(fields[1]),
                             (int(fields[11]) + int(fields[12])) / tick)
    return table


def cpu_counters(roots: dict[str, int]) -> dict[str, float]:
    """``cpu:<name>``: CPU seconds of each process tree (a server and what
    it forked, the worker and its pool), plus this client process. On a
    machine short of cores this, not the wall time of a round trip, is
    what a job costs: every process competes for the same cores."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out = {}
    for name, root in roots.items():
        todo, total = [root], 0.0
        while todo:
            pid = todo.pop()
            total += table.get(pid, (0, 0.0))[1]
            todo.extend(children.get(pid, ()))
        out[f"cpu:{name}"] = total
    times = os.times()
    out["cpu:client"] = times.user + times.system
    return out


def per_job(before: dict, after: dict, n: int) -> dict[str, float]:
    keys = set(before) | set(after)
    delta = {k: (after.get(k, 0) - before.get(k, 0)) / n for k in keys}
    # Our own metrics reads (one range, one INFO per sample) are noise of
    # 2/n: left in, the same for every mode.
    delta["redis_cmds"] = sum(v for k, v in delta.items()
                              if k.startswith("redis:"))
    delta["cpu_ms"] = 1000 * sum(v for k, v in delta.items()
                                 if k.startswith("cpu:"))
    return delta


def run_one(mode: str, task: str, n: int, latency_n: int,
            concurrency: int) -> dict:
    """One mode, in this (child) process: start its worker, measure."""
    import redis

    sys.path.insert(0, str(BENCH))
    import bench_app

    env = os.environ
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "--quiet", "-A", "bench_app",
         "worker", "-P", "prefork", "-c", str(concurrency), "-n",
         f"{mode}@bench", "-l", "error", "--without-mingle",
         "--without-gossip"], cwd=BENCH, env=dict(env),
        start_new_session=True)
    store = redis.Redis.from_url(bench_app.REDIS)
    ares_mode = mode != "plain"
    try:
        deadline = time.monotonic() + 60
        while not bench_app.app.control.ping([f"{mode}@bench"], timeout=0.5):
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode} worker did not start")
        fn = getattr(bench_app, task)
        stamp = time.time_ns()

        def submit(i):
            if ares_mode:
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
        roots = {"worker": worker.pid, **{
            name: int(pid) for name, pid in (
                item.split("=") for item in env["BENCH_PIDS"].split(","))}}
        before = {**counters(store, env["BENCH_ETCD"]),
                  **cpu_counters(roots)}
        t0 = time.perf_counter()
        results = [submit(i) for i in range(n)]
        submit_s = time.perf_counter() - t0
        bench_app.app.control.add_consumer("celery", destination=[node],
                                           reply=True)
        backend = bench_app.app.backend
        keys = [backend.get_key_for_task(r.id) for r in results]
        deadline = time.monotonic() + 300
        while True:
            metas = store.mget(keys)
            if all(metas):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: results missing after 300 s")
            time.sleep(0.05)
        done = sorted(datetime.fromisoformat(json.loads(m)["date_done"])
                      .timestamp() for m in metas)
        span = done[-1] - done[0]
        after = {**counters(store, env["BENCH_ETCD"]), **cpu_counters(roots)}
        return {"throughput": (n - 1) / span, "submit_rate": n / submit_s,
                "p50": statistics.median(latencies),
                "p99": percentile(latencies, 99),
                **per_job(before, after, n)}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        bench_app.app.close()


def median_runs(runs: list[dict]) -> dict:
    """Each mode's figures: the median over the runs, plus the range of
    its throughput ratio to plain Celery in the same round."""
    out = {}
    for mode in runs[0]:
        keys = set().union(*(run[mode] for run in runs))
        row = {key: statistics.median(run[mode].get(key, 0) for run in runs)
               for key in keys}
        ratios = [run[mode]["throughput"] / run["plain"]["throughput"]
                  for run in runs]
        row["ratio_lo"], row["ratio_hi"] = min(ratios), max(ratios)
        out[mode] = row
    return out


def run_mode(mode: str, task: str, conc: int, args, env: dict) -> dict:
    """Run one mode in a child process (its own imports: the "before"
    mode imports ``ares_celery`` from the old tree)."""
    env = dict(env, BENCH_MODE="plain" if mode == "plain" else "ares")
    tree = Path(args.before).resolve() if mode == "before" else ROOT
    # The tree first: it wins over the editable install in site-packages.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), str(BENCH), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", mode,
         "--task", task, "--concurrency", str(conc), "--tasks",
         str(args.tasks), "--latency-samples", str(args.latency_samples)],
        env=env, cwd=BENCH, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2])
    parser.add_argument("--task", choices=["noop", "sleep"], nargs="+",
                        default=["noop"])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"],
                        default="redis")
    parser.add_argument("--before", metavar="TREE",
                        help="a source tree of an older commit: its ares "
                             "runs too, as the 'before' column")
    parser.add_argument("--breakdown", action="store_true",
                        help="print Redis commands per job by name")
    parser.add_argument("--etcd-fsync", action="store_true",
                        help="run etcd with fsync (default: --unsafe-no-fsync)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per mode (round robin); medians shown")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.task[0], args.tasks,
                                 args.latency_samples, args.concurrency[0])))
        return

    sys.path.insert(0, str(ROOT))
    from ares_celery.testing import EtcdServer, RabbitMQServer, RedisServer

    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    modes = ["plain", "ares"] + (["before"] if args.before else [])
    rows = []
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        etcd_server = stack.enter_context(
            EtcdServer(fsync=args.etcd_fsync))
        urls = {"redis": f"{redis_server.url}/0"}
        pids = {"redis": redis_server.proc.pid, "etcd": etcd_server.proc.pid}
        if "rabbitmq" in brokers:
            rabbit = stack.enter_context(RabbitMQServer())
            urls["rabbitmq"] = rabbit.url
            pids["rabbitmq"] = rabbit.proc.pid
        for broker in brokers:
            env = dict(os.environ, BENCH_BROKER=urls[broker],
                       BENCH_REDIS=f"{redis_server.url}/0",
                       BENCH_ETCD=etcd_server.endpoint,
                       BENCH_PIDS=",".join(f"{k}={v}" for k, v in
                                           pids.items()))
            for task in args.task:
                for conc in args.concurrency:
                    runs = [{mode: run_mode(mode, task, conc, args, env)
                             for mode in modes}
                            for _ in range(args.repeat)]
                    rows.append((broker, task, conc, median_runs(runs)))
    print(f"\n{args.tasks} tasks per run, prefork worker, Redis results, "
          f"etcd fsync={'on' if args.etcd_fsync else 'off'}; "
          f"round trips per job over submit+run"
          + (f"; medians of {args.repeat} runs per mode, round robin, "
             "ratio range in brackets" if args.repeat > 1 else ""))
    header = (f"{'broker':8} {'task':5} {'procs':>5} {'mode':6} | "
              f"{'jobs/s':>7} {'ratio':>6} | {'p50':>8} {'added':>7} | "
              f"{'p99':>8} {'added':>7} | {'etcd w':>6} {'etcd r':>6} "
              f"{'etcd calls':>10} {'redis cmds':>10} {'CPU/job':>8}")
    print(header)
    print("-" * len(header))
    for broker, task, conc, got in rows:
        plain = got["plain"]
        for mode, r in got.items():
            print(f"{broker:8} {task:5} {conc:>5} {mode:6} | "
                  f"{r['throughput']:7.0f} "
                  f"{r['throughput'] / plain['throughput']:6.2f} | "
                  + (f"[{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}] "
                     if args.repeat > 1 else "") +
                  f"{r['p50']:6.2f}ms {r['p50'] - plain['p50']:5.2f}ms | "
                  f"{r['p99']:6.2f}ms {r['p99'] - plain['p99']:5.2f}ms | "
                  f"{r['etcd_writes']:6.2f} {r['etcd_reads']:6.2f} "
                  f"{r['etcd_calls']:10.2f} {r['redis_cmds']:10.1f} "
                  f"{r['cpu_ms']:6.2f}ms")
    print("\nCPU ms per job by process (all processes share the cores)")
    for broker, task, conc, got in rows:
        for mode, r in got.items():
            print(f"{broker:8} {task:5} {conc:>5} {mode:6} | " + "  ".join(
                f"{name[4:]} {1000 * r[name]:5.2f}" for name in sorted(r)
                if name.startswith("cpu:")))
    if args.breakdown:
        print("\nRedis commands per job by name")
        for broker, task, conc, got in rows:
            names = sorted({k for r in got.values() for k in r
                            if k.startswith("redis:")})
            print(f"{broker} {task} procs={conc}: " + ", ".join(
                f"{name[6:]} " + "/".join(f"{got[m].get(name, 0):.2f}"
                                          for m in got)
                for name in names
                if any(abs(got[m].get(name, 0)) >= 0.05 for m in got))
                + f"  ({'/'.join(got)})")


if __name__ == "__main__":
    main()
