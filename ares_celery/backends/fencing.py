"""What both fenced backends share: which token a write carries and how a
rejected (zombie) commit is reported.

A write for a job this thread is executing carries the job's fencing token;
any other write (the worker's main process recording a time-limit kill, or
a plain Celery task sharing the backend) carries no token and is only held
to write-once.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states

from .. import headers as wire
from ..exactly_once import context
from ..observability import events
from ..observability.metrics import count_commit

logger = logging.getLogger("ares_celery.fencing")

#: States after which nothing may overwrite the result.
TERMINAL_STATES = frozenset(states.READY_STATES)


class CommitStats:
    """Per-process counters, read by tests."""

    accepted = 0
    fenced = 0
    duplicate = 0


def token_for(task_id: str) -> int:
    """The fencing token for a write of ``task_id`` from this thread, or 0."""
    ctx = context.lookup(task_id)
    return ctx.fencing_token if ctx is not None else 0


def committed_request_id(task_id: str, request: Any) -> str:
    """The request id to record with a commit ("" if none): the running
    job's, else the one on the message (the worker's main process commits
    REVOKED for a revoked message with no job running). Recorded so that
    ``AsyncResult.forget()``, which only knows the job id, can retire the
    request id too."""
    ctx = context.lookup(task_id)
    if ctx is not None and ctx.request_id:
        return str(ctx.request_id)
    if request is None:
        return ""
    try:
        value = wire.header(request, wire.REQUEST_ID)
    except Exception:  # noqa: BLE001 - an odd request object: no id
        return ""
    return str(value) if value else ""


def report_rejected(task_id: str, state: str, token: int, reason: str,
                    current: str) -> None:
    if reason == "fenced":
        CommitStats.fenced += 1
        count_commit("fenced")
        events.committed(task_id, "fenced", token, current)
        logger.warning(
            "ares: commit of job %s (%s) with fencing token %s REJECTED: a "
            "newer lease holder has token %s; the committed result stands",
            task_id, state, token, current)
    else:
        CommitStats.duplicate += 1
        logger.info("ares: job %s already committed (token %s); %s write "
                    "with token %s dropped", task_id, current, state, token)


def mark_committed(task_id: str, lock_released: bool = False) -> None:
    """Tell the running job its commit was accepted, so its lock can be
    dropped lazily (nobody needs it once the result is committed)."""
    CommitStats.accepted += 1
    count_commit("accepted")
    ctx = context.lookup(task_id)
    if ctx is not None:
        events.committed(task_id, "accepted", ctx.fencing_token)
        ctx.committed = True
        ctx.released = ctx.released or lock_released
