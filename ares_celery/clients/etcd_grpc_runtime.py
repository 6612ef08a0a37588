"""``grpc`` and etcd's generated stubs, imported the way this package needs.

gRPC's fork support (``GRPC_ENABLE_FORK_SUPPORT``, on in current grpcio)
installs ``pthread_atfork`` handlers that try to keep channels usable
across ``fork``. This package never uses a channel across a fork (only
pool children, which do not fork, open them; a process forked from one
uses HTTP), and those handlers are what breaks a fork with a channel open:
measured here, 2 to 4 in 40 ``subprocess`` calls with a ``preexec_fn``
from a process with an open channel died with SIGSEGV, 0 in 150 with the
support off. So it is switched off before ``grpc`` is first imported,
unless the environment already says otherwise.

Import this module only in a process that may hold channels (see
:mod:`ares_celery.clients.etcd_grpc`).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402 - after the fork-support switch above
from etcd3.etcdrpc import kv_pb2, rpc_pb2, rpc_pb2_grpc  # noqa: E402

__all__ = ["grpc", "kv_pb2", "rpc_pb2", "rpc_pb2_grpc"]
