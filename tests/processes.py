"""Real ``celery worker`` subprocesses for fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from ares_celery.testing.servers import die_with_parent, wait_until

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns a truthy value, with a deadline."""
    return wait_until(predicate, timeout, what, max_pause=0.05)


def owner(workers, pid: int):
    """The worker whose process group the pool process ``pid`` is in."""
    group = os.getpgid(pid)
    return next(w for w in workers if w.proc.pid == group)


@contextmanager
def worker_pair(app, env: dict, concurrency: int = 2):
    """Two ``celery worker`` processes started with ``env``, SIGKILLed
    after: the takeover tests' holder and the worker that takes over."""
    workers = [WorkerProcess(app, concurrency=concurrency, env=env)
               for _ in range(2)]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.kill()


class WorkerProcess:
    """``celery -A <module> worker`` in its own process group."""

    def __init__(self, app, name: str | None = None, concurrency: int = 1,
                 pool: str = "prefork", env: dict | None = None,
                 module: str = "tests.apps.jobs") -> None:
        self.app = app
        self.module = module
        self.name = name or f"w{uuid.uuid4().hex[:6]}@test"
        self.concurrency = concurrency
        self.pool = pool
        # The worker loads ``module`` with this app's broker.
        self.env = {**os.environ, "ARES_TEST_BROKER": app.conf.broker_url,
                    **(env or {})}
        self.log = Path(tempfile.mkstemp(prefix="ares-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0, wait: bool = True) -> WorkerProcess:
        """Launch the worker and (unless ``wait`` is false) wait until it
        answers a ping."""
        cmd = [sys.executable, "-m", "celery", "-A", self.module,
               "worker", "-n", self.name, "-P", self.pool,
               "-c", str(self.concurrency), "-l", "info",
               "--without-mingle", "--without-gossip"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
        if wait:
            wait_for(self._ready, timeout, f"worker {self.name} ready")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{self.tail()}")
        try:
            return bool(self.app.control.ping([self.name], timeout=0.5))
        except Exception:  # noqa: BLE001 - broker just restarted: try again
            return False

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children."""
        if self.proc and self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def supervise(self) -> Supervisor:
        """Restart the worker whenever it exits, as systemd's
        ``Restart=always`` would (Celery 5.7.0 can end a worker whose broker
        connection drops while it holds unacked messages)."""
        return Supervisor(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Supervisor:
    """A thread that keeps one :class:`WorkerProcess` running."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if self.worker.proc is not None and \
                    self.worker.proc.poll() is not None:
                self.restarts += 1
                try:
                    self.worker.start(timeout=60)
                except Exception:  # noqa: BLE001 - broker still away: again
                    continue
