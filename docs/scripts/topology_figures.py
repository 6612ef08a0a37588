"""Draw the mock GPU topologies and tabulate their placements for the docs.

Every picture and number on the GPU topology page comes from the code
itself (``mock_topology`` and ``best_placement``), so the docs cannot drift
from what the router and the worker really do: ``tests/docs`` regenerates
them and fails if the committed files differ.

    .venv/bin/python docs/scripts/topology_figures.py          # rewrite them
    .venv/bin/python docs/scripts/topology_figures.py --check  # exit 1 if stale

No plotting library is needed: the SVG is written by hand, GPUs on a
circle (no chord passes through another GPU), coloured by NUMA node.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from ares_celery.gpu import HostTopology, Placement, best_placement, mock_topology

DOCS = Path(__file__).resolve().parent.parent
NAMES = ("dgx1-v100", "dgx-a100", "pcie-8x-2socket", "pcie-4x-2switch")
#: One busy-GPU scenario per host, to show how the choice moves.
BUSY = {"dgx1-v100": (3,), "dgx-a100": (0, 2), "pcie-8x-2socket": (0,),
        "pcie-4x-2switch": (0,)}

WIDTH, TOP, RADIUS, NODE_R = 560, 78, 140, 27
NUMA_FILL = ("#dbe9ff", "#ffe3cc", "#dcf5dc", "#f3dcf5", "#fff6c2", "#d9f2f2",
             "#f5d9d9", "#e6e6e6")
DASH = {"PIX": "", "PXB": "8 3", "PHB": "5 4", "NODE": "2 4", "SYS": "1 5"}


def fmt_gbps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def pairs(topo: HostTopology) -> list[tuple[int, int]]:
    return [(i, j) for i in topo.indices for j in topo.indices if i < j]


def link_classes(topo: HostTopology) -> dict[str, float]:
    """Each link label (``NV2``, ``PIX``...) and its GB/s, fastest first."""
    classes = {topo.link(i, j).label(): topo.bandwidth(i, j) for i, j in pairs(topo)}
    return dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0])))


def edge_style(label: str, gbps: float, fastest: float, slowest: float) -> str:
    span = fastest - slowest
    width = 2.0 if span <= 0 else 1.5 + 4.5 * (gbps - slowest) / span
    colour = "#1b7f3b" if label.startswith("NV") else "#2f5fd0"
    dash = DASH.get(label, "")
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return f'stroke="{colour}" stroke-width="{width:.1f}"{dash_attr}'


def draw(topo: HostTopology, name: str, placement: Placement) -> str:
    """An SVG of ``topo``: GPUs, links by class, ``placement`` highlighted."""
    n = len(topo.gpus)
    cx, cy = WIDTH / 2, TOP + RADIUS + NODE_R + 10
    pos = {g.index: (cx + RADIUS * math.sin(2 * math.pi * k / n),
                     cy - RADIUS * math.cos(2 * math.pi * k / n))
           for k, g in enumerate(topo.gpus)}
    classes = link_classes(topo)
    switch = all(topo.link(i, j).nvswitch for i, j in pairs(topo))
    omitted = {}
    if len(classes) > 1 and not switch:
        weakest = min(classes.values())
        omitted = {label: bw for label, bw in classes.items() if bw == weakest}
    drawn = {label: bw for label, bw in classes.items() if label not in omitted}
    fastest, slowest = max(drawn.values()), min(drawn.values())
    legend_rows = len(drawn) + bool(omitted) + 1
    height = int(cy + RADIUS + NODE_R + 24 + 22 * legend_rows)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
           f'height="{height}" viewBox="0 0 {WIDTH} {height}" '
           'font-family="sans-serif" font-size="13">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="16" y="26" font-size="17" font-weight="bold">'
           f'{escape(name)}: {n}x {escape(topo.gpus[0].name or "GPU")}</text>',
           f'<text x="16" y="48">best {len(placement.gpus)} GPUs: '
           f'{list(placement.gpus)}, ring {"-".join(map(str, placement.ring))}'
           f'-{placement.ring[0]}, bottleneck {fmt_gbps(placement.score)} GB/s'
           '</text>']
    ring = placement.ring
    ring_edges = {frozenset((ring[k], ring[(k + 1) % len(ring)]))
                  for k in range(len(ring))} if len(ring) > 1 else set()
    if switch:
        label, bw = next(iter(classes.items()))
        for i, (x, y) in pos.items():
            if i in placement.gpus:
                out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{cx:.1f}" '
                           f'y2="{cy:.1f}" stroke="#ff9800" stroke-width="12" '
                           'stroke-opacity="0.45"/>')
            out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{cx:.1f}" '
                       f'y2="{cy:.1f}" {edge_style(label, bw, bw, bw)}/>')
        out.append(f'<rect x="{cx - 48:.1f}" y="{cy - 16:.1f}" width="96" '
                   'height="32" rx="6" fill="#eef7ee" stroke="#1b7f3b"/>')
        out.append(f'<text x="{cx:.1f}" y="{cy + 5:.1f}" text-anchor="middle">'
                   'NVSwitch</text>')
    else:
        for edge in sorted(ring_edges, key=sorted):
            (x1, y1), (x2, y2) = (pos[i] for i in sorted(edge))
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
                       f'y2="{y2:.1f}" stroke="#ff9800" stroke-width="12" '
                       'stroke-opacity="0.45"/>')
        for i, j in pairs(topo):
            label = topo.link(i, j).label()
            if label not in omitted:
                (x1, y1), (x2, y2) = pos[i], pos[j]
                style = edge_style(label, topo.bandwidth(i, j), fastest, slowest)
                out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
                           f'y2="{y2:.1f}" {style}/>')
    for gpu in topo.gpus:
        x, y = pos[gpu.index]
        fill = NUMA_FILL[(gpu.numa_node or 0) % len(NUMA_FILL)]
        chosen = gpu.index in placement.gpus
        stroke = 'stroke="#e65100" stroke-width="4"' if chosen \
            else 'stroke="#333" stroke-width="1.5"'
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{NODE_R}" '
                   f'fill="{fill}" {stroke}/>')
        out.append(f'<text x="{x:.1f}" y="{y - 1:.1f}" text-anchor="middle" '
                   f'font-weight="bold">GPU{gpu.index}</text>')
        out.append(f'<text x="{x:.1f}" y="{y + 13:.1f}" text-anchor="middle" '
                   f'font-size="10">NUMA {gpu.numa_node}</text>')
    y = cy + RADIUS + NODE_R + 30
    for label, bw in drawn.items():
        style = edge_style(label, bw, fastest, slowest)
        out.append(f'<line x1="20" y1="{y - 4:.1f}" x2="70" y2="{y - 4:.1f}" {style}/>')
        out.append(f'<text x="80" y="{y:.1f}">{escape(label)}: {fmt_gbps(bw)} GB/s '
                   'per direction</text>')
        y += 22
    if omitted:
        text = ", ".join(f"{label} {fmt_gbps(bw)} GB/s" for label, bw in omitted.items())
        out.append(f'<text x="20" y="{y:.1f}">not drawn (every other pair): '
                   f'{escape(text)}</text>')
        y += 22
    out.append(f'<line x1="20" y1="{y - 4:.1f}" x2="70" y2="{y - 4:.1f}" '
               'stroke="#ff9800" stroke-width="12" stroke-opacity="0.45"/>')
    out.append(f'<text x="80" y="{y:.1f}">chosen GPUs and their ring; fill colour '
               '= NUMA node</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def placement_table(topo: HostTopology, name: str) -> str:
    """Markdown: the best placement for each k, all free and with some busy."""
    n = len(topo.gpus)
    sizes = [k for k in (1, 2, 3, 4, 8, 16) if k <= n]
    busy = BUSY[name]
    free = [i for i in topo.indices if i not in busy]
    rows = ["| free GPUs | k | chosen GPUs | best ring | score GB/s | "
            "leftover GB/s |", "|---|---|---|---|---|---|"]
    for label, free_set in (("all", None), (f"all but {list(busy)}", free)):
        for k in sizes:
            if k > (n if free_set is None else len(free_set)):
                continue
            p = best_placement(topo, k, free=free_set)
            ring = "-".join(map(str, p.ring)) + (f"-{p.ring[0]}" if k > 1 else "")
            leftover = "" if p.leftover_score is None else fmt_gbps(p.leftover_score)
            rows.append(f"| {label} | {k} | {list(p.gpus)} | {ring} | "
                        f"{fmt_gbps(p.score)} | {leftover} |")
    return "\n".join(rows) + "\n"


def render_all() -> dict[Path, str]:
    """Every generated file, by path, as it should be committed."""
    files: dict[Path, str] = {}
    for name in NAMES:
        topo = mock_topology(name, host=name)
        half = best_placement(topo, len(topo.gpus) // 2)
        files[DOCS / "img" / f"topology-{name}.svg"] = draw(topo, name, half)
        files[DOCS / "generated" / f"placement-{name}.md"] = placement_table(topo, name)
    return files


def stale_files() -> list[Path]:
    return [path for path, text in render_all().items()
            if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(DOCS.parent)}")
        return 1 if stale else 0
    for path, text in render_all().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
