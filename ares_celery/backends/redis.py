"""A Celery Redis result backend whose commits are fenced.

The commit is one Lua script: it refuses the write if a terminal result was
committed before (write-once) or if the writer's fencing token is smaller
than the highest token any lease holder of the job registered (a zombie),
and otherwise stores the meta and PUBLISHes it exactly like Celery's own
Redis backend, so ``AsyncResult.get()`` wakes up at once.
"""

from __future__ import annotations

from typing import Any, ClassVar

from celery.backends.redis import RedisBackend
from kombu.utils.encoding import bytes_to_str

from ..errors import ConfigurationError
from ..keys import Keys
from ..settings import AresSettings
from .fencing import TERMINAL_STATES, mark_committed, report_rejected, token_for

#: How Celery names this backend in ``result_backend`` ("module:Class+url").
BACKEND_PATH = "ares_celery.backends.redis:FencedRedisBackend"

_COMMIT = """
local token = tonumber(ARGV[3])
if token > 0 then
  local fence = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
  if token < fence then
    redis.call('HINCRBY', KEYS[2], 'fenced', 1)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*',
               'job', ARGV[5], 'token', ARGV[3], 'fence', fence,
               'state', ARGV[6])
    return {0, 'fenced', tostring(fence)}
  end
end
local committed = redis.call('HGET', KEYS[2], 'committed')
if committed then return {0, 'duplicate', committed} end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'committed', ARGV[3], 'state', ARGV[6])
  redis.call('HINCRBY', KEYS[2], 'commits', 1)
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

    # -- used by the task before the body runs ---------------------------

    def register_fence(self, job_id: str, token: int) -> str | None:
        """Raise the job's fence to ``token``; return the committed token if
        the job is already committed (then the body must not run)."""
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
                int(expires or 0), task_id, state, marker_ttl]
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

