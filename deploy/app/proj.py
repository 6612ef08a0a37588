"""The Celery app the deployment images run: ``celery -A proj worker``.

An example project, configured entirely from the environment so that the
same image serves Compose, Kubernetes and systemd; replace the tasks (or
the whole module) with your own and keep the settings block. Secrets come
in as separate variables (``REDIS_PASSWORD``, ``ARES_ETCD_PASSWORD``) so
that they live in a Secret or an env file, never in a ConfigMap.
"""

from __future__ import annotations

import os
from urllib.parse import quote

from celery import Celery

from ares_celery import Ares


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, default)
    return value if value not in ("", None) else None


def broker_url() -> str:
    """``ARES_BROKER_URL`` with ``REDIS_PASSWORD`` put in (URL-encoded, so
    any character is safe in the password)."""
    url = _env("ARES_BROKER_URL", "redis://redis:6379/0")
    password = _env("REDIS_PASSWORD")
    if password and "@" not in url:
        scheme, rest = url.split("://", 1)
        user = quote(_env("REDIS_USER") or "", safe="")
        url = f"{scheme}://{user}:{quote(password, safe='')}@{rest}"
    return url


app = Celery("proj", broker=broker_url())
app.conf.update(
    ares_etcd_endpoints=_env("ARES_ETCD_ENDPOINTS", "etcd:2379"),
    ares_etcd_user=_env("ARES_ETCD_USER"),
    ares_etcd_password=_env("ARES_ETCD_PASSWORD"),
    ares_etcd_ca_cert=_env("ARES_ETCD_CA_CERT"),
    ares_etcd_cert=_env("ARES_ETCD_CERT"),
    ares_etcd_key=_env("ARES_ETCD_KEY"),
    ares_lease_ttl=int(_env("ARES_LEASE_TTL", "30")),
    ares_namespace=_env("ARES_NAMESPACE", "ares"),
    ares_metrics_port=_env("ARES_METRICS_PORT"),
    ares_gpu_state_dir=_env("ARES_GPU_STATE_DIR"),
    # Above the lease TTL (Ares warns otherwise) and above the longest job.
    broker_transport_options={
        "visibility_timeout": int(_env("ARES_VISIBILITY_TIMEOUT", "3600")),
        # kombu holds its unacked-restore mutex this long after a crashed
        # holder (default 300 s): no redelivery happens meanwhile.
        "unacked_mutex_expire": 30},
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,     # Flower shows ares fields live
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
)
ares = Ares(app)


@ares.task(name="proj.ping")
def ping(payload: str = "pong") -> dict:
    """An exactly-once no-GPU task: proves Redis, etcd and a worker work."""
    ctx = ares.current()
    return {"payload": payload, "job_id": ctx.job_id,
            "fencing_token": ctx.fencing_token}


@ares.gpu_task(name="proj.train", gpus=2, interconnect="nvlink")
def train(config: dict) -> dict:
    """A GPU task: routed to the host whose free GPUs are best linked."""
    ctx = ares.current()
    return {"host": ctx.host, "gpus": ctx.gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "config": config}
