"""Layer 1: request dedup in Redis.

A submission is *reserved* with one atomic script (SET-NX semantics plus a
claim timestamp), then the message is published, then the record is marked
*published* (one HSET). A duplicate that finds a fresh reservation waits
for it to turn into *published*; one that finds a stale reservation (its
client died between recording and publishing) takes the claim over and
publishes itself, so the job is never lost. Publishing twice in that rare
race is harmless: layers 2 and 3 make execution and commit exactly-once
anyway.

The broker can lose a published message too: kombu's Redis transport pops a
message and records it as unacked in two steps, so a Redis crash between
them drops it. A retried submission of a job that was published long ago
(``ares_republish_after``) and is still not committed therefore publishes it
again: clients that retry heal what the broker lost.

An operator can lose messages on purpose, too: ``celery purge`` records
when it ended (:meth:`DedupStore.record_purge`), and a retry of a job that
was published before the last purge and is not committed publishes it again
at once (a copy that survived the purge is skipped or deferred by layers 2
and 3). ``celery ares forget`` retires a request id (:meth:`DedupStore.forget`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

import redis

from ..clients.redis import unavailable_as_ares_error
from ..errors import RequestIdConflict, ServiceUnavailable
from .identity import Keys
from .published_marks import FLUSH_TIMEOUT_S, Mark, PublishedMarks

Outcome = Literal["reserved", "takeover", "republish", "published", "pending"]

_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'job', ARGV[2], 'task', ARGV[3],
             'digest', ARGV[4], 'state', 'reserved', 'owner', ARGV[1],
             'at', now)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return {'reserved', ARGV[2]}
end
local f = redis.call('HMGET', KEYS[1], 'job', 'task', 'digest', 'state', 'at')
if f[2] ~= ARGV[3] or f[3] ~= ARGV[4] then
  return {'conflict', f[1] or '', f[2] or ''}
end
if f[4] == 'published' then
  local at = tonumber(f[5] or '0')
  local after = tonumber(ARGV[7])
  local why = nil
  if at <= tonumber(redis.call('GET', KEYS[3]) or '-1') then
    why = 'purged'
  elseif after > 0 and now - at > after then
    why = 'stale'
  end
  if why and redis.call('HEXISTS', KEYS[2], 'committed') == 0 then
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'at', now)
    return {'republish', f[1], why}
  end
  return {'published', f[1]}
end
if now - tonumber(f[5] or '0') > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'at', now)
  return {'takeover', f[1]}
end
return {'pending', f[1]}
"""

