"""Recovery driven by the lease, not the broker.

When a job's holder dies, hangs or is cut off, its lease expires and etcd
deletes its job lock; when a worker dies, its presence key goes the same
way, orphaning the messages it had reserved (:mod:`.reservations`). One
recoverer at a time (an etcd election among the workers) follows both
prefixes and, for every key that went with an *expired* lease, publishes
the jobs again at once, whatever the broker and its visibility timeout. A
key deleted while its lease still lives was given back on purpose (commit,
retry, re-route, clean shutdown) and is left alone: that is how expiry is
told from release.

Every worker follows both prefixes all the time and keeps the deletions of
the last moments (:data:`BACKLOG_S`); only the leader acts on them. A new
leader starts with that backlog, so it sees what expired together with the
old leader (a dead worker's reservations vanish in the same revision as its
election key) or while nobody led; it also sweeps the job records for
holders whose lease is gone. Re-dispatching is idempotent (the copy is the
same job: a second copy finds the lock held or the job committed), so a
change of leader or a late copy from the broker costs a message, never a
second run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from celery import Celery

from ..clients.etcd import KeyValue, WatchEvent
from ..coordination.election import Election
from ..coordination.watch import PrefixWatch
from ..errors import AresError, ServiceUnavailable
from ..observability.metrics import count_recovery
from ..services import Services
from .messages import publish_message
from .task import ExactlyOnceTask

logger = logging.getLogger(__name__)

#: How many recovered (job, lease) pairs are remembered, so the lock and the
#: reservation of one death re-dispatch once.
REMEMBERED = 10_000

#: Where a job that could not be re-published goes: tried again this often.
RETRY_S = 1.0

#: A re-dispatched job that no new holder took after this long is published
#: again (doubling, up to :data:`RECHECK_MAX_S`, at most :data:`RECHECKS`
#: times): RabbitMQ hands new messages to a hung but connected consumer
#: too, as long as it has prefetch credit left (4 x its concurrency by
#: default), so a few copies may land there before one reaches a live
#: worker; a copy costs a message, never a run.
RECHECK_S = 1.0
RECHECK_MAX_S = 4.0
RECHECKS = 8

#: Followers keep deletions this long, for the leader that comes next; a
#: leader dies unnoticed for at most its lease TTL, added to this.
BACKLOG_S = 30.0

class LeaseLiveness:
    """Is lease X still alive? One etcd call per lease, then cached.

    A lease etcd says has ``t`` seconds left cannot expire sooner (only a
    revoke ends it early: a clean shutdown, whose keys were deleted first),
    so "alive" is cached for ``t``; "gone" is cached for good.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._alive_until: dict[int, float] = {}
        self._dead: OrderedDict[int, None] = OrderedDict()

    def dead(self, lease: int) -> bool:
        if not lease:
            return False  # a key on no lease is never deleted by expiry
        if lease in self._dead:
            return True
        now = time.monotonic()
        if self._alive_until.get(lease, 0.0) > now:
            return False
        ttl = self._services.etcd.lease_ttl(lease)
        if ttl > 0:
            self._alive_until[lease] = now + max(ttl - 1, 0)
            return False
        self._alive_until.pop(lease, None)
        self._dead[lease] = None
        while len(self._dead) > REMEMBERED:
            self._dead.popitem(last=False)
        return True


