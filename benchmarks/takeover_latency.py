"""How long after a worker fails does another worker start its job?

For each broker (a private Redis and RabbitMQ, each with its defaults: an
hour of visibility timeout on Redis, 30 minutes of consumer timeout on
RabbitMQ) and each failure (the whole worker SIGKILLed, the whole worker
SIGSTOPped, only the pool process running the job SIGSTOPped), a job is
started on one of two ``celery worker -c 2`` processes, the failure is
injected, and the time until the job's body starts again (in any other
process) is measured: for ares-celery at each lease TTL asked for, and for
plain Celery (acks_late + reject_on_worker_lost) in the same run, waiting
at most ``--cap`` seconds. Measured, not asserted; prints a table.

    python benchmarks/takeover_latency.py --ttl 4 30 --trials 5
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
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ares_celery.testing import EtcdServer, RabbitMQServer, RedisServer  # noqa: E402
from ares_celery.testing.servers import die_with_parent, wait_until  # noqa: E402

FAULTS = ("worker-sigkill", "worker-sigstop", "pool-sigstop")


class Worker:
    def __init__(self, env: dict, name: str) -> None:
        self.env, self.name, self.proc = env, name, None

    def start(self) -> Worker:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "takeover_app", "worker",
             "-n", self.name, "-c", "2", "-l", "warning", "--without-mingle",
             "--without-gossip"], cwd=ROOT / "benchmarks", env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)
        return self

    def group(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.group(signal.SIGCONT)
            self.group(signal.SIGKILL)
            self.proc.wait()


def started(store, trial):
    return [json.loads(x) for x in store.lrange(f"takeover:started:{trial}",
                                                0, -1)]


def wait_ready(app, names, timeout=60.0):
    wait_until(lambda: len(app.control.ping(names, timeout=0.5)) == len(names),
               timeout, f"workers {names}")


def run_cell(mode, broker_url, redis_url, etcd, ttl, fault, trials, cap,
             store):
    env = dict(os.environ, BENCH_MODE=mode, BENCH_BROKER=broker_url,
               BENCH_REDIS=redis_url, BENCH_ETCD=etcd, BENCH_TTL=str(ttl),
               PYTHONPATH=str(ROOT))
    os.environ.update({k: env[k] for k in ("BENCH_MODE", "BENCH_BROKER",
                                           "BENCH_REDIS", "BENCH_ETCD",
                                           "BENCH_TTL")})
    sys.path.insert(0, str(ROOT / "benchmarks"))
    for name in [n for n in sys.modules if n == "takeover_app"]:
        del sys.modules[name]
    import takeover_app
    app = takeover_app.app
    results = []
    stamp = time.time_ns()
    for trial in range(trials):
        names = [f"a{trial}-{stamp}@bench", f"b{trial}-{stamp}@bench"]
        workers = [Worker(env, n).start() for n in names]
        try:
            wait_ready(app, names)
            key = f"{mode}-{fault}-{ttl}-{stamp}-{trial}"
            if mode == "ares":
                takeover_app.hold.apply_async((key,), request_id=key)
            else:
                takeover_app.hold.apply_async((key,))
            first = wait_until(lambda key=key: started(store, key), 30,
                               "the job to start")[0]
            group = os.getpgid(first["pid"])
            victim = next(w for w in workers if w.proc.pid == group)
            failed_at = time.time()
            if fault == "worker-sigkill":
                victim.group(signal.SIGKILL)
            elif fault == "worker-sigstop":
                victim.group(signal.SIGSTOP)
            else:
                os.kill(first["pid"], signal.SIGSTOP)
            deadline = time.monotonic() + cap
            took = None
            while time.monotonic() < deadline:
                again = started(store, key)[1:]
                if again:
                    took = again[0]["at"] - failed_at
                    break
                time.sleep(0.05)
            results.append(took)
            store.set(f"takeover:release:{key}", 1)
        finally:
            for worker in workers:
                worker.kill()
    return results


def fmt(values, cap):
    done = [v for v in values if v is not None]
    if not done:
        return f"none in {cap:.0f}s", ""
    p50 = statistics.median(done)
    worst = "" if len(done) == len(values) else f" ({len(values) - len(done)}x none)"
    return f"{p50:.2f}s", f"{max(done):.2f}s{worst}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", nargs="+", default=["redis", "rabbitmq"])
    parser.add_argument("--faults", nargs="+", default=list(FAULTS))
    parser.add_argument("--ttl", nargs="+", type=int, default=[4, 30])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--plain-trials", type=int, default=2)
    parser.add_argument("--cap", type=float, default=60.0,
                        help="longest wait for a takeover, seconds")
    args = parser.parse_args()
    rows = []
    redis_server, etcd_server = RedisServer(), EtcdServer()
    redis_server.start()
    etcd_server.start()
    rabbit = None
    try:
        store = redis.Redis.from_url(f"{redis_server.url}/1")
        for broker in args.brokers:
            if broker == "rabbitmq":
                rabbit = RabbitMQServer()
                rabbit.start()
                url = rabbit.url
            else:
                url = f"{redis_server.url}/0"
            for fault in args.faults:
                for ttl in args.ttl:
                    cap = max(args.cap, ttl + 30)
                    got = run_cell("ares", url, f"{redis_server.url}/1",
                                   etcd_server.endpoint, ttl, fault,
                                   args.trials, cap, store)
                    rows.append((broker, fault, f"ares TTL {ttl}s", got, cap))
                    print(rows[-1], flush=True)
                if args.plain_trials:
                    got = run_cell("plain", url, f"{redis_server.url}/1",
                                   etcd_server.endpoint, 30, fault,
                                   args.plain_trials, args.cap, store)
                    rows.append((broker, fault, "plain Celery", got, args.cap))
                    print(rows[-1], flush=True)
            if rabbit is not None:
                rabbit.cleanup()
                rabbit = None
    finally:
        if rabbit is not None:
            rabbit.cleanup()
        redis_server.cleanup()
        etcd_server.cleanup()
    print()
    print(f"{'broker':9} {'failure':15} {'who':16} {'trials':>6} "
          f"{'p50':>10} {'max':>10}")
    for broker, fault, who, got, cap in rows:
        p50, worst = fmt(got, cap)
        print(f"{broker:9} {fault:15} {who:16} {len(got):>6} {p50:>10} "
              f"{worst:>10}")


if __name__ == "__main__":
    main()
