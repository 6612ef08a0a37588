"""Start real ``redis-server`` and ``etcd`` processes on free loopback ports.

Tests, the demo and the benchmarks use these instead of anything left
running by hand: each server gets its own temporary data dir and port, is
polled until healthy (with a deadline, no fixed sleeps), and can be
stopped, killed, paused and restarted on the same port and data dir to
inject real faults.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """An unused loopback TCP port (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None,
               max_pause: float = 0.2):
    """Poll ``check`` until it returns something truthy (and return it),
    with a deadline; a check that raises ``OSError`` (not listening yet)
    counts as not yet. Fails early if ``proc`` exits, with ``log``'s tail."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(pause)
        pause = min(pause * 1.5, max_pause)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the process that started
    us dies, so a test run that is killed leaves no servers behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: cleanup() still stops the server


def _require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found; install the Debian package "
                           f"{package!r} (scripts/bootstrap.sh does)")
    return path


class _Process:
    """Common start/stop/kill/pause handling for one server process."""

    name = "server"

    def __init__(self, workdir: Path | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"ares-{self.name}-"))
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / f"{self.name}.log"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.workdir,
            start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_until(self.healthy, timeout, f"{self.name} to be healthy",
                   self.proc, self.log)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()


class RedisServer(_Process):
    """A private ``redis-server`` (no persistence unless asked)."""

    name = "redis"

    def __init__(self, port: int | None = None, workdir: Path | None = None,
                 password: str | None = None, persist: bool = False) -> None:
        super().__init__(workdir)
        self.binary = _require_binary("redis-server", "redis-server")
        self.port = port or free_port()
        self.password = password
        self.persist = persist

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.workdir), "--daemonize", "no",
               "--save", "", "--appendonly", "yes" if self.persist else "no",
               "--protected-mode", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def healthy(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")


class EtcdServer(_Process):
    """A single etcd member (or one member of an :class:`EtcdCluster`)."""

    name = "etcd"

    def __init__(self, client_port: int | None = None,
                 peer_port: int | None = None, workdir: Path | None = None,
                 member: str = "default", initial_cluster: str | None = None,
                 fsync: bool = False) -> None:
        super().__init__(workdir)
        self.binary = _require_binary("etcd", "etcd-server")
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.member = member
        self.initial_cluster = initial_cluster
        self.fsync = fsync

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        cmd = [self.binary, "--name", self.member,
               "--data-dir", str(self.workdir / "data"),
               "--listen-client-urls", client,
               "--advertise-client-urls", client,
               "--listen-peer-urls", self.peer_url,
               "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster",
               self.initial_cluster or f"{self.member}={self.peer_url}",
               "--initial-cluster-state", "new",
               "--initial-cluster-token", f"ares-{self.client_port}",
               "--heartbeat-interval", "50", "--election-timeout", "500",
               "--log-level", "warn", "--logger", "zap"]
        if not self.fsync:
            # Tests restart etcd cleanly; skipping fsync keeps a 2-core
            # machine fast. Benchmarks say which mode they measured.
            cmd.append("--unsafe-no-fsync")
        return cmd

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.client_port}/health"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return b'"true"' in resp.read()


class EtcdCluster:
    """Several etcd members on loopback, for leader-loss tests."""

    def __init__(self, size: int = 3) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}"
                           for i, (_, peer) in enumerate(ports))
        self.members = [EtcdServer(client, peer, member=f"m{i}",
                                   initial_cluster=initial)
                        for i, (client, peer) in enumerate(ports)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 60.0) -> None:
        for member in self.members:
            log = open(member.log, "ab")
            member.proc = subprocess.Popen(
                member._command(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)
            log.close()
        for member in self.members:
            member.wait_healthy(timeout)

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()
