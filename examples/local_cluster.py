"""A throw-away cluster for the examples: private Redis and etcd on free
loopback ports, and real ``celery worker`` processes for one example app.

The example apps read ``DEMO_BROKER`` and ``DEMO_ETCD`` when they are
imported, so the cluster sets them before it imports the app; that is why
the app module is named here rather than imported by the caller.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from ares_celery.testing import EtcdServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent


class LocalCluster:
    """``with LocalCluster("examples.payments_app") as cluster:`` starts
    Redis, etcd and one worker (``cluster.app`` is the imported module)."""

    def __init__(self, app_module: str, workers: dict[str, dict[str, str]] | None = None,
                 concurrency: int = 2, broker: RedisServer | None = None) -> None:
        self.app_module = app_module
        #: worker node name -> extra environment for that worker
        self.worker_envs = workers if workers is not None else {"example@local": {}}
        self.concurrency = concurrency
        self.redis = RedisServer()
        #: The broker is the same Redis unless the example needs its own.
        self.broker = broker
        self.etcd = EtcdServer()
        self.workers: dict[str, subprocess.Popen] = {}
        self.app: ModuleType | None = None

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        self.redis.start()
        if self.broker is not None:
            self.broker.start()
        self.etcd.start()
        broker = self.broker or self.redis
        env = {"DEMO_BROKER": f"{broker.url}/0", "DEMO_ETCD": self.etcd.endpoint,
               "DEMO_REDIS": f"{self.redis.url}/0"}
        os.environ.update(env)
        for var in ("ARES_MOCK_GPUS", "ARES_HOST"):
            os.environ.pop(var, None)  # each worker gets its own, if any
        print(f"redis  : {self.redis.url} (pid {self.redis.proc.pid})")
        if self.broker is not None:
            print(f"broker : {self.broker.url} (pid {self.broker.proc.pid})")
        print(f"etcd   : {self.etcd.endpoint} (pid {self.etcd.proc.pid})")
        for name, extra in self.worker_envs.items():
            self.workers[name] = subprocess.Popen(
                [sys.executable, "-m", "celery", "--quiet", "-A", self.app_module,
                 "worker", "-c", str(self.concurrency), "-n", name,
                 "--without-mingle", "--without-gossip", "-l", "warning"],
                cwd=ROOT, env=dict(os.environ, **extra), start_new_session=True)
        self.app = importlib.import_module(self.app_module)
        self.wait_for_workers(timeout)
        for name, proc in self.workers.items():
            print(f"worker : {name} (pid {proc.pid})")
        print()

    def wait_for_workers(self, timeout: float) -> None:
        """Poll with a deadline until every worker answers a ping."""
        deadline = time.monotonic() + timeout
        names = list(self.workers)
        while len(self.app.app.control.ping(names, timeout=0.5)) < len(names):
            dead = [n for n, w in self.workers.items() if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SystemExit(f"workers did not start (exited: {dead})")

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()  # warm shutdown: the worker stops its own pool
        for proc in self.workers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for server in (self.redis, self.broker, self.etcd):
            if server is not None:
                server.cleanup()
