"""What a GPU task asks for, validated when the task is decorated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import GpuRequestError

INTERCONNECTS = (None, "nvlink", "pcie", "any")


@dataclass(frozen=True)
class GpuRequest:
    """``gpus`` GPUs, each with at least ``min_memory_gb`` GB, and (for
    ``interconnect="nvlink"``) every link of the ring on NVLink."""

    gpus: int
    min_memory_gb: float | None = None
    interconnect: str | None = None

    def __post_init__(self) -> None:
        gpus = self.gpus
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise GpuRequestError(f"gpus must be an int >= 1, got {gpus!r}")
        mem = self.min_memory_gb
        if mem is not None and (isinstance(mem, bool)
                                or not isinstance(mem, (int, float))
                                or not mem > 0):
            raise GpuRequestError(
                f"min_memory_gb must be a number > 0, got {mem!r}")
        if self.interconnect not in INTERCONNECTS:
            raise GpuRequestError(
                f"interconnect must be one of None, 'nvlink', 'pcie', 'any'; "
                f"got {self.interconnect!r}")

    @property
    def shape(self) -> tuple[int, float | None, str | None]:
        """Hashable key; routes are cached per shape."""
        return (self.gpus, self.min_memory_gb, self.interconnect)

    def placement_kwargs(self) -> dict[str, Any]:
        return {"min_memory_gb": self.min_memory_gb,
                "interconnect": self.interconnect}

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "min_memory_gb": self.min_memory_gb,
                "interconnect": self.interconnect}

    def describe(self) -> str:
        parts = [f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"]
        if self.min_memory_gb:
            parts.append(f">= {self.min_memory_gb:g} GB each")
        if self.interconnect == "nvlink":
            parts.append("on an NVLink ring")
        return " ".join(parts)
