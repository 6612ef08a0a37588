"""A worker that holds more messages than one etcd Txn may carry records
every one of them under its lease (``reserved/<lease>/<job>``)."""

from __future__ import annotations

import pytest

from ares_celery.clients.etcd import MAX_TXN_OPS
from tests.processes import WorkerProcess, wait_for
from tests.records import KEYS

pytestmark = pytest.mark.integration


def test_held_messages_move_to_a_new_lease_in_txns_etcd_accepts(jobs):
    """Countdown messages wait in the worker's timer, all held at once.
    When the worker's session lease is replaced (here revoked; in
    production an etcd outage longer than the lease TTL), every record
    moves: a put under the new lease and a delete under the old one, 2 ops
    per message. Written as one Txn that was over etcd's limit (128 ops by
    default) for 64 messages or more: etcd refused it with
    INVALID_ARGUMENT, which ended the tracker's thread, so nothing the
    worker held from then on was recorded, and its death left those
    messages to the broker's visibility timeout."""
    count = MAX_TXN_OPS // 2 + 36
    etcd = jobs.ares.services.etcd
    ids = {jobs.record.apply_async((n,), request_id=f"held-{n}",
                                   countdown=600).id for n in range(count)}

    def leases() -> dict[str, set[str]]:
        """Lease (hex) -> the submitted jobs recorded under it."""
        kvs, _ = etcd.range_prefix_with_revision(KEYS.reserved_prefix())
        found: dict[str, set[str]] = {}
        for kv in kvs:
            lease, job = kv.key[len(KEYS.reserved_prefix()):].split("/")
            if job in ids:
                found.setdefault(lease, set()).add(job)
        return found

    worker = WorkerProcess(jobs.app).start()
    try:
        wait_for(lambda: list(leases().values()) == [ids], 30,
                 f"all {count} held messages to be recorded")
        (first,) = leases()
        etcd.revoke_lease(int(first, 16))
        wait_for(lambda: (now := leases()) and first not in now
                 and list(now.values()) == [ids], 30,
                 f"all {count} records to move to the worker's new lease")
    finally:
        worker.kill()
