"""Coordination through etcd, in the shape of etcd's ``client/v3/concurrency``.

- :mod:`.session`: the process lease, kept alive (``session.go``).
- :mod:`.mutex`: per-job locks that borrow the session's lease and hand out
  their ownership compare and fencing token (``mutex.go``).
- :mod:`.watch`: list a prefix, then watch it from that revision, relisting
  after compaction or a restart.
"""

from .mutex import JobLock, JobLocks, LockOutcome, ownership_compare
from .session import LeaseGrant, Session
from .watch import PrefixWatch

__all__ = ["JobLock", "JobLocks", "LeaseGrant", "LockOutcome", "PrefixWatch",
           "Session", "ownership_compare"]
