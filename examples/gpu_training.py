"""GPU-aware routing on this machine, no GPUs needed, in under a minute.

Starts a private Redis and etcd and two real ``celery worker`` processes that
pretend to be two GPU hosts: ``dgx1`` (a DGX-1 with V100s, hybrid cube-mesh
NVLink) and ``a100`` (a DGX A100, NVSwitch). Then submits 4-GPU NVLink
training jobs, one of them twice with the same request id, and prints where
each ran: host, GPUs, ``CUDA_VISIBLE_DEVICES`` and fencing token.

    python -m examples.gpu_training
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ares_celery.testing import EtcdServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
HOSTS = {"dgx1": "dgx1-v100", "a100": "dgx-a100"}
JOBS = ["resnet-a", "resnet-b", "bert-a", "bert-b"]


def start_worker(host: str, mock: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "--quiet", "-A", "examples.gpu_training_app",
         "worker", "-c", "2", "-n", f"train@{host}", "--without-mingle",
         "--without-gossip", "-l", "warning"],
        cwd=ROOT, env=dict(env, ARES_MOCK_GPUS=mock), start_new_session=True)


def main() -> int:
    redis_server, etcd_server = RedisServer(), EtcdServer()
    redis_server.start()
    etcd_server.start()
    env = dict(os.environ, DEMO_BROKER=f"{redis_server.url}/0",
               DEMO_ETCD=etcd_server.endpoint)
    env.pop("ARES_MOCK_GPUS", None)
    env.pop("ARES_HOST", None)  # the host identity comes from -n train@<host>
    os.environ.update({k: env[k] for k in ("DEMO_BROKER", "DEMO_ETCD")})
    print(f"redis  : {redis_server.url} (pid {redis_server.proc.pid})")
    print(f"etcd   : {etcd_server.endpoint} (pid {etcd_server.proc.pid})")
    workers = {host: start_worker(host, mock, env) for host, mock in HOSTS.items()}
    try:
        from ares_celery.gpu.inventory import InventoryCache
        from examples import gpu_training_app as training

        names = [f"train@{host}" for host in HOSTS]
        deadline = time.monotonic() + 60
        while len(training.app.control.ping(names, timeout=0.5)) < len(names):
            dead = [h for h, w in workers.items() if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SystemExit(f"workers did not start (exited: {dead})")
        services = training.ares.services
        cache = InventoryCache(services.etcd, services.keys).start()
        if not cache.wait_for(lambda h: set(HOSTS) <= set(h), 30):
            raise SystemExit("GPU hosts did not appear in the inventory")
        for host, mock in HOSTS.items():
            inv = cache.get(host)
            print(f"worker : train@{host} (pid {workers[host].pid}, mock GPUs {mock!r}, "
                  f"queue {inv.queue}, {len(inv.free)}/{len(inv.topology)} GPUs free)")
        print()

        request = training.train.gpu_request
        print(f"submitting {len(JOBS)} jobs of {request.describe()}, "
              f"then '{JOBS[0]}' again with the same request id")
        results = {}
        for model in JOBS:
            results[model] = training.train.apply_async(
                (model,), {"seconds": 1.5}, request_id=f"train-{model}")
        duplicate = training.train.apply_async(
            (JOBS[0],), {"seconds": 1.5}, request_id=f"train-{JOBS[0]}")
        values = {model: r.get(timeout=60) for model, r in results.items()}
        dup_value = duplicate.get(timeout=60)

        print(f"\n{'job':10} {'host':6} {'GPUs':14} {'CUDA_VISIBLE_DEVICES':22} "
              f"{'score GB/s':>10} {'token':>6}  executions")
        executions = {}
        for model, v in values.items():
            job_id = results[model].id
            executions[model] = int(training.store.get(f"train:executions:{job_id}") or 0)
            print(f"{model:10} {v['host']:6} {str(v['gpus']):14} "
                  f"{v['cuda_visible_devices']:22} {v['placement_score']:>10.1f} "
                  f"{v['fencing_token']:>6}  {executions[model]}")
        same_id = duplicate.id == results[JOBS[0]].id and dup_value == values[JOBS[0]]
        print(f"\nduplicate of '{JOBS[0]}': job id {duplicate.id} "
              f"({'same job, same result' if same_id else 'DIFFERENT'})")
        used = sorted({v["host"] for v in values.values()})
        print(f"hosts used: {', '.join(used)}")
        overlap_ok = no_shared_gpus(values)
        first_on_a100 = values[JOBS[0]]["host"] == "a100"
        print(f"first job on the NVSwitch host (a100): {'YES' if first_on_a100 else 'NO'}")
        print(f"no GPU shared by overlapping jobs: {'YES' if overlap_ok else 'NO'}")
        all_free = cache.wait_for(lambda h: all(
            h[host].free == frozenset(h[host].topology.indices) for host in HOSTS), 15)
        print(f"all GPUs free again: {'YES' if all_free else 'NO'}")
        once = same_id and all(n == 1 for n in executions.values())
        print("\nexactly once:", "YES" if once else "NO")
        ok = once and overlap_ok and first_on_a100 and all_free
        return 0 if ok else 1
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers.values():
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        redis_server.cleanup()
        etcd_server.cleanup()


def no_shared_gpus(values: dict[str, dict]) -> bool:
    """Jobs that ran on the same host at the same time had disjoint GPUs."""
    items = list(values.values())
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            if a["host"] == b["host"] and overlap and set(a["gpus"]) & set(b["gpus"]):
                return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
