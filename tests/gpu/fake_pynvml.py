"""A stand-in ``pynvml`` module built from plain data, for probe tests.

Only what :mod:`ares_celery.gpu.nvml_probe` calls is modelled; a field set to
``NOT_SUPPORTED`` raises ``NVMLError_NotSupported`` like a driver would.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

NOT_SUPPORTED = object()


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's spelling
    pass


class NVMLError_InvalidArgument(NVMLError):  # noqa: N801
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801
    pass


@dataclass
class FakeLink:
    remote_bus: tuple[int, int, int] | None
    remote_type: Any = 0  # 0 GPU, 2 SWITCH
    state: Any = 1
    version: Any = 4


@dataclass
class FakeGpu:
    bus: tuple[int, int, int]
    name: str = "NVIDIA A100-SXM4-80GB"
    uuid: Any = None
    memory: Any = (80 * 1024**3, 70 * 1024**3)
    utilization: Any = 5
    numa: Any = 0
    affinity_node: Any = NOT_SUPPORTED
    mig: Any = (0, 0)
    pcie: Any = (4, 16)
    links: list[FakeLink] = field(default_factory=list)


@dataclass
class _Pci:
    domain: int
    bus: int
    device: int
    busId: bytes  # noqa: N815 - pynvml's field name


def _pci(bus: tuple[int, int, int]) -> _Pci:
    return _Pci(bus[0], bus[1], bus[2], f"{bus[0]:08X}:{bus[1]:02X}:{bus[2]:02X}.0".encode())


def build(
    gpus: list[FakeGpu],
    levels: dict[tuple[int, int], Any] | None = None,
    init_error: type[Exception] | None = None,
    missing: tuple[str, ...] = (),
) -> types.ModuleType:
    """A module object that quacks like pynvml for ``gpus``."""
    m = types.ModuleType("pynvml")
    m.calls = {"init": 0, "shutdown": 0}
    levels = levels or {}

    def value(v: Any) -> Any:
        if v is NOT_SUPPORTED:
            raise NVMLError_NotSupported("Not Supported")
        if isinstance(v, type) and issubclass(v, BaseException):
            raise v("boom")
        return v

    def init() -> None:
        m.calls["init"] += 1
        if init_error:
            raise init_error("NVML Shared Library Not Found")

    def shutdown() -> None:
        m.calls["shutdown"] += 1

    def link(h: int, n: int) -> FakeLink:
        if n >= len(gpus[h].links):
            raise NVMLError_InvalidArgument("Invalid Argument")
        return gpus[h].links[n]

    def memory(h: int) -> Any:
        total, free = value(gpus[h].memory)
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    def affinity(h: int, size: int, scope: int) -> list[int]:
        node = value(gpus[h].affinity_node)
        words = [0] * size
        words[node // 64] = 1 << (node % 64)
        return words

    def level(a: int, b: int) -> Any:
        return value(levels.get((min(a, b), max(a, b)), 30))

    functions = {
        "nvmlInit": init,
        "nvmlShutdown": shutdown,
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetUUID": lambda h: value(gpus[h].uuid) or f"GPU-fake-{h}",
        "nvmlDeviceGetName": lambda h: value(gpus[h].name),
        "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(
            gpu=value(gpus[h].utilization), memory=0
        ),
        "nvmlDeviceGetNumaNodeId": lambda h: value(gpus[h].numa),
        "nvmlDeviceGetCpuAffinityWithinScope": affinity,
        "nvmlDeviceGetMigMode": lambda h: list(value(gpus[h].mig)),
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: value(gpus[h].pcie)[0],
        "nvmlDeviceGetMaxPcieLinkWidth": lambda h: value(gpus[h].pcie)[1],
        "nvmlDeviceGetPciInfo": lambda h: _pci(gpus[h].bus),
        "nvmlDeviceGetTopologyCommonAncestor": level,
        "nvmlDeviceGetNvLinkState": lambda h, n: value(link(h, n).state),
        "nvmlDeviceGetNvLinkVersion": lambda h, n: value(link(h, n).version),
        "nvmlDeviceGetNvLinkRemoteDeviceType": lambda h, n: value(link(h, n).remote_type),
        "nvmlDeviceGetNvLinkRemotePciInfo": lambda h, n: _pci(value(link(h, n).remote_bus)),
    }
    for name, fn in functions.items():
        if name not in missing:
            setattr(m, name, fn)
    for cls in (
        NVMLError,
        NVMLError_NotSupported,
        NVMLError_InvalidArgument,
        NVMLError_LibraryNotFound,
        NVMLError_DriverNotLoaded,
    ):
        setattr(m, cls.__name__, cls)
    m.NVML_NVLINK_MAX_LINKS = 18
    m.NVML_FEATURE_ENABLED = 1
    m.NVML_NVLINK_DEVICE_TYPE_GPU = 0
    m.NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    m.NVML_AFFINITY_SCOPE_NODE = 0
    return m
