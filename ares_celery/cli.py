"""``celery -A proj ares ...``: inspect GPU topology and the inventory.

Registered as a Celery CLI plugin (entry point group ``celery.commands``),
the same way Celery's own subcommands are click commands that receive the
app through ``ctx.obj``.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import click
from celery.bin.base import CeleryCommand, CLIContext

from .clients.redis import redact_url, unavailable_as_ares_error
from .errors import AresError
from .exactly_once.identity import job_id_for, validate_request_id
from .gpu.discovery import discover_topology
from .gpu.inventory import InventoryCache
from .gpu.model import HostTopology
from .gpu.policies import DEFAULT_POLICY, POLICIES
from .gpu.request import GpuRequest
from .job_view import read_job


def _ares(ctx: CLIContext):
    ares = getattr(ctx.obj.app, "ares", None)
    if ares is None:
        raise click.UsageError(
            "the app has no Ares instance: create `Ares(app)` in the module "
            "given to -A")
    return ares


#: Spaces between matrix columns, whatever the widest label.
MATRIX_GAP = 2


def format_matrix(topo: HostTopology) -> str:
    """An ``nvidia-smi topo -m``-like matrix, each link's label followed by
    its GB/s (``NV12/NVSwitch 300``), then each GPU's NUMA node.

    Every column is as wide as the widest cell anywhere in the matrix plus
    :data:`MATRIX_GAP`, so labels of any length never run into the next
    column and the columns line up under their headers.
    """
    indices = topo.indices
    cells = {(i, j): "X" if i == j else
             f"{topo.link(i, j).label()} {topo.bandwidth(i, j):.0f}"
             for i in indices for j in indices}
    heads = [f"GPU{j}" for j in indices]
    width = max(len(text) for text in [*cells.values(), *heads]) + MATRIX_GAP
    first = max(len(head) for head in heads) + MATRIX_GAP
    numa = {i: topo.gpu(i).numa_node for i in indices}
    tail = "NUMA" if any(n is not None for n in numa.values()) else ""
    lines = [(" " * first + "".join(h.ljust(width) for h in heads)
              + tail).rstrip()]
    for i in indices:
        row = f"GPU{i}".ljust(first) + "".join(
            cells[i, j].ljust(width) for j in indices)
        if tail:
            row += "-" if numa[i] is None else str(numa[i])
        lines.append(row.rstrip())
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
@click.option("--policy", default=DEFAULT_POLICY,
              type=click.Choice(sorted(POLICIES)),
              help="placement policy to show placements of")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def topology(ctx: click.Context, mock: str | None, host: str | None,
             policy: str, as_json: bool) -> None:
    """This host's GPU topology and the best placement for k=1..n."""
    try:
        topo = discover_topology(mock, host)
    except AresError as exc:
        raise click.ClickException(str(exc)) from exc
    placements = []
    for k in range(1, len(topo) + 1):
        try:
            p = POLICIES[policy].place(topo, GpuRequest(k, policy=policy))
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
    click.echo("\nlinks (type, then estimated GB/s per direction)")
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


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _job_id(instance, ref: str) -> tuple[str, str | None]:
    """``ref`` is a job id (a UUID) or a request id."""
    try:
        return str(uuid.UUID(ref)), None
    except ValueError:
        try:
            rid = validate_request_id(ref)
        except AresError as exc:
            raise _fail(exc) from exc
        return job_id_for(instance.settings.namespace, rid), rid


@ares.command(cls=CeleryCommand)
@click.pass_context
def status(ctx: click.Context) -> None:
    """Are etcd and Redis reachable; hosts, free GPUs, locks, fenced commits."""
    instance = _ares(ctx)
    services, settings = instance.services, instance.settings
    try:
        info = services.etcd.status()
        click.echo(f"etcd   {settings.etcd_address}: ok (version "
                   f"{info.get('version', '?')}, revision "
                   f"{info.get('header', {}).get('revision', '?')})")
        with unavailable_as_ares_error(settings.redis_url):
            version = services.redis.info("server").get("redis_version", "?")
            click.echo(f"redis  {redact_url(settings.redis_url)}: ok "
                       f"(version {version})")
            keys = services.keys
            locks = services.etcd.count_prefix(keys.lock_prefix())
            hosts = InventoryCache(services.etcd, keys).load_once().hosts()
            free = sum(len(h.free) for h in hosts.values())
            total = sum(len(h.topology) for h in hosts.values())
            fenced = services.redis.xlen(keys.fenced_log())
    except AresError as exc:
        raise _fail(exc) from exc
    click.echo(f"hosts  {len(hosts)} GPU host(s), {free}/{total} GPUs free")
    click.echo(f"locks  {locks} job lock(s) held")
    click.echo(f"fenced {fenced} rejected (zombie) commit(s) recorded")


def _read_lock(services, job_id: str):
    """The job's lock key-value, its holder, and its lease's TTL (-1: the
    lease is gone, or the lock has none)."""
    lock = services.etcd.get(services.keys.lock(job_id))
    if lock is None:
        return None, {}, -1
    holder = json.loads(lock.value or b"{}")
    ttl = services.etcd.lease_ttl(lock.lease) if lock.lease else -1
    return lock, holder, ttl


def _unknown_job(instance, ref: str, job_id: str, rid: str | None) -> str:
    named = f"request id {rid!r} (job id {job_id})" if rid else \
        f"job id {job_id} (nor about it as a request id)"
    settings = instance.settings
    return (f"ares knows nothing about {named}: no submission record, lock, "
            "job record, worker reservation, fence or stored result in "
            f"namespace {settings.namespace!r} (Redis "
            f"{settings.redis_address}, etcd {settings.etcd_address}). Check "
            f"the spelling of {ref!r} and the app given to -A; a request id "
            f"is forgotten {settings.dedup_ttl}s (ares_dedup_ttl) after its "
            "submission, and a job submitted without a request id is known "
            "only once a worker takes it")


