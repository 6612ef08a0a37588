"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from ares_celery.gpu.allocation import HostGpuLedger
from ares_celery.gpu.mock_topologies import mock_topology
from ares_celery.gpu.policies import POLICIES


@pytest.fixture()
def ledger(tmp_path):
    """A fresh GPU ledger of a mock 8-GPU host ``h1`` (a real file)."""
    topo = mock_topology("dgx-a100", host="h1")
    book = HostGpuLedger(tmp_path / "ledger.json", topo, POLICIES)
    book.reset(host="h1", queue="q", worker="w", lease=0)
    return book
