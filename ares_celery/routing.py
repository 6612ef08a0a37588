"""Moved to :mod:`ares_celery.gpu.routing`; kept for imports of the old
path."""

from .gpu.routing import ROUTE_HEADER, GpuRouter, RouteDecision

__all__ = ["ROUTE_HEADER", "GpuRouter", "RouteDecision"]
