"""Every error the public API raises derives from :class:`AresError`.

One root class lets callers write a single ``except AresError`` around
submission and still tell the cases apart by subclass.
"""

from __future__ import annotations


class AresError(Exception):
    """Root of all ares-celery errors."""


class AresWarning(UserWarning):
    """A setting that weakens the guarantee without breaking it outright."""


class UnknownSettingWarning(AresWarning):
    """An ``ares_*`` name in ``app.conf`` that no part of ares reads.

    A warning rather than an error: the name may belong to the user's own
    code. Misspelled, it would silently leave the default in force (an
    ``ares_lease_tll = 5`` keeps the 30 s lease), so the message names the
    closest valid setting.
    """


class ConfigurationError(AresError):
    """The Celery app or the ``ares_*`` settings cannot give the guarantee."""


class InvalidRequestId(AresError, ValueError):
    """A request id that cannot serve as an idempotency key."""


class RequestIdConflict(AresError):
    """A request id already names a job of another task or other arguments."""


class ServiceUnavailable(AresError, ConnectionError):
    """Redis or etcd could not be reached; the message names the address."""


class AuthenticationFailed(ServiceUnavailable):
    """Redis or etcd refused our credentials (or demands some we lack).

    A kind of :class:`ServiceUnavailable` so every fail-closed path treats
    it the same; a class of its own so operators read "wrong password",
    not "network down". The message names the user and address, never the
    password.
    """


class LeaseLost(AresError):
    """The worker no longer holds the job's lease: its commit will be fenced."""


class Preempted(LeaseLost):
    """A more urgent job needs this job's GPUs: ``ctx.check()`` raises it so
    the body stops (after a checkpoint, ideally). A kind of
    :class:`LeaseLost` because the handling is the same: the run ends
    without a commit and the job is requeued, keeping its job id; it
    resumes from its last checkpoint and the stop is not counted as a
    failed attempt. A body that lets it propagate needs no other code."""


class CheckpointError(AresError, ValueError):
    """A checkpoint state that cannot be saved; raised at the call, before
    any round trip, so the body that passed it sees why."""


class CheckpointNotSerializable(CheckpointError):
    """``ctx.checkpoint(state)`` with state JSON cannot encode (a tensor,
    a set, NaN): checkpoint plain data and references to blobs."""


class CheckpointTooLarge(CheckpointError):
    """The encoded state is over the 1 MiB limit: store the blob elsewhere
    and checkpoint its reference."""


class JobStillHeld(AresError):
    """A live worker holds the job's lock: it cannot be retired (forgotten)
    now; the message names the holder."""


class AttemptsExhausted(AresError):
    """A job lost its holder (killed, hung, cut off) ``max_attempts`` times:
    it is committed as FAILURE instead of being run again forever."""


class GpuRequestError(AresError, ValueError):
    """A GPU requirement that is malformed (bad count, memory or link type)."""


class UnsatisfiableGpuRequest(AresError):
    """No placement can ever satisfy the GPU request; the message says why."""


class NoGpuHosts(AresError):
    """No GPU host is registered, so a GPU task has nowhere to go."""


class NvmlUnavailable(AresError):
    """NVML (the NVIDIA driver library) is not present or not usable here."""


class TopologyParseError(AresError, ValueError):
    """``nvidia-smi topo -m`` text that cannot be read; names the bad line."""
