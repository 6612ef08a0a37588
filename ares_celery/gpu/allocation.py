"""Worker-side GPU allocation, shared by every pool process of one host.

Prefork children are separate processes, so the host's allocations live in
a small JSON file guarded by ``flock``: a child picks its GPUs from the
host's free set with the placement scorer while holding the lock, so two
jobs can never get the same GPU. Jobs that find too few GPUs free register
as waiting, and GPUs are granted to waiters by (aged) priority, then
submission time, whenever GPUs free up: not to whichever process happens
to poll first. Each allocation records the pid that holds
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
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AresError, UnsatisfiableGpuRequest
from .model import HostTopology
from .placement import Placement, PlacementPolicy
from .preemption import Victim, candidates, choose_victims, victim_from
from .priority import DEFAULT_PRIORITY, effective_priority
from .request import GpuRequest

logger = logging.getLogger(__name__)


class GpusBusy(AresError):
    """The GPUs this job needs did not become free within the wait bound."""


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (killed, not yet reaped by the
    worker's main process) counts as dead: its GPUs are no longer used."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


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


def waiter_entry(request: GpuRequest, priority: int,
                 submitted: float | None, preemptible: bool = False,
                 token: int = 0) -> dict[str, Any]:
    """A waiting job as the ledger file records it: its request, priority,
    submission time (seniority survives re-routes and deferrals), pid,
    whether it may be preempted once running and its fencing token (what a
    preemptor needs to release the lock of a victim it had to kill)."""
    now = time.time()
    return {"gpus": request.gpus, "min_memory_gb": request.min_memory_gb,
            "interconnect": request.interconnect, "policy": request.policy,
            "priority": priority,
            "submitted": now if submitted is None else float(submitted),
            "pid": os.getpid(), "since": now, "preemptible": preemptible,
            "token": token}


def entry_request(entry: Mapping[str, Any]) -> GpuRequest:
    return GpuRequest(int(entry["gpus"]), entry.get("min_memory_gb"),
                      entry.get("interconnect"), policy=entry["policy"])


def entry_priority(entry: Mapping[str, Any], now: float) -> int:
    """The waiter's effective (aged) priority at ``now``."""
    return effective_priority(int(entry["priority"]),
                              now - float(entry["submitted"]))


def grant_key(entry: Mapping[str, Any], job_id: str,
              now: float) -> tuple[int, float, float, str]:
    """Most urgent first, then earliest submitted, then earliest to wait
    here; the job id makes the order total."""
    return (-entry_priority(entry, now), float(entry["submitted"]),
            float(entry.get("since", 0.0)), job_id)


def in_grant_order(waiting: Mapping[str, Mapping[str, Any]], now: float
                   ) -> list[tuple[str, Mapping[str, Any]]]:
    """Waiting jobs, the one owed GPUs first (see :func:`grant_key`)."""
    return sorted(waiting.items(),
                  key=lambda kv: grant_key(kv[1], kv[0], now))


