"""Run the whole product on this machine in under a minute.

Starts a private Redis and etcd, a real ``celery worker`` that pretends to
be a DGX-1 (mock GPU topology), submits one payment five times at once with
the same request id, and shows that it ran once, with which fencing token,
and where a 4-GPU job would be placed.
"""

from __future__ import annotations

import os
import threading

from examples.local_cluster import LocalCluster

MOCK = os.environ.get("ARES_MOCK_GPUS", "dgx1-v100")


def main() -> int:
    workers = {"demo@dgx1": {"ARES_MOCK_GPUS": MOCK}}
    with LocalCluster("examples.demo_app", workers) as cluster:
        demo_app = cluster.app
        print(f"(worker demo@dgx1 has mock GPUs {MOCK!r})\n")
        results = []

        def submit() -> None:
            results.append(demo_app.charge.apply_async(
                ("acct-1", 500), request_id="order-77"))

        threads = [threading.Thread(target=submit) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        retry = demo_app.charge.apply_async(("acct-1", 500),
                                            request_id="order-77")
        ids = {r.id for r in results} | {retry.id}
        print("6 submissions of request_id='order-77' (5 concurrent + 1 retry)")
        print(f"  job ids returned : {sorted(ids)}")
        value = retry.get(timeout=30)
        ledger = demo_app.ledger
        execs = int(ledger.get(f"demo:executions:{retry.id}") or 0)
        charges = int(ledger.get("demo:charges:acct-1") or 0)
        print(f"  executions       : {execs}")
        print(f"  ledger charges   : {charges}")
        print(f"  fencing token    : {value['fencing_token']}")
        print(f"  result           : {value}\n")
        show_placement()
        ok = len(ids) == 1 and execs == 1 and charges == 1
        print("\nexactly once:", "YES" if ok else "NO")
        return 0 if ok else 1


def show_placement() -> None:
    try:
        from ares_celery.gpu import best_placement, mock_topology
    except ImportError:
        print("(GPU placement not available in this build)")
        return
    topo = mock_topology(MOCK, host="dgx1")
    print(f"GPU placement on mock topology {MOCK!r} ({len(topo.gpus)} GPUs):")
    for k in (2, 4, 8):
        p = best_placement(topo, k)
        print(f"  k={k}: GPUs {list(p.gpus)}  score {p.score:.1f} GB/s  "
              f"({p.reason})")


if __name__ == "__main__":
    raise SystemExit(main())
