"""Fenced checkpoints: the state a job resumes from on its next run.

A long job saves small JSON state (``ctx.checkpoint({"step": 900})``) so
that whoever runs it next (a takeover after a crash, a ``self.retry``, a
redelivery) starts from there instead of from zero. A checkpoint is written
like a result is committed: atomically, and only by the job's current
holder, so a zombie (a holder whose lease expired and whose job was taken
over) can never roll a newer holder's progress back.

Checkpoints live next to the result store's own fence, because the fence
check and the write must be one atomic step:

- Redis result store: a hash ``<ns>:checkpoint:<job>`` beside the job hash.
  One Lua script refuses a write whose token is older than the job's fence
  (a takeover holder raised it) or than the token of the checkpoint already
  stored (a newer holder saved first), and otherwise replaces it.
- etcd result store: a key ``/<ns>/checkpoints/<job>``, put in a Txn that
  compares the job's lock key create revision with the writer's token (the
  lock's ownership compare): only the live holder's write lands. etcd's
  default request limit (``--max-request-bytes``, 1.5 MiB) leaves room for
  the 1 MiB state limit.

Either way the checkpoint outlives the holder (it is not on any worker's
lease), lives as long as the job's etcd record while the job is uncommitted
and is deleted once the result is committed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis

from ..clients.etcd import op_put, op_range
from ..clients.redis import unavailable_as_ares_error
from ..coordination.mutex import ownership_compare
from ..errors import (
    CheckpointNotSerializable,
    CheckpointTooLarge,
    LeaseLost,
    ServiceUnavailable,
)
from ..keys import Keys
from ..observability.metrics import count_checkpoint

if TYPE_CHECKING:
    from ..clients.etcd import EtcdGateway
    from ..services import Services

logger = logging.getLogger(__name__)

#: The largest encoded state (UTF-8 JSON) a checkpoint may hold: enough for
#: steps, counters, paths and small metadata; model weights and optimizer
#: state belong in object storage, with their reference checkpointed.
MAX_CHECKPOINT_BYTES = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint: the decoded state and who wrote it when."""

    state: Any
    token: int
    at: float
    size: int


