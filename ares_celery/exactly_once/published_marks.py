"""Marking a reservation *published* off the submitting thread.

The mark is the client's second Redis round trip per job, after the
publish; the caller needs nothing from its answer, so it goes to a writer
thread and ``apply_async`` returns as soon as the message is out (issue
14). Until the mark lands the record still says *reserved*, which every
reader already handles: a duplicate submission waits for the mark (as it
waits for a client between reserve and publish), and if the mark never
lands (the process is killed, Redis is away) the claim goes stale and a
retry publishes the job again, a copy layers 2 and 3 skip. Marks still
queued when the process ends are written first: at interpreter exit, and
in a ``multiprocessing`` or billiard child (a prefork pool process that
submits from a task), which ends with ``os._exit`` and so skips
``atexit``, from its exit finalizers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.util import Finalize

logger = logging.getLogger("ares_celery.submission")

#: How long exit (or :meth:`PublishedMarks.flush`) waits for queued marks.
FLUSH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Mark:
    """One reservation to mark published, and what the record holds."""

    request_id: str
    job_id: str
    task_name: str
    digest: str


class PublishedMarks:
    """A queue of marks and the one thread (per process) that writes them,
    several in one round trip when they pile up."""

    def __init__(self, write: Callable[[list[Mark]], None]) -> None:
        self._write = write
        self._todo: list[Mark] = []
        self._writing = 0
        self._changed = threading.Condition()
        self._writer: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, mark: Mark) -> None:
        with self._changed:
            self._todo.append(mark)
            self._changed.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._run, daemon=True, name="ares-published-marks")
                self._writer.start()
                # Run by multiprocessing's exit function: registered with
                # atexit in a plain process, called before os._exit in a
                # multiprocessing or billiard child (billiard shares
                # multiprocessing.util's registry).
                Finalize(None, self.flush, exitpriority=10)

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every mark queued so far is written (or failed);
        False if that took longer than ``timeout``. A forked child has
        nothing to wait for: the marks it inherited are its parent's."""
        if os.getpid() != self._pid:
            return True
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._todo and not self._writing, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._todo)
                batch, self._todo = self._todo, []
                self._writing = len(batch)
            try:
                self._write(batch)
            except Exception as exc:  # noqa: BLE001 - the claim goes stale
                logger.warning(
                    "ares: could not mark %d submission(s) published (%s); "
                    "a retry of them publishes again after the claim "
                    "timeout", len(batch), exc)
            finally:
                with self._changed:
                    self._writing = 0
                    self._changed.notify_all()
