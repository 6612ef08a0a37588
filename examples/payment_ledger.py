"""An external store for the payments example: accounts in a SQLite file,
debited only through :func:`debit`, which is fenced and idempotent.

Why both: the job id makes a re-run of the same payment find the first
application and do nothing (idempotent), and the fencing token makes a
worker that lost its lease lose against the newer holder: once a newer
token has touched a payment, ``UPDATE ... WHERE fence <= token`` matches no
row for the older one. The body of an exactly-once job may run twice after a
crash or a pause; with this store the money moves once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

APPLIED, ALREADY_APPLIED, STALE_TOKEN = "applied", "already applied", "stale token"

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY, account TEXT NOT NULL, cents INTEGER NOT NULL,
    fence INTEGER NOT NULL, applied INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS executions (
    payment_id TEXT NOT NULL, token INTEGER NOT NULL, pid INTEGER NOT NULL);
"""


@contextmanager
def connect(path: str | Path) -> Iterator[sqlite3.Connection]:
    """An autocommit connection, closed after use; a multi-statement write
    takes the file's write lock itself (``BEGIN IMMEDIATE``)."""
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    try:
        db.executescript(SCHEMA)
        yield db
    finally:
        db.close()


def open_accounts(path: str | Path, balances: dict[str, int]) -> None:
    with connect(path) as db:
        db.executemany("INSERT OR REPLACE INTO accounts VALUES (?, ?)",
                       balances.items())


def record_execution(path: str | Path, payment_id: str, token: int, pid: int) -> None:
    """Count body runs (not fenced on purpose: it shows how often the body ran)."""
    with connect(path) as db:
        db.execute("INSERT INTO executions VALUES (?, ?, ?)", (payment_id, token, pid))


# --8<-- [start:debit]
def debit(path: str | Path, payment_id: str, account: str, cents: int,
          token: int) -> str:
    """Debit ``account`` once for ``payment_id``, if ``token`` is not stale."""
    with connect(path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO payments (payment_id, account, cents, fence) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (payment_id) DO UPDATE "
                "SET fence = excluded.fence WHERE payments.fence <= excluded.fence",
                (payment_id, account, cents, token))
            fence, applied = db.execute(
                "SELECT fence, applied FROM payments WHERE payment_id = ?",
                (payment_id,)).fetchone()
            if fence != token:
                outcome = STALE_TOKEN            # a newer holder has been here
            elif applied:
                outcome = ALREADY_APPLIED        # an earlier run of this job did it
            else:
                db.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?",
                           (cents, account))
                db.execute("UPDATE payments SET applied = 1 WHERE payment_id = ?",
                           (payment_id,))
                outcome = APPLIED
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return outcome
# --8<-- [end:debit]


def balances(path: str | Path) -> dict[str, int]:
    with connect(path) as db:
        return dict(db.execute("SELECT id, balance FROM accounts ORDER BY id"))


def executions(path: str | Path, payment_id: str) -> int:
    with connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM executions WHERE payment_id = ?",
                          (payment_id,)).fetchone()[0]


def payment(path: str | Path, payment_id: str) -> tuple[int, int] | None:
    """``(fence, applied)`` of a payment, or None if it never reached the store."""
    with connect(path) as db:
        return db.execute("SELECT fence, applied FROM payments WHERE payment_id = ?",
                          (payment_id,)).fetchone()