def encode_state(job_id: str, state: Any) -> str:
    """``state`` as compact JSON, or a clear error: checked before any
    round trip, so a bad state fails at the call that passed it."""
    try:
        text = json.dumps(state, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointNotSerializable(
            f"job {job_id}: checkpoint state must be JSON-serializable "
            f"(dicts, lists, str, int, float, bool, None): {exc}. Save "
            "tensors, arrays and other objects to your own storage and "
            "checkpoint their path or URL") from exc
    size = len(text.encode())
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointTooLarge(
            f"job {job_id}: checkpoint state is {size} bytes encoded, over "
            f"the {MAX_CHECKPOINT_BYTES}-byte limit. Store the blob elsewhere "
            "(object storage, a shared filesystem) and checkpoint its "
            'reference, e.g. {"step": 900, "weights": "s3://.../step-900.pt"}')
    return text


class CheckpointStore(Protocol):
    """Where one result store keeps checkpoints (fenced writes)."""

    def save(self, job_id: str, token: int, text: str, at: float) -> None:
        """Replace the job's checkpoint with ``text`` (encoded state) if
        ``token`` is still the job's newest holder; else raise LeaseLost."""

    def load(self, job_id: str) -> Checkpoint | None:
        """The job's latest checkpoint, or None."""

    def discard(self, job_id: str) -> None:
        """Delete the job's checkpoint (after its result is committed)."""


# KEYS[1]: checkpoint hash, KEYS[2]: job hash (fence, commit marker).
# ARGV: token, encoded state, time, size, TTL.
_SAVE = """
local token = tonumber(ARGV[1])
local fence = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
if token < fence then return {0, 'fence', tostring(fence)} end
local committed = redis.call('HGET', KEYS[2], 'committed')
if committed then return {0, 'committed', committed} end
local held = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if token < held then return {0, 'checkpoint', tostring(held)} end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'state', ARGV[2],
           'at', ARGV[3], 'size', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, 'ok', ARGV[1]}
"""

_REFUSED = {
    "fence": "a newer holder took the job over (fence {current})",
    "committed": "the job is already committed (token {current})",
    "checkpoint": "a newer holder (token {current}) saved a checkpoint",
}


def _refused(job_id: str, token: int, why: str) -> LeaseLost:
    count_checkpoint("fenced")
    logger.warning("ares: checkpoint of job %s with fencing token %s "
                   "REFUSED: %s", job_id, token, why)
    return LeaseLost(
        f"job {job_id}: checkpoint with fencing token {token} refused: "
        f"{why}; this execution no longer owns the job and must stop")


class RedisCheckpoints:
    """Checkpoints beside the Redis result store's job hash, fenced by its
    ``fence`` field and by the token of the checkpoint already there."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl: int,
                 url: str = "redis") -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._url = url
        self._save = client.register_script(_SAVE)

    def save(self, job_id: str, token: int, text: str, at: float) -> None:
        with unavailable_as_ares_error(self._url):
            accepted, reason, current = self._save(
                keys=[self._keys.checkpoint(job_id), self._keys.job(job_id)],
                args=[token, text, repr(at), len(text.encode()), self._ttl])
        if not accepted:
            why = reason.decode() if isinstance(reason, bytes) else reason
            held = current.decode() if isinstance(current, bytes) else current
            raise _refused(job_id, token,
                           _REFUSED[why].format(current=held))

    def load(self, job_id: str) -> Checkpoint | None:
        with unavailable_as_ares_error(self._url):
            raw = self._client.hgetall(self._keys.checkpoint(job_id))
        if not raw:
            return None
        return Checkpoint(state=json.loads(raw[b"state"]),
                          token=int(raw[b"token"]), at=float(raw[b"at"]),
                          size=int(raw[b"size"]))

    def discard(self, job_id: str) -> None:
        with unavailable_as_ares_error(self._url):
            self._client.delete(self._keys.checkpoint(job_id))


class EtcdCheckpoints:
    """Checkpoints in etcd, written in a Txn that holds only while the
    writer's job lock is still there (its ownership compare)."""

    def __init__(self, etcd: EtcdGateway, keys: Keys,
                 lease: Callable[[], int]) -> None:
        self._etcd = etcd
        self._keys = keys
        # Job records' shared lease: the checkpoint lives as long as the
        # job's record would, then expires if nobody committed the job.
        self._lease = lease

    def save(self, job_id: str, token: int, text: str, at: float) -> None:
        lock_key = self._keys.lock(job_id)
        # Spliced, not re-encoded: ``text`` is already JSON.
        value = (f'{{"token":{token},"at":{at!r},'
                 f'"size":{len(text.encode())},"state":{text}}}')
        outcome = self._etcd.txn(
            compare=[ownership_compare(lock_key, token)],
            success=[op_put(self._keys.checkpoint_record(job_id), value,
                            self._lease())],
            failure=[op_range(lock_key)])
        if outcome.succeeded:
            return
        held = outcome.ranges()[0] if outcome.ranges() else []
        why = (f"the job's lock is now held at token "
               f"{held[0].create_revision}" if held
               else "the job's lock is gone (lease expired or committed)")
        raise _refused(job_id, token, why)

    def load(self, job_id: str) -> Checkpoint | None:
        kv = self._etcd.get(self._keys.checkpoint_record(job_id))
        if kv is None:
            return None
        record = json.loads(kv.value)
        return Checkpoint(state=record["state"], token=int(record["token"]),
                          at=float(record["at"]), size=int(record["size"]))

    def discard(self, job_id: str) -> None:
        self._etcd.delete(self._keys.checkpoint_record(job_id))


def checkpoint_store(backend: Any, services: Services) -> CheckpointStore:
    """The checkpoint store that goes with the app's fenced result store
    (``backend``: the Redis one fences in Redis, the etcd one in etcd)."""
    if getattr(backend, "store_name", None) == "etcd":
        return EtcdCheckpoints(services.etcd, services.keys,
                               services.locks.records_lease)
    settings = services.settings
    # As long as the job hash (its fence) is kept: a day at least.
    ttl = max(int(getattr(backend, "expires", 0) or 0), settings.dedup_ttl,
              86400)
    return RedisCheckpoints(backend.client, services.keys, ttl,
                            url=str(getattr(backend, "url", None) or "redis"))


class JobCheckpoints:
    """One run's view of its job's checkpoint: saves with its token, loads
    the latest lazily (a job that never asks pays no round trip)."""

    def __init__(self, job_id: str, token: int,
                 store: Callable[[], CheckpointStore] | None,
                 on_saved: Callable[[Checkpoint], None] | None = None,
                 may_exist: bool = True) -> None:
        self.job_id = job_id
        self.token = token
        self._open = store
        self._store: CheckpointStore | None = None
        self._listeners = [on_saved] if on_saved is not None else []
        self._latest: Checkpoint | None = None
        self._loaded = False
        #: A checkpoint of this job may be stored (an earlier run may have
        #: saved one, or this one did): then committing deletes it.
        self.may_exist = may_exist

    def _backing(self) -> CheckpointStore | None:
        if self._store is None and self._open is not None:
            self._store = self._open()
        return self._store

    def listen(self, on_saved: Callable[[Checkpoint], None]) -> None:
        """Also call ``on_saved`` after every save (the GPU host notes the
        time: work since then is what a preemption would lose)."""
        self._listeners.append(on_saved)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, read from the store on first use."""
        if not self._loaded:
            store = self._backing()
            self._latest = store.load(self.job_id) if store else None
            self._loaded = True
            self.may_exist = self.may_exist or self._latest is not None
        return self._latest

    def save(self, state: Any, at: float,
             before_write: Callable[[], None] | None = None) -> Checkpoint:
        """Validate, call ``before_write`` (the lease check), then write
        fenced; raises LeaseLost for a zombie."""
        text = encode_state(self.job_id, state)
        if before_write is not None:
            before_write()
        store = self._backing()
        if store is not None:
            store.save(self.job_id, self.token, text, at)
            self.may_exist = True
        saved = Checkpoint(state=json.loads(text), token=self.token, at=at,
                           size=len(text.encode()))
        self._latest, self._loaded = saved, True
        count_checkpoint("saved")
        for listener in self._listeners:
            listener(saved)
        return saved

    def discard(self) -> None:
        """After the commit: delete the checkpoint, best effort (it expires
        by itself otherwise). Costs a round trip only when one may exist."""
        store = self._backing() if self.may_exist else None
        if store is None:
            return
        try:
            store.discard(self.job_id)
        except (ServiceUnavailable, redis.RedisError) as exc:
            logger.warning("ares: checkpoint of committed job %s not "
                           "deleted (%s); it expires by itself", self.job_id,
                           exc)
