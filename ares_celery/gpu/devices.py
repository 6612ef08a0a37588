"""The two facts a topology is made of: a GPU, and the link between two GPUs.

They live below everything else in ``ares_celery.gpu`` (the bandwidth model,
the ``nvidia-smi`` reader and :class:`~ares_celery.gpu.model.HostTopology`
all build on them) so that none of those modules has to import another to
know what a GPU is.  Unknown facts are ``None``, never guessed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ares_celery.errors import GpuRequestError, TopologyParseError

#: PCIe path levels from nearest to farthest, as ``nvidia-smi topo -m`` names them.
PCIE_LEVELS: tuple[str, ...] = ("PIX", "PXB", "PHB", "NODE", "SYS")

LINK_KINDS = ("nvlink", "pcie")


def _fields(obj: Any) -> dict[str, Any]:
    """Field name -> value.  Not ``dataclasses.asdict``: every field here is a
    scalar, and asdict's deep copy made building a 16-GPU graph (which
    placement compiles from) several times slower."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@dataclass(frozen=True)
class Gpu:
    """One GPU as the scheduler needs to know it; ``None`` means unknown.

    Memory is in MiB, as NVML and ``nvidia-smi`` report it; ``utilization`` is
    a percentage; ``mig_mode`` is True when MIG is enabled (whole-GPU jobs
    cannot use such a GPU).
    """

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None
    utilization: int | None = None
    numa_node: int | None = None
    mig_mode: bool | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise GpuRequestError(f"GPU index must be a non-negative int, got {self.index!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (every field, unknowns as null)."""
        return _fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Gpu:
        """Inverse of :meth:`to_dict`; unknown keys are rejected to catch typos."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - names
        if extra:
            raise TopologyParseError(f"unknown GPU fields {sorted(extra)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class Link:
    """How two GPUs talk: bonded NVLinks, or a PCIe path of some level.

    ``kind`` is ``"nvlink"`` or ``"pcie"``.  An NVLink link has
    ``nvlink_lanes`` (the N of ``NV<N>``; None for ``NVB``, NVLink forwarded
    through another GPU, then ``via_gpu`` is True), ``nvlink_gen`` when known,
    and ``nvswitch`` True when the lanes go through an NVSwitch fabric.
    ``pcie_level`` (PIX/PXB/PHB/NODE/SYS) is the PCIe path, where known, for
    either kind.
    """

    kind: str
    nvlink_lanes: int | None = None
    nvlink_gen: int | None = None
    pcie_level: str | None = None
    nvswitch: bool = False
    via_gpu: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LINK_KINDS:
            raise TopologyParseError(f"link kind must be one of {LINK_KINDS}, got {self.kind!r}")
        if self.pcie_level is not None and self.pcie_level not in PCIE_LEVELS:
            raise TopologyParseError(
                f"PCIe level must be one of {PCIE_LEVELS}, got {self.pcie_level!r}"
            )
        if self.kind == "pcie" and (self.nvlink_lanes or self.nvswitch or self.via_gpu):
            raise TopologyParseError("a pcie link cannot carry NVLink lanes")

    @property
    def is_nvlink(self) -> bool:
        """True when traffic between the pair goes over NVLink (NVSwitch included)."""
        return self.kind == "nvlink"

    def label(self) -> str:
        """Short ``nvidia-smi``-style name: ``NV2``, ``NV12/NVSwitch``, ``NVB``, ``PIX``."""
        if self.kind == "nvlink":
            if self.via_gpu:
                return "NVB"
            text = f"NV{self.nvlink_lanes}"
            return text + "/NVSwitch" if self.nvswitch else text
        return self.pcie_level or "PCIe?"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return _fields(self)
