"""Where ares keeps things: the key layout of one namespace in Redis and
etcd, in one place so every reader and writer agrees (and tests need not
hard-code it)."""

from __future__ import annotations


class Keys:
    """Key layout of one namespace in Redis and etcd."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def dedup(self, request_id: str) -> str:
        return f"{self.namespace}:dedup:{request_id}"

    def job(self, job_id: str) -> str:
        """Redis hash with the job's fence (highest token) and commit."""
        return f"{self.namespace}:job:{job_id}"

    def checkpoint(self, job_id: str) -> str:
        """Redis hash with the job's latest checkpoint (state, token, time,
        size) when the result store is Redis: next to the job hash whose
        fence guards it."""
        return f"{self.namespace}:checkpoint:{job_id}"

    def fenced_log(self) -> str:
        """Redis stream recording every rejected (fenced) commit."""
        return f"{self.namespace}:fenced"

    def purged(self) -> str:
        """Redis: when the last ``celery purge`` ended (ms, Redis clock): a
        job published before it and not committed may have been purged, so
        a retry publishes it again (see ``exactly_once.purge``)."""
        return f"{self.namespace}:purged"

    def lock_prefix(self) -> str:
        return f"/{self.namespace}/locks/"

    def lock(self, job_id: str) -> str:
        return f"{self.lock_prefix()}{job_id}"

    def result(self, job_id: str) -> str:
        return f"/{self.namespace}/results/{job_id}"

    def done(self, job_id: str) -> str:
        return f"/{self.namespace}/done/{job_id}"

    def checkpoint_record(self, job_id: str) -> str:
        """etcd: the job's latest checkpoint when the result store is etcd
        (written only while the writer's lock is there)."""
        return f"/{self.namespace}/checkpoints/{job_id}"

    def fenced(self, job_id: str, token: int) -> str:
        return f"/{self.namespace}/fenced/{job_id}/{token}"

    def inventory_prefix(self) -> str:
        return f"/{self.namespace}/inventory/"

    def inventory_topology(self, host: str) -> str:
        """A host's topology (rarely changes), attached to its lease."""
        return f"/{self.namespace}/inventory/{host}/topology"

    def inventory_state(self, host: str) -> str:
        """A host's free/busy GPUs (changes per job), attached to its lease."""
        return f"/{self.namespace}/inventory/{host}/state"

    def host_queues(self) -> str:
        """Redis hash: every GPU host ever registered -> its queue (the
        janitor drains the queues of hosts that left the inventory)."""
        return f"{self.namespace}:gpu:queues"

    def job_record_prefix(self) -> str:
        return f"/{self.namespace}/jobs/"

    def job_record(self, job_id: str) -> str:
        """etcd: what it takes to publish the job again and who held it
        last; put with every lock taken (its version counts them), so it
        outlives the holder and lets a recoverer re-dispatch the job."""
        return f"{self.job_record_prefix()}{job_id}"

    def released(self, job_id: str) -> str:
        """etcd: put each time a live holder gives the lock back without a
        commit (retry, re-route): its version counts the tenures that did
        not end in a holder's death."""
        return f"/{self.namespace}/released/{job_id}"

    def reserved_prefix(self) -> str:
        return f"/{self.namespace}/reserved/"

    def reserved_by(self, lease_id: int) -> str:
        """etcd: the prefix of every message the worker on ``lease_id``
        holds."""
        return f"{self.reserved_prefix()}{lease_id:x}/"

    def reserved(self, lease_id: int, job_id: str) -> str:
        """etcd: a message a worker holds but has not finished (prefetched,
        waiting for its ETA, running). Not on the worker's lease: it must
        outlive the worker (see :meth:`worker`)."""
        return f"{self.reserved_by(lease_id)}{job_id}"

    def workers_prefix(self) -> str:
        return f"/{self.namespace}/workers/"

    def worker(self, lease_id: int) -> str:
        """etcd: present while the worker on ``lease_id`` lives (on that
        lease): when it goes, the worker's reserved messages are orphans."""
        return f"{self.workers_prefix()}{lease_id:x}"

    def election(self, name: str) -> str:
        """etcd: the key whose holder leads ``name`` (one actor at a time)."""
        return f"/{self.namespace}/election/{name}"
