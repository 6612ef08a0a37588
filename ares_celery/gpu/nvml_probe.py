"""Build a :class:`HostTopology` of this machine from NVML (``pynvml``).

Two things this gets right that go-gpuallocator and Slurm's NVML autodetect
do not: NVLink lanes that end at an NVSwitch are counted (two GPUs on one
NVSwitch fabric get ``min`` of their switch lanes, instead of looking
PCIe-only because no remote bus id matches a GPU), and every NVML call that
fails on an odd driver or GPU becomes an unknown (``None``) field rather than
a crash of the worker.  Only a missing or unloadable NVML raises, as
:class:`~ares_celery.errors.NvmlUnavailable`.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from ares_celery.errors import NvmlUnavailable
from ares_celery.gpu.devices import Gpu, Link
from ares_celery.gpu.mock_topologies import MOCK_TOPOLOGY_NAMES
from ares_celery.gpu.model import HostTopology

T = TypeVar("T")

#: NVML ``nvmlGpuTopologyLevel_t`` -> path level.  INTERNAL (0, two GPUs on one
#: board) is as close as a shared switch, so it maps to PIX.
NVML_TO_PCIE_LEVEL: dict[int, str] = {
    0: "PIX",
    10: "PIX",
    20: "PXB",
    30: "PHB",
    40: "NODE",
    50: "SYS",
}

#: ``nvmlDeviceGetNvLinkVersion`` value -> NVLink generation (1.0 .. 6.0).
NVML_NVLINK_VERSION_TO_GEN: dict[int, int] = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}

_DEFAULT_MAX_LINKS = 18
_SWITCH = 2  # NVML_NVLINK_DEVICE_TYPE_SWITCH
_GPU = 0  # NVML_NVLINK_DEVICE_TYPE_GPU
_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE


#: What to do on a host without GPUs: the ways a user actually selects a
#: mock topology (the worker option, the CLI option, the environment
#: variable ``discovery.MOCK_ENV``), not the Python function behind them.
NO_GPU_HINT = (
    "On a host without GPUs, pretend with a mock topology: "
    "`celery -A proj worker --ares-mock-gpus NAME`, "
    "`celery -A proj ares topology --mock NAME`, or ARES_MOCK_GPUS=NAME in "
    "the environment (NAME: one of " + ", ".join(MOCK_TOPOLOGY_NAMES)
    + ", or a saved `nvidia-smi topo -m` / JSON file)"
)


def _load_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailable(
            "the pynvml module (pip package nvidia-ml-py) is not installed; "
            f"install it on GPU hosts. {NO_GPU_HINT}"
        ) from exc


class _Nvml:
    """Calls into pynvml where any NVML error means "unknown"."""

    def __init__(self, module: ModuleType):
        self.m = module
        self.error: type[BaseException] = getattr(module, "NVMLError", Exception)

    def get(
        self, name: str, *args: Any, convert: Callable[[Any], T] | None = None
    ) -> T | Any | None:
        fn = getattr(self.m, name, None)
        if fn is None:
            return None
        try:
            value = fn(*args)
            return convert(value) if convert else value
        except (self.error, AttributeError, TypeError, ValueError, IndexError):
            return None

    def const(self, name: str, default: int) -> int:
        value = getattr(self.m, name, default)
        return value if isinstance(value, int) else default


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _bus_key(pci: Any) -> tuple[int, int, int] | None:
    """(domain, bus, device) of an nvmlPciInfo_t, tolerant of old/new layouts."""
    if pci is None:
        return None
    fields = [getattr(pci, name, None) for name in ("domain", "bus", "device")]
    if all(isinstance(f, int) for f in fields):
        return (fields[0], fields[1], fields[2])
    bus_id = getattr(pci, "busId", None) or getattr(pci, "busIdLegacy", None)
    if bus_id is None:
        return None
    try:
        domain, bus, rest = _text(bus_id).strip().split(":")
        return (int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16))
    except ValueError:
        return None


def _numa_node(nvml: _Nvml, handle: Any) -> int | None:
    """nvmlDeviceGetNumaNodeId where the driver has it, else the node-scope CPU affinity."""
    node = nvml.get("nvmlDeviceGetNumaNodeId", handle)
    if isinstance(node, int) and node >= 0:
        return node
    scope = nvml.const("NVML_AFFINITY_SCOPE_NODE", 0)
    words = nvml.get("nvmlDeviceGetCpuAffinityWithinScope", handle, 4, scope)
    if words is None:
        return None
    for word_pos, word in enumerate(list(words)):
        word = int(word)
        if word:
            return word_pos * 64 + (word & -word).bit_length() - 1
    return None


def _probe_gpu(nvml: _Nvml, index: int, handle: Any) -> Gpu:
    memory = nvml.get("nvmlDeviceGetMemoryInfo", handle)
    util = nvml.get("nvmlDeviceGetUtilizationRates", handle)
    mig = nvml.get("nvmlDeviceGetMigMode", handle)
    return Gpu(
        index=index,
        uuid=nvml.get("nvmlDeviceGetUUID", handle, convert=_text),
        name=nvml.get("nvmlDeviceGetName", handle, convert=_text),
        memory_total_mb=int(memory.total) // (1 << 20)
        if getattr(memory, "total", None) is not None
        else None,
        memory_free_mb=int(memory.free) // (1 << 20)
        if getattr(memory, "free", None) is not None
        else None,
        utilization=int(util.gpu) if getattr(util, "gpu", None) is not None else None,
        numa_node=_numa_node(nvml, handle),
        mig_mode=(int(mig[0]) == _MIG_ENABLED) if isinstance(mig, (list, tuple)) and mig else None,
        pcie_gen=nvml.get("nvmlDeviceGetMaxPcieLinkGeneration", handle, convert=int),
        pcie_width=nvml.get("nvmlDeviceGetMaxPcieLinkWidth", handle, convert=int),
    )


def _probe_nvlinks(
    nvml: _Nvml, handles: dict[int, Any], bus_to_gpu: dict[tuple[int, int, int], int]
) -> tuple[dict[tuple[int, int], int], dict[int, int], dict[int, int]]:
    """Direct lanes per GPU pair, NVSwitch lanes per GPU, NVLink generation per GPU."""
    max_links = nvml.const("NVML_NVLINK_MAX_LINKS", _DEFAULT_MAX_LINKS)
    enabled = nvml.const("NVML_FEATURE_ENABLED", 1)
    switch_type = nvml.const("NVML_NVLINK_DEVICE_TYPE_SWITCH", _SWITCH)
    gpu_type = nvml.const("NVML_NVLINK_DEVICE_TYPE_GPU", _GPU)
    direct: dict[tuple[int, int], int] = {}
    switch_lanes: dict[int, int] = {}
    generation: dict[int, int] = {}
    for index, handle in handles.items():
        for link in range(max_links):
            # NotSupported / InvalidArgument (no such link) come back as None.
            if nvml.get("nvmlDeviceGetNvLinkState", handle, link) != enabled:
                continue
            version = nvml.get("nvmlDeviceGetNvLinkVersion", handle, link)
            gen = NVML_NVLINK_VERSION_TO_GEN.get(version) if isinstance(version, int) else None
            if gen is not None:
                generation[index] = min(generation.get(index, gen), gen)
            remote_type = nvml.get("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
            if remote_type == switch_type:
                switch_lanes[index] = switch_lanes.get(index, 0) + 1
                continue
            peer = bus_to_gpu.get(
                _bus_key(nvml.get("nvmlDeviceGetNvLinkRemotePciInfo", handle, link))
            )
            if peer is not None and peer != index and remote_type in (gpu_type, None):
                direct[(index, peer)] = direct.get((index, peer), 0) + 1
    # Each side counts its own lanes; take the larger so one failing side does
    # not hide a link.
    pairs: dict[tuple[int, int], int] = {}
    for (a, b), lanes in direct.items():
        pair = (min(a, b), max(a, b))
        pairs[pair] = max(pairs.get(pair, 0), lanes)
    return pairs, switch_lanes, generation


def _pair_gen(generation: dict[int, int], a: int, b: int) -> int | None:
    known = [generation[g] for g in (a, b) if g in generation]
    return min(known) if known else None


def probe_nvml(host: str | None = None) -> HostTopology:
    """Probe this host's GPUs with NVML; ``host`` defaults to the hostname.

    Raises NvmlUnavailable when pynvml is missing or NVML cannot start (no
    driver, library not found); everything after that degrades to unknowns.
    NVML is always shut down again.
    """
    module = _load_pynvml()
    nvml = _Nvml(module)
    try:
        module.nvmlInit()
    except (nvml.error, OSError) as exc:
        raise NvmlUnavailable(
            f"NVML could not start ({type(exc).__name__}: {exc}); no NVIDIA driver on this host? "
            f"{NO_GPU_HINT}"
        ) from exc
    try:
        return _probe(nvml, host or socket.gethostname())
    finally:
        try:
            module.nvmlShutdown()
        except nvml.error:
            pass


def _probe(nvml: _Nvml, host: str) -> HostTopology:
    count = nvml.get("nvmlDeviceGetCount", convert=int) or 0
    handles: dict[int, Any] = {}
    gpus: list[Gpu] = []
    for index in range(count):
        handle = nvml.get("nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            gpus.append(Gpu(index=index))  # lost or inaccessible: known to exist, nothing more
            continue
        handles[index] = handle
        gpus.append(_probe_gpu(nvml, index, handle))

    bus_to_gpu: dict[tuple[int, int, int], int] = {}
    for index, handle in handles.items():
        key = _bus_key(nvml.get("nvmlDeviceGetPciInfo", handle))
        if key is not None:
            bus_to_gpu[key] = index

    direct, switch_lanes, generation = _probe_nvlinks(nvml, handles, bus_to_gpu)

    links: dict[tuple[int, int], Link] = {}
    indices = sorted(handles)
    for pos, a in enumerate(indices):
        for b in indices[pos + 1 :]:
            level = nvml.get("nvmlDeviceGetTopologyCommonAncestor", handles[a], handles[b])
            pcie_level = NVML_TO_PCIE_LEVEL.get(level) if isinstance(level, int) else None
            lanes = direct.get((a, b), 0)
            via_switch = min(switch_lanes.get(a, 0), switch_lanes.get(b, 0))
            if lanes or via_switch:
                links[(a, b)] = Link(
                    "nvlink",
                    nvlink_lanes=lanes + via_switch,
                    nvlink_gen=_pair_gen(generation, a, b),
                    pcie_level=pcie_level,
                    nvswitch=via_switch > 0,
                )
            else:
                links[(a, b)] = Link("pcie", pcie_level=pcie_level)
    return HostTopology(host, gpus, links)
