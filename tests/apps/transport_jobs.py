"""A test app whose one task reports how its process reaches etcd.

Run by a real prefork worker (``-A tests.apps.transport_jobs``) to show
that pool children use gRPC for the job's lock Txn while the main process,
which forks them, never loads gRPC at all.
"""

from __future__ import annotations

import os

from tests.apps.config import make_app

app, ares = make_app("transport_jobs")


@ares.task(name="transport_jobs.etcd_transport")
def etcd_transport() -> dict:
    """This process's etcd transport, and how many calls went over gRPC
    (the job's own lock Txn among them: it ran before this body)."""
    etcd = ares.services.etcd
    return {"pid": os.getpid(), "transport": etcd.transport,
            "grpc_calls": getattr(etcd, "grpc_calls", 0)}