_ROLLBACK = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'state')
if f[1] == ARGV[1] and f[2] == 'reserved' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RECORD_PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], now, 'EX', ARGV[1])
return now
"""


@dataclass(frozen=True)
class Reservation:
    outcome: Outcome
    job_id: str
    owner: str
    #: Why a ``republish``: ``"stale"`` (published ``ares_republish_after``
    #: ago, the broker may have lost it) or ``"purged"`` (published before
    #: the last ``celery purge``).
    reason: str = ""

    @property
    def must_publish(self) -> bool:
        return self.outcome in ("reserved", "takeover", "republish")


class DedupStore:
    """Records submissions so duplicates publish nothing."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl: int,
                 claim_timeout: float, url: str = "",
                 republish_after: float = 0) -> None:
        self._redis = client
        self._keys = keys
        self._ttl = ttl
        self._claim_ms = int(claim_timeout * 1000)
        self._republish_ms = int(republish_after * 1000)
        self._url = url
        self._reserve = client.register_script(_RESERVE)
        self._rollback = client.register_script(_ROLLBACK)
        self._record_purge = client.register_script(_RECORD_PURGE)
        self._marks = PublishedMarks(self.write_published)

    def reserve(self, request_id: str, job_id: str, task_name: str,
                digest: str, label: str | None = None) -> Reservation:
        """Claim the right to publish, or learn that someone else did.

        ``label`` names the key in a conflict's message (``task_id '...'``
        for a job named by its task id).

        Blocks (polling with a deadline) while another submitter holds a
        fresh claim, so that a call that returns always means the message
        is, or is being, published by a live client.
        """
        owner = uuid.uuid4().hex
        key = self._keys.dedup(request_id)
        deadline = time.monotonic() + self._claim_ms / 1000 + 5
        pause = 0.001
        while True:
            outcome, *rest = self._call(
                self._reserve,
                [key, self._keys.job(job_id), self._keys.purged()],
                [owner, job_id, task_name, digest, self._ttl, self._claim_ms,
                 self._republish_ms])
            outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
            found = [r.decode() if isinstance(r, bytes) else r for r in rest]
            if outcome == "conflict":
                job, other = found[0], found[1]
                why = (f"of task {other!r}, but you submitted task "
                       f"{task_name!r}" if other != task_name else
                       f"of task {other!r} with different arguments")
                named = label or f"request_id {request_id!r}"
                raise RequestIdConflict(
                    f"{named} already names job {job} {why}; use a new "
                    "one for different work")
            if outcome != "pending":
                return Reservation(outcome, found[0], owner,
                                   found[1] if len(found) > 1 else "")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"request_id {request_id!r} stayed reserved but "
                    "unpublished past the claim timeout; retry the submission")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def mark_later(self, request_id: str, job_id: str, task_name: str,
                   digest: str) -> None:
        """Mark the reservation published from the writer thread
        (:mod:`.published_marks`): the submitter does not wait for it."""
        self._marks.add(Mark(request_id, job_id, task_name, digest))

    def flush_marks(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait for the marks queued by :meth:`mark_later` to be written."""
        return self._marks.flush(timeout)

    def write_published(self, marks: list[Mark]) -> None:
        """One HSET per mark (no script, no clock read), all in one round
        trip: the record keeps its reservation time as ``at``. That is a
        few milliseconds before the publish, which errs the safe way: a
        purge that ended in between, or a stale-publish check, republishes
        on a retry rather than not (a second copy is skipped or deferred by
        layers 2 and 3). The record's identity fields are written again
        with the state, so a record that vanished meanwhile (a forget) is
        whole again at once; then, and only then, it needs its TTL too."""
        keys = [self._keys.dedup(mark.request_id) for mark in marks]
        with unavailable_as_ares_error(self._url):
            pipe = self._redis.pipeline(transaction=False)
            for key, mark in zip(keys, marks, strict=True):
                pipe.hset(key, mapping={
                    "job": mark.job_id, "task": mark.task_name,
                    "digest": mark.digest, "state": "published"})
            recreated = [key for key, added in zip(keys, pipe.execute(),
                                                   strict=True) if added]
            if recreated:
                pipe = self._redis.pipeline(transaction=False)
                for key in recreated:
                    pipe.expire(key, self._ttl)
                pipe.execute()

    def rollback(self, request_id: str, owner: str) -> None:
        """Undo our reservation after a failed publish (the seed never did),
        so the client's retry is not blocked for the claim timeout."""
        try:
            self._call(self._rollback, [self._keys.dedup(request_id)], [owner])
        except ServiceUnavailable:
            pass  # the claim goes stale by itself and a retry takes it over

    def record_purge(self) -> int:
        """Note that queues were purged just now (Redis clock, ms): every
        job published before this and not committed is published again by
        its next retry. Kept as long as a dedup record can live, since only
        records older than the purge need it."""
        return int(self._call(self._record_purge, [self._keys.purged()],
                              [max(self._ttl, 1)]))

    def last_purge(self) -> int | None:
        """When the last recorded purge ended (ms), if one is remembered."""
        with unavailable_as_ares_error(self._url):
            value = self._redis.get(self._keys.purged())
        return int(value) if value is not None else None

    def record(self, request_id: str) -> dict[str, str]:
        """The request's dedup record (job, task, state...), or {}."""
        with unavailable_as_ares_error(self._url):
            raw = self._redis.hgetall(self._keys.dedup(request_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def forget(self, request_id: str) -> bool:
        """Retire the request id: its next submission is new (same job id,
        since that is derived from the request id). True if a record was
        there."""
        with unavailable_as_ares_error(self._url):
            return bool(self._redis.delete(self._keys.dedup(request_id)))

    def _call(self, script, keys, args):
        with unavailable_as_ares_error(self._url):
            return script(keys=keys, args=args)
