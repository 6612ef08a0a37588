"""The ``ares_unrevoke`` worker remote-control command.

``revoke(job_id)`` makes every worker remember the id in memory
(``celery.worker.state.revoked``, for ``worker_revoke_expires``, 3 h by
default, and across restarts with ``--statedb``) and mark any message of it
REVOKED. A job retired on purpose (``celery ares forget``) must run when it
is submitted again, so the retire broadcasts this command, registered the
way Celery registers its own (``celery.worker.control.control_command``),
and every worker drops the ids from its revoked set.

Imported by :mod:`ares_celery.app`, so that every worker of an ares app
has the command.
"""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import control_command, ok

#: The command's name (what a retire broadcasts).
UNREVOKE = "ares_unrevoke"


@control_command(
    name=UNREVOKE,
    variadic="job_ids",
    signature="[job_id1 [job_id2 [... [job_idN]]]]",
)
def ares_unrevoke(state: Any, job_ids: list[str] | str) -> dict[str, Any]:
    """Forget that these job ids were revoked (ares: the job was retired)."""
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids or ())
    forgotten = [job_id for job_id in ids if job_id in worker_state.revoked]
    for job_id in forgotten:
        worker_state.revoked.discard(job_id)
    reply = ok(f"{len(forgotten)} revoke(s) forgotten")
    reply["forgotten"] = forgotten
    return reply
