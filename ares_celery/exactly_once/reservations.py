"""Messages a worker holds but has not finished, recorded under its lease.

A worker takes more messages than it runs: prefetched ones wait for a free
pool process, ETA/countdown ones (deferred copies among them) wait in its
timer, for hours if need be. None of them holds a job lock, so if the
worker dies or hangs, only the broker could give them back (after the
visibility timeout, or never for a hung RabbitMQ consumer). The tracker
therefore keeps, for every exactly-once message the worker has held for a
moment, a key ``reserved/<lease>/<job>`` (value: the message), and one
presence key ``workers/<lease>`` on the worker's own session lease. When
that lease ends, etcd deletes the presence key; the recoverer (watching
it, or sweeping later if nobody watched) publishes the worker's reserved
messages again. The reserved keys themselves live on the long records
lease, so they are still there for a recoverer that starts after the
worker died.

A held message can also be *dropped* by a live worker: when the broker
connection breaks, Celery forgets what it had prefetched (a delivery tag
means nothing on the next connection), and with Redis those messages stay
in kombu's unacked hash until the visibility timeout. The tracker sees a
request leave Celery's books unacknowledged, outside a shutdown, and
publishes its message again itself.

A message is recorded when it arrives (Celery's ``task_received``), in
batches written every :data:`BATCH_S` by a thread of the tracker's own (so
a slow or absent etcd never stalls consuming); a periodic look at Celery's
books (:data:`SYNC_INTERVAL_S`) removes what was finished and notices what
was dropped. A worker that dies within a batch of receiving a message
leaves that message to the broker's own redelivery.

Records are never deleted on shutdown: Celery hands unfinished messages
back to the broker when it can, but it cannot always (the restore itself
can fail with the connection that ended the worker), and a second copy of
a job costs a message, never a second run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery

from ..clients.etcd import MAX_TXN_OPS, op_delete, op_put
from ..errors import ServiceUnavailable
from ..services import Services
from .messages import encode_message, publish_message, reserved_message

logger = logging.getLogger(__name__)

#: How often Celery's books are read for finished and dropped messages.
SYNC_INTERVAL_S = 0.25

#: Arrivals are written to etcd in batches this far apart; a message
#: finished within it is never written (most short jobs are not).
BATCH_S = 0.1

#: An arrival not yet in Celery's books is kept this long.
ARRIVAL_GRACE_S = 1.0

#: A dropped message is published again only after this long, and only if
#: the worker is still running then: a worker that is stopping drops what
#: it prefetched too (and hands it back to the broker itself).
DROP_GRACE_S = 2.0


def held_requests() -> list[Any]:
    """Every request this worker holds and has not finished: reserved,
    running, and scheduled for an ETA (Celery's own bookkeeping)."""
    from celery.worker import state

    return [*state.reserved_requests, *state.active_requests,
            *state.scheduled_requests]


def shutting_down() -> bool:
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


class ReservationTracker:
    """Keeps ``reserved/<lease>/<job>`` equal to the held messages.

    ``wanted(request)`` says which requests to record (exactly-once tasks:
    a plain Celery task must not be re-published by ares).
    """

    def __init__(self, app: Celery, services: Services,
                 wanted: Callable[[Any], bool],
                 held: Callable[[], Iterable[Any]] = held_requests) -> None:
        self._app = app
        self._services = services
        self._wanted = wanted
        self._held = held
        self._guard = threading.Lock()
        # Job id -> the held request (its message is built by the writer
        # thread, off the event loop, and only if still held by then).
        self._desired: dict[str, Any] = {}
        self._messages: dict[str, dict[str, Any]] = {}
        # Job id -> when it arrived, until Celery's books show it.
        self._arrived: dict[str, float] = {}
        # Strong references: Celery's own sets are weak, and a dropped
        # request must still say whether it was acknowledged.
        self._seen: dict[str, Any] = {}
        self._dropped: list[tuple[float, Any]] = []
        self._written: dict[str, int] = {}   # job id -> lease it is under
        self._present = 0                     # lease our presence key is on
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="ares-reservations")
        self._thread.start()

    def received(self, request: Any) -> None:
        """On the worker's event loop, as a message arrives: record it
        with the next batch."""
        if not self._wanted(request):
            return
        with self._guard:
            self._desired[request.id] = request
            self._arrived[request.id] = time.monotonic()
        self._wake.set()

    def snapshot(self) -> None:
        """On the worker's event loop, now and then: forget what is
        finished, and note what was dropped unacknowledged since the last
        look (it is published again)."""
        held = {}
        for request in self._held():
            if request.id not in held and self._wanted(request):
                held[request.id] = request
        with self._guard:
            known = self._desired
            desired = dict(held)
            dropped = [request for job_id, request in self._seen.items()
                       if job_id not in held and not request.acknowledged]
            if dropped and shutting_down():
                dropped = []  # Celery hands them back to the broker itself
            # Arrived but not in the books yet (a threads pool reads them
            # from another thread): keep them a moment.
            recent = time.monotonic() - ARRIVAL_GRACE_S
            self._arrived = {job_id: at for job_id, at in self._arrived.items()
                             if job_id not in held and at > recent}
            for job_id in self._arrived:
                if job_id in known:
                    desired.setdefault(job_id, known[job_id])
            self._desired = desired
            now = time.monotonic()
            self._dropped.extend((now, request) for request in dropped)
        self._seen = held
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(SYNC_INTERVAL_S * 4)
            if self._stop.is_set():
                return
            self._stop.wait(BATCH_S)  # let a burst of arrivals batch up
            self._wake.clear()
            try:
                self._sync()
            except ServiceUnavailable as exc:
                logger.debug("ares: reservations not synced: %s", exc)
                self._stop.wait(SYNC_INTERVAL_S)
            except Exception:  # noqa: BLE001 - the thread must live on
                # A dead tracker records nothing the worker holds from then
                # on, silently: log it and try again with the next sync.
                logger.exception("ares: reservations not synced")
                self._stop.wait(SYNC_INTERVAL_S)

    def _republish_dropped(self) -> None:
        ripe_before = time.monotonic() - DROP_GRACE_S
        with self._guard:
            if shutting_down() or self._stop.is_set():
                self._dropped = []
                return
            ripe = [m for at, m in self._dropped if at <= ripe_before]
            self._dropped = [(at, m) for at, m in self._dropped
                             if at > ripe_before]
        for index, request in enumerate(ripe):
            message = self._message(request)
            if message is None:
                continue
            try:
                publish_message(self._app, message)
            except Exception as exc:  # noqa: BLE001 - broker still away
                logger.info("ares: could not publish a dropped message "
                            "again yet: %s", exc)
                with self._guard:
                    self._dropped[:0] = [(0.0, m) for m in ripe[index:]]
                return
            logger.warning(
                "ares: job %s was dropped unacknowledged by this worker "
                "(broker connection lost); published it again",
                (message.get("options") or {}).get("task_id"))

    def _message(self, request: Any) -> dict[str, Any] | None:
        message = self._messages.get(request.id)
        if message is None:
            try:
                message = reserved_message(request)
            except Exception as exc:  # noqa: BLE001 - cannot record it
                logger.debug("ares: cannot record message %s: %s",
                             request.id, exc)
                return None
            self._messages[request.id] = message
        return message

    def _sync(self) -> None:
        if self._dropped:
            self._republish_dropped()
        with self._guard:
            desired = {job_id: request
                       for job_id, request in self._desired.items()
                       if not request.acknowledged}
        written = self._written
        if not desired and not written:
            return
        keys, locks = self._services.keys, self._services.locks
        lease = self._services.keeper.current().lease_id
        ops = []
        for job_id, request in desired.items():
            if written.get(job_id) != lease:
                message = self._message(request)
                if message is None:
                    continue
                ops.append(op_put(keys.reserved(lease, job_id),
                                  encode_message(message),
                                  locks.records_lease()))
        if ops and self._present != lease:
            # Present on our lease with the first record under it: whoever
            # sees the presence key go recovers the records.
            ops.insert(0, op_put(keys.worker(lease), "", lease))
        for job_id, under in written.items():
            if job_id not in desired or under != lease:
                ops.append(op_delete(keys.reserved(under, job_id)))
        self._messages = {job_id: m for job_id, m in self._messages.items()
                          if job_id in desired}
        if not ops:
            return
        # A worker can hold hundreds of messages (ETA/countdown ones wait
        # in its timer): one Txn each MAX_TXN_OPS, the presence key in the
        # first. If a later one fails, the next sync writes them all again.
        for start in range(0, len(ops), MAX_TXN_OPS):
            self._services.etcd.txn(compare=[],
                                    success=ops[start:start + MAX_TXN_OPS])
        if any("request_put" in op for op in ops):
            self._present = lease
        self._written = {job_id: lease for job_id in desired
                         if job_id in self._messages}
