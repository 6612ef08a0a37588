"""A private RabbitMQ node on free loopback ports, like the Redis and etcd
servers: its own Erlang port mapper, data dir, logs, config and cookie, so a
test session never touches (or depends on) the machine's own broker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from .servers import _Process, die_with_parent, free_port

#: Debian puts the real scripts here; /usr/sbin/rabbitmq-server is a wrapper
#: that switches to the rabbitmq user, which cannot write our temp dir.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def _rabbitmq_binary(name: str) -> str:
    path = RABBITMQ_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install the Debian package "
                           "'rabbitmq-server' (scripts/bootstrap.sh does)")
    return found


class RabbitMQServer(_Process):
    """One RabbitMQ node (``rabbitmq-server``), no plugins.

    Settings are RabbitMQ's defaults except what a private node needs
    (ports, paths, ``loopback_users = none``); in particular
    ``consumer_timeout`` stays at its 30 minutes.
    """

    name = "rabbitmq"
    start_timeout = 60.0

    def __init__(self, port: int | None = None, workdir: Path | None = None,
                 config: str = "") -> None:
        super().__init__(workdir)
        self.binary = _rabbitmq_binary("rabbitmq-server")
        self._own_port = port is None
        self.port = port or free_port()
        self._assign_ports()
        self.extra_config = config
        self._epmd: subprocess.Popen | None = None

    def _assign_ports(self) -> None:
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"ares{self.port}@localhost"

    def _fresh_ports(self) -> bool:
        if not self._own_port:
            return False
        self.kill()
        self._stop_epmd()
        shutil.rmtree(self.workdir / "mnesia", ignore_errors=True)
        self.port = free_port()
        self._assign_ports()
        return True

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        """What ``rabbitmq-server`` and ``rabbitmqctl`` need to find this
        node (and nothing of the machine's own)."""
        work = self.workdir
        return dict(
            os.environ,
            HOME=str(work),  # the Erlang cookie lives in $HOME
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(work / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(work / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(work / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(work / "mnesia"),
            RABBITMQ_LOG_BASE=str(work / "log"),
            RABBITMQ_PID_FILE=str(work / "rabbitmq.pid"),
            RABBITMQ_LOGS="-",
        )

    def _write_config(self) -> None:
        work = self.workdir
        (work / "rabbitmq-env.conf").write_text("")
        (work / "advanced.config").write_text("[].\n")
        (work / "enabled_plugins").write_text("[].\n")
        (work / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            "log.console = true\nlog.console.level = warning\n"
            + self.extra_config)

    def _command(self) -> list[str]:
        return [self.binary]

    def _prepare(self) -> None:
        self._write_config()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address",
                 "127.0.0.1"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)

    def _environment(self) -> dict[str, str]:
        return self.env()

    def healthy(self) -> bool:
        """The AMQP port answers the protocol header with a Connection.Start
        (method frame, class 10): the broker accepts clients, not just
        connections."""
        with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
            sock.settimeout(1)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            frame = sock.recv(11)
            return len(frame) >= 11 and frame[0] == 1 and \
                frame[7:11] == b"\x00\x0a\x00\x0a"

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """``rabbitmqctl`` against this node."""
        proc = subprocess.run(
            [_rabbitmq_binary("rabbitmqctl"), "-n", self.node, *args],
            env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: "
                               f"{proc.stderr or proc.stdout}")
        return proc.stdout

    def stop(self, timeout: float = 20.0) -> None:
        # The script runs the Erlang VM in its process group: signal all.
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the node (the VM and its helpers): a crash."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def _stop_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            self._epmd.kill()
            self._epmd.wait()

    def cleanup(self) -> None:
        self.stop()
        self._stop_epmd()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
