"""ares-celery: exactly-once jobs and GPU-topology-aware routing for Celery."""

from .app import Ares, AresWarning
from .errors import (
    AresError,
    AttemptsExhausted,
    AuthenticationFailed,
    CheckpointError,
    CheckpointNotSerializable,
    CheckpointTooLarge,
    ConfigurationError,
    InvalidRequestId,
    JobStillHeld,
    LeaseLost,
    Preempted,
    RequestIdConflict,
    ServiceUnavailable,
    UnknownSettingWarning,
)
from .exactly_once.context import JobContext

__all__ = [
    "Ares",
    "AresError",
    "AresWarning",
    "AttemptsExhausted",
    "AuthenticationFailed",
    "CheckpointError",
    "CheckpointNotSerializable",
    "CheckpointTooLarge",
    "ConfigurationError",
    "InvalidRequestId",
    "JobContext",
    "JobStillHeld",
    "LeaseLost",
    "Preempted",
    "RequestIdConflict",
    "ServiceUnavailable",
    "UnknownSettingWarning",
]
__version__ = "0.1.0"
