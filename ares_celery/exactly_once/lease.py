"""Moved to :mod:`ares_celery.coordination.session`; kept for imports of
the old path."""

from ..coordination.session import LeaseGrant, LeaseKeeper, Session

__all__ = ["LeaseGrant", "LeaseKeeper", "Session"]
