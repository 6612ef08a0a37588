"""Flower's ``format_task`` hook for ares-celery's task events.

Celery's event state keeps every field of a task's events, but Flower
shows only the fields a task names in ``_fields``, and hands the hook a
copy made through Celery's pickling, which keeps only those fields. So the
hook reads our ``ares_*`` fields from the task in Flower's event state (the
``Events`` thread's ``state``, the same object Flower's own pages read),
sets them on the copy and extends the copy's ``_fields``: Flower then lists
them as rows on the task page ("Ares fencing token", "Ares gpus", ...) and
in its task table's JSON. Custom events also make Celery record their name
as the task's state while the job runs ("ARES-LEASE"); the hook shows the
real state instead.
"""

from __future__ import annotations

import threading
from typing import Any

#: In the order a job meets them: lease, placement, checkpoint,
#: preemption, commit; then deferrals.
ARES_FIELDS = (
    "ares_request_id", "ares_fencing_token", "ares_attempt", "ares_lease_id",
    "ares_holder",
    "ares_host", "ares_gpus", "ares_gpu_uuids", "ares_placement_score",
    "ares_placement", "ares_queue", "ares_gpu_wait_s",
    "ares_checkpoint_at", "ares_checkpoint_size", "ares_checkpoint_token",
    "ares_preempt", "ares_preempted_by", "ares_preempt_grace_s",
    "ares_gpu_seconds_lost",
    "ares_commit", "ares_commit_token", "ares_fenced_by",
    "ares_deferred", "ares_retry_in_s", "ares_waits", "ares_rerouted_to",
    "ares_skipped",
)
CUSTOM_STATE_PREFIX = "ARES-"

_events_thread: Any = None


def flower_state() -> Any:
    """Flower's event state (``flower.events.Events.state``), or None
    outside a Flower process."""
    global _events_thread
    if _events_thread is None or not _events_thread.is_alive():
        try:
            from flower.events import Events
        except ImportError:
            return None
        _events_thread = next((t for t in threading.enumerate()
                               if isinstance(t, Events)), None)
    return getattr(_events_thread, "state", None)


def recorded(task: Any) -> Any:
    """The task as Flower's event state holds it, with every event field."""
    state = flower_state()
    if state is None:
        return task
    tasks = getattr(state.tasks, "data", state.tasks)  # no LRU bump
    return tasks.get(task.uuid, task)


def shown_state(task: Any) -> str:
    """The state to show. Celery records a custom event's name as the
    task's state and keeps it through a later ``task-started`` (which it
    ranks earlier), so: a deferred job waits, any other of our events
    comes from a running job."""
    state = task.state or "PENDING"
    if not state.startswith(CUSTOM_STATE_PREFIX):
        return state
    return "DEFERRED" if state == "ARES-DEFERRED" else "STARTED"


def format_task(task: Any) -> Any:
    """Flower calls this with a copy of the task before showing it."""
    source = recorded(task)
    task.state = shown_state(task)
    present = []
    for name in ARES_FIELDS:
        value = getattr(source, name, None)
        if value is not None:
            setattr(task, name, value)
            present.append(name)
    if present:
        task._fields = tuple(task._fields) + tuple(present)
    return task
