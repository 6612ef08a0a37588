"""The ``ares_*`` settings, read once from ``app.conf`` and validated.

Validation happens when :class:`~ares_celery.Ares` is created so that a
misconfigured deployment fails at import time, not on the first job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .clients.etcd import EtcdGateway
from .clients.etcd_endpoints import endpoint_schemes, parse_endpoints
from .clients.etcd_grpc import check_transport
from .clients.etcd_security import EtcdSecurity
from .clients.redis import redact_url
from .errors import ConfigurationError
from .unknown_settings import NOT_SETTINGS, warn_unknown_settings

LEASE_TTL_MIN = 2
LEASE_TTL_MAX = 3600

DEFAULTS: dict[str, Any] = {
    "ares_redis_url": None,            # falls back to the broker URL
    "ares_etcd_endpoints": ["127.0.0.1:2379"],
    "ares_etcd_timeout": 2.0,
    "ares_etcd_user": None,            # etcd auth (with ares_etcd_password)
    "ares_etcd_password": None,
    "ares_etcd_ca_cert": None,         # TLS: CA bundle for the server cert
    "ares_etcd_cert": None,            # TLS: client certificate (+ key)
    "ares_etcd_key": None,
    "ares_etcd_transport": "auto",     # "grpc" or "http": see clients.etcd_grpc
    "ares_lease_ttl": 30,
    "ares_dedup_ttl": 86400,
    "ares_dedup_claim_timeout": 5.0,
    "ares_republish_after": 600.0,
    "ares_max_attempts": 5,            # holders a job may lose before FAILURE
    "ares_recovery": True,             # workers re-dispatch jobs of dead holders
    "ares_namespace": "ares",
    "ares_result_store": "redis",      # a name in backends.registry.STORES
    "ares_lease_retry_max_delay": None,  # defaults to the lease TTL
    "ares_redis_max_connections": 16,
    "ares_gpu_wait_timeout": 60.0,     # worker waits this long for GPUs
    "ares_preempt_grace": 30.0,        # a preempted job's time to yield
    "ares_gpu_state_dir": None,        # default: the temp dir
    "ares_cuda_visible_devices": "index",  # or "uuid"
    "ares_metrics_port": None,         # workers: Prometheus port, or "host:port"
}

def _kind(value: Any) -> str:
    return f"{value!r} (a {type(value).__name__})"


def _bound(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else str(limit)


def _number(name: str, value: Any, low: float, high: float,
            integer: bool = False) -> Any:
    """A number in ``[low, high]``; a string such as ``"30"`` (what an
    environment variable gives) is refused, not guessed at."""
    what = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{name} must be {what} from {_bound(low)} to {_bound(high)}, "
            f"got {_kind(value)}")
    if integer and int(value) != value:
        raise ConfigurationError(
            f"{name} must be {what} from {_bound(low)} to {_bound(high)}, "
            f"got {value!r}")
    if not low <= value <= high:
        raise ConfigurationError(
            f"{name}={value!r} is out of range [{_bound(low)}, "
            f"{_bound(high)}]")
    return int(value) if integer else float(value)


def _flag(name: str, value: Any) -> bool:
    """Only ``True`` or ``False``: ``"false"`` is a true string, so
    accepting truthy values would turn features on by accident."""
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"{name} must be True or False, got {_kind(value)}")
    return value


def _directory(name: str, value: Any) -> str | None:
    """``None`` or a non-empty path (``str`` or ``os.PathLike``); it need
    not exist where the settings are read, only on the hosts that use it."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigurationError(
            f"{name} must be a directory path (a str or pathlib.Path) or "
            f"None, got {_kind(value)}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise ConfigurationError(
            f"{name} must be a text path, got {_kind(value)}")
    return path


