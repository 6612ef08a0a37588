"""Worker-side GPU allocation, shared by every pool process of one host.

Prefork children are separate processes, so the host's allocations live in
a small JSON file guarded by ``flock``: a child picks its GPUs from the
host's free set with the placement scorer while holding the lock, so two
jobs can never get the same GPU. Each allocation records the pid that holds
it; if that process dies (SIGKILL, hard time limit, revoke with terminate)
the next allocation or the worker's periodic reaper gives the GPUs back.
The ledger only records; :class:`~ares_celery.gpu.host.GpuHost` publishes
the new free set after every change, so the router sees it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AresError, UnsatisfiableGpuRequest
from .model import HostTopology
from .placement import Placement, PlacementPolicy
from .request import GpuRequest

logger = logging.getLogger(__name__)


class GpusBusy(AresError):
    """The GPUs this job needs did not become free within the wait bound."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def ledger_path(namespace: str, host: str, directory: str | None = None) -> Path:
    base = Path(directory or tempfile.gettempdir())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
    return base / f"ares-gpus-{namespace}-{safe}.json"


@dataclass(frozen=True)
class Allocation:
    job_id: str
    placement: Placement
    topology: HostTopology

    @property
    def gpus(self) -> list[int]:
        return list(self.placement.gpus)

    @property
    def uuids(self) -> list[str]:
        return [self.topology.gpu(i).uuid or "" for i in self.placement.gpus]


class HostGpuLedger:
    """The host's GPU allocations, in a file every pool process shares.

    ``policies`` (placement policy by name) choose the GPUs: the request
    names its policy, so the worker's final choice is made by the same rule
    the router used to pick the host.
    """

    def __init__(self, path: Path, topology: HostTopology,
                 policies: Mapping[str, PlacementPolicy]) -> None:
        self.path = Path(path)
        self.topology = topology
        self._policies = policies
        self._lock_path = self.path.with_suffix(".lock")

    # -- file plumbing -------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The state, read and written back under the host-wide lock."""
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()
                before = json.dumps(state, sort_keys=True)
                yield state
                if json.dumps(state, sort_keys=True) != before:
                    self._write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {"allocations": {}}

    def _write(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    # -- worker main process -------------------------------------------------

    def reset(self, **info: Any) -> None:
        """A fresh ledger for a starting worker (stale allocations of a
        previous run on this host are dropped)."""
        with self.locked() as state:
            state.clear()
            state.update(info, allocations={})

    def update_info(self, **info: Any) -> None:
        with self.locked() as state:
            state.update(info)

    def busy(self) -> dict[int, str]:
        with self.locked() as state:
            self._reap(state)
            return self._busy(state)

    def snapshot(self) -> tuple[dict[int, str], dict[str, Any]]:
        """Busy GPUs and the worker's info (queue, worker, lease), read
        together under the lock: what the host's state key must say."""
        with self.locked() as state:
            info = {k: v for k, v in state.items() if k != "allocations"}
            return self._busy(state), info

    def reap_dead(self) -> list[str]:
        """Give back GPUs of processes that died; returns their job ids."""
        with self.locked() as state:
            return self._reap(state)

    # -- pool processes --------------------------------------------------------

    def try_allocate(self, job_id: str, request: GpuRequest) -> Allocation | None:
        """Best GPUs for the job from the free set now, or None if too few
        are free. Raises UnsatisfiableGpuRequest if this host can never
        satisfy it."""
        policy = self._policies[request.policy]
        policy.place(self.topology, request)  # ever possible on this host?
        with self.locked() as state:
            self._reap(state)
            allocations = state.setdefault("allocations", {})
            mine = allocations.get(job_id)
            if mine is not None and mine["pid"] == os.getpid():
                placement = policy.place(self.topology, request,
                                         free=mine["gpus"])
                return Allocation(job_id, placement, self.topology)
            busy = self._busy(state)
            free = [i for i in self.topology.indices if i not in busy]
            try:
                placement = policy.place(self.topology, request, free=free)
            except UnsatisfiableGpuRequest:
                return None
            allocations[job_id] = {"gpus": list(placement.gpus),
                                   "pid": os.getpid(), "at": time.time(),
                                   "score": placement.score}
            return Allocation(job_id, placement, self.topology)

    def allocate(self, job_id: str, request: GpuRequest, timeout: float,
                 on_change: Callable[[], None] | None = None) -> Allocation:
        """Wait (polling, with a deadline) for GPUs, then take them."""
        deadline = time.monotonic() + timeout
        pause = 0.02
        while True:
            allocation = self.try_allocate(job_id, request)
            if allocation is not None:
                if on_change is not None:
                    on_change()
                return allocation
            if time.monotonic() >= deadline:
                raise GpusBusy(
                    f"{request.describe()} not free on host "
                    f"{self.topology.host} within {timeout:g}s")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    def release(self, job_id: str) -> bool:
        with self.locked() as state:
            return state.setdefault("allocations", {}).pop(job_id, None) \
                is not None

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _busy(state: dict[str, Any]) -> dict[int, str]:
        busy: dict[int, str] = {}
        for job_id, entry in state.get("allocations", {}).items():
            for gpu in entry["gpus"]:
                busy[int(gpu)] = job_id
        return busy

    @staticmethod
    def _reap(state: dict[str, Any]) -> list[str]:
        allocations = state.setdefault("allocations", {})
        dead = [job for job, entry in allocations.items()
                if not _pid_alive(int(entry["pid"]))]
        for job in dead:
            logger.warning("ares: job %s's process died; its GPUs %s are free "
                           "again", job, allocations[job]["gpus"])
            del allocations[job]
        return dead
