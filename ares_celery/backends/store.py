"""What a fenced result store must do, so a new one is one file plus one
registry row (:mod:`ares_celery.backends.registry`).

Celery's own backends are the model (``celery/backends/consul.py``: a
``KeyValueStoreBackend`` overriding a few hooks). A fenced store is a
Celery result backend that additionally

- refuses a commit whose fencing token is older than the job's newest
  holder's, and any commit after the first terminal one (write-once);
- answers, before a body runs, whether the job is already committed
  (:meth:`FencedStore.register_fence`), raising the job's fence to the new
  token where the store keeps one;
- says whether its commit marker lives in etcd (then the lock Txn reads it
  and a committed job is never locked again) and how ``result_backend`` is
  spelled for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..settings import AresSettings


@dataclass(frozen=True)
class CommitProbe:
    """A job's commit state as one read saw it."""

    #: The committed fencing token, if the job is committed.
    committed: str | None
    #: The job was retired (``celery ares forget``): earlier tenures may
    #: exist although its record is gone, so a first holder raises the
    #: fence after all.
    retired: bool


@runtime_checkable
class FencedStore(Protocol):
    """The part of a fenced result backend the worker calls directly."""

    #: ``ares_result_store`` value that selects this store.
    store_name: ClassVar[str]
    #: True when the commit marker is an etcd key the lock Txn can read.
    marker_in_etcd: ClassVar[bool]

    def send_commit_probe(self, job_id: str
                          ) -> Callable[[], CommitProbe] | None:
        """What a first holder must know before its body (is the job
        committed, was it retired), in one read sent now and answered by
        the returned call, which must be made (it returns the connection):
        the worker sends it just before the lock Txn and reads it after, so
        the store answers while etcd works. None if it could not be sent,
        or the store needs no such read (``marker_in_etcd``)."""

    def register_fence(self, job_id: str, token: int,
                       first_holder: bool = False,
                       probe: CommitProbe | None = None) -> str | None:
        """Before the body: record ``token`` as the job's newest holder (if
        the store fences by comparing tokens) and return the committed
        token if the job is already committed (the body must not run).
        A ``first_holder`` (its lock Txn created the job's record: no
        earlier token can exist) need not raise a fence, only answer; its
        ``probe``, read alongside the lock Txn, answers without a call."""

    def commit_record(self, job_id: str) -> dict[str, str]:
        """``state``, ``committed`` (token), ``request`` of the commit, or
        {}: what retiring a job (``celery ares forget``) reads first."""

    def retire_ops(self, job_id: str) -> list[dict]:
        """etcd ops deleting the commit, run in the Txn that checks the
        job's lock is not held (empty when the commit is not in etcd)."""

    def retire_commit(self, job_id: str) -> None:
        """Delete whatever of the commit :meth:`retire_ops` did not."""

    @classmethod
    def result_backend_url(cls, current: Any, settings: AresSettings) -> str:
        """The ``result_backend`` value that installs this store, given the
        app's current one; raises ConfigurationError if they contradict."""
