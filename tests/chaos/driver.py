"""Randomized chaos run: N jobs, 3 real workers, real faults, then an audit.

``python -m tests.chaos.driver --jobs 1000 --seed 7`` replays a run; the
pytest module runs it with N=200. Everything is real: a persistent Redis
(broker, dedup records, fenced results), a 3-member etcd cluster, three
``celery worker`` processes on mock 8-GPU hosts, and several client
processes each submitting every request 2-3 times at about the same time.

Faults, each at a seeded point of progress: SIGKILL of a busy worker
(restarted after), SIGSTOP of a busy worker until another worker took its
job over, then SIGCONT (a zombie), SIGKILL + restart of Redis, a stop and
start of the whole etcd cluster, and SIGKILL of the etcd leader (restarted
once a new leader is elected).

The audit proves, from the stores alone: every request committed exactly
once (none lost), the committed result equals the fenced side effect, no
zombie commit was accepted, and no two holders of one job overlapped while
both believed their lease valid. It also counts re-executions per fault.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ares_celery.exactly_once.identity import job_id_for
from ares_celery.testing import EtcdCluster, RabbitMQServer, RedisServer
from ares_celery.testing.servers import wait_until
from tests.chaos.audit import NAMESPACE, audit_run
from tests.chaos.clients import client_main
from tests.chaos.report import ChaosReport, FaultRecord

FAULTS = ("kill_worker", "pause_worker", "restart_redis", "restart_etcd",
          "kill_etcd_leader")


@dataclass
class ChaosConfig:
    jobs: int = 200
    seed: int | None = None
    workers: int = 3
    concurrency: int = 2
    clients: int = 4
    #: Share of requests that are 2-GPU jobs (routed to host queues).
    gpu_share: float = 0.2
    #: Share of bodies that do not stop themselves on a lost lease: their
    #: late commits are what the fence has to reject.
    careless_share: float = 0.5
    duration: tuple[float, float] = (0.05, 0.3)
    #: Clients spread their submissions over about this long, so that the
    #: faults hit a stream of work rather than an already drained queue.
    submit_seconds: float = 20.0
    #: Faults beyond one of each kind.
    extra_faults: int = 0
    lease_ttl: int = 3
    #: "redis" (broker, dedup and results in one Redis) or "rabbitmq" (the
    #: broker a private RabbitMQ node with publisher confirms; the Redis
    #: still holds dedup records and results). Broker settings are kombu's
    #: defaults either way: takeover is the lease's job.
    broker: str = "redis"
    deadline: float = 240.0
    #: ``ares_republish_after``: the driver re-submits what has not committed
    #: after this long, as a retrying client would, healing lost messages.
    republish_after: float = 15.0


# -- the run -------------------------------------------------------------

class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else \
            random.SystemRandom().randrange(1, 2**31)
        self.rng = random.Random(self.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="ares-chaos-"))
        self.report = ChaosReport(self.seed, config)
        self.workers = []
        self.redis = RedisServer(persist=True)
        self.rabbitmq = RabbitMQServer() if config.broker == "rabbitmq" \
            else None
        self.effects_server = RedisServer()
        self.etcd = EtcdCluster(3)

    # -- setup -----------------------------------------------------------

    def _env(self) -> dict:
        return {
            "ARES_TEST_BROKER": self.rabbitmq.url if self.rabbitmq
            else f"{self.redis.url}/0",
            "ARES_TEST_REDIS": f"{self.redis.url}/0",
            "ARES_TEST_ETCD": ",".join(self.etcd.endpoints),
            "ARES_CHAOS_EFFECTS": f"{self.effects_server.url}/0",
            "ARES_TEST_LEASE_TTL": str(self.config.lease_ttl),
            "ARES_TEST_STATE_DIR": str(self.tmp / "ledgers"),
            "ARES_TEST_REPUBLISH_AFTER": str(self.config.republish_after),
        }

    def _start_services(self) -> None:
        self.redis.start()
        if self.rabbitmq is not None:
            self.rabbitmq.start()
        self.effects_server.start()
        self.etcd.start()
        (self.tmp / "ledgers").mkdir()
        os.environ.update(self._env())
        from tests.chaos import app as chaos
        self.chaos = chaos
        import redis
        self.store = redis.Redis.from_url(f"{self.redis.url}/0")

    def _worker(self, index: int):
        from tests.processes import WorkerProcess
        return WorkerProcess(
            self.chaos.app, name=f"chaos{index}@chaos-host-{index}",
            concurrency=self.config.concurrency, module="tests.chaos.app",
            env={**self._env(), "ARES_MOCK_GPUS": "hgx-h100"})

    def _requests(self) -> list[tuple[str, str, list]]:
        cfg, rng = self.config, self.rng
        out = []
        for i in range(cfg.jobs):
            kind = "train" if rng.random() < cfg.gpu_share else "pay"
            careless = rng.random() < cfg.careless_share
            duration = round(rng.uniform(*cfg.duration), 3)
            out.append((f"chaos-{self.seed}-{i}", kind,
                        [i, duration] if not careless else [i, duration, 0]))
        return out

    def _client_plan(self, requests) -> list[list]:
        """Each request 2-3 times, on different clients, at about the same
        position in each client's sequence (so copies race)."""
        cfg, rng = self.config, self.rng
        plans = [[] for _ in range(cfg.clients)]
        for position, (rid, kind, args) in enumerate(requests):
            copies = rng.choice((2, 3))
            for client in rng.sample(range(cfg.clients), copies):
                plans[client].append((position + rng.uniform(0, 3),
                                      (rid, kind, args)))
        return [[item for _, item in sorted(plan)] for plan in plans]

    # -- faults ----------------------------------------------------------

    def _busy(self, careless_only: bool = False) -> list[tuple[int, str, str]]:
        """(worker index, job id, token) of jobs running right now."""
        pids = {w.proc.pid: i for i, w in enumerate(self.workers)
                if w.proc.poll() is None}
        busy = []
        for field_, job in self.chaos.effects.hgetall("chaos:busy").items():
            worker_pid, _, token = field_.decode().partition(":")
            careless = self.chaos.effects.sismember("chaos:careless",
                                                    job.decode())
            if int(worker_pid) in pids and (careless or not careless_only):
                busy.append((pids[int(worker_pid)], job.decode(), token))
        return busy

    def _pick_busy(self, careless_only: bool) -> tuple[int, str, str]:
        """A running job to fault (a careless one if asked and any shows up
        within a few seconds)."""
        def pick(careless: bool):
            busy = self._busy(careless)
            return self.rng.choice(sorted(busy)) if busy else None
        if careless_only:
            try:
                return self._wait(lambda: pick(True), 10,
                                  "a careless job to fault")
            except TimeoutError:
                pass
        return self._wait(lambda: pick(False), 30,
                          f"a busy worker to fault ({self._done()} done)")

    def kill_worker(self) -> str:
        index, job, _ = self._pick_busy(False)
        self.workers[index].kill()
        self.workers[index] = self._worker(index).start()
        return f"worker {index} mid-job {job[:8]}"

    def pause_worker(self) -> str:
        """SIGSTOP a worker in the middle of a (careless) job until another
        worker has taken that job over, then SIGCONT: a zombie. If the job
        committed in the instant before the signal landed, try another."""
        for _ in range(5):
            index, job, token = self._pick_busy(True)
            worker = self.workers[index]
            worker.pause()
            try:
                if self._committed([job])[0] is not None:
                    continue          # it finished first: not a zombie
                self._wait(lambda j=job, t=token: any(
                    int(r["token"]) > int(t) for r in self.chaos.audit(j)),
                    self.config.lease_ttl * 4 + 20,
                    f"job {job} to be taken over")
            finally:
                worker.resume()
            if self.chaos.effects.sismember("chaos:careless", job):
                # Let the zombie reach its commit (and be fenced) before the
                # next fault can kill it.
                self._wait(lambda j=job.encode(): any(
                    entry[b"job"] == j for _, entry in
                    self.store.xrange(f"{NAMESPACE}:fenced")), 30,
                    f"the zombie of {job} to try its commit")
            return f"worker {index} job {job[:8]} token {token}"
        raise TimeoutError("no job stayed running long enough to pause")

    def restart_redis(self) -> str:
        self.redis.kill()
        self.redis.start()
        return "SIGKILL + start (AOF, fsync always)"

    def restart_etcd(self) -> str:
        self.etcd.restart()
        return "all 3 members stopped and started"

    def kill_etcd_leader(self) -> str:
        leader = self.etcd.leader()
        leader.kill()
        new = self.etcd.leader()
        leader.start()
        return f"{leader.member} killed, {new.member} elected, back"

    def _fault_plan(self) -> list[tuple[float, str]]:
        names = list(FAULTS) + [self.rng.choice(FAULTS)
                                for _ in range(self.config.extra_faults)]
        self.rng.shuffle(names)
        # The first pause comes early, while careless bodies are still
        # running: that is what makes a zombie commit (and its rejection)
        # certain in every run, not only in most.
        first_pause = names.index("pause_worker")
        names.insert(self.rng.randrange(2), names.pop(first_pause))
        points = sorted(self.rng.uniform(0.05, 0.7) for _ in names)
        return list(zip(points, names, strict=True))

    def _supervise(self) -> None:
        """Restart a worker that exited on its own, as systemd or Kubernetes
        would (a Celery 5.7.0 worker on Redis exits with an
        AttributeError when the broker connection drops while it holds
        unacked messages; the report counts these)."""
        for index, worker in enumerate(self.workers):
            if worker.proc is not None and worker.proc.poll() is not None:
                self.report.worker_exits += 1
                print(f"chaos: worker {index} exited "
                      f"({worker.proc.returncode}); restarting", flush=True)
                # Launched, not awaited: waiting for its ping here would
                # stall the progress polls of the fault plan while the other
                # workers drain the queue past the next fault's point.
                self.workers[index] = self._worker(index).start(wait=False)

    def _wait(self, check, timeout: float, what: str):
        """Poll ``check`` with a deadline, supervising the workers meanwhile."""
        def supervised():
            self._supervise()
            return check()
        return wait_until(supervised, timeout, what)

    def _done(self) -> int:
        return self.chaos.effects.scard("chaos:done")

    # -- run -------------------------------------------------------------

    def run(self) -> ChaosReport:
        cfg = self.config
        began = time.monotonic()
        print(f"chaos: seed {self.seed}", flush=True)
        self._start_services()
        requests = self._requests()
        for rid, _, args in requests:
            if len(args) == 3:
                self.chaos.effects.sadd("chaos:careless",
                                        job_id_for(NAMESPACE, rid))
        clients = []
        try:
            self.workers = [self._worker(i) for i in range(cfg.workers)]
            for worker in self.workers:
                worker.start()
            self._wait_inventory()
            ctx = multiprocessing.get_context("spawn")
            for n, plan in enumerate(self._client_plan(requests)):
                out = self.tmp / f"client-{n}.json"
                pause = 2 * cfg.submit_seconds / max(len(plan), 1)
                proc = ctx.Process(target=client_main, args=(
                    self._env(), plan, pause, self.seed + n, str(out)))
                proc.start()
                clients.append((proc, out))
            for point, name in self._fault_plan():
                target = int(point * cfg.jobs)
                try:
                    self._wait(lambda t=target: self._done() >= t,
                               cfg.deadline, f"{target} jobs done before {name}")
                except TimeoutError as exc:
                    self.report.violations.append(f"stalled: {exc}"[:300])
                    break
                record = FaultRecord(name, time.time())
                try:
                    record.detail = getattr(self, name)()
                except TimeoutError as exc:  # a liveness failure: report it
                    record.detail = "stalled"
                    self.report.violations.append(
                        f"{name}: {str(exc).splitlines()[0]}")
                record.ended = time.time()
                self.report.faults.append(record)
                print(f"chaos: {time.monotonic() - began:6.1f}s "
                      f"{self._done():>5} done  {name}: {record.detail}",
                      flush=True)
            self._join_clients([proc for proc, _ in clients])
            self._wait_committed(requests)
            self.report.elapsed = time.monotonic() - began
            audit_run(self, requests, [out for _, out in clients])
        finally:
            for proc, _ in clients:
                if proc.is_alive():
                    proc.kill()
            for worker in self.workers:
                worker.stop()
            self._keep_logs_if_failed()
            self.redis.cleanup()
            if self.rabbitmq is not None:
                self.rabbitmq.cleanup()
            self.effects_server.cleanup()
            self.etcd.cleanup()
        return self.report

    def _join_clients(self, clients: list) -> None:
        """Wait for the clients, supervising the workers meanwhile: a
        client's GPU submissions need a registered host, so with every
        worker down (kombu can end them all at a Redis restart) the clients
        would retry for ever. A client still running after the deadline is
        a liveness failure: its stacks are dumped (SIGUSR1, see
        :mod:`tests.chaos.clients`) so the report says where it hung."""
        try:
            self._wait(lambda: not any(p.is_alive() for p in clients),
                       self.config.deadline, "the clients to finish")
        except TimeoutError:
            for n, proc in enumerate(clients):
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGUSR1)
                    proc.join(2)
                    self.report.violations.append(
                        f"stalled: client {n} still submitting after "
                        f"{self.config.deadline:.0f}s (stacks on stderr)")

    def _wait_inventory(self) -> None:
        from ares_celery.gpu.inventory import InventoryCache
        services = self.chaos.ares.services
        cache = InventoryCache(services.etcd, services.keys).start()
        try:
            cache.wait_for(lambda h: len(h) >= self.config.workers, 30)
        finally:
            cache.stop()

    def _committed(self, job_ids: list[str]) -> list:
        pipe = self.store.pipeline()
        for job in job_ids:
            pipe.hget(f"{NAMESPACE}:job:{job}", "committed")
        return pipe.execute()

    def _wait_committed(self, requests) -> None:
        """Wait for every job to commit; like a client that retries on a
        timeout, re-submit (same request id) whatever is still missing after
        ``republish_after``: a message the broker lost is published again."""
        jobs = {job_id_for(NAMESPACE, rid): (rid, kind, args)
                for rid, kind, args in requests}
        tasks = {"pay": self.chaos.pay, "train": self.chaos.train}
        deadline = time.monotonic() + self.config.deadline
        while True:
            try:
                self._wait(lambda: all(self._committed(list(jobs))),
                           self.config.republish_after + 2,
                           "every job to commit")
                return
            except TimeoutError:
                pass
            missing = [j for j, c in zip(jobs, self._committed(list(jobs)),
                                         strict=True) if not c]
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"{len(missing)} jobs never committed (lost?): "
                    f"{missing[:5]}")
                return
            for job in missing:
                rid, kind, args = jobs[job]
                tasks[kind].apply_async(args, request_id=rid)
                self.report.resubmitted.add(rid)

    def _keep_logs_if_failed(self) -> None:
        if self.report.ok:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for i, worker in enumerate(self.workers):
            shutil.copy(worker.log, self.tmp / f"worker-{i}.log")
        print(f"chaos: logs kept in {self.tmp}", file=sys.stderr)


def run_chaos(config: ChaosConfig) -> ChaosReport:
    return ChaosRun(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--extra-faults", type=int, default=0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--broker", choices=("redis", "rabbitmq"),
                        default="redis")
    parser.add_argument("--report-json", type=Path,
                        help="also write the report's figures here")
    parser.add_argument("--dump-stacks-after", type=float, default=720,
                        help="print every thread's stack if the run is "
                        "still going after this many seconds (a hang)")
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(args.dump_stacks_after, exit=False)
    report = run_chaos(ChaosConfig(jobs=args.jobs, seed=args.seed,
                                   extra_faults=args.extra_faults,
                                   clients=args.clients,
                                   broker=args.broker))
    print(report.table(), flush=True)
    if args.report_json:
        args.report_json.write_text(json.dumps(report.summary()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
