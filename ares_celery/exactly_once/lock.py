"""Moved to :mod:`ares_celery.coordination.mutex`; kept for imports of the
old path."""

from ..coordination.mutex import JobLock, JobLocks, LockOutcome

__all__ = ["JobLock", "JobLocks", "LockOutcome"]
