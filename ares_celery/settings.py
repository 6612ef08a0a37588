"""The ``ares_*`` settings, read once from ``app.conf`` and validated.

Validation happens when :class:`~ares_celery.Ares` is created so that a
misconfigured deployment fails at import time, not on the first job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .clients.etcd import parse_endpoints
from .errors import ConfigurationError

LEASE_TTL_MIN = 2
LEASE_TTL_MAX = 3600

DEFAULTS: dict[str, Any] = {
    "ares_redis_url": None,            # falls back to the broker URL
    "ares_etcd_endpoints": ["127.0.0.1:2379"],
    "ares_etcd_timeout": 2.0,
    "ares_lease_ttl": 30,
    "ares_dedup_ttl": 86400,
    "ares_dedup_claim_timeout": 5.0,
    "ares_namespace": "ares",
    "ares_result_store": "redis",      # "redis" or "etcd"
    "ares_lease_retry_max_delay": None,  # defaults to the lease TTL
    "ares_redis_max_connections": 16,
    "ares_gpu_wait_timeout": 60.0,     # worker waits this long for GPUs
    "ares_gpu_state_dir": None,        # default: the temp dir
    "ares_cuda_visible_devices": "index",  # or "uuid"
}


def _number(name: str, value: Any, low: float, high: float,
            integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise ConfigurationError(f"{name} must be whole seconds, got {value!r}")
    if not low <= value <= high:
        raise ConfigurationError(
            f"{name}={value!r} is out of range [{low}, {high}]")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class AresSettings:
    redis_url: str
    etcd_endpoints: list[tuple[str, int]]
    etcd_timeout: float = 2.0
    lease_ttl: int = 30
    dedup_ttl: int = 86400
    dedup_claim_timeout: float = 5.0
    namespace: str = "ares"
    result_store: str = "redis"
    lease_retry_max_delay: float = 30.0
    redis_max_connections: int = 16
    gpu_wait_timeout: float = 60.0
    gpu_state_dir: str | None = None
    cuda_visible_devices: str = "index"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def etcd_address(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.etcd_endpoints)

    @classmethod
    def from_conf(cls, conf: Any) -> AresSettings:
        values = {key: conf.get(key, default)
                  for key, default in DEFAULTS.items()}
        redis_url = values["ares_redis_url"] or conf.get("broker_url")
        if not redis_url or not str(redis_url).startswith(
                ("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "ares_redis_url must be a redis:// or rediss:// URL "
                f"(got {redis_url!r}); set it or use a Redis broker")
        lease_ttl = _number("ares_lease_ttl", values["ares_lease_ttl"],
                            LEASE_TTL_MIN, LEASE_TTL_MAX, integer=True)
        namespace = values["ares_namespace"]
        if not isinstance(namespace, str) or not namespace \
                or not namespace.replace("-", "").replace("_", "").isalnum():
            raise ConfigurationError(
                f"ares_namespace must be a non-empty word, got {namespace!r}")
        store = values["ares_result_store"]
        if store not in ("redis", "etcd"):
            raise ConfigurationError(
                f"ares_result_store must be 'redis' or 'etcd', got {store!r}")
        retry_max = values["ares_lease_retry_max_delay"]
        visible = values["ares_cuda_visible_devices"]
        if visible not in ("index", "uuid"):
            raise ConfigurationError(
                "ares_cuda_visible_devices must be 'index' or 'uuid', "
                f"got {visible!r}")
        return cls(
            redis_url=str(redis_url),
            etcd_endpoints=parse_endpoints(values["ares_etcd_endpoints"]),
            etcd_timeout=_number("ares_etcd_timeout",
                                 values["ares_etcd_timeout"], 0.05, 60),
            lease_ttl=lease_ttl,
            dedup_ttl=_number("ares_dedup_ttl", values["ares_dedup_ttl"],
                              1, 365 * 86400, integer=True),
            dedup_claim_timeout=_number(
                "ares_dedup_claim_timeout", values["ares_dedup_claim_timeout"],
                0.05, 600),
            namespace=namespace,
            result_store=store,
            lease_retry_max_delay=float(lease_ttl) if retry_max is None else
            _number("ares_lease_retry_max_delay", retry_max, 0.05, 3600),
            redis_max_connections=_number(
                "ares_redis_max_connections",
                values["ares_redis_max_connections"], 2, 10000, integer=True),
            gpu_wait_timeout=_number("ares_gpu_wait_timeout",
                                     values["ares_gpu_wait_timeout"], 0, 86400),
            gpu_state_dir=values["ares_gpu_state_dir"],
            cuda_visible_devices=visible,
            raw=values,
        )
