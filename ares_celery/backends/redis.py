"""A Celery Redis result backend whose commits are fenced.

The commit is one Lua script: it refuses the write if a terminal result was
committed before (write-once) or if the writer's fencing token is smaller
than the highest token any lease holder of the job registered (a zombie),
and otherwise stores the meta and PUBLISHes it exactly like Celery's own
Redis backend, so ``AsyncResult.get()`` wakes up at once.

The commit marker (in the job's hash, next to its fence) also records the
job's request id, so that ``AsyncResult.forget()``, which knows only the job
id, can retire the whole job (:mod:`ares_celery.exactly_once.retire`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from celery.backends.redis import RedisBackend
from kombu.utils.encoding import bytes_to_str

from ..errors import ConfigurationError
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
BACKEND_PATH = "ares_celery.backends.redis:FencedRedisBackend"

_COMMIT = """
local marker = redis.call('HMGET', KEYS[2], 'fence', 'committed', 'commits')
local token = tonumber(ARGV[3])
if token > 0 then
  -- No fence: only a first holder ran the job (a later one raises it).
  local fence = tonumber(marker[1] or '0')
  if token < fence then
    redis.call('HINCRBY', KEYS[2], 'fenced', 1)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*',
               'job', ARGV[5], 'token', ARGV[3], 'fence', fence,
               'state', ARGV[6])
    return {0, 'fenced', tostring(fence)}
  end
end
local committed = marker[2]
if committed then
  -- A revoke marks a job REVOKED before its message is seen (no request
  -- id then); the message, discarded later, still names it: note it.
  if ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[2], 'request') == 0 then
    redis.call('HSET', KEYS[2], 'request', ARGV[8])
  end
  return {0, 'duplicate', committed}
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  -- 'commits' counts accepted commits (an audit: it must stay 1); it is
  -- read with the fence above and written with the marker, no HINCRBY.
  local commits = tonumber(marker[3] or '0') + 1
  if ARGV[8] ~= '' then
    redis.call('HSET', KEYS[2], 'committed', ARGV[3], 'state', ARGV[6],
               'commits', commits, 'request', ARGV[8])
  else
    redis.call('HSET', KEYS[2], 'committed', ARGV[3], 'state', ARGV[6],
               'commits', commits)
  end
  if ttl > 0 then redis.call('EXPIRE', KEYS[2], ARGV[7]) end
