"""``celery -A proj ares ...``: inspect GPU topology and the inventory.

Registered as a Celery CLI plugin (entry point group ``celery.commands``),
the same way Celery's own subcommands are click commands that receive the
app through ``ctx.obj``.
"""

from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CLIContext

from .errors import AresError
from .gpu import best_placement
from .gpu.discovery import discover_topology
from .gpu.inventory import InventoryCache
from .gpu.model import HostTopology


def _ares(ctx: CLIContext):
    ares = getattr(ctx.obj.app, "ares", None)
    if ares is None:
        raise click.UsageError(
            "the app has no Ares instance: create `Ares(app)` in the module "
            "given to -A")
    return ares


def format_matrix(topo: HostTopology) -> str:
    """An ``nvidia-smi topo -m``-like matrix, with GB/s under each label."""
    indices = topo.indices
    width = max(12, *(len(topo.link(i, j).label()) + 2 for i in indices
                      for j in indices if i != j)) if len(indices) > 1 else 12
    head = " " * 8 + "".join(f"GPU{j}".ljust(width) for j in indices)
    lines = [head]
    for i in indices:
        cells = []
        for j in indices:
            if i == j:
                cells.append("X".ljust(width))
            else:
                link = topo.link(i, j)
                cells.append(f"{link.label()} {topo.bandwidth(i, j):.0f}"
                             .ljust(width))
        gpu = topo.gpu(i)
        numa = "" if gpu.numa_node is None else f"  NUMA {gpu.numa_node}"
        lines.append(f"GPU{i}".ljust(8) + "".join(cells) + numa)
    return "\n".join(lines)


@click.group(name="ares", cls=click.Group)
@click.pass_context
def ares(ctx: click.Context) -> None:
    """ares-celery: exactly-once jobs and GPU placement."""


@ares.command(cls=CeleryCommand)
@click.option("--mock", default=None,
              help="mock topology name or topo -m / JSON file "
                   "(default: $ARES_MOCK_GPUS, else NVML)")
@click.option("--host", default=None, help="host name to report")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def topology(ctx: click.Context, mock: str | None, host: str | None,
             as_json: bool) -> None:
    """This host's GPU topology and the best placement for k=1..n."""
    try:
        topo = discover_topology(mock, host)
    except AresError as exc:
        raise click.ClickException(str(exc)) from exc
    placements = []
    for k in range(1, len(topo) + 1):
        try:
            p = best_placement(topo, k)
            placements.append({"k": k, "gpus": list(p.gpus),
                               "score": p.score, "reason": p.reason})
        except AresError as exc:
            placements.append({"k": k, "error": str(exc)})
    if as_json:
        click.echo(json.dumps({"topology": json.loads(topo.to_json()),
                               "placements": placements}, indent=2,
                              default=str))
        return
    click.echo(f"host {topo.host}: {len(topo)} GPUs")
    for gpu in topo.gpus:
        mem = "?" if gpu.memory_total_mb is None else \
            f"{gpu.memory_total_mb / 1024:.0f} GiB"
        click.echo(f"  GPU{gpu.index}: {gpu.name or '?'} {mem}")
    click.echo("")
    click.echo(format_matrix(topo))
    click.echo("\nbest placement (score: ring bottleneck GB/s per direction)")
    for row in placements:
        if "error" in row:
            click.echo(f"  k={row['k']}: {row['error']}")
        else:
            click.echo(f"  k={row['k']}: GPUs {row['gpus']}  "
                       f"score {row['score']:.1f}")


@ares.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def inventory(ctx: click.Context, as_json: bool) -> None:
    """GPU hosts registered in etcd, with their free GPUs."""
    instance = _ares(ctx)
    try:
        hosts = InventoryCache(instance.services.etcd,
                               instance.services.keys).load_once().hosts()
    except AresError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [inv.to_dict() for _, inv in sorted(hosts.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no GPU hosts registered")
        return
    click.echo(f"{'host':20} {'queue':28} {'gpus':>4} {'free':>4}  free GPUs")
    for row in rows:
        click.echo(f"{row['host']:20} {row['queue']:28} {row['gpus']:>4} "
                   f"{len(row['free']):>4}  {row['free']}")