@ares.command(cls=CeleryCommand)
@click.argument("ref")
@click.pass_context
def job(ctx: click.Context, ref: str) -> None:
    """Who holds a job's lease, its token, and whether it is committed.

    REF is a request id or a job id. One that ares has no record of is an
    error (exit status 1), not a job shown as pending.
    """
    instance = _ares(ctx)
    services = instance.services
    job_id, rid = _job_id(instance, ref)
    candidates = [(job_id, rid)]
    if rid is None:
        # A UUID is a job id, or a request id that happens to be a UUID.
        candidates.append((job_id_for(instance.settings.namespace, ref), ref))
    try:
        with unavailable_as_ares_error(instance.settings.redis_url):
            for job_id, rid in candidates:
                view = read_job(services, instance.app.backend, job_id, rid)
                if view.known:
                    break
    except AresError as exc:
        raise _fail(exc) from exc
    if not view.known:
        raise click.ClickException(
            _unknown_job(instance, ref, candidates[0][0], candidates[0][1]))
    decoded, lock, holder = view.record, view.lock, view.holder
    rid = view.request_id
    click.echo(f"job        {view.job_id}"
               + (f" (request id {rid!r})" if rid else ""))
    if view.dedup:
        click.echo(f"submitted  {view.dedup.get('state', '?')} "
                   f"(task {view.dedup.get('task', '?')})")
    if lock is not None:
        click.echo(f"lease      held by {holder.get('host')}:{holder.get('pid')} "
                   f"token {lock.create_revision}, lease {lock.lease:x} "
                   f"ttl {view.ttl}s")
    else:
        click.echo("lease      not held")
    click.echo(f"attempts   {view.attempts} (holders that took the job and "
               "did not give it back; a retry or a preemption does not "
               "count)")
    if view.priority is not None:
        click.echo(f"priority   {view.priority} (0-9, higher is more urgent)")
    click.echo(f"fence      {decoded.get('fence', '-')}")
    if "committed" in decoded:
        click.echo(f"committed  yes: {decoded.get('state')} with token "
                   f"{decoded['committed']}")
    else:
        click.echo(f"committed  no (state {view.meta.get('status')})")
    if decoded.get("fenced"):
        click.echo(f"rejected   {decoded['fenced']} zombie commit(s)")
    checkpoint = view.checkpoint
    if checkpoint is not None:
        at = datetime.fromtimestamp(checkpoint.at, timezone.utc)
        click.echo(f"checkpoint {at.isoformat(timespec='seconds')} "
                   f"({checkpoint.size} bytes, token {checkpoint.token})")
    else:
        click.echo("checkpoint none")


@ares.command(cls=CeleryCommand)
@click.argument("job_id")
@click.pass_context
def release(ctx: click.Context, job_id: str) -> None:
    """Delete a job's lock, only if its holder's lease is gone."""
    instance = _ares(ctx)
    services = instance.services
    try:
        lock, holder, ttl = _read_lock(services, job_id)
        if lock is None:
            click.echo(f"job {job_id}: no lock held; nothing to release")
            return
        if ttl > 0:
            raise click.ClickException(
                f"refusing: job {job_id} is held by {holder.get('host')}:"
                f"{holder.get('pid')} whose lease {lock.lease:x} is alive "
                f"({ttl}s left); it frees itself if that worker dies")
        released = services.locks.release(job_id, lock.create_revision)
    except AresError as exc:
        raise _fail(exc) from exc
    if not released:
        raise click.ClickException(
            f"job {job_id}: the lock changed while releasing; run it again")
    click.echo(f"job {job_id}: released lock (token {lock.create_revision})")


@ares.command(cls=CeleryCommand)
@click.argument("ref")
@click.option("--timeout", default=1.0, show_default=True, type=float,
              help="seconds to wait for workers to confirm they forgot a "
                   "revoke of the job")
@click.pass_context
def forget(ctx: click.Context, ref: str, timeout: float) -> None:
    """Retire a request id (or job id) so a retry runs the job again.

    Deletes its dedup record, result and commit marker, and etcd job
    record, and makes live workers forget a revoke of it. Refused while a
    live worker holds the job's lock.
    """
    from .exactly_once.retire import JobRetirer  # only this command needs it

    instance = _ares(ctx)
    job_id, rid = _job_id(instance, ref)
    retirer = JobRetirer(instance.services, instance.app.backend,
                         instance.app.control, broadcast_timeout=timeout)
    try:
        with unavailable_as_ares_error(instance.settings.redis_url):
            done = retirer.retire(job_id, rid)
    except AresError as exc:
        raise _fail(exc) from exc
    named = f" (request id {done.request_id!r})" if done.request_id else ""
    if not done.found:
        raise click.ClickException(
            f"nothing to forget: job {job_id}{named} has no dedup record, "
            "result, job record or revoke on a live worker")
    click.echo(f"job {job_id}{named}: forgotten")
    for item in done.removed:
        click.echo(f"  removed  {item}")
    if done.unrevoked_on:
        click.echo(f"  revoke   forgotten by {', '.join(done.unrevoked_on)}")
    if done.broadcast_error:
        click.echo(f"  warning  workers were not told to forget a revoke "
                   f"({done.broadcast_error}); a worker that saw one still "
                   "marks the job REVOKED", err=True)
    if done.request_id is None:
        click.echo("  warning  no request id found for this job id: its "
                   "dedup record (if any) stays until it expires; run "
                   "forget with the request id", err=True)
    else:
        click.echo(f"a retry with request id {done.request_id!r} runs the "
                   "job again (same job id)")
