"""The GPU topology of one host: GPUs, the link between every pair, bandwidths.

One model serves three sources (NVML, ``nvidia-smi topo -m`` text, named mock
hosts) so that placement, routing and the inventory published to etcd never
care where a topology came from.  Unknown facts are ``None``, never guessed,
so a probe on an odd driver still yields a usable (if conservative) model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import networkx as nx

from ares_celery.errors import GpuRequestError, TopologyParseError
from ares_celery.gpu.bandwidth import link_gbps
from ares_celery.gpu.devices import LINK_KINDS, PCIE_LEVELS, Gpu, Link
from ares_celery.gpu.smi_parser import read_topo_matrix

# Gpu, Link and the level names live in devices.py (below the bandwidth model and
# the parser); they are re-exported here, where callers have always found them.
__all__ = [
    "JSON_FORMAT",
    "LINK_KINDS",
    "PCIE_LEVELS",
    "Gpu",
    "HostTopology",
    "Link",
    "parse_topo_matrix",
]

JSON_FORMAT = "ares-gpu-topology/1"


def _pair(i: int, j: int) -> tuple[int, int]:
    return (i, j) if i < j else (j, i)


class HostTopology:
    """GPUs of one host and the link between every pair of them.

    Immutable: a worker that wants to record new free memory builds a new one
    with :meth:`replace_gpu`.  Pairs missing from ``links`` get an unknown
    PCIe link (treated as the slowest path) so the model is always complete.
    """

    def __init__(self, host: str, gpus: Iterable[Gpu], links: Mapping[tuple[int, int], Link]):
        self._host = str(host)
        ordered = tuple(sorted(gpus, key=lambda g: g.index))
        indices = [g.index for g in ordered]
        if len(set(indices)) != len(indices):
            raise TopologyParseError(f"host {host}: duplicate GPU indices in {indices}")
        self._gpus = ordered
        self._by_index = {g.index: g for g in ordered}
        complete: dict[tuple[int, int], Link] = {}
        for (i, j), link in links.items():
            if i == j or i not in self._by_index or j not in self._by_index:
                raise TopologyParseError(
                    f"host {host}: link ({i}, {j}) does not join two known GPUs"
                )
            complete[_pair(i, j)] = link
        for a_pos, a in enumerate(indices):
            for b in indices[a_pos + 1 :]:
                complete.setdefault((a, b), Link("pcie"))
        self._links = dict(sorted(complete.items()))
        self._bandwidth = {
            pair: link_gbps(link, self._by_index[pair[0]], self._by_index[pair[1]])
            for pair, link in self._links.items()
        }
        self._fingerprint: str | None = None

    # -- accessors -----------------------------------------------------------------

    @property
    def host(self) -> str:
        """Host name (the worker's queue is derived from it)."""
        return self._host

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        """GPUs sorted by index."""
        return self._gpus

    @property
    def indices(self) -> tuple[int, ...]:
        """GPU indices, sorted."""
        return tuple(self._by_index)

    def __len__(self) -> int:
        return len(self._gpus)

    def __iter__(self) -> Iterator[Gpu]:
        return iter(self._gpus)

    def gpu(self, index: int) -> Gpu:
        """The GPU with ``index``; GpuRequestError if there is none."""
        try:
            return self._by_index[index]
        except (KeyError, TypeError):
            raise GpuRequestError(
                f"host {self._host} has no GPU {index!r} (GPUs: {list(self._by_index)})"
            ) from None

    def link(self, i: int, j: int) -> Link:
        """The link between GPUs ``i`` and ``j``."""
        self.gpu(i)
        self.gpu(j)
        if i == j:
            raise GpuRequestError(f"GPU {i} has no link to itself")
        return self._links[_pair(i, j)]

    @property
    def links(self) -> dict[tuple[int, int], Link]:
        """Every pair ``(i, j)`` with ``i < j`` and its link (a copy)."""
        return dict(self._links)

    def bandwidth(self, i: int, j: int) -> float:
        """Estimated GB/s per direction between GPUs ``i`` and ``j``."""
        self.link(i, j)
        return self._bandwidth[_pair(i, j)]

    @property
    def graph(self) -> nx.Graph:
        """A fresh networkx graph: GPUs as nodes (Gpu fields as attributes),
        one edge per pair with ``bandwidth`` (GB/s), ``label`` and the Link
        fields.  Built on each access so callers may mutate it freely.

        This is what placement reads (the ring-bandwidth policy compiles its
        bandwidth matrix from it), so a policy sees the host exactly as any
        other graph consumer does.
        """
        g = nx.Graph(host=self._host)
        g.add_nodes_from((gpu.index, gpu.to_dict()) for gpu in self._gpus)
        g.add_edges_from(
            (i, j, {"bandwidth": self._bandwidth[(i, j)], "label": link.label(), **link.to_dict()})
            for (i, j), link in self._links.items()
        )
        return g

    def replace_gpu(self, index: int, **changes: Any) -> HostTopology:
        """A copy with GPU ``index``'s fields changed (e.g. ``memory_free_mb``)."""
        new = dataclasses.replace(self.gpu(index), **changes)
        gpus = [new if g.index == index else g for g in self._gpus]
        return HostTopology(self._host, gpus, self._links)

    def with_host(self, host: str) -> HostTopology:
        """The same hardware under another host name."""
        return HostTopology(host, self._gpus, self._links)

    # -- identity --------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Deterministic digest of what placement depends on.

        Covers GPU indices, total memory, NUMA node, MIG mode, PCIe gen/width
        and every link; leaves out the host name, UUIDs, names and the volatile
        fields (free memory, utilization), so that identical machines share
        memoized placements and a utilization tick does not flush the cache.
        """
        if self._fingerprint is None:
            static = {
                "gpus": [
                    [g.index, g.memory_total_mb, g.numa_node, g.mig_mode, g.pcie_gen, g.pcie_width]
                    for g in self._gpus
                ],
                "links": [
                    [i, j, *dataclasses.astuple(link)] for (i, j), link in self._links.items()
                ],
            }
            blob = json.dumps(static, sort_keys=True, separators=(",", ":"))
            self._fingerprint = "topo1-" + hashlib.sha256(blob.encode()).hexdigest()[:24]
        return self._fingerprint

    # -- serialization ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, lossless (see :meth:`from_dict`)."""
        return {
            "format": JSON_FORMAT,
            "host": self._host,
            "gpus": [g.to_dict() for g in self._gpus],
            "links": [{"a": i, "b": j, **link.to_dict()} for (i, j), link in self._links.items()],
        }

    def to_json(self, indent: int | None = None) -> str:
        """JSON text (keys sorted, so equal topologies give equal text)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostTopology:
        """Inverse of :meth:`to_dict`; TopologyParseError on malformed input."""
        if not isinstance(data, Mapping) or data.get("format") != JSON_FORMAT:
            raise TopologyParseError(f"not an {JSON_FORMAT} document")
        try:
            gpus = [Gpu.from_dict(g) for g in data["gpus"]]
            links = {}
            for entry in data["links"]:
                entry = dict(entry)
                a, b = entry.pop("a"), entry.pop("b")
                links[(a, b)] = Link(**entry)
            return cls(data["host"], gpus, links)
        except (KeyError, TypeError, GpuRequestError) as exc:
            raise TopologyParseError(f"malformed topology JSON: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str) -> HostTopology:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TopologyParseError(f"topology JSON does not parse: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_nvidia_smi(cls, text: str, host: str = "localhost") -> HostTopology:
        """Read ``nvidia-smi topo -m`` output (see :mod:`ares_celery.gpu.smi_parser`)."""
        gpus, links = read_topo_matrix(text)
        return cls(host, gpus, links)

    # -- comparison ------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostTopology):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self._host, self.fingerprint()))

    def __repr__(self) -> str:
        return (
            f"HostTopology(host={self._host!r}, gpus={len(self._gpus)}, "
            f"fingerprint={self.fingerprint()!r})"
        )


def parse_topo_matrix(text: str, host: str = "localhost") -> HostTopology:
    """Parse ``nvidia-smi topo -m`` output into a topology for ``host``.

    The function form of :meth:`HostTopology.from_nvidia_smi`; it lives here,
    not in the parser, because the parser sits below the model and must not
    know it (see :func:`~ares_celery.gpu.smi_parser.read_topo_matrix` for what
    is accepted and inferred).
    """
    return HostTopology.from_nvidia_smi(text, host=host)