class Recoverer:
    """Runs in every worker's main process; acts only while elected."""

    def __init__(self, app: Celery, services: Services,
                 sweep_every: float) -> None:
        self._app = app
        self._services = services
        self._sweep_every = sweep_every
        keys = services.keys
        self._election = Election(services.etcd, services.keeper,
                                  keys.election("recoverer"), self._leading)
        self._locks = PrefixWatch(services.etcd, keys.lock_prefix(),
                                  _ignore_snapshot, self._lock_events,
                                  name="ares-recover-locks", prev_kv=True,
                                  deletes_only=True)
        self._workers = PrefixWatch(services.etcd, keys.workers_prefix(),
                                    _ignore_snapshot, self._worker_events,
                                    name="ares-recover-workers",
                                    prev_kv=True, deletes_only=True)
        self._liveness = LeaseLiveness(services)
        self._done: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._work: queue.Queue = queue.Queue()
        self._backlog_s = BACKLOG_S + sweep_every
        self._backlog: deque[tuple[float, tuple]] = deque()
        self._acting = False
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_sweep = 0.0
        # Job id -> (due, delay, tries left, lease, message, record revision)
        self._follow_ups: dict[str, tuple] = {}
        #: Jobs re-dispatched by this process (tests, metrics).
        self.recovered = 0

    @property
    def leading(self) -> bool:
        return self._election.leading

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="ares-recoverer")
        self._thread.start()
        self._locks.start(wait=None)
        self._workers.start(wait=None)
        self._election.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)
        self._locks.stop()
        self._workers.stop()
        self._election.resign()

    def tick(self) -> None:
        """Periodic (from the worker's timer, so no I/O here): keep
        campaigning, sweep now and then while leading."""
        self._work.put(("tick",))

    # -- leadership ------------------------------------------------------------

    def _leading(self, leading: bool) -> None:
        with self._guard:
            self._acting = leading
            if not leading:
                return
            # What expired before we led (with the old leader, or while
            # nobody led): the backlog, then a sweep of the job records.
            backlog = [item for _, item in self._backlog]
            self._backlog.clear()
        for item in backlog:
            self._work.put(item)
        self._work.put(("sweep",))

    # -- what the watches deliver (on their threads: hand over, no I/O) --------

    def _lock_events(self, events: list[WatchEvent]) -> None:
        self._deletions("lock", events)

    def _worker_events(self, events: list[WatchEvent]) -> None:
        self._deletions("worker", events)

    def _deletions(self, kind: str, events: list[WatchEvent]) -> None:
        items = [(kind, event.kv.key.rsplit("/", 1)[-1], event.prev)
                 for event in events
                 if event.type == "DELETE" and event.prev is not None]
        if not items:
            return
        with self._guard:
            if not self._acting:
                now = time.monotonic()
                self._backlog.extend((now, item) for item in items)
                while self._backlog and \
                        self._backlog[0][0] < now - self._backlog_s:
                    self._backlog.popleft()
                return
        for item in items:
            self._work.put(item)

    # -- the work ------------------------------------------------------------------

    def _run(self) -> None:
        retry: list[tuple] = []
        while not self._stop.is_set():
            timeout = RETRY_S if retry else None
            if self._follow_ups:
                due = min(f[0] for f in self._follow_ups.values())
                wait = max(due - time.monotonic(), 0.01)
                timeout = wait if timeout is None else min(timeout, wait)
            try:
                item = self._work.get(timeout=timeout)
            except queue.Empty:
                item = None
            if self._stop.is_set():
                return
            try:
                self._follow_up()
            except (AresError, ServiceUnavailable) as exc:
                logger.info("ares: recovery follow-up postponed: %s", exc)
            if self._stop.is_set():
                return
            if item is None:
                items, retry = retry, []
            else:
                items = [item]
            for item in items:
                try:
                    self._handle(item)
                except (AresError, ServiceUnavailable) as exc:
                    logger.warning("ares: recovery of %s postponed: %s",
                                   item[1] if len(item) > 1 else item[0],
                                   exc)
                    if item[0] != "tick":
                        retry.append(item)
                except Exception:  # noqa: BLE001 - keep recovering
                    logger.exception("ares: recovery of %s failed", item)

    def _handle(self, item: tuple) -> None:
        if item[0] == "tick":
            if self._election.tick() and \
                    time.monotonic() >= self._next_sweep:
                self._sweep()
            return
        if not self.leading:
            if item[0] != "sweep":
                with self._guard:
                    self._backlog.append((time.monotonic(), item))
            return
        kind = item[0]
        if kind == "sweep":
            self._sweep()
            return
        _, job_id, prev = item
        if not self._liveness.dead(prev.lease):
            return  # given back on purpose, not expired
        if kind == "lock":
            self._recover_lock(job_id, prev)
        else:
            self._recover_worker(prev.lease)

    def _recover_lock(self, job_id: str, prev: KeyValue) -> None:
        etcd, keys = self._services.etcd, self._services.keys
        record = etcd.get(keys.job_record(job_id))
        if record is None:
            return  # committed and cleaned up
        if etcd.get(keys.lock(job_id)) is not None:
            return  # someone holds it again already
        self._dispatch(job_id, prev.lease, json.loads(record.value), "lock",
                       record.mod_revision)

    def _recover_worker(self, lease: int) -> None:
        """Publish again every message the dead worker on ``lease`` held,
        then forget them."""
        etcd, keys = self._services.etcd, self._services.keys
        prefix = keys.reserved_by(lease)
        held, _ = etcd.range_prefix_with_revision(prefix)
        for kv in held:
            job_id = kv.key.rsplit("/", 1)[-1]
            if etcd.get(keys.lock(job_id)) is not None:
                continue  # a live holder runs it (or will): its lock covers it
            self._dispatch(job_id, lease, json.loads(kv.value), "reserved")
        if held:
            etcd.delete_prefix(prefix)

    def _sweep(self) -> None:
        """What expired while nobody watched: messages reserved by workers
        whose lease is gone, and jobs whose last holder's lease is gone,
        whose lock is gone, that were not given back and not committed."""
        self._next_sweep = time.monotonic() + self._sweep_every
        etcd, keys = self._services.etcd, self._services.keys
        reserved, _ = etcd.range_prefix_with_revision(keys.reserved_prefix(),
                                                      keys_only=True)
        leases = {int(kv.key[len(keys.reserved_prefix()):].split("/", 1)[0],
                      16) for kv in reserved}
        for lease in leases:
            if self._liveness.dead(lease):
                self._recover_worker(lease)
        records, _ = etcd.range_prefix_with_revision(keys.job_record_prefix(),
                                                     keys_only=True)
        if not records:
            return
        locked = {kv.key.rsplit("/", 1)[-1] for kv in
                  etcd.range_prefix_with_revision(keys.lock_prefix(),
                                                  keys_only=True)[0]}
        for listed in records:
            job_id = listed.key.rsplit("/", 1)[-1]
            if job_id in locked:
                continue
            record = etcd.get(listed.key)
            if record is None:
                continue  # committed meanwhile
            released = etcd.get(keys.released(job_id))
            if released is not None and \
                    released.mod_revision > record.mod_revision:
                continue  # the last holder gave it back on purpose
            message = json.loads(record.value)
            lease = int((message.get("holder") or {}).get("lease") or 0)
            if self._liveness.dead(lease):
                self._dispatch(job_id, lease, message, "lock",
                               record.mod_revision)

    def _dispatch(self, job_id: str, lease: int, message: dict[str, Any],
                  source: str, revision: int = 0) -> None:
        if (job_id, lease) in self._done:
            return
        route = self._publish(message)
        self._done[(job_id, lease)] = None
        while len(self._done) > REMEMBERED:
            self._done.popitem(last=False)
        if revision:
            self._follow_ups[job_id] = (time.monotonic() + RECHECK_S,
                                        RECHECK_S, RECHECKS, lease, message,
                                        revision)
        self.recovered += 1
        count_recovery(source)
        logger.warning("ares: job %s re-dispatched%s: its %s lease %x "
                       "expired", job_id, f" to {route}" if route else "",
                       "holder's" if source == "lock" else "worker's", lease)

    def _follow_up(self) -> None:
        """Publish again the re-dispatched jobs nobody took yet: the job's
        record is unchanged (no new holder put it) and it has no lock."""
        if not self._follow_ups or not self.leading:
            return
        etcd, keys = self._services.etcd, self._services.keys
        now = time.monotonic()
        for job_id, entry in list(self._follow_ups.items()):
            due, delay, left, lease, message, revision = entry
            if due > now:
                continue
            record = etcd.get(keys.job_record(job_id))
            if record is None or record.mod_revision != revision \
                    or etcd.get(keys.lock(job_id)) is not None or left <= 0:
                del self._follow_ups[job_id]
                continue
            self._publish(message)
            logger.warning("ares: job %s not taken %.0fs after its "
                           "re-dispatch; published again", job_id, delay)
            delay = min(delay * 2, RECHECK_MAX_S)
            self._follow_ups[job_id] = (now + delay, delay, left - 1, lease,
                                        message, revision)

    def _publish(self, message: dict[str, Any]) -> str | None:
        """Publish a recorded message; returns the queue it was re-routed
        to, if it was."""
        task = self._app.tasks.get(message["task"])
        route = task.recovery_route(message) \
            if isinstance(task, ExactlyOnceTask) else None
        if route is None:
            publish_message(self._app, message)
            return None
        queue_name, headers = route
        publish_message(self._app, message, queue=queue_name, headers=headers)
        return queue_name


def _ignore_snapshot(kvs: list[KeyValue], revision: int) -> None:
    """Listings tell nothing about deletions; the sweep covers the past."""
