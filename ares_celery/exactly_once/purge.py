"""``celery purge`` with ares: GPU host queues too, and purged jobs come back.

Plain ``celery purge`` empties the app's known queues (``app.amqp.queues``).
Two things go wrong with exactly-once jobs:

- the GPU host queues (``ares.gpu.<host>``) are declared by the GPU workers,
  not by the app, so the purge leaves them alone;
- a purged job's dedup record still says *published*, so a retry of its
  request id returns the job id without publishing, and ``get()`` waits
  until ``ares_republish_after`` (10 minutes by default).

Celery's builtin commands cannot be replaced by a plugin, but every command
with preload options runs them through ``user_preload_options`` with the
click context current. :class:`PurgeHook` adds one preload option
(``--ares-keep-gpu-queues``) so that the signal fires, and when the command
is ``purge`` it

- adds the registered GPU host queues that exist on the broker to
  ``app.amqp.queues`` before the purge runs, so Celery's own purge lists
  them in its prompt, honours ``-Q`` / ``-X`` and purges them;
- registers a context resource that, once the purge succeeded (not after a
  declined prompt or an error), records the purge time in Redis
  (:meth:`~ares_celery.exactly_once.dedup.DedupStore.record_purge`): a
  retry of a job published before it and not committed publishes it again.

Republishing a job whose message survived (it was running, or prefetched
by a worker) is harmless: layers 2 and 3 skip or defer the extra copy.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

import click
from celery import Celery, signals
from kombu import Connection, Exchange, Queue

from ..errors import AresError
from ..services import Services

logger = logging.getLogger(__name__)

#: The preload option (and its keyword name) that makes the hook run.
KEEP_GPU_QUEUES = "--ares-keep-gpu-queues"
KEEP_GPU_QUEUES_NAME = "ares_keep_gpu_queues"


def gpu_host_queues(services: Services) -> list[str]:
    """Every GPU host queue ever registered (GPU workers register theirs
    in Redis when they start; see :mod:`ares_celery.gpu.janitor`)."""
    registered = services.redis.hvals(services.keys.host_queues())
    return sorted({q.decode() if isinstance(q, bytes) else q
                   for q in registered})


def existing_queues(connection: Connection, names: list[str]) -> list[str]:
    """The queues in ``names`` the broker has. One channel per question: a
    missing queue closes an AMQP channel, and Celery's purge uses a single
    channel, so one missing name would silently stop it purging the rest."""
    found = []
    for name in names:
        try:
            with connection.channel() as channel:
                Queue(name, Exchange(name), name)(channel).queue_declare(
                    passive=True)
            found.append(name)
        except Exception as exc:  # noqa: BLE001 - missing queue, broker error
            logger.debug("ares: queue %s not there: %s", name, exc)
    return found


class _AfterPurge:
    """A click context resource: on a clean exit of ``celery purge``,
    record the purge. Checks the exception both ways: click 8.2+ hands it
    to resources, older click closes them without it."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def __enter__(self) -> _AfterPurge:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or sys.exc_info()[0] is not None:
            return  # declined prompt, broker error: nothing was purged
        try:
            self._services.dedup.record_purge()
        except AresError as error:
            raise click.ClickException(
                f"the queues were purged, but ares could not record the "
                f"purge ({error}): retries of purged jobs publish them again "
                "only after ares_republish_after; run the purge again once "
                "Redis is back") from error
        click.echo("ares: purge recorded; a retried submission of a purged "
                   "job publishes it again")


class PurgeHook:
    """Hooks ``celery purge`` for one app (installed by ``Ares``)."""

    def __init__(self, app: Celery, services: Services) -> None:
        self._app = app
        self._services = services

    def install(self) -> None:
        self._app.user_options["preload"].add(click.Option(
            [KEEP_GPU_QUEUES], is_flag=True, default=False,
            help="ares: `celery purge` leaves the GPU host queues alone "
                 "(it purges them by default)"))
        signals.user_preload_options.connect(self._on_preload, weak=False)

    def _on_preload(self, sender: Any = None, app: Any = None,
                    options: dict[str, Any] | None = None,
                    **_: Any) -> None:
        if app is not self._app:
            return
        ctx = click.get_current_context(silent=True)
        if ctx is None or ctx.command.name != "purge":
            return
        if not (options or {}).get(KEEP_GPU_QUEUES_NAME):
            self._add_gpu_queues()
        ctx.with_resource(_AfterPurge(self._services))

    def _add_gpu_queues(self) -> None:
        try:
            names = gpu_host_queues(self._services)
        except AresError as exc:
            raise click.ClickException(
                f"ares: cannot list the GPU host queues ({exc}); pass "
                f"{KEEP_GPU_QUEUES} to purge only the app's queues") from exc
        known = set(self._app.amqp.queues)
        missing = [name for name in names if name not in known]
        if not missing:
            return
        with self._app.connection_for_write() as connection:
            for name in existing_queues(connection, missing):
                self._app.amqp.queues.select_add(name)
