"""Which topology does *this* host have: a named mock, a file, or NVML."""

from __future__ import annotations

import os
import socket

from .mock_topologies import load_topology
from .model import HostTopology
from .nvml_probe import probe_nvml

MOCK_ENV = "ARES_MOCK_GPUS"


def discover_topology(mock: str | None = None,
                      host: str | None = None) -> HostTopology:
    """The local GPU topology.

    A mock (argument, else ``$ARES_MOCK_GPUS``) names a built-in topology or
    a ``topo -m``/JSON file and wins over NVML, so hosts without GPUs can
    play a GPU host in tests and demos. Without one, NVML is probed and
    :class:`~ares_celery.errors.NvmlUnavailable` says why it cannot be.
    """
    host = host or socket.gethostname()
    mock = mock or os.environ.get(MOCK_ENV) or None
    if mock:
        return load_topology(mock, host=host)
    return probe_nvml(host=host)
