"""The payments example's Celery app: one exactly-once debit task.

The task body debits an account in an external SQLite store
(:mod:`examples.payment_ledger`) and passes ``ares.current().fencing_token``
with the write, so the store can refuse a worker that lost its lease.
"""

from __future__ import annotations

import os

from examples import payment_ledger
from examples.example_app import make_app

app, ares = make_app("payments")
LEDGER = os.environ.get("PAYMENTS_DB", "payments.sqlite3")


@ares.task(name="payments.debit")
def debit(payment_id: str, account: str, cents: int) -> dict:
    ctx = ares.current()
    payment_ledger.record_execution(LEDGER, payment_id, ctx.fencing_token, os.getpid())
    ctx.check()  # a zombie stops here if it already knows; the fence is the real guard
    outcome = payment_ledger.debit(LEDGER, payment_id, account, cents, ctx.fencing_token)
    return {"payment_id": payment_id, "account": account, "cents": cents,
            "outcome": outcome, "fencing_token": ctx.fencing_token,
            "job_id": ctx.job_id}
