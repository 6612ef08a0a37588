"""GPU-aware routing on this machine, no GPUs needed, in under a minute.

Starts a private Redis and etcd and two real ``celery worker`` processes that
pretend to be two GPU hosts: ``dgx1`` (a DGX-1 with V100s, hybrid cube-mesh
NVLink) and ``a100`` (a DGX A100, NVSwitch). Then submits 4-GPU NVLink
training jobs, one of them twice with the same request id, and prints where
each ran: host, GPUs, ``CUDA_VISIBLE_DEVICES`` and fencing token.

    python -m examples.gpu_training
"""

from __future__ import annotations

from ares_celery.gpu.inventory import InventoryCache
from examples.local_cluster import LocalCluster

HOSTS = {"dgx1": "dgx1-v100", "a100": "dgx-a100"}
JOBS = ["resnet-a", "resnet-b", "bert-a", "bert-b"]


def main() -> int:
    workers = {f"train@{host}": {"ARES_MOCK_GPUS": mock} for host, mock in HOSTS.items()}
    with LocalCluster("examples.gpu_training_app", workers) as cluster:
        return run(cluster)


def run(cluster: LocalCluster) -> int:
    training = cluster.app
    services = training.ares.services
    cache = InventoryCache(services.etcd, services.keys).start()
    if not cache.wait_for(lambda h: set(HOSTS) <= set(h), 30):
        raise SystemExit("GPU hosts did not appear in the inventory")
    for host, mock in HOSTS.items():
        inv = cache.get(host)
        print(f"host   : {host} (mock GPUs {mock!r}, queue {inv.queue}, "
              f"{len(inv.free)}/{len(inv.topology)} GPUs free)")
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
