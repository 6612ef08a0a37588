"""The job lock Txn over etcd's JSON gateway (HTTP) vs gRPC, and gRPC
created after fork.

Against a private etcd (``--fsync`` to make it durable; the default skips
fsync as the test servers do), in two parts:

* latency: ``--txns`` lock-shaped transactions per transport (the shape
  ``JobLocks.acquire`` sends: create the lock on the session lease if it
  is absent, put the job record with its previous value, read the released
  key and the commit marker; on failure read the holder), one after the
  other from one process, printing p50/p99/mean wall time and the CPU
  per Txn of the client process and of etcd (its JSON gateway runs inside
  etcd and calls etcd's gRPC API over loopback: on a small machine that
  CPU competes with the workers). Each transport runs in its own forked child, so this
  process never holds a channel.
* fork: ``--children`` processes forked from this one, each marked
  fork-free (as ``worker_process_init`` does in a pool child), each
  creating its gRPC channel after the fork and running ``--per-child``
  lock Txns; the parent never imports ``grpc``. Prints how many children
  completed every Txn over gRPC.

    python benchmarks/etcd_transport.py --txns 2000 --children 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ares_celery.clients import etcd_grpc  # noqa: E402
from ares_celery.clients.etcd import (  # noqa: E402
    EtcdGateway,
    cmp_create_revision,
    op_put,
    op_range,
)
from ares_celery.testing import EtcdServer  # noqa: E402


def lock_txn(etcd: EtcdGateway, job: str, lease: int, records_lease: int):
    lock, record = f"/bench/lock/{job}", f"/bench/job/{job}"
    done = op_range(f"/bench/done/{job}")
    holder = json.dumps({"host": "bench", "pid": os.getpid(),
                         "lease": lease, "nonce": uuid.uuid4().hex})
    return etcd.txn(
        compare=[cmp_create_revision(lock, 0)],
        success=[op_put(lock, holder, lease),
                 op_put(record, f'{{"holder":{holder},"task":"bench.noop"}}',
                        records_lease, prev_kv=True),
                 op_range(f"/bench/released/{job}"), done],
        failure=[op_range(lock), done])


def gateway(endpoint: str, transport: str) -> EtcdGateway:
    if transport == "grpc":
        etcd_grpc.mark_fork_free()
    return etcd_grpc.process_gateway([endpoint], 2.0, None, transport)


def server_cpu(pid: int) -> float:
    """etcd's CPU seconds so far (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(endpoint: str, transport: str, txns: int, etcd_pid: int) -> dict:
    """In this (forked) process: ``txns`` lock Txns, after a warm-up."""
    etcd = gateway(endpoint, transport)
    lease, records = etcd.grant_lease(60), etcd.grant_lease(3600)
    run = uuid.uuid4().hex[:8]
    for i in range(50):
        lock_txn(etcd, f"warm-{run}-{i}", lease, records)
    walls = []
    server0 = server_cpu(etcd_pid)
    cpu0 = time.process_time()
    for i in range(txns):
        start = time.perf_counter()
        result = lock_txn(etcd, f"{run}-{i}", lease, records)
        walls.append(time.perf_counter() - start)
        assert result.succeeded
    cpu = time.process_time() - cpu0
    server = server_cpu(etcd_pid) - server0
    walls.sort()
    return {"transport": etcd.transport,
            "p50": walls[len(walls) // 2] * 1e3,
            "p99": walls[int(len(walls) * 0.99)] * 1e3,
            "mean": statistics.fmean(walls) * 1e3,
            "cpu": cpu / txns * 1e3, "server": server / txns * 1e3}


def in_child(work) -> tuple[int, int]:
    """Fork; the child runs ``work()`` and writes its JSON to a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            out = work()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    return pid, read


def collect(pid: int, read: int) -> dict:
    with os.fdopen(read) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "no answer"}


def fork_child(endpoint: str, per_child: int) -> dict:
    etcd = gateway(endpoint, "grpc")
    lease, records = etcd.grant_lease(60), etcd.grant_lease(3600)
    run = uuid.uuid4().hex[:8]
    ok = sum(lock_txn(etcd, f"fork-{run}-{i}", lease, records).succeeded
             for i in range(per_child))
    return {"transport": etcd.transport, "ok": ok,
            "grpc_calls": getattr(etcd, "grpc_calls", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--txns", type=int, default=2000)
    parser.add_argument("--children", type=int, default=15)
    parser.add_argument("--per-child", type=int, default=100)
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args()
    with EtcdServer(fsync=args.fsync) as server:
        endpoint = server.endpoint
        print(f"etcd {'with' if args.fsync else 'without'} fsync, "
              f"{os.cpu_count()} CPUs, {args.txns} lock Txns per transport")
        print(f"{'transport':<10}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
              f"{'client CPU ms':>15}{'etcd CPU ms':>13}")
        for transport in ("http", "grpc"):
            row = collect(*in_child(
                lambda t=transport: measure(endpoint, t, args.txns,
                                            server.proc.pid)))
            if "error" in row:
                print(f"{transport:<10}failed: {row['error']}")
                continue
            print(f"{row['transport']:<10}{row['p50']:>9.3f}{row['p99']:>9.3f}"
                  f"{row['mean']:>9.3f}{row['cpu']:>15.3f}"
                  f"{row['server']:>13.3f}")
        started = [in_child(lambda: fork_child(endpoint, args.per_child))
                   for _ in range(args.children)]
        rows = [collect(pid, read) for pid, read in started]
        good = sum(1 for r in rows if r.get("transport") == "grpc"
                   and r.get("ok") == args.per_child)
        errors = sorted({r["error"] for r in rows if "error" in r})
        parent_clean = not any(m.split(".")[0] == "grpc" for m in sys.modules)
        print(f"fork: {good}/{args.children} children created their channel "
              f"after fork and ran {args.per_child}/{args.per_child} lock "
              f"Txns over gRPC; parent imported grpc: {not parent_clean}"
              + (f"; errors: {errors}" if errors else ""))


if __name__ == "__main__":
    main()
