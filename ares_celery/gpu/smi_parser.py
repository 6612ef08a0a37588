"""Read ``nvidia-smi topo -m`` text into GPUs and the links between them.

Why a parser when NVML exists: operators paste this matrix into bug reports
and runbooks, mock hosts are written in it, and a host whose NVML bindings
misbehave can still be described by the one command every driver ships.

Accepted: cells ``X``, ``NV<n>``, ``NVB``, ``PIX``, ``PXB``, ``PHB``, ``NODE``,
``SYS`` and the pre-2018 ``SOC`` (read as SYS, the conservative choice); NIC
columns and rows (``NIC0`` or ``mlx5_0`` style), the ``CPU Affinity``, ``NUMA
Affinity`` and ``GPU NUMA ID`` columns; tabs or spaces; a shell prompt before
the matrix and legend text after it.  Anything else raises
:class:`~ares_celery.errors.TopologyParseError` naming the line.

The reader returns plain GPUs and links, not a
:class:`~ares_celery.gpu.model.HostTopology`: the model is built *from* this
module (``HostTopology.from_nvidia_smi``), so this module may not know it.
"""

from __future__ import annotations

import re

from ares_celery.errors import TopologyParseError
from ares_celery.gpu.devices import Gpu, Link

#: Header columns after the device columns, in the order nvidia-smi prints them.
EXTRA_COLUMNS: tuple[str, ...] = ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")

_GPU_LABEL = re.compile(r"^GPU(\d+)$")
_NV_CELL = re.compile(r"^NV(\d+)$")
_PCIE_CELLS = {"PIX": "PIX", "PXB": "PXB", "PHB": "PHB", "NODE": "NODE", "SYS": "SYS", "SOC": "SYS"}

#: Most NVLinks one GPU has ever had (H100/B200: 18).  A clique of GPUs whose
#: pairwise lanes add up to more than this per GPU cannot be direct links, so
#: it must be an NVSwitch fabric (DGX A100: NV12 to 7 peers = 84 lanes).
MAX_DIRECT_NVLINKS_PER_GPU = 18


def _error(line_no: int, line: str, why: str) -> TopologyParseError:
    return TopologyParseError(f"line {line_no}: {why}: {line.strip()!r}")


def _split_header(line: str) -> tuple[list[str], list[str]]:
    """Device column names and the extra (multi-word) column names."""
    tokens = line.split()
    devices: list[str] = []
    extras: list[str] = []
    pos = 0
    while pos < len(tokens):
        for extra in EXTRA_COLUMNS:
            words = extra.split()
            if tokens[pos : pos + len(words)] == words:
                extras.append(extra)
                pos += len(words)
                break
        else:
            if extras:
                raise ValueError(f"column {tokens[pos]!r} after {extras[-1]!r}")
            devices.append(tokens[pos])
            pos += 1
    return devices, extras


def _find_header(lines: list[str]) -> int:
    for pos, line in enumerate(lines):
        tokens = line.split()
        if tokens and tokens[0] == "GPU0":
            # A header starts with GPU0; a row starts with its label and has an X.
            if "X" not in tokens:
                return pos
    first = next(
        (f"line {p + 1}: {ln.strip()!r}" for p, ln in enumerate(lines) if ln.strip()), "empty input"
    )
    raise TopologyParseError(
        f"no nvidia-smi topo -m header (a line starting with GPU0) found; {first}"
    )


def _parse_numa(value: str | None) -> int | None:
    if value is None:
        return None
    head = value.split(",")[0].split("-")[0]
    return int(head) if head.isdigit() else None