def _redis_url(conf: Any, value: Any) -> str:
    """``ares_redis_url``, else the broker URL: a ``redis://``,
    ``rediss://`` (with certificate checks) or ``unix://`` URL."""
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(
            "ares_redis_url must be a redis:// or rediss:// URL string, "
            f"got a {type(value).__name__}")
    redis_url = value or conf.get("broker_url")
    if not redis_url or not str(redis_url).startswith(
            ("redis://", "rediss://", "unix://")):
        shown = redact_url(str(redis_url)) if redis_url else redis_url
        raise ConfigurationError(
            "ares_redis_url must be a redis:// or rediss:// URL "
            f"(got {shown!r}); set it or use a Redis broker")
    if str(redis_url).startswith("rediss://") \
            and "ssl_cert_reqs=" not in str(redis_url):
        raise ConfigurationError(
            f"{redact_url(str(redis_url))}: a rediss:// URL needs "
            "?ssl_cert_reqs=required (plus ssl_ca_certs=, and "
            "ssl_certfile=/ssl_keyfile= for client certificates); "
            "Celery's Redis result backend refuses it without")
    return str(redis_url)


def _readable_file(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigurationError(f"{name} must be a file path, got {value!r}")
    path = os.fspath(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigurationError(f"{name}={path!r} is not a readable file")
    return path


def etcd_security(values: dict[str, Any]) -> EtcdSecurity:
    """TLS and auth for etcd from the ``ares_etcd_*`` settings.

    TLS is on when an endpoint says ``https://`` or any certificate setting
    is given; contradictions (an ``http://`` endpoint with certificates,
    mixed schemes, a certificate without its key, a user without a
    password) are refused here rather than surfacing as a handshake error
    on the first job.
    """
    schemes = endpoint_schemes(values["ares_etcd_endpoints"])
    if len(schemes) > 1:
        raise ConfigurationError(
            "ares_etcd_endpoints mixes http:// and https:// endpoints; "
            "every member of one cluster is reached the same way")
    if schemes - {"http", "https"}:
        raise ConfigurationError(
            f"ares_etcd_endpoints scheme {schemes.pop()!r} is not http or "
            "https")
    ca = _readable_file("ares_etcd_ca_cert", values["ares_etcd_ca_cert"])
    cert = _readable_file("ares_etcd_cert", values["ares_etcd_cert"])
    key = _readable_file("ares_etcd_key", values["ares_etcd_key"])
    if (cert is None) != (key is None):
        raise ConfigurationError(
            "ares_etcd_cert and ares_etcd_key go together: a client "
            "certificate is useless without its private key")
    tls = "https" in schemes or any((ca, cert))
    if tls and "http" in schemes:
        raise ConfigurationError(
            "ares_etcd_ca_cert/ares_etcd_cert are set but "
            "ares_etcd_endpoints use http://; write https:// endpoints "
            "(or drop the certificate settings)")
    user, password = values["ares_etcd_user"], values["ares_etcd_password"]
    for name, value in (("ares_etcd_user", user),
                        ("ares_etcd_password", password)):
        if value is not None and (not isinstance(value, str) or not value):
            # The type, never the value: it may be the password.
            raise ConfigurationError(
                f"{name} must be a non-empty string or None, got a "
                f"{type(value).__name__}")
    if (user is None) != (password is None):
        raise ConfigurationError(
            "ares_etcd_user and ares_etcd_password go together "
            f"(got {'a user' if user else 'a password'} only)")
    return EtcdSecurity(protocol="https" if tls else "http", ca_cert=ca,
                        cert=cert, key=key, user=user, password=password)


def metrics_listen(name: str, value: Any) -> tuple[str, int] | None:
    """Where a worker serves ``/metrics``: ``None`` (off), a port (all
    interfaces, as Prometheus exporters do) or ``"host:port"``."""
    if value is None or value == "":
        return None
    host, port = "0.0.0.0", value
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        port = int(port) if port.strip().isdigit() else port
    if isinstance(port, bool) or not isinstance(port, int) \
            or not 1 <= port <= 65535:
        raise ConfigurationError(
            f"{name} must be a TCP port (1..65535) or 'host:port', "
            f"got {value!r}")
    return host, port


@dataclass(frozen=True)
class AresSettings:
    redis_url: str = field(repr=False)
    etcd_endpoints: list[tuple[str, int]]
    etcd_timeout: float = 2.0
    etcd_security: EtcdSecurity = field(default_factory=EtcdSecurity)
    etcd_transport: str = "auto"
    lease_ttl: int = 30
    dedup_ttl: int = 86400
    dedup_claim_timeout: float = 5.0
    republish_after: float = 600.0
    max_attempts: int = 5
    recovery: bool = True
    namespace: str = "ares"
    result_store: str = "redis"
    lease_retry_max_delay: float = 30.0
    redis_max_connections: int = 16
    gpu_wait_timeout: float = 60.0
    preempt_grace: float = 30.0
    gpu_state_dir: str | None = None
    cuda_visible_devices: str = "index"
    metrics_listen: tuple[str, int] | None = None

    @property
    def etcd_address(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.etcd_endpoints)

    @property
    def redis_address(self) -> str:
        """The Redis URL without its password, for logs and errors."""
        return redact_url(self.redis_url)

    def etcd_gateway(self) -> EtcdGateway:
        """A new gateway with these endpoints, TLS files and credentials
        (one per process: see :class:`~ares_celery.services.Services`)."""
        return EtcdGateway(self.etcd_endpoints, self.etcd_timeout,
                           self.etcd_security)

    @classmethod
    def from_conf(cls, conf: Any) -> AresSettings:
        """Read and check every ``ares_*`` setting: a wrong type or value
        is a :class:`ConfigurationError` naming the setting; an ``ares_*``
        name that is not a setting warns with the closest one."""
        values = {key: conf.get(key, default)
                  for key, default in DEFAULTS.items()}
        # After the reads above: they finalize Celery's lazy configuration.
        warn_unknown_settings(conf, DEFAULTS, NOT_SETTINGS, stacklevel=3)
        redis_url = _redis_url(conf, values["ares_redis_url"])
        lease_ttl = _number("ares_lease_ttl", values["ares_lease_ttl"],
                            LEASE_TTL_MIN, LEASE_TTL_MAX, integer=True)
        namespace = values["ares_namespace"]
        if not isinstance(namespace, str) or not namespace \
                or not namespace.replace("-", "").replace("_", "").isalnum():
            raise ConfigurationError(
                f"ares_namespace must be a non-empty word, got {namespace!r}")
        store = values["ares_result_store"]
        if not isinstance(store, str) or not store:
            # Which names exist is the store registry's to say (Ares checks).
            raise ConfigurationError(
                f"ares_result_store must be a store name, got {store!r}")
        retry_max = values["ares_lease_retry_max_delay"]
        visible = values["ares_cuda_visible_devices"]
        if visible not in ("index", "uuid"):
            raise ConfigurationError(
                "ares_cuda_visible_devices must be 'index' or 'uuid', "
                f"got {visible!r}")
        return cls(
            redis_url=redis_url,
            etcd_endpoints=parse_endpoints(values["ares_etcd_endpoints"]),
            etcd_timeout=_number("ares_etcd_timeout",
                                 values["ares_etcd_timeout"], 0.05, 60),
            etcd_security=etcd_security(values),
            etcd_transport=check_transport(values["ares_etcd_transport"]),
            lease_ttl=lease_ttl,
            dedup_ttl=_number("ares_dedup_ttl", values["ares_dedup_ttl"],
                              1, 365 * 86400, integer=True),
            dedup_claim_timeout=_number(
                "ares_dedup_claim_timeout", values["ares_dedup_claim_timeout"],
                0.05, 600),
            republish_after=_number(
                "ares_republish_after", values["ares_republish_after"],
                0, 30 * 86400),
            max_attempts=_number("ares_max_attempts",
                                 values["ares_max_attempts"], 1, 1000,
                                 integer=True),
            recovery=_flag("ares_recovery", values["ares_recovery"]),
            namespace=namespace,
            result_store=store,
            lease_retry_max_delay=float(lease_ttl) if retry_max is None else
            _number("ares_lease_retry_max_delay", retry_max, 0.05, 3600),
            redis_max_connections=_number(
                "ares_redis_max_connections",
                values["ares_redis_max_connections"], 2, 10000, integer=True),
            gpu_wait_timeout=_number("ares_gpu_wait_timeout",
                                     values["ares_gpu_wait_timeout"], 0, 86400),
            preempt_grace=_number("ares_preempt_grace",
                                  values["ares_preempt_grace"], 0, 86400),
            gpu_state_dir=_directory("ares_gpu_state_dir",
                                     values["ares_gpu_state_dir"]),
            cuda_visible_devices=visible,
            metrics_listen=metrics_listen("ares_metrics_port",
                                          values["ares_metrics_port"]),
        )