def usable_by(job_id: str, gpus: Iterable[int],
              reserved: Mapping[str, str]) -> list[int]:
    """Of ``gpus``, those ``job_id`` may take: not reserved for another
    (preempting) job."""
    return [i for i in gpus if reserved.get(str(i), job_id) == job_id]


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
            state.update(info, allocations={}, waiting={})

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
            return self._snapshot(state)

    def publish_with(self, write: Callable[[dict[int, str], dict[str, Any]],
                                           None]) -> None:
        """Call ``write(busy, info)`` while holding the lock: pool processes
        that change the ledger one after the other then publish in that
        order too, so an older state never lands after a newer one (and
        stays there: nothing would correct it)."""
        with self.locked() as state:
            write(*self._snapshot(state))

    def _snapshot(self, state: dict[str, Any]
                  ) -> tuple[dict[int, str], dict[str, Any]]:
        info = {k: v for k, v in state.items()
                if k not in ("allocations", "waiting", "reserved")}
        info["preemptible"] = self._preemptible(state)
        return self._busy(state), info

    def preemptible(self) -> dict[str, int]:
        """Running jobs a more urgent one may preempt (job id -> priority),
        for the inventory the router reads."""
        with self.locked() as state:
            return self._preemptible(state)

    @staticmethod
    def _preemptible(state: dict[str, Any]) -> dict[str, int]:
        return {job: int(entry.get("priority", 0))
                for job, entry in state.get("allocations", {}).items()
                if entry.get("preemptible") and not entry.get("preempt")}

    def reap_dead(self) -> list[str]:
        """Give back GPUs of processes that died; returns their job ids."""
        with self.locked() as state:
            return self._reap(state)

    # -- pool processes --------------------------------------------------------

    def try_allocate(self, job_id: str, request: GpuRequest,
                     priority: int = DEFAULT_PRIORITY,
                     submitted: float | None = None,
                     preemptible: bool = False,
                     token: int = 0) -> Allocation | None:
        """The job's GPUs if it is granted them now, else None (and the job
        stays registered as waiting, so a release can hand GPUs to it).

        Grants follow :meth:`_grant`: effective priority, then submission
        time. Raises UnsatisfiableGpuRequest if this host can never satisfy
        the request."""
        policy = self._policies[request.policy]
        policy.place(self.topology, request)  # ever possible on this host?
        with self.locked() as state:
            self._reap(state)
            allocations = state.setdefault("allocations", {})
            mine = allocations.get(job_id)
            if mine is not None and mine["pid"] == os.getpid():
                state.setdefault("waiting", {}).pop(job_id, None)
                return self._allocation(job_id, request, mine["gpus"])
            waiting = state.setdefault("waiting", {})
            if job_id not in waiting or waiting[job_id]["pid"] != os.getpid():
                waiting[job_id] = waiter_entry(request, priority, submitted,
                                               preemptible, token)
            self._grant(state, time.time())
            mine = allocations.get(job_id)
            if mine is not None and mine["pid"] == os.getpid():
                return self._allocation(job_id, request, mine["gpus"])
            return None

    def allocate(self, job_id: str, request: GpuRequest, timeout: float,
                 on_change: Callable[[], None] | None = None,
                 priority: int = DEFAULT_PRIORITY,
                 submitted: float | None = None,
                 preemptible: bool = False, token: int = 0,
                 on_poll: Callable[[], float | None] | None = None,
                 ) -> Allocation:
        """Wait (polling, with a deadline) until the ledger grants the job
        its GPUs; a job that gives up (timeout, soft time limit) leaves the
        waiting list and hands on GPUs granted after its last look.
        ``on_poll`` runs after every look that found no GPUs (the host
        preempts and enforces the grace from there); it may return a
        ``time.monotonic()`` the wait must last until (a preemptor waits
        out its victims' grace)."""
        deadline = time.monotonic() + timeout
        pause = 0.02
        granted: Allocation | None = None
        try:
            while True:
                granted = self.try_allocate(job_id, request, priority,
                                            submitted, preemptible, token)
                if granted is not None:
                    if on_change is not None:
                        on_change()
                    return granted
                if on_poll is not None:
                    # First: a preemption started now extends the wait,
                    # even with a wait bound of 0.
                    deadline = max(deadline, on_poll() or deadline)
                if time.monotonic() >= deadline:
                    raise GpusBusy(
                        f"{request.describe()} not free on host "
                        f"{self.topology.host} within {timeout:g}s")
                time.sleep(pause)
                pause = min(pause * 1.5, 0.5)
        finally:
            if granted is None:
                self.withdraw(job_id)

    def withdraw(self, job_id: str) -> None:
        """The job stops waiting here (and gives back GPUs granted to it
        after its last look), so it blocks nobody while it is elsewhere."""
        changed = False
        with self.locked() as state:
            if state.setdefault("waiting", {}).pop(job_id, None) is not None:
                changed = True
            mine = state.setdefault("allocations", {}).get(job_id)
            if mine is not None and mine["pid"] == os.getpid() \
                    and mine.get("granted"):
                del state["allocations"][job_id]
                changed = True
            if changed:
                self._settle(state)
                self._grant(state, time.time())

    def waiting(self) -> dict[str, dict[str, Any]]:
        """The jobs waiting for GPUs on this host (job id -> entry)."""
        with self.locked() as state:
            self._reap(state)
            return dict(state.get("waiting", {}))

    def release(self, job_id: str) -> bool:
        """Give back the GPUs this process holds for the job and hand them
        to the waiting jobs that rank first, in the same locked step: no job
        that arrives (or polls) later can take GPUs a more urgent waiter was
        owed.

        Only the holder's own allocation is released: another delivery of
        the same job (a recovered or deferred copy that found the job's lock
        held, in another pool process) also ends in ``_finish_job``, and
        must not free the GPUs of the copy that is running. A holder that
        dies is reaped by pid instead."""
        with self.locked() as state:
            allocations = state.setdefault("allocations", {})
            entry = allocations.get(job_id)
            if entry is None or int(entry["pid"]) != os.getpid():
                return False
            del allocations[job_id]
            self._reserve_for_preemptor(state, entry)
            self._grant(state, time.time())
            return True

    # -- preemption ------------------------------------------------------------

    def preempt_for(self, job_id: str,
                    now: float | None = None) -> list[Victim]:
        """Mark running jobs to yield their GPUs to waiting ``job_id``, if
        it is the most urgent job that cannot start here, has no preemption
        in flight, and lower-priority preemptible jobs would free a
        placement (see :mod:`~ares_celery.gpu.preemption`). Returns the
        victims marked now (none: nothing to do, or already done)."""
        now = time.time() if now is None else now
        with self.locked() as state:
            self._reap(state)
            waiting = state.setdefault("waiting", {})
            allocations = state.setdefault("allocations", {})
            entry = waiting.get(job_id)
            if entry is None or any(
                    (a.get("preempt") or {}).get("by") == job_id
                    for a in allocations.values()):
                return []
            blocked = self._first_blocked(state, now)
            if blocked != job_id:
                return []
            request = entry_request(entry)
            pool = candidates(allocations, int(entry["priority"]), now)
            victims = choose_victims(self.topology,
                                     self._policies[request.policy], request,
                                     self._free_for(state, job_id), pool)
            for victim in victims or ():
                allocations[victim.job_id]["preempt"] = {
                    "by": job_id, "at": now,
                    "priority": int(entry["priority"])}
            return victims or []

    def preempt_request(self, job_id: str) -> dict[str, Any] | None:
        """The request to yield made to running ``job_id`` (``by``, ``at``,
        ``priority`` of the preemptor), or None: what ``ctx.check()`` asks."""
        with self.locked() as state:
            entry = state.get("allocations", {}).get(job_id)
            return dict(entry["preempt"]) if entry and entry.get("preempt") \
                else None

    def note_checkpoint(self, job_id: str, at: float) -> None:
        """The running job saved a checkpoint: less work at risk, so it is
        a cheaper victim from now on."""
        with self.locked() as state:
            entry = state.get("allocations", {}).get(job_id)
            if entry is not None:
                entry["checkpoint_at"] = at

    def kill_overdue(self, job_id: str, grace: float,
                     now: float | None = None) -> list[Victim]:
        """SIGKILL the processes of victims ``job_id`` asked to yield more
        than ``grace`` seconds ago and that still run; returns them.

        The signal is sent under the ledger's lock, with the victim's
        allocation still recorded for that pid: a victim releases its GPUs
        (under this lock) only when its job ends, so the process killed is
        still running the victim, never a job it took on afterwards."""
        now = time.time() if now is None else now
        with self.locked() as state:
            out = []
            for victim_id, entry in state.get("allocations", {}).items():
                mark = entry.get("preempt") or {}
                if mark.get("by") != job_id \
                        or now - float(mark["at"]) < grace \
                        or not pid_alive(int(entry["pid"])):
                    continue
                try:
                    os.kill(int(entry["pid"]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                out.append(victim_from(victim_id, entry, now))
            return out

    def _first_blocked(self, state: dict[str, Any], now: float) -> str | None:
        """The most urgent waiter that the GPUs free for it cannot place."""
        for job_id, entry in in_grant_order(state.get("waiting", {}), now):
            request = entry_request(entry)
            try:
                self._policies[request.policy].place(
                    self.topology, request, free=self._free_for(state, job_id))
            except UnsatisfiableGpuRequest:
                return job_id
        return None

    @staticmethod
    def _reserve_for_preemptor(state: dict[str, Any],
                               entry: Mapping[str, Any]) -> None:
        """A preempted job's GPUs are held for the job that preempted it
        (while it waits), so no third job takes them first."""
        owner = (entry.get("preempt") or {}).get("by")
        if owner and owner in state.get("waiting", {}):
            reserved = state.setdefault("reserved", {})
            for gpu in entry["gpus"]:
                reserved[str(gpu)] = owner

    @staticmethod
    def _settle(state: dict[str, Any]) -> None:
        """Forget reservations and yield requests of jobs no longer waiting
        (granted, gone elsewhere, dead): their victims may go on."""
        waiting = state.get("waiting", {})
        reserved = state.setdefault("reserved", {})
        for gpu in [g for g, owner in reserved.items() if owner not in waiting]:
            del reserved[gpu]
        for entry in state.get("allocations", {}).values():
            if (entry.get("preempt") or {}).get("by") not in (None, *waiting):
                del entry["preempt"]

    def _free_for(self, state: dict[str, Any], job_id: str) -> list[int]:
        """GPUs nobody holds, minus those reserved for another job."""
        allocated = self._allocated(state)
        return usable_by(job_id, (i for i in self.topology.indices
                                  if i not in allocated),
                         state.get("reserved", {}))

    def _allocation(self, job_id: str, request: GpuRequest,
                    gpus: list[int]) -> Allocation:
        placement = self._policies[request.policy].place(
            self.topology, request, free=gpus)
        return Allocation(job_id, placement, self.topology)

    def _grant(self, state: dict[str, Any], now: float) -> list[str]:
        """Give free GPUs to waiting jobs, most urgent first.

        Waiters are taken by effective priority (aged, see
        :mod:`~ares_celery.gpu.priority`), then submission time. A waiter
        whose request does not fit the free GPUs lets waiters of its own
        effective priority that do fit go ahead (backfill), but blocks every
        waiter ranked below that level: freed GPUs accumulate for it instead
        of going to less urgent work. Aging is what lets an old waiter of a
        lower level through in the end. Returns the job ids granted."""
        waiting = state.setdefault("waiting", {})
        allocations = state.setdefault("allocations", {})
        if not waiting:
            return []
        allocated = self._allocated(state)
        reserved = state.setdefault("reserved", {})
        free = [i for i in self.topology.indices if i not in allocated]
        granted: list[str] = []
        blocked_at: int | None = None
        for job_id, entry in in_grant_order(waiting, now):
            level = entry_priority(entry, now)
            if blocked_at is not None and level < blocked_at:
                break
            request = entry_request(entry)
            try:
                placement = self._policies[request.policy].place(
                    self.topology, request,
                    free=usable_by(job_id, free, reserved))
            except UnsatisfiableGpuRequest:
                if blocked_at is None:
                    blocked_at = level
                continue
            allocations[job_id] = {"gpus": list(placement.gpus),
                                   "pid": entry["pid"], "at": now,
                                   "score": placement.score,
                                   "priority": entry["priority"],
                                   "preemptible": bool(
                                       entry.get("preemptible")),
                                   "token": int(entry.get("token") or 0),
                                   "granted": True}
            free = [i for i in free if i not in placement.gpus]
            granted.append(job_id)
        for job_id in granted:
            del waiting[job_id]
        if granted:
            self._settle(state)
        return granted

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _allocated(state: dict[str, Any]) -> dict[int, str]:
        busy: dict[int, str] = {}
        for job_id, entry in state.get("allocations", {}).items():
            for gpu in entry["gpus"]:
                busy[int(gpu)] = job_id
        return busy

    @classmethod
    def _busy(cls, state: dict[str, Any]) -> dict[int, str]:
        """Allocated GPUs and GPUs reserved for a preempting job: neither
        is free for anyone else (what the router must see)."""
        busy = {int(gpu): owner
                for gpu, owner in state.get("reserved", {}).items()}
        busy.update(cls._allocated(state))
        return busy

    @classmethod
    def _reap(cls, state: dict[str, Any]) -> list[str]:
        waiting = state.setdefault("waiting", {})
        for job in [job for job, entry in waiting.items()
                    if not pid_alive(int(entry["pid"]))]:
            del waiting[job]
        allocations = state.setdefault("allocations", {})
        dead = [job for job, entry in allocations.items()
                if not pid_alive(int(entry["pid"]))]
        for job in dead:
            logger.warning("ares: job %s's process died; its GPUs %s are free "
                           "again", job, allocations[job]["gpus"])
            cls._reserve_for_preemptor(state, allocations.pop(job))
        cls._settle(state)
        return dead
