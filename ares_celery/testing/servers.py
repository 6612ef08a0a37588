"""Start real ``redis-server`` and ``etcd`` processes on free loopback ports.

Tests, the demo and the benchmarks use these instead of anything left
running by hand: each server gets its own temporary data dir and port, is
polled until healthy (with a deadline, no fixed sleeps), and can be
stopped, killed, paused and restarted on the same port and data dir to
inject real faults.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .certs import TestPki


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


def port_was_taken(exc: Exception) -> bool:
    """Whether a server that exited while starting (``exc`` carries its
    log's tail) could not bind its port."""
    text = str(exc).lower()
    return "address already in use" in text or "eaddrinuse" in text


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

    #: Seconds a start may take before it counts as failed.
    start_timeout = 30.0

    def _prepare(self) -> None:
        """Before each start: what the server needs on disk or running."""

    def _environment(self) -> dict[str, str] | None:
        """The server's environment (None: ours)."""
        return None

    #: First starts tried on fresh ports before giving up (see :meth:`start`).
    START_ATTEMPTS = 3
    _started = False

    def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until it serves. A first start whose
        port another process took between :func:`free_port` and the
        server's bind (an outgoing connection can get any free port) is
        retried on fresh ports, if this server chose them; a restart keeps
        its ports, which clients (and an etcd member's data) remember."""
        for attempt in range(1, self.START_ATTEMPTS + 1):
            self._prepare()
            self.spawn()
            try:
                self.wait_healthy(timeout)
            except RuntimeError as exc:
                if self._started or attempt == self.START_ATTEMPTS or \
                        not port_was_taken(exc) or not self._fresh_ports():
                    raise
                continue
            self._started = True
            return

    def _fresh_ports(self) -> bool:
        """Pick new ports after a first start lost one; False where the
        caller chose them (nothing to do but fail)."""
        return False

    def spawn(self) -> None:
        """Launch the server, not waiting for it (a cluster launches every
        member before any can be healthy)."""
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.workdir,
            env=self._environment(), start_new_session=True,
            preexec_fn=die_with_parent)
        log.close()

    def wait_healthy(self, timeout: float | None = None) -> None:
        wait_until(self.healthy, timeout or self.start_timeout,
                   f"{self.name} to be healthy", self.proc, self.log)

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

    def restart(self, timeout: float | None = None) -> None:
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


def client_tls_context(pki: TestPki) -> ssl.SSLContext:
    """An SSL context that trusts the test CA and presents its client
    certificate (for health checks of servers that demand one)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


class RedisServer(_Process):
    """A private ``redis-server`` (no persistence unless asked).

    ``password`` alone sets ``requirepass``; with ``username`` too it
    creates that ACL user instead and disables the passwordless default
    user. ``tls`` serves TLS only (the plain port is closed) and requires
    client certificates signed by the test CA.
    """

    name = "redis"

    def __init__(self, port: int | None = None, workdir: Path | None = None,
                 password: str | None = None, persist: bool = False,
                 username: str | None = None, tls: TestPki | None = None,
                 extra_args: list[str] | None = None) -> None:
        super().__init__(workdir)
        self.binary = _require_binary("redis-server", "redis-server")
        self._own_port = port is None
        self.port = port or free_port()
        self.password = password
        self.persist = persist
        self.username = username
        self.tls = tls
        self.extra_args = list(extra_args or [])

    def _fresh_ports(self) -> bool:
        if self._own_port:
            self.port = free_port()
        return self._own_port

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password \
            else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        port = ["--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes"] if self.tls \
            else ["--port", str(self.port)]
        cmd = [self.binary, *port, "--bind", "127.0.0.1",
               "--dir", str(self.workdir), "--daemonize", "no",
               "--save", "", "--appendonly", "yes" if self.persist else "no",
               "--protected-mode", "no"]
        if self.persist:
            # Every write on disk before the reply: a SIGKILLed server comes
            # back with all it acknowledged (queued messages, dedup records,
            # fences), which is what the exactly-once guarantees assume.
            cmd += ["--appendfsync", "always"]
        if self.password and self.username:
            cmd += ["--user", self.username, "on", f">{self.password}",
                    "~*", "&*", "+@all", "--user", "default", "off"]
        elif self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def healthy(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), 1) as raw:
            sock = client_tls_context(self.tls).wrap_socket(
                raw, server_hostname="127.0.0.1") if self.tls else raw
            if self.password:
                user = f"{self.username} " if self.username else ""
                sock.sendall(f"AUTH {user}{self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")


class EtcdServer(_Process):
    """A single etcd member (or one member of an :class:`EtcdCluster`).

    ``tls`` serves clients over https only and requires client
    certificates signed by the test CA (``--client-cert-auth``).
    """

    name = "etcd"

    def __init__(self, client_port: int | None = None,
                 peer_port: int | None = None, workdir: Path | None = None,
                 member: str = "default", initial_cluster: str | None = None,
                 fsync: bool = False, tls: TestPki | None = None,
                 extra_args: list[str] | None = None,
                 cluster_token: str | None = None) -> None:
        super().__init__(workdir)
        self.binary = _require_binary("etcd", "etcd-server")
        # A cluster member's ports are the cluster's to change.
        self._own_ports = client_port is None and peer_port is None and \
            initial_cluster is None and cluster_token is None
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.member = member
        self.initial_cluster = initial_cluster
        self.fsync = fsync
        self.cluster_token = cluster_token or f"ares-{self.client_port}"
        self.tls = tls
        self.extra_args = list(extra_args or [])

    def discard_failed_start(self) -> None:
        """After a first start that lost its port: nothing to keep (the
        data would remember the old ports)."""
        self.kill()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def _fresh_ports(self) -> bool:
        if not self._own_ports:
            return False
        self.discard_failed_start()
        self.client_port, self.peer_port = free_port(), free_port()
        self.cluster_token = f"ares-{self.client_port}"
        return True

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _command(self) -> list[str]:
        client = self.client_url
        cmd = [self.binary, "--name", self.member,
               "--data-dir", str(self.workdir / "data"),
               "--listen-client-urls", client,
               "--advertise-client-urls", client,
               "--listen-peer-urls", self.peer_url,
               "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster",
               self.initial_cluster or f"{self.member}={self.peer_url}",
               "--initial-cluster-state", "new",
               "--initial-cluster-token", self.cluster_token,
               "--heartbeat-interval", "50", "--election-timeout", "500",
               "--log-level", "warn", "--logger", "zap"]
        if not self.fsync:
            # Tests restart etcd cleanly; skipping fsync keeps a 2-core
            # machine fast. Benchmarks say which mode they measured.
            cmd.append("--unsafe-no-fsync")
        if self.tls:
            cmd += ["--cert-file", str(self.tls.server_cert),
                    "--key-file", str(self.tls.server_key),
                    "--trusted-ca-file", str(self.tls.ca),
                    "--client-cert-auth"]
        return cmd + self.extra_args

    def healthy(self) -> bool:
        context = client_tls_context(self.tls) if self.tls else None
        with urllib.request.urlopen(f"{self.client_url}/health", timeout=1,
                                    context=context) as resp:
            return b'"true"' in resp.read()

    def call(self, path: str, body: dict, token: str | None = None) -> dict:
        """One admin request to the JSON gateway (``/v3/<path>``)."""
        request = urllib.request.Request(
            f"{self.client_url}/v3/{path}", data=json.dumps(body).encode(),
            headers={"Authorization": token} if token else {},
            method="POST")
        context = client_tls_context(self.tls) if self.tls else None
        with urllib.request.urlopen(request, timeout=5,
                                    context=context) as resp:
            return json.loads(resp.read())

    def enable_auth(self, root_password: str) -> None:
        """``etcdctl user add root && etcdctl auth enable``, over HTTP
        (Debian's etcd-server package ships no etcdctl). Safe to repeat."""
        for path, body in (("auth/role/add", {"name": "root"}),
                           ("auth/user/add", {"name": "root",
                                              "password": root_password}),
                           ("auth/user/grant", {"user": "root",
                                                "role": "root"})):
            try:
                self.call(path, body)
            except urllib.error.HTTPError as exc:
                if b"already exists" not in exc.read():
                    raise
        self.call("auth/enable", {})

    def disable_auth(self, root_password: str) -> None:
        """``etcdctl auth disable``: drops every issued token."""
        token = self.call("auth/authenticate", {
            "name": "root", "password": root_password})["token"]
        self.call("auth/disable", {}, token)

    def status(self) -> dict:
        """``/v3/maintenance/status``: member id, leader id, raft term."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.client_port}/v3/maintenance/status",
            data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=2) as resp:
            return json.loads(resp.read())


class EtcdCluster:
    """Several etcd members on loopback, for leader-loss tests."""

    START_ATTEMPTS = _Process.START_ATTEMPTS

    def __init__(self, size: int = 3) -> None:
        self.members = [EtcdServer(member=f"m{i}") for i in range(size)]
        self._started = False
        self._assign_ports()

    def _assign_ports(self) -> None:
        ports = [(free_port(), free_port()) for _ in self.members]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}"
                           for i, (_, peer) in enumerate(ports))
        for member, (client, peer) in zip(self.members, ports, strict=True):
            member.client_port, member.peer_port = client, peer
            member.initial_cluster = initial
            member.cluster_token = f"ares-cluster-{ports[0][0]}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 60.0) -> None:
        """Start every member. A first start whose ports were taken between
        :func:`free_port` and etcd's bind (an outgoing connection can get
        any free port) is retried on fresh ports; a restart keeps its
        ports, which the members' data remembers."""
        for attempt in range(1, self.START_ATTEMPTS + 1):
            for member in self.members:
                member.spawn()
            try:
                for member in self.members:
                    member.wait_healthy(timeout)
            except RuntimeError as exc:
                if self._started or attempt == self.START_ATTEMPTS or \
                        not port_was_taken(exc):
                    raise
                for member in self.members:
                    member.discard_failed_start()
                self._assign_ports()
                continue
            self._started = True
            return

    def leader(self, timeout: float = 30.0) -> EtcdServer:
        """The member the running members agree is leader (waits for an
        election to settle)."""
        def agreed() -> EtcdServer | None:
            leaders = set()
            by_id = {}
            for member in self.members:
                if member.proc is None or member.proc.poll() is not None:
                    continue
                status = member.status()
                by_id[status["header"]["member_id"]] = member
                leaders.add(status.get("leader"))
            if len(leaders) == 1:
                return by_id.get(leaders.pop())
            return None
        return wait_until(agreed, timeout, "an etcd leader")

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def restart(self, timeout: float = 60.0) -> None:
        """Stop every member, then start them all again on the same data:
        a full etcd outage and recovery."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()
