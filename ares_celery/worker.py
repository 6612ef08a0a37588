"""Moved to :mod:`ares_celery.gpu.host_step` (the bootstep) and
:mod:`ares_celery.gpu.host` (the host state); kept for imports of the old
path."""

from .gpu.host import GpuHost
from .gpu.host_step import HOST_ENV, GpuHostStep, inventory_summary, worker_host

#: Old name of :class:`~ares_celery.gpu.host.GpuHost`.
GpuWorkerState = GpuHost

__all__ = ["HOST_ENV", "GpuHostStep", "GpuWorkerState", "inventory_summary",
           "worker_host"]