def read_topo_matrix(text: str) -> tuple[list[Gpu], dict[tuple[int, int], Link]]:
    """The GPUs and the link of every GPU pair in ``nvidia-smi topo -m`` output.

    NUMA nodes come from the ``NUMA Affinity`` column; old drivers print only
    ``CPU Affinity``, and then GPUs with the same CPU set are numbered as one
    node in order of appearance (an inference, documented as such).  NVLink
    generation is unknown in this text, so NVLink bandwidth uses the 25 GB/s
    per lane of V100/A100/H100.
    """
    lines = text.expandtabs(8).splitlines()
    header_pos = _find_header(lines)
    try:
        devices, extras = _split_header(lines[header_pos])
    except ValueError as exc:
        raise _error(header_pos + 1, lines[header_pos], f"bad header ({exc})") from None
    if len(set(devices)) != len(devices):
        raise _error(header_pos + 1, lines[header_pos], "duplicate column names")
    gpu_columns = [d for d in devices if _GPU_LABEL.match(d)]
    if not gpu_columns:
        raise _error(header_pos + 1, lines[header_pos], "no GPU columns")

    cells: dict[str, list[str]] = {}
    row_line: dict[str, int] = {}
    extra_values: dict[str, dict[str, str]] = {}
    for pos in range(header_pos + 1, len(lines)):
        line = lines[pos]
        tokens = line.split()
        if not tokens:
            if cells:
                break
            continue
        label = tokens[0]
        if label not in devices:
            if label.rstrip(":") in ("Legend", "NIC") or len(cells) == len(devices):
                break
            raise _error(pos + 1, line, f"row label {label!r} is not a column of the header")
        if label in cells:
            raise _error(pos + 1, line, f"second row for {label}")
        row = tokens[1 : 1 + len(devices)]
        if len(row) < len(devices):
            raise _error(pos + 1, line, f"expected {len(devices)} cells, found {len(row)}")
        rest = tokens[1 + len(devices) :]
        if len(rest) > len(extras):
            raise _error(pos + 1, line, f"{len(rest) - len(extras)} unexpected trailing field(s)")
        for col, cell in zip(devices, row, strict=True):
            if (col == label) != (cell == "X"):
                raise _error(
                    pos + 1, line, f"cell {cell!r} in column {col}: X belongs on the diagonal only"
                )
            if (
                cell != "X"
                and cell != "NVB"
                and not _NV_CELL.match(cell)
                and cell not in _PCIE_CELLS
            ):
                raise _error(pos + 1, line, f"unknown cell {cell!r} in column {col}")
        cells[label] = row
        row_line[label] = pos + 1
        extra_values[label] = dict(zip(extras[: len(rest)], rest, strict=True))

    missing = [g for g in gpu_columns if g not in cells]
    if missing:
        raise TopologyParseError(
            f"no matrix row for {', '.join(missing)} (header on line {header_pos + 1})"
        )

    col_pos = {d: p for p, d in enumerate(devices)}
    links: dict[tuple[int, int], Link] = {}
    for a_pos, a in enumerate(gpu_columns):
        for b in gpu_columns[a_pos + 1 :]:
            forward, backward = cells[a][col_pos[b]], cells[b][col_pos[a]]
            if forward != backward:
                raise TopologyParseError(
                    f"line {row_line[a]}: {a}->{b} is {forward} but line {row_line[b]}: "
                    f"{b}->{a} is {backward}; the matrix must be symmetric"
                )
            links[(int(a[3:]), int(b[3:]))] = _cell_link(forward)
    links = _mark_nvswitch(links)

    affinity_nodes: dict[str, int] = {}
    gpus = []
    for label in gpu_columns:
        extra = extra_values[label]
        numa = _parse_numa(extra.get("NUMA Affinity"))
        if "NUMA Affinity" not in extra and extra.get("CPU Affinity") not in (None, "N/A"):
            numa = affinity_nodes.setdefault(extra["CPU Affinity"], len(affinity_nodes))
        gpus.append(Gpu(index=int(label[3:]), numa_node=numa))
    return gpus, links


def _cell_link(cell: str) -> Link:
    match = _NV_CELL.match(cell)
    if match:
        return Link("nvlink", nvlink_lanes=int(match.group(1)))
    if cell == "NVB":
        return Link("nvlink", via_gpu=True)
    return Link("pcie", pcie_level=_PCIE_CELLS[cell])


def _mark_nvswitch(links: dict[tuple[int, int], Link]) -> dict[tuple[int, int], Link]:
    """Flag NVLink cliques too dense for direct links as NVSwitch fabrics."""
    lanes_per_gpu: dict[int, int] = {}
    for (i, j), link in links.items():
        if link.nvlink_lanes:
            lanes_per_gpu[i] = lanes_per_gpu.get(i, 0) + link.nvlink_lanes
            lanes_per_gpu[j] = lanes_per_gpu.get(j, 0) + link.nvlink_lanes
    switched = {g for g, lanes in lanes_per_gpu.items() if lanes > MAX_DIRECT_NVLINKS_PER_GPU}
    return {
        pair: Link("nvlink", nvlink_lanes=link.nvlink_lanes, nvswitch=True)
        if link.nvlink_lanes and pair[0] in switched and pair[1] in switched
        else link
        for pair, link in links.items()
    }
