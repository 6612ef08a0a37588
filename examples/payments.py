"""Idempotent payments: each payment submitted several times, debited once.

Starts a private Redis, etcd and a real ``celery worker``; opens two
accounts in a SQLite file; submits three payments four times each with the
payment id as the request id (three submissions at once, then a retry);
prints the balances and, per payment, how many job ids the submissions got,
how often the body ran and what the store did. Then it replays the write of
a worker whose lease was taken over (an older fencing token) and shows the
store refusing it.

    python -m examples.payments
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from examples import payment_ledger
from examples.local_cluster import LocalCluster

OPENING = {"alice": 10_000, "bob": 5_000}
PAYMENTS = [("pay-1001", "alice", 2_500), ("pay-1002", "bob", 1_250),
            ("pay-1003", "alice", 999)]
AT_ONCE = 3


def submit_many(debit, payment: tuple[str, str, int]) -> list:
    """``AT_ONCE`` concurrent submissions, then one retry: same request id."""
    results: list = []

    def submit() -> None:
        results.append(debit.apply_async(payment, request_id=payment[0]))

    threads = [threading.Thread(target=submit) for _ in range(AT_ONCE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.append(debit.apply_async(payment, request_id=payment[0]))
    return results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ares-payments-") as tmp:
        ledger = Path(tmp) / "ledger.sqlite3"
        os.environ["PAYMENTS_DB"] = str(ledger)
        payment_ledger.open_accounts(ledger, OPENING)
        with LocalCluster("examples.payments_app") as cluster:
            return run(cluster.app.debit, ledger)


def run(debit, ledger: Path) -> int:
    print(f"{len(PAYMENTS)} payments, each submitted {AT_ONCE + 1} times "
          f"({AT_ONCE} at once, then a retry) with its payment id as request id\n")
    submissions = {p[0]: submit_many(debit, p) for p in PAYMENTS}
    values = {pid: rs[-1].get(timeout=30) for pid, rs in submissions.items()}
    print(f"{'payment':9} {'account':7} {'cents':>6} {'submits':>7} {'job ids':>7} "
          f"{'body runs':>9}  {'store':15} {'token':>5}")
    ok = True
    for pid, account, cents in PAYMENTS:
        ids = {r.id for r in submissions[pid]}
        runs = payment_ledger.executions(ledger, pid)
        value = values[pid]
        print(f"{pid:9} {account:7} {cents:>6} {len(submissions[pid]):>7} {len(ids):>7} "
              f"{runs:>9}  {value['outcome']:15} {value['fencing_token']:>5}")
        ok &= len(ids) == 1 and runs == 1 and value["outcome"] == payment_ledger.APPLIED
    expected = dict(OPENING)
    for _, account, cents in PAYMENTS:
        expected[account] -= cents
    after = payment_ledger.balances(ledger)
    print("\nbalances (cents):")
    for account, opening in OPENING.items():
        print(f"  {account:6} {opening:>6} -> {after[account]:>6}  "
              f"(expected {expected[account]})")
    ok &= after == expected

    pid, account, cents = PAYMENTS[0]
    token = values[pid]["fencing_token"]
    stale = payment_ledger.debit(ledger, pid, account, cents, token - 1)
    print(f"\nreplayed write of {pid} by a lease holder with an older token "
          f"({token - 1} < {token}): {stale}")
    ok &= stale == payment_ledger.STALE_TOKEN and payment_ledger.balances(ledger) == after
    print(f"balances unchanged: {'YES' if payment_ledger.balances(ledger) == after else 'NO'}")
    print("\neach payment applied exactly once:", "YES" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
