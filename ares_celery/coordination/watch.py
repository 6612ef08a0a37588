"""Follow everything under an etcd prefix: list, then watch from there.

Readers that keep a picture of etcd in memory (the router's GPU inventory,
and the recoverer that notices expired job locks) need the same loop: list
the prefix and remember the revision it was read at, then watch from the
next revision so no change between the two is missed. When the stream ends
(etcd restarted, the network cut it) or etcd says it compacted the history
we would replay, the picture may be stale: list again and start over, with
back-off. The caller supplies what to do with a snapshot and with events;
this module owns the protocol.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..clients.etcd import EtcdGateway, KeyValue, WatchEvent, WatchStream
from ..errors import ServiceUnavailable

logger = logging.getLogger(__name__)

#: Back-off between attempts after a broken stream, doubling up to the max.
RESTART_PAUSE_S = 0.1
RESTART_PAUSE_MAX_S = 5.0

#: While a stream is open, its endpoint is asked this often for a
#: linearizable read. A member that is stopped or cut off from the quorum
#: keeps the stream open and silent (no error, no events, for ever); one
#: that does not answer has its stream closed, and the watch lists and
#: follows again from an endpoint that answers.
PROBE_EVERY_S = 5.0


class PrefixWatch:
    """Keep ``on_snapshot`` / ``on_events`` fed with the state of a prefix.

    ``on_snapshot(kvs, revision)`` receives a full listing (first, and after
    every restart): the reader replaces what it had. ``on_events(events)``
    receives each batch of changes after it, in revision order (with the
    replaced or deleted key-value when ``prev_kv``). Both run in the watch
    thread (or the caller's, for :meth:`list_once`).
    """

    def __init__(self, etcd: EtcdGateway, prefix: str,
                 on_snapshot: Callable[[list[KeyValue], int], None],
                 on_events: Callable[[list[WatchEvent]], None],
                 name: str = "ares-watch", prev_kv: bool = False,
                 deletes_only: bool = False) -> None:
        self._etcd = etcd
        self.prefix = prefix
        self._prev_kv = prev_kv
        self._deletes_only = deletes_only
        self._on_snapshot = on_snapshot
        self._on_events = on_events
        self._name = name
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: WatchStream | None = None
        #: The revision the reader's picture is current at.
        self.revision = 0

    def start(self, wait: float | None = 5.0) -> PrefixWatch:
        """Start following in a daemon thread; with ``wait``, block until
        the first listing arrived (ServiceUnavailable if it did not)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=self._name)
            self._thread.start()
        if wait and not self._synced.wait(wait):
            raise ServiceUnavailable(
                f"etcd at {self._etcd.address}: could not read {self.prefix} "
                f"within {wait}s")
        return self

    def list_once(self) -> None:
        """One listing, no watch (CLI, scripts, one-shot sweeps)."""
        kvs, revision = self._etcd.range_prefix_with_revision(
            self.prefix, keys_only=self._deletes_only)
        self._on_snapshot(kvs, revision)
        self.revision = revision
        self._synced.set()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        pause = RESTART_PAUSE_S
        while not self._stop.is_set():
            try:
                self.list_once()
                self._follow()
                pause = RESTART_PAUSE_S
            except Exception as exc:  # noqa: BLE001 - keep following
                if self._stop.is_set():
                    return
                logger.info("ares: watch of %s restarting: %s", self.prefix,
                            exc)
                self._stop.wait(pause)
                pause = min(pause * 2, RESTART_PAUSE_MAX_S)

    def _follow(self) -> None:
        """Apply events until the stream ends or must be restarted."""
        with self._etcd.watch_prefix(self.prefix, self.revision + 1,
                                     prev_kv=self._prev_kv,
                                     deletes_only=self._deletes_only) \
                as stream:
            self._stream = stream
            if self._stop.is_set():
                return
            probe = StreamProbe(self._etcd, stream, self.prefix, self._name)
            try:
                for batch in stream:
                    if self._stop.is_set():
                        return
                    if batch.restart:
                        return  # compacted or canceled: relist
                    self._on_events(batch.events)
                    self.revision = max(
                        self.revision,
                        *(e.kv.mod_revision for e in batch.events))
            finally:
                probe.stop()
        raise ServiceUnavailable(f"watch stream of {self.prefix} ended")


class StreamProbe:
    """Asks a watch stream's endpoint a question every ``PROBE_EVERY_S``
    and closes the stream when it gets no answer (see ``PROBE_EVERY_S``)."""

    def __init__(self, etcd: EtcdGateway, stream: WatchStream, key: str,
                 name: str) -> None:
        self._etcd = etcd
        self._stream = stream
        self._key = key
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True,
                         name=f"{name}-probe").start()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(PROBE_EVERY_S):
            if not self._etcd.answers(self._stream.endpoint, self._key) \
                    and not self._done.is_set():
                logger.warning(
                    "ares: the etcd endpoint serving the watch of %s did not "
                    "answer within %ss; following from another one",
                    self._key, self._etcd.timeout)
                self._stream.close()
                return