end
return {1, 'ok', ARGV[3]}
"""

_FENCE = """
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) > fence then
  redis.call('HSET', KEYS[1], 'fence', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('HGET', KEYS[1], 'committed')
"""

# Retire a commit: the result and the marker go, the fence stays (a zombie
# of an earlier tenure must stay fenced when the job runs again), and
# 'retired' makes the job's next first holder raise the fence after all:
# retiring deleted the job's etcd record, so that holder is "first" even
# though earlier tenures (zombies among them) exist.
_RETIRE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'retired', 1)
return redis.call('HDEL', KEYS[2], 'committed', 'state', 'request', 'commits')
"""


class FencedRedisBackend(RedisBackend):
    """Drop-in for ``redis://`` results with write-once, fenced commits."""

    store_name: ClassVar[str] = "redis"
    marker_in_etcd: ClassVar[bool] = False

    @classmethod
    def result_backend_url(cls, current: Any, settings: AresSettings) -> str:
        """The app's own ``redis://`` result backend (or, if it has none,
        ``ares_redis_url``), fenced."""
        if isinstance(current, str) and current.startswith(BACKEND_PATH):
            return current
        if current is None:
            url = settings.redis_url
        elif isinstance(current, str) and current.startswith(
                ("redis://", "rediss://")):
            url = current
        else:
            raise ConfigurationError(
                f"result_backend={current!r} cannot fence commits; use a "
                "redis:// URL (or none: ares_redis_url is used) or set "
                "ares_result_store='etcd'")
        return f"{BACKEND_PATH}+{url}"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._keys = Keys(self.app.conf.get("ares_namespace", "ares"))
        self._dedup_ttl = int(self.app.conf.get("ares_dedup_ttl", 86400))
        self._commit_script = self.client.register_script(_COMMIT)
        self._fence_script = self.client.register_script(_FENCE)
        self._retire_script = self.client.register_script(_RETIRE)

    # -- used by the task before the body runs ---------------------------

    def commit_probe(self, job_id: str) -> CommitProbe:
        """One HMGET of the job hash's ``committed`` and ``retired``."""
        return _probe(self.ensure(lambda: self.client.hmget(
            self._keys.job(job_id), "committed", "retired"), ()))

    def send_commit_probe(self, job_id: str
                          ) -> Callable[[], CommitProbe] | None:
        """:meth:`commit_probe` in two halves on a connection of its own:
        the HMGET is written to Redis now, its answer read by the returned
        call (which hands the connection back, or drops it on any error).
        Nothing waits in between, so no thread is needed to overlap it
        with the lock Txn."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("HMGET", self._keys.job(job_id), "committed",
                              "retired")
        except Exception:  # noqa: BLE001 - the caller reads after the Txn
            conn.disconnect()
            pool.release(conn)
            return None

        def answer() -> CommitProbe:
            try:
                return _probe(conn.read_response())
            except BaseException:
                conn.disconnect()  # a half-read reply must not be reused
                raise
            finally:
                pool.release(conn)

        return answer

    def register_fence(self, job_id: str, token: int,
                       first_holder: bool = False,
                       probe: CommitProbe | None = None) -> str | None:
        """Raise the job's fence to ``token``; return the committed token if
        the job is already committed (then the body must not run).

        ``first_holder``: the lock Txn created the job's record, so no
        older token can exist and only the committed check is needed (one
        HMGET instead of the fence script, none if ``probe`` was read
        alongside the lock Txn), unless the job was retired (``celery ares
        forget``), which deletes the record but not the earlier tenures:
        then the fence is raised as for any holder.
        """
        if first_holder:
            probe = probe or self.commit_probe(job_id)
            if probe.committed:
                return probe.committed
            if not probe.retired:
                return None
        ttl = max(int(self.expires or 0), self._dedup_ttl, 86400)
        committed = self.ensure(lambda: self._fence_script(
            keys=[self._keys.job(job_id)], args=[token, ttl]), ())
        return bytes_to_str(committed) if committed else None

    # -- Celery's storage hook -------------------------------------------

    def _store_result(self, task_id, result, state, traceback=None,
                      request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state,
                                     traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        token = token_for(task_id)
        terminal = state in TERMINAL_STATES
        expires = self.failure_expires if state == "FAILURE" else self.expires
        keys = [self.get_key_for_task(task_id), self._keys.job(task_id),
                self._keys.fenced_log()]
        # The commit marker outlives the result if need be: while a dedup
        # record can answer a retry, the marker must still say "committed"
        # or the retry would republish (and re-run) a finished job.
        marker_ttl = max(int(expires or 0), self._dedup_ttl)
        args = [self.encode(meta), "1" if terminal else "0", token,
                int(expires or 0), task_id, state, marker_ttl,
                committed_request_id(task_id, request)]
        accepted, reason, current = self.ensure(
            lambda: self._commit_script(keys=keys, args=args), ())
        reason, current = bytes_to_str(reason), bytes_to_str(current)
        if not accepted and token and current == str(token):
            accepted = True  # our own commit, retried after a lost reply
        if accepted:
            if terminal:
                mark_committed(task_id)
        else:
            report_rejected(task_id, state, token, reason, current)
        return result


    def on_task_call(self, producer, task_id):
        """Publishing ``task_id`` means a new run of it: drop any state this
        client buffered for it before (Celery keeps REVOKED metas in
        ``_pending_messages`` for late waiters), or a ``get()`` after a
        retire-and-retry would return the old state. The store stays the
        truth: a waiter still reads the committed meta from it."""
        self._drop_buffered(task_id)
        super().on_task_call(producer, task_id)

    def _drop_buffered(self, task_id: str) -> None:
        self._cache.pop(task_id, None)
        pending = self._pending_messages
        try:
            buffered = pending.pop(task_id)
        except KeyError:
            return
        pending.total -= len(buffered)

    # -- retiring a job (forget) -------------------------------------------

    def commit_record(self, job_id: str) -> dict[str, str]:
        """The job's commit marker: ``state``, ``committed`` (the token)
        and ``request`` (its request id), or {} if it is not committed."""
        raw = self.ensure(lambda: self.client.hgetall(self._keys.job(job_id)),
                          ())
        record = {bytes_to_str(k): bytes_to_str(v) for k, v in raw.items()}
        return record if "committed" in record else {}

    def retire_ops(self, job_id: str) -> list[dict]:
        """etcd ops that retire the commit in the same Txn as the job's
        lock check: none, the commit lives in Redis."""
        return []

    def retire_commit(self, job_id: str) -> None:
        """Delete the result and the commit marker, keep the fence."""
        self.ensure(lambda: self._retire_script(
            keys=[self.get_key_for_task(job_id), self._keys.job(job_id)],
            args=[]), ())
        self._drop_buffered(job_id)

    def _forget(self, task_id):
        """``AsyncResult.forget()``: retire the whole job, not only its
        result, so a retry with its request id runs it again instead of
        finding "committed" with no result (refused while a live holder
        has the job)."""
        retire_forgotten(self.app, self, bytes_to_str(task_id))


def _probe(reply: list) -> CommitProbe:
    """``HMGET <job hash> committed retired`` as a :class:`CommitProbe`."""
    committed, retired = reply
    return CommitProbe(bytes_to_str(committed) if committed else None,
                       bool(retired))
