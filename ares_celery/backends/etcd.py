"""A Celery result backend on etcd whose commit is one fenced Txn.

The commit compares (a) that the job's lock key was created at the writer's
fencing token, so the writer still holds a live lease, and (b) that no
result was committed before; only then does it write the result, set the
commit marker and delete the lock, all in the same transaction. Results
hang off a shared, hourly lease so they expire like Celery's
``result_expires`` instead of piling up.

The commit marker records the job's request id, so ``AsyncResult.forget()``,
which knows only the job id, can retire the whole job
(:mod:`ares_celery.exactly_once.retire`).

Select it with ``ares_result_store = "etcd"``. ``AsyncResult.get()`` polls
(etcd has no pub/sub that fits Celery's consumer); the Redis backend is the
lower-latency choice.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, ClassVar

from celery.backends.base import KeyValueStoreBackend
from kombu.utils.encoding import bytes_to_str

from ..clients.etcd import (
    EtcdGateway,
    KeyValue,
    cmp_value,
    cmp_version,
    op_delete,
    op_put,
    op_range,
)
from ..coordination.mutex import ownership_compare
from ..exactly_once.retire import retire_forgotten
from ..keys import Keys
from ..settings import AresSettings
from .fencing import (
    TERMINAL_STATES,
    committed_request_id,
    mark_committed,
    report_rejected,
    token_for,
)
from .store import CommitProbe

#: How Celery names this backend in ``result_backend`` ("module:Class+url").
BACKEND_PATH = "ares_celery.backends.etcd:FencedEtcdBackend"


class FencedEtcdBackend(KeyValueStoreBackend):
    """Results in etcd, committed write-once under the fencing token."""

    supports_native_join = False
    store_name: ClassVar[str] = "etcd"
    marker_in_etcd: ClassVar[bool] = True

    @classmethod
    def result_backend_url(cls, current: Any, settings: AresSettings) -> str:
        """etcd results use ``ares_etcd_*``; whatever ``result_backend``
        said is replaced (the store is chosen by ``ares_result_store``)."""
        return f"{BACKEND_PATH}+etcd://"

    def __init__(self, app=None, url=None, **kwargs):
        super().__init__(app=app, url=url, **kwargs)
        conf = self.app.conf
        # The same endpoints, TLS files and credentials as the job locks.
        self._settings = AresSettings.from_conf(conf)
        self._keys = Keys(self._settings.namespace)
        self._gateway: EtcdGateway | None = None
        self._gateway_lock = threading.Lock()
        self._lease: tuple[int, float] | None = None
        self.expires = int(self.prepare_expires(None, type=int) or 86400)

    @property
    def etcd(self) -> EtcdGateway:
        with self._gateway_lock:
            if self._gateway is None:
                self._gateway = self._settings.etcd_gateway()
            return self._gateway

    def __reduce__(self, args=(), kwargs=None):
        return super().__reduce__(args, dict(kwargs or {}))

    def send_commit_probe(self, job_id: str) -> None:
        """None: the lock Txn reads the commit marker itself."""
        return None

    def register_fence(self, job_id: str, token: int,
                       first_holder: bool = False,
                       probe: CommitProbe | None = None) -> str | None:
        """Nothing to record: the commit compares the lock's create
        revision itself, and the lock Txn already read the commit marker
        (``marker_in_etcd``), so a committed job never got this far."""
        return None

    # -- expiry ------------------------------------------------------------

    def _results_lease(self) -> int:
        """A lease shared by all results written in the same hour, granted
        with TTL = result_expires + 1 h so every result lives at least
        ``result_expires``."""
        now = time.monotonic()
        if self._lease is None or now - self._lease[1] > 3600:
            lease_id = self.etcd.grant_lease(self.expires + 3600)
            self._lease = (lease_id, now)
        return self._lease[0]

    # -- KeyValueStoreBackend primitives -------------------------------------

    def get_key_for_task(self, task_id, key=""):
        return self._keys.result(bytes_to_str(task_id)).encode()

    def get(self, key):
        kv = self.etcd.get(bytes_to_str(key))
        return kv.value if kv is not None else None

    def mget(self, keys):
        return [self.get(key) for key in keys]

    def set(self, key, value):
        self.etcd.put(bytes_to_str(key), value, lease=self._results_lease())

    def delete(self, key):
        self.etcd.delete(bytes_to_str(key))

    def _store_result(self, task_id, result, state, traceback=None,
                      request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state,
                                     traceback=traceback, request=request)
        task_id = bytes_to_str(task_id)
        meta["task_id"] = task_id
        token = token_for(task_id)
        terminal = state in TERMINAL_STATES
        result_key = self._keys.result(task_id)
        done_key = self._keys.done(task_id)
        lock_key = self._keys.lock(task_id)
        lease = self._results_lease()
        compare = [cmp_version(done_key, 0)]
        success = [op_put(result_key, self.encode(meta), lease)]
        if terminal:
            marker = json.dumps({
                "token": token, "state": state,
                "request": committed_request_id(task_id, request)})
            success.append(op_put(done_key, marker, lease))
            if token:
                compare.append(ownership_compare(lock_key, token))
                success.append(op_delete(lock_key))
        outcome = self.etcd.txn(compare, success,
                                failure=[op_range(done_key)])
        if outcome.succeeded:
            if terminal:
                mark_committed(task_id, lock_released=bool(token))
            return result
        ranges = outcome.ranges()
        done = ranges[0] if ranges else []
        if done:
            self._note_request(done[0], committed_request_id(task_id, request))
            committed = json.loads(done[0].value).get("token", 0)
            if token and committed == token:
                return result  # our own commit, retried after a lost reply
            report_rejected(task_id, state, token, "duplicate", str(committed))
        else:
            self.etcd.put(self._keys.fenced(task_id, token),
                          json.dumps({"state": state, "at": time.time()}),
                          lease=lease)
            report_rejected(task_id, state, token, "fenced", "a newer holder")
        return result


    def _note_request(self, done: KeyValue, request_id: str) -> None:
        """A revoke marks a job REVOKED before its message is seen (no
        request id then); the message, discarded later, still names it:
        add it to the marker, if the marker is still the one we read."""
        try:
            marker = json.loads(done.value)
        except ValueError:
            return
        if not request_id or marker.get("request"):
            return
        marker["request"] = request_id
        self.etcd.txn([cmp_value(done.key, done.value)],
                      [op_put(done.key, json.dumps(marker), done.lease)])

    def on_task_call(self, producer, task_id):
        """Publishing ``task_id`` means a new run of it (after a retire): a
        result cached from before is stale."""
        self._cache.pop(task_id, None)
        super().on_task_call(producer, task_id)

    # -- retiring a job (forget) -------------------------------------------

    def commit_record(self, job_id: str) -> dict[str, str]:
        """The job's commit marker: ``state``, ``committed`` (the token)
        and ``request`` (its request id), or {} if it is not committed."""
        kv = self.etcd.get(self._keys.done(job_id))
        if kv is None:
            return {}
        try:
            marker = json.loads(kv.value)
        except ValueError:
            marker = {}
        return {"state": str(marker.get("state", "")),
                "committed": str(marker.get("token", 0)),
                "request": str(marker.get("request") or "")}

    def retire_ops(self, job_id: str) -> list[dict]:
        """The result and the commit marker go in the same Txn that checks
        nobody holds the job's lock."""
        return [op_delete(self._keys.result(job_id)),
                op_delete(self._keys.done(job_id))]

    def retire_commit(self, job_id: str) -> None:
        """Nothing left to delete (:meth:`retire_ops` did it)."""
        self._cache.pop(job_id, None)

    def _forget(self, task_id):
        """``AsyncResult.forget()``: retire the whole job, not only its
        result, so a retry with its request id runs it again (refused
        while a live holder has the job)."""
        retire_forgotten(self.app, self, bytes_to_str(task_id))
